"""The fetcher's politeness, judged from the server's side: arrival times, requests in flight, retries.

Each test gets its own loopback server (its arrivals and max_in_flight are per server) and its own
Fetcher (limits and pauses are per Fetcher). Timing checks allow a little slack for the time a request
takes from the limiter to the server; none of them sleeps to synchronise.
"""

from __future__ import annotations

import email.utils
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from pipelines.demo.server import DemoServer
from pipelines.stages.crawl.fetch import Fetched, Fetcher
from pipelines.stages.crawl.polite import HostLimiter, NoSlot, host_key, retry_after
from tests.test_fetch import fetcher

# A request that got its slot just before another thread's 429 came back is already on its way and
# cannot be recalled; it reaches the server within this much of the pause being set.
ON_THE_WIRE = 0.3


@pytest.fixture
def server() -> Iterator[DemoServer]:
    with DemoServer(port=0, seed=0, slow_seconds=30) as s:
        yield s


class PauseSpy:
    """Records when a fetcher pauses a host (after the limiter has the pause), and signals it."""

    def __init__(self, f: Fetcher) -> None:
        self.times: list[float] = []
        self.paused = threading.Event()
        pause = f.limiter.pause

        def spy(host: str, seconds: float, status: int | None = None) -> None:
            pause(host, seconds, status)
            self.times.append(time.monotonic())
            self.paused.set()

        f.limiter.pause = spy  # type: ignore[method-assign]


def fetch_all(f: Fetcher, urls: list[str], threads: int = 8) -> list[Fetched]:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(f.fetch, urls))


def arrivals(server: DemoServer, path: str | None = None) -> list[float]:
    with server.lock:
        return [t for p, t in server.arrivals if path is None or p == path]


def test_a_429_slows_the_host_down_instead_of_hammering_it(server):
    f = fetcher(http_retries=2)
    spy = PauseSpy(f)
    got = fetch_all(f, [f"{server.base_url}/busy/{i}?n=1&s=1" for i in range(8)])
    # every URL answered 429 once: each was retried once, after the pause, and then fetched
    assert [(g.status, g.retries) for g in got] == [("success", 1)] * 8
    with server.lock:
        log = list(server.arrivals)
    assert len(log) == 16  # one refusal and one success per URL, nothing more
    first_429, seen = log[0][1], set()
    for path, t in log:
        retry = path in seen
        seen.add(path)
        if retry or t > spy.times[0] + ON_THE_WIRE:
            assert t - first_429 >= 0.9, f"{path} reached the server {t - first_429:.3f} s after the first 429"


def test_a_pause_holds_back_every_thread_and_url_of_that_host_only(server, web):
    f = fetcher(http_retries=1)
    spy = PauseSpy(f)
    with ThreadPoolExecutor(max_workers=1) as pool:
        busy = pool.submit(f.fetch, f"{server.base_url}/busy/0?n=1&s=1")
        assert spy.paused.wait(5)
        # another host is not held back: fetched while the busy one is still paused
        assert f.fetch(web.url("img", 31)).status == "success"
        assert f.limiter.paused_for(host_key(urlsplit(server.base_url))) > 0
        # another URL of the paused host, from another thread, waits for the pause
        other = f.fetch(server.url("img", 1))
        assert (other.status, other.retries) == ("success", 0)
        assert (busy.result().status, busy.result().retries) == ("success", 1)
    assert arrivals(server, "/img/1")[0] - arrivals(server, "/busy/0")[0] >= 0.9


@pytest.mark.parametrize(("kind", "error_class", "code"), [("busy", "http_429", 429), ("unavailable", "http_5xx", 503)])
def test_without_retries_the_refusal_is_the_result(server, kind, error_class, code):
    got = fetcher().fetch(f"{server.base_url}/{kind}/0?n=1&s=1")  # http_retries defaults to 0
    assert (got.status, got.error_class, got.http_status, got.retries) == ("failed_to_download", error_class, code, 0)
    assert server.hits == {f"/{kind}/0": 1}


@pytest.mark.parametrize(("kind", "after"), [("busy", "date"), ("unavailable", "1")])
def test_a_refusal_is_retried_after_its_retry_after(server, kind, after):
    got = fetcher(http_retries=2).fetch(f"{server.base_url}/{kind}/0?n=1&s={after}")
    assert (got.status, got.http_status, got.retries) == ("success", 200, 1)
    first, second = arrivals(server, f"/{kind}/0")
    assert second - first >= 0.9


def test_without_retry_after_the_backoff_doubles_and_a_success_resets_it(server):
    f = fetcher(http_retries=2)
    got = f.fetch(f"{server.base_url}/busy/0?n=2&s=none")
    assert (got.status, got.retries) == ("success", 2)
    a0, a1, a2 = arrivals(server, "/busy/0")
    assert a1 - a0 >= 0.9 and a2 - a1 >= 1.9  # 1 s, then 2 s
    got = f.fetch(f"{server.base_url}/busy/1?n=1&s=none")
    assert (got.status, got.retries) == ("success", 1)
    b0, b1 = arrivals(server, "/busy/1")
    assert 0.9 <= b1 - b0 < 1.9  # 1 s again, not 4 s: the success reset the backoff


@pytest.mark.parametrize(("kind", "after", "max_wait", "said", "error_class"), [
    ("busy", "120", 5.0, "Retry-After 120 s is longer than max_retry_wait 5 s", "http_429"),
    ("unavailable", "none", 0.5, "backoff 1 s is longer than max_retry_wait 0.5 s", "http_5xx"),
])
def test_a_wait_longer_than_max_retry_wait_gives_up_at_once(server, kind, after, max_wait, said, error_class):
    f = fetcher(http_retries=2, max_retry_wait=max_wait)
    start = time.monotonic()
    got = f.fetch(f"{server.base_url}/{kind}/0?n=1&s={after}")
    assert time.monotonic() - start < 0.4
    assert (got.status, got.error_class, got.retries) == ("failed_to_download", error_class, 0)
    assert said in got.error_message
    assert server.hits == {f"/{kind}/0": 1}
    # the host stays paused for this fetcher: its other URLs give up too, without a request
    other = f.fetch(server.url("img", 1))
    assert (other.status, other.error_class, other.http_status) == ("failed_to_download", error_class, None)
    assert "paused" in other.error_message
    assert server.hits == {f"/{kind}/0": 1}


@pytest.mark.parametrize("cap", [2, 0])
def test_per_host_connections_caps_requests_in_flight(server, cap):
    f = fetcher(per_host_connections=cap, timeout=10.0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(f.fetch, server.url("slow", i)) for i in range(8)]
        try:
            with server.changed:  # the slow route holds every request until release
                assert server.changed.wait_for(lambda: server.in_flight == (cap or 8), timeout=5)
                if cap:  # and no more arrive while those are held: the others wait for a slot
                    assert not server.changed.wait_for(lambda: server.in_flight > cap, timeout=0.5)
        finally:
            server.release.set()
        got = [fu.result() for fu in futures]
    assert [g.status for g in got] == ["success"] * 8
    assert server.max_in_flight == (cap or 8)


def test_per_host_rate_spaces_request_starts(server):
    got = fetch_all(fetcher(per_host_rate=5.0), [server.url("img", i) for i in range(6)], threads=6)
    assert [g.status for g in got] == ["success"] * 6
    times = arrivals(server)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 5 and min(gaps) >= 0.2 - 0.05, gaps


def test_a_rate_slot_past_the_deadline_fails_at_once_as_a_timeout(server):
    f = fetcher(per_host_rate=0.5, timeout=0.2)  # the next start is 2 s away; a fetch may take 0.6 s
    assert f.budget == pytest.approx(0.6)
    assert f.fetch(server.url("img", 0)).status == "success"
    start = time.monotonic()
    got = f.fetch(server.url("img", 1))
    assert time.monotonic() - start < 0.4
    assert (got.status, got.error_class) == ("failed_to_download", "timeout")
    assert "per_host_rate" in got.error_message
    assert server.hits == {"/img/0": 1}


def test_a_slot_wait_ends_at_the_deadline():
    limiter = HostLimiter(connections=1)
    with limiter.slot("h:80", time.monotonic() + 5):
        start = time.monotonic()
        with pytest.raises(NoSlot), limiter.slot("h:80", start + 0.2):
            pass
        assert 0.19 <= time.monotonic() - start < 1.0
        with limiter.slot("other:80", time.monotonic() + 0.1):  # other hosts have their own slots
            pass


def test_a_burst_of_refusals_doubles_the_backoff_once():
    now = [100.0]
    limiter = HostLimiter(clock=lambda: now[0])
    assert limiter.refused("h:80", started=99.0) == 1.0
    assert limiter.refused("h:80", started=99.5) == 1.0  # was under way when the first came: same burst
    now[0] = 102.0
    assert limiter.refused("h:80", started=101.5) == 2.0
    now[0] = 105.0
    assert limiter.refused("h:80", started=104.0) == 4.0
    limiter.succeeded("h:80")
    assert limiter.refused("h:80", started=105.0) == 1.0


DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
AT = email.utils.parsedate_to_datetime(DATE).timestamp()


@pytest.mark.parametrize(("value", "now", "seconds"), [
    ("5", None, 5.0), (" 0 ", None, 0.0), (DATE, AT - 30, 30.0), (DATE, AT + 30, 0.0),
    ("Wed, 21 Oct 2015 07:28:00 -0000", AT - 2, 2.0), ("9" * 5000, None, 1e9),
    (None, None, None), ("soon", None, None), ("-1", None, None), ("1.5", None, None), ("²", None, None),
])
def test_retry_after_reads_seconds_and_http_dates(value, now, seconds):
    assert retry_after(value, now) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(("url", "key"), [
    ("http://Example.COM/x.jpg", "example.com:80"), ("http://example.com:80/y", "example.com:80"),
    ("https://example.com/x", "example.com:443"), ("https://example.com:8443/x", "example.com:8443"),
    ("http://[::1]/x", "[::1]:80"),
])
def test_host_key_is_lowercased_host_and_port(url, key):
    assert host_key(urlsplit(url)) == key
