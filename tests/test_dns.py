"""Name resolution in the crawl: the per-process cache, its TTLs, one resolution per host at a time, a bounded
number of resolver threads, and the request's deadline over the wait for an answer.

Every host name here is answered by a resolver function the test hands the cache (resolver.Resolver's seam for
getaddrinfo), always with a loopback address: no query leaves the machine and every connection goes to the
loopback web. Slow resolvers block on an Event the test sets; nothing sleeps to synchronise.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.stages.crawl import inputs, resolver
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.stages.crawl.netpolicy import AddressPolicy
from pipelines.stages.crawl.resolver import Resolver, ResolveTimeout
from pipelines.stages.crawl.shard import crawl_shard
from tests.test_fetch import fetcher

LOOPBACK_INFOS = socket.getaddrinfo("127.0.0.1", None, type=socket.SOCK_STREAM)  # a numeric host: no query
MARGIN = 0.5  # a fetch that gives up waits a little past its wait: thread wake-ups, the error's way back up


class Clock:
    """The cache's clock, moved by hand: entries expire when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Answers:
    """A resolver function: every name is 127.0.0.1 (or the error given); counts its calls and, while `gate`
    is clear, blocks them on it. `entered` is set once a call is under way; `most` is the most at once."""

    def __init__(self, gate: bool = False, error: OSError | None = None) -> None:
        self.calls: list[str] = []
        self.gate = threading.Event()
        if not gate:
            self.gate.set()
        self.entered = threading.Event()
        self.error = error
        self._lock = threading.Lock()
        self._now = 0
        self.most = 0

    def __call__(self, host: str) -> list[tuple]:
        with self._lock:
            self.calls.append(host)
            self._now += 1
            self.most = max(self.most, self._now)
        self.entered.set()
        try:
            assert self.gate.wait(30), "the test never released the resolver"
            if self.error is not None:
                raise self.error
            return LOOPBACK_INFOS
        finally:
            with self._lock:
                self._now -= 1


@pytest.fixture
def released() -> Iterator[list[Answers]]:
    """Resolvers a test blocked, released when it ends however it ends, so no resolver thread outlives it."""
    blocked: list[Answers] = []
    yield blocked
    for answers in blocked:
        answers.gate.set()


def named(web, host: str, kind: str = "img", index: int = 1) -> str:
    """A loopback web URL under a host name instead of 127.0.0.1."""
    return f"http://{host}:{urlsplit(web.base_url).port}/{kind}/{index}"


def test_a_slow_resolver_fails_the_row_as_dns_within_its_timeout_naming_the_host(web, released):
    answers = Answers(gate=True)
    released.append(answers)
    f = fetcher(timeout=0.5, resolver=Resolver(resolve=answers))
    t0 = time.monotonic()
    got = f.fetch(named(web, "slow-dns.test"))
    elapsed = time.monotonic() - t0
    assert (got.status, got.error_class) == ("failed_to_download", "dns")
    assert "slow-dns.test" in got.error_message and "this request had left" in got.error_message
    assert elapsed < 0.5 + MARGIN
    # a second request while the first resolution is stuck waits for it (within its own time), not another one
    assert f.fetch(named(web, "slow-dns.test", index=2)).error_class == "dns"
    assert answers.calls == ["slow-dns.test"]
    assert f.dns.as_dict() == {"hits": 1, "misses": 1, "timeouts": 2}
    # the resolution that outlived its requests answers the next one
    answers.gate.set()
    assert f.fetch(named(web, "slow-dns.test", index=3)).status == "success"
    assert answers.calls == ["slow-dns.test"]


def test_a_host_is_resolved_once_within_its_ttl_and_again_after_it(web):
    answers, clock = Answers(), Clock()
    f = fetcher(resolver=Resolver(ttl=60, resolve=answers, clock=clock))
    assert f.fetch(named(web, "Cached.test")).status == "success"
    assert f.fetch(named(web, "cached.test", index=2)).status == "success"  # host names are case-insensitive
    assert answers.calls == ["cached.test"]
    assert f.dns.as_dict() == {"hits": 1, "misses": 1, "timeouts": 0}
    clock.now += 61
    assert f.fetch(named(web, "cached.test", index=3)).status == "success"
    assert answers.calls == ["cached.test", "cached.test"]
    assert f.dns.as_dict() == {"hits": 1, "misses": 2, "timeouts": 0}


def test_addresses_from_the_cache_are_still_judged_by_the_address_policy(web):
    answers = Answers()
    cache = Resolver(resolve=answers)  # one process cache, two shard tasks with different policies
    assert fetcher(resolver=cache).fetch(named(web, "judged.test", index=11)).status == "success"
    denying = fetcher(policy=AddressPolicy.from_cidrs(["127.0.0.0/8"], ["127.0.0.1/32"]), resolver=cache)
    before = web.hits.get("/img/12", 0)  # the session's web: other files fetch its paths too
    got = denying.fetch(named(web, "judged.test", index=12))
    assert (got.status, got.error_class) == ("blocked", "ssrf")
    assert "judged.test resolves to 127.0.0.1" in got.error_message
    assert web.hits.get("/img/12", 0) == before
    assert denying.dns.as_dict()["hits"] == 1 and answers.calls == ["judged.test"]
    # and by default loopback is refused, cached or not
    assert fetcher(policy=AddressPolicy(), resolver=cache).fetch(named(web, "judged.test", index=12)).status == "blocked"


def test_concurrent_fetches_of_one_host_share_one_resolution(web, released):
    answers = Answers(gate=True)
    released.append(answers)
    cache = Resolver(ttl=0, resolve=answers)  # no cache at all: only the shared resolution keeps it to one
    f = fetcher(timeout=5.0, resolver=cache)
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = pool.map(f.fetch, [named(web, "shared.test", index=20 + i) for i in range(6)])
        assert cache.wait_for_waiters("shared.test", 6, timeout=5)
        answers.gate.set()
        assert {r.status for r in results} == {"success"}
    assert answers.calls == ["shared.test"]
    assert f.dns.as_dict() == {"hits": 5, "misses": 1, "timeouts": 0}
    assert f.fetch(named(web, "shared.test", index=30)).status == "success"
    assert len(answers.calls) == 2  # ttl 0: the next request resolves again


def test_resolver_threads_are_bounded_and_a_stuck_host_is_not_resolved_twice(released):
    answers = Answers(gate=True)
    released.append(answers)
    cache = Resolver(threads=2, resolve=answers)
    hosts = [f"h{i}.test" for i in range(5)]

    def give_up(host: str) -> str:
        with pytest.raises(ResolveTimeout) as err:
            cache.lookup(host, 80, time.monotonic() + 0.2)
        return str(err.value)

    with ThreadPoolExecutor(max_workers=5) as pool:
        messages = list(pool.map(give_up, hosts))
    assert all(h in m for h, m in zip(hosts, messages, strict=True))
    assert len(answers.calls) == 2 and answers.most == 2  # three hosts wait in the queue, not on threads
    give_up(answers.calls[0])  # stuck, and not resolved again
    assert len(answers.calls) == 2
    answers.gate.set()
    for host in hosts:  # the queue drains through the same two threads
        assert cache.lookup(host, 8080, time.monotonic() + 5)[0][4] == ("127.0.0.1", 8080)
    assert sorted(answers.calls) == hosts and answers.most <= 2


def test_a_name_that_does_not_exist_is_remembered_for_the_negative_ttl(web):
    answers, clock = Answers(error=socket.gaierror(socket.EAI_NONAME, "Name or service not known")), Clock()
    cache = Resolver(ttl=300, negative_ttl=10, resolve=answers, clock=clock)
    f = fetcher(resolver=cache)
    got = f.fetch(named(web, "nowhere.test"))
    assert (got.status, got.error_class) == ("failed_to_download", "dns")
    assert "cannot resolve nowhere.test" in got.error_message
    assert f.fetch(named(web, "nowhere.test", index=2)).error_class == "dns"
    assert answers.calls == ["nowhere.test"]
    clock.now += 11
    assert f.fetch(named(web, "nowhere.test", index=3)).error_class == "dns"
    assert len(answers.calls) == 2


def test_a_temporary_failure_is_not_remembered():
    answers = Answers(error=socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    cache = Resolver(resolve=answers)
    for _ in range(2):
        with pytest.raises(socket.gaierror, match="cannot resolve again.test"):
            cache.lookup("again.test", 80, time.monotonic() + 5)
    assert answers.calls == ["again.test", "again.test"]


def test_an_ip_literal_needs_no_resolver(web):
    answers = Answers()
    f = fetcher(resolver=Resolver(resolve=answers))
    assert f.fetch(web.url("img", 1)).status == "success"
    assert answers.calls == [] and f.dns.as_dict() == {"hits": 0, "misses": 0, "timeouts": 0}


def test_a_shard_reports_its_lookups_in_its_record(tmp_path, web, monkeypatch):
    cfg = CrawlConfig(input=str(tmp_path / "urls.csv"), allow_networks=["127.0.0.0/8"], image_size=32,
                      samples_per_shard=10, threads=4, timeout=2, dns_ttl=120, dns_negative_ttl=5, dns_threads=2,
                      per_host_scope="task")  # called outside a crawl stage: no host token service
    urls = [named(web, "shard.test", index=40 + i) for i in range(4)] + [named(web, "other.test", index=50)]
    (tmp_path / "urls.csv").write_text("url,caption\n" + "".join(f"{u},a picture\n" for u in urls))
    answers = Answers()
    # the process's resolver for these settings, as every shard task of a worker process shares it
    monkeypatch.setitem(resolver._shared, (120.0, 5.0, 2), Resolver(ttl=120, negative_ttl=5, threads=2,
                                                                       resolve=answers))
    staged = inputs.stage(cfg, str(tmp_path / "_inputs"), lambda: None)
    (shard,) = staged["shards"]
    record = crawl_shard(cfg, shard["url"], str(tmp_path / "part-00000.parquet"),
                         storage.read_parquet(staged["plan"]), [])
    assert record["status"] == {"success": 5}
    assert sorted(answers.calls) == ["other.test", "shard.test"]
    # each host's robots.txt request resolves it (a miss); its image requests are answered by the cache
    assert (record["dns_misses"], record["dns_hits"], record["dns_timeouts"]) == (2, 5, 0)
    assert (record["robots_fetches"], record["robots_hits"]) == (2, 3)
    assert pq.read_table(tmp_path / "part-00000.parquet").num_rows == 5


def test_a_lookup_without_a_deadline_waits_for_the_answer():
    assert Resolver(resolve=Answers()).lookup("open.test", 80, float("inf"))[0][4] == ("127.0.0.1", 80)
