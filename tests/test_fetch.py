"""The crawl's fetcher against the loopback web: statuses, error classes, address policy, byte cap."""

from __future__ import annotations

import pytest

from pipelines.demo.server import DemoServer
from pipelines.stages.crawl.fetch import Fetcher
from pipelines.stages.crawl.netpolicy import AddressPolicy

LOOPBACK = AddressPolicy.from_cidrs(["127.0.0.0/8"], [])


def fetcher(policy=LOOPBACK, **kw) -> Fetcher:
    args = {"timeout": 2.0, "max_bytes": 1 << 20, "max_redirects": 3, "policy": policy,
            "user_agent_token": "clipline", "contact": None, "disallowed": ["noai", "noimageai"]} | kw
    return Fetcher(**args)


def test_image_is_fetched(web):
    got = fetcher().fetch(web.url("img", 1))
    assert got.status == "success" and got.http_status == 200
    assert got.data[:2] in (b"\xff\xd8", b"\x89P")  # JPEG or PNG magic


@pytest.mark.parametrize(("kind", "status", "error_class", "http_status"), [
    ("missing", "failed_to_download", "http_4xx", 404),
    ("error", "failed_to_download", "http_5xx", 500),
    ("optout", "opted_out", "x_robots_tag", 200),
    ("busy", "failed_to_download", "http_429", 429),  # not retried: http_retries defaults to 0
    ("unavailable", "failed_to_download", "http_5xx", 503),
])
def test_http_failures_are_classified(web, kind, status, error_class, http_status):
    got = fetcher().fetch(web.url(kind, 7))
    assert (got.status, got.error_class, got.http_status) == (status, error_class, http_status)
    assert got.data is None


def test_timeout_is_bounded(web):
    got = fetcher(timeout=0.3).fetch(web.url("slow", 3))
    assert (got.status, got.error_class) == ("failed_to_download", "timeout")


@pytest.mark.parametrize("url", [None, "", "ftp://127.0.0.1/x.jpg", "file:///etc/passwd", "http://", "not a url",
                                 "http://[::1", "http://[abc]/x.jpg"])
def test_non_http_urls_are_invalid(url):
    got = fetcher().fetch(url)
    assert (got.status, got.error_class) == ("invalid", "invalid_url")


def test_loopback_is_refused_by_default_without_a_request(web):
    path = "/img/424242"
    got = fetcher(policy=AddressPolicy()).fetch(web.base_url + path)
    assert (got.status, got.error_class) == ("blocked", "ssrf")
    assert "127.0.0.1" in got.error_message
    assert web.hits.get(path, 0) == 0


def test_deny_list_wins_over_allow_list(web):
    policy = AddressPolicy.from_cidrs(["127.0.0.0/8"], ["127.0.0.1/32"])
    assert fetcher(policy=policy).fetch(web.url("img", 5)).status == "blocked"


def test_redirect_into_a_denied_address_never_reaches_it(web):
    with DemoServer(host="127.0.0.2", port=0) as inner:
        target = inner.url("img", 9)
        policy = AddressPolicy.from_cidrs(["127.0.0.0/8"], ["127.0.0.2/32"])
        got = fetcher(policy=policy).fetch(f"{web.url('redirect', 1)}?to={target}")
        assert (got.status, got.error_class) == ("blocked", "ssrf")
        assert inner.hits == {}
        # the same redirect with the inner host allowed is followed
        assert fetcher().fetch(f"{web.url('redirect', 1)}?to={target}").status == "success"
        assert inner.hits == {"/img/9": 1}


def test_redirect_to_another_scheme_is_refused(web):
    got = fetcher().fetch(f"{web.url('redirect', 2)}?to=ftp://127.0.0.1/x.jpg")  # urllib itself would follow ftp
    assert got.status == "failed_to_download" and got.error_class == "redirect"


def test_redirect_chain_is_cut_at_the_limit(web):
    assert fetcher(max_redirects=3).fetch(web.url("redirect", 3)).status == "success"
    got = fetcher(max_redirects=3).fetch(web.url("redirect", 4))
    assert (got.status, got.error_class, got.http_status) == ("failed_to_download", "redirect", 302)


@pytest.mark.parametrize("kind", ["img", "nolength"])  # refused from Content-Length; cut off while reading
def test_body_over_the_byte_cap_is_cut_off(web, kind):
    got = fetcher(max_bytes=100).fetch(web.url(kind, 1))
    assert (got.status, got.error_class) == ("failed_to_download", "too_large")
    assert got.data is None
    assert fetcher().fetch(web.url(kind, 1)).status == "success"


def test_zero_redirects_means_none_followed(web):
    got = fetcher(max_redirects=0).fetch(web.url("redirect", 1))
    assert (got.error_class, got.http_status) == ("redirect", 302)
    assert fetcher(max_redirects=1).fetch(web.url("redirect", 1)).status == "success"


def test_spaces_in_urls_are_encoded_not_protocol_errors(web):
    got = fetcher().fetch(web.base_url + "/img/1 2")  # the server sees /img/1%202: not an image route
    assert (got.error_class, got.http_status) == ("http_4xx", 404)


@pytest.mark.parametrize(("address", "refused"), [
    ("8.8.8.8", False), ("2606:4700:4700::1111", False),
    ("10.0.0.1", True), ("169.254.169.254", True), ("100.64.0.1", True), ("224.0.0.1", True), ("0.0.0.0", True),
    ("::1", True), ("fe80::1%eth0", True), ("fc00::1", True), ("fec0::1", True),
    ("::ffff:127.0.0.1", True),  # IPv4-mapped
    ("64:ff9b::a00:1", True),  # NAT64 to 10.0.0.1
    ("2002:a00:1::", True),  # 6to4 of 10.0.0.1
    ("::10.0.0.1", True),  # IPv4-compatible
    ("64:ff9b::808:808", False),  # NAT64 to 8.8.8.8
    ("192.0.0.192", True), ("::ffff:192.0.0.192", True),  # Oracle Cloud's legacy metadata; Python calls it global
    ("192.0.0.9", True),  # the rest of 192.0.0.0/24 (IETF protocol assignments) too
])
def test_address_policy_sees_through_ipv6_forms(address, refused):
    assert AddressPolicy().refuses(address) is refused


def test_user_agent_names_the_crawler_and_contact():
    f = fetcher(contact="mailto:crawl@example.org")
    assert "clipline/" in f.user_agent and "mailto:crawl@example.org" in f.user_agent


def test_pixel_cap_is_checked_from_the_header_before_decoding(web):
    from pipelines.stages.crawl.config import CrawlConfig
    from pipelines.stages.crawl.shard import ShardCrawler

    crawler = ShardCrawler(CrawlConfig(input="-", allow_networks=["127.0.0.0/8"], image_size=32))
    row = crawler.one(web.url("bomb", 1), "a bomb")
    # too_many_pixels comes from the header check; a decode attempt would report "decode" instead
    assert (row["status"], row["error_class"]) == ("failed_to_resize", "too_many_pixels")
    assert "20000x20000 exceeds max_pixels 89478485" in row["error_message"]
    assert row.get("image") is None
    ok = crawler.one(web.url("img", 1), "fine")
    assert ok["status"] == "success" and (ok["width"], ok["height"]) == (32, 32)
