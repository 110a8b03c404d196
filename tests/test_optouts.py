"""Opt-outs through the real fetch path: robots.txt (for our token and AI crawlers' tokens, RFC 9309's 4xx and 5xx,
fetched once per origin, under the address policy and the row's deadline), TDMRep and X-Robots-Tag. The crawl's
counts of each kind in the manifest and `clipline status`, and what a refresh does with them, are tested with the
other crawl runs on Ray in test_crawl_refresh.py, so this file starts no Ray.

Each test serves its own small web on a loopback address (127.0.0.1, or the aliases 127.0.0.2/3 where the address
policy is tested) and hands its fetcher a robots cache of its own, so nothing is shared between tests. A robots.txt
that must be slow waits on an Event the test sets; nothing sleeps to synchronise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.stages.crawl.fetch import Fetcher
from pipelines.stages.crawl.netpolicy import AddressPolicy
from pipelines.stages.crawl.robots import RobotsCache
from tests.support.optoutweb import OptoutWeb
from tests.test_fetch import fetcher


@pytest.fixture
def site() -> Iterator[OptoutWeb]:
    with OptoutWeb() as s:
        yield s


def polite(**kw) -> Fetcher:
    """A fetcher that honours robots.txt, with a robots cache of its own."""
    args = {"robots_txt": True, "robots": RobotsCache(), "optout_user_agents": ["GPTBot", "CCBot"]} | kw
    return fetcher(**args)


def outcome(f: Fetcher, url: str) -> tuple[str, str | None]:
    got = f.fetch(url)
    return got.status, got.error_class


def test_robots_txt_disallowing_our_token_opts_those_urls_out_only(site):
    site.serve("User-agent: clipline\nDisallow: /img/private\n\nUser-agent: *\nAllow: /\n")
    f = polite()
    got = f.fetch(site.img("private-1"))
    assert (got.status, got.error_class, got.data) == ("opted_out", "robots_txt", None)
    assert "robots.txt disallows this URL for user-agent clipline" in got.error_message
    assert outcome(f, site.img("public-1")) == ("success", None)
    assert site.hits == {"/robots.txt": 1, "/img/public-1": 1}  # the opted-out image was never requested


def test_robots_txt_disallowing_an_ai_token_opts_out_whatever_our_own_token(site):
    site.serve("User-agent: GPTBot\nDisallow: /\n\nUser-agent: *\nDisallow:\n")
    got = polite().fetch(site.img("a"))
    assert (got.status, got.error_class) == ("opted_out", "robots_txt")
    assert "user-agent gptbot" in got.error_message
    # without GPTBot among the tokens honoured, the same rules let the crawler in
    assert outcome(polite(optout_user_agents=["CCBot"]), site.img("a")) == ("success", None)


@pytest.mark.parametrize("robots", ["User-agent: *\nAllow: /\n", "User-agent: otherbot\nDisallow: /\n", ""])
def test_robots_txt_that_allows_us_lets_the_image_through(site, robots):
    site.serve(robots)
    assert outcome(polite(), site.img("b")) == ("success", None)


@pytest.mark.parametrize("status", [404, 403, 410])
def test_a_4xx_robots_txt_allows_everything(site, status):
    site.serve("User-agent: *\nDisallow: /\n", status=status)  # the body of an error page is not rules
    assert outcome(polite(), site.img("c")) == ("success", None)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_5xx_or_429_robots_txt_disallows_the_host_for_the_error_ttl(site, status):
    site.serve("", status=status)
    f = polite(robots=RobotsCache(ttl=3600, error_ttl=300))
    got = f.fetch(site.img("d"))
    assert (got.status, got.error_class, got.http_status) == ("failed_to_download", "robots_unavailable", None)
    assert f"robots.txt answered HTTP {status}" in got.error_message and "RFC 9309" in got.error_message
    site.serve("User-agent: *\nAllow: /\n")  # the host recovers, but the answer is kept for the error TTL
    assert outcome(f, site.img("e")) == ("failed_to_download", "robots_unavailable")
    assert site.hits == {"/robots.txt": 1}  # no image requested, robots.txt once


def test_answers_are_kept_for_their_ttl_and_asked_again_after_it(site):
    now = [1000.0]
    cache = RobotsCache(ttl=60, error_ttl=5, clock=lambda: now[0])
    f = polite(robots=cache)
    site.serve("", status=500)
    assert outcome(f, site.img("f")) == ("failed_to_download", "robots_unavailable")
    now[0] += 6  # past the error TTL: asked again
    site.serve("User-agent: *\nDisallow: /img/no\n")
    assert outcome(f, site.img("g")) == ("success", None)
    site.serve("User-agent: *\nDisallow: /\n")
    now[0] += 59  # within the TTL of the 200: the rules are not asked again
    assert outcome(f, site.img("h")) == ("success", None)
    now[0] += 2
    assert outcome(f, site.img("i")) == ("opted_out", "robots_txt")
    assert site.hits["/robots.txt"] == 3
    assert f.robots_counts.as_dict() == {"fetches": 3, "hits": 1, "timeouts": 0}


def test_robots_txt_is_fetched_once_for_many_concurrent_rows_of_a_host(site):
    site.serve("User-agent: *\nDisallow: /img/odd\n")
    site.gate.clear()
    cache = RobotsCache()
    f = polite(robots=cache, per_host_connections=4)
    urls = [site.img(f"{'odd' if i % 2 else 'even'}-{i}") for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = pool.map(lambda u: outcome(f, u), urls)
        assert cache.wait_for_waiters(site.origin, 12, timeout=10)  # all twelve wait for the one request
        site.gate.set()
        got = list(results)
    assert got == [("success", None), ("opted_out", "robots_txt")] * 6
    assert site.hits["/robots.txt"] == 1
    assert f.robots_counts.as_dict() == {"fetches": 1, "hits": 11, "timeouts": 0}
    # scheme, host and port name the origin: the same host on another port is another robots.txt
    with OptoutWeb().serve("User-agent: *\nDisallow: /\n") as other:
        assert outcome(f, other.img("even-0")) == ("opted_out", "robots_txt")
        assert other.hits == {"/robots.txt": 1}


def test_a_slow_robots_txt_counts_within_the_rows_deadline(site):
    site.serve("User-agent: *\nAllow: /\n")
    site.gate.clear()  # robots.txt never answers while the test runs
    f = polite(timeout=0.3)
    t0 = time.monotonic()
    got = f.fetch(site.img("slow"))
    assert time.monotonic() - t0 < f.budget + 0.5
    assert (got.status, got.error_class) == ("failed_to_download", "timeout")
    assert "robots.txt could not be fetched" in got.error_message
    # unreachable: the host counts as disallowing everything for the error TTL, without another request
    assert outcome(f, site.img("slow-2")) == ("failed_to_download", "timeout")
    assert site.hits == {"/robots.txt": 1}


def test_a_row_waiting_for_another_rows_robots_txt_gives_up_at_its_own_deadline(site):
    site.serve("User-agent: *\nAllow: /\n")
    site.gate.clear()
    cache = RobotsCache()
    patient, hurried = polite(robots=cache, timeout=5.0), polite(robots=cache, timeout=0.2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(patient.fetch, site.img("patient"))
        assert cache.wait_for_waiters(site.origin, 1, timeout=10)  # its request to robots.txt is under way
        t0 = time.monotonic()
        got = hurried.fetch(site.img("hurried"))
        assert time.monotonic() - t0 < hurried.budget + 0.5
        assert (got.status, got.error_class) == ("failed_to_download", "timeout")
        assert "was still being fetched at this request's deadline" in got.error_message
        site.gate.set()
        assert first.result().status == "success"
    assert hurried.robots_counts.as_dict() == {"fetches": 0, "hits": 1, "timeouts": 1}
    assert site.hits == {"/robots.txt": 1, "/img/patient": 1}


def test_the_robots_txt_request_obeys_the_address_policy():
    # the image host 127.0.0.2 is allowed; its robots.txt redirects into 127.0.0.3, which is denied
    policy = AddressPolicy.from_cidrs(["127.0.0.0/8"], ["127.0.0.3/32"])
    with OptoutWeb("127.0.0.2") as site, OptoutWeb("127.0.0.3") as inner:
        site.serve(status=302, Location=f"{inner.origin}/robots.txt")
        got = polite(policy=policy).fetch(site.img("j"))
        assert (got.status, got.error_class) == ("blocked", "ssrf")
        assert "robots.txt could not be fetched" in got.error_message and "127.0.0.3" in got.error_message
        assert inner.hits == {} and site.hits == {"/robots.txt": 1}  # the image was not requested either
        # with 127.0.0.3 allowed the redirect is followed to the rules there
        inner.serve("User-agent: *\nDisallow: /img/j\n")
        assert outcome(polite(), site.img("j")) == ("opted_out", "robots_txt")
        assert inner.hits == {"/robots.txt": 1} and "/img/j" not in site.hits
    # a denied host: robots.txt is refused before any connection, as the image would be
    with OptoutWeb("127.0.0.3") as denied:
        assert outcome(polite(policy=policy), denied.img("k")) == ("blocked", "ssrf")
        assert denied.hits == {}


def test_with_robots_txt_off_it_is_never_requested(site):
    site.serve("User-agent: *\nDisallow: /\n")
    assert outcome(polite(robots_txt=False), site.img("l")) == ("success", None)
    assert site.hits == {"/img/l": 1}


@pytest.mark.parametrize(("headers", "expected"), [
    ({"tdm_reservation": "1"}, ("opted_out", "tdm_reservation")),
    ({"tdm_reservation": " 1 ", "tdm_policy": "https://example.org/policy.json"}, ("opted_out", "tdm_reservation")),
    ({"tdm_reservation": "0"}, ("success", None)),
    ({"X_Robots_Tag": "noml"}, ("opted_out", "x_robots_tag")),
    ({"X_Robots_Tag": "noai, noimageai"}, ("opted_out", "x_robots_tag")),
    ({"X_Robots_Tag": "clipline: noml"}, ("opted_out", "x_robots_tag")),
    ({"X_Robots_Tag": "gptbot: noai"}, ("opted_out", "x_robots_tag")),  # an AI token we honour
    ({"X_Robots_Tag": "otherbot: noai"}, ("success", None)),
    ({"X_Robots_Tag": "nofollow"}, ("success", None)),
])
def test_response_headers_opt_the_image_out(site, headers, expected):
    f = polite(disallowed=["noai", "noimageai", "noml"])
    got = f.fetch(site.img("m", **headers))
    assert (got.status, got.error_class) == expected
    if expected[0] == "opted_out":
        assert got.http_status == 200 and got.data is None
    if expected[1] == "tdm_reservation":
        assert got.error_message.startswith("tdm-reservation: 1 (TDMRep)")


def test_tdm_reservation_can_be_ignored(site):
    assert outcome(polite(tdm_reservation=False), site.img("n", tdm_reservation="1")) == ("success", None)


def test_a_huge_robots_txt_is_read_up_to_its_cap_and_the_rest_ignored(site):
    filler = "# " + "x" * 1000 + "\n"
    site.serve("User-agent: *\nDisallow: /img/early\n" + filler * 600 + "Disallow: /img/late\n")  # ~600 KB
    f = polite()
    assert outcome(f, site.img("early")) == ("opted_out", "robots_txt")
    assert outcome(f, site.img("late")) == ("success", None)  # past 512 KiB: not read


def test_fetchers_of_a_worker_process_share_its_robots_cache_only_when_their_answers_would_agree():
    a, b = (fetcher(robots_txt=True, optout_user_agents=["GPTBot"]) for _ in range(2))
    assert a.robots is b.robots is not None  # two shard tasks of one crawl in one process
    other_tokens = fetcher(robots_txt=True, optout_user_agents=["CCBot"])
    other_policy = fetcher(robots_txt=True, optout_user_agents=["GPTBot"], policy=AddressPolicy())
    assert other_tokens.robots is not a.robots and other_policy.robots is not a.robots
