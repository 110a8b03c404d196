"""The host token service without a cluster: the lease table's rules on a fake clock, and worker clients on real
threads against it (a plain function standing in for the actor call). The cluster test is test_polite_cluster.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pipelines.stages.crawl.hosttokens import HostTokenService, JobLimiter, TokenClient, TokenTable
from pipelines.stages.crawl.polite import NoSlot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def leases(grants) -> list[int | None]:
    return [g.lease for g in grants]


def test_a_host_gets_at_most_its_connections_and_a_release_grants_the_next_in_line():
    table = TokenTable(connections=2, rate=0, clock=Clock())
    a = table.exchange("a", [(1, "h:80", 5, 30), (2, "h:80", 5, 30), (3, "h:80", 5, 30)], [])
    assert [g.req for g in a] == [1, 2] and not any(g.waited for g in a)
    assert table.exchange("b", [(1, "other:80", 5, 30)], [])[0].lease is not None  # another host: its own slots
    assert table.exchange("b", [(2, "h:80", 5, 30)], []) == []  # queued behind a's third
    (g3,) = table.exchange("a", [], [a[0].lease])  # a release: the first in line gets the slot
    assert (g3.req, g3.waited) == (3, True)
    assert table.exchange("a", [], [a[1].lease]) == []  # ... and the next goes to b, in its mailbox
    (gb,) = table.collect("b")
    assert (gb.req, gb.waited) == (2, True)
    assert table.stats()["max_leases"] == 2


def test_a_lease_not_released_expires_after_its_hold():
    clock = Clock()
    table = TokenTable(connections=1, rate=0, clock=clock)
    (held,) = table.exchange("dead", [(1, "h:80", 5, 30)], [])  # its task dies holding the slot
    assert table.exchange("b", [(1, "h:80", 100, 30)], []) == []
    clock.now += 29.9
    assert table.exchange("b", [], []) == []
    clock.now += 0.2
    (g,) = table.exchange("b", [], [])
    assert g.req == 1 and g.lease != held.lease
    assert table.counts["expired"] == 1
    table.exchange("dead", [], [held.lease])  # a release after expiry changes nothing
    assert table.stats()["leases_out"] == 1 and table.counts["released"] == 0


def test_a_renewed_lease_does_not_expire():
    clock = Clock()
    table = TokenTable(connections=1, rate=0, clock=clock)
    (held,) = table.exchange("a", [(1, "h:80", 5, 10)], [])
    table.exchange("b", [(1, "h:80", 100, 10)], [])
    for _ in range(3):
        clock.now += 9
        assert table.exchange("a", [], [], [held.lease]) == []
    clock.now += 10.1  # no renewal for longer than its TTL: its holder is gone
    assert [g.req for g in table.exchange("b", [], [])] == [1] and table.counts["expired"] == 1


def test_a_grant_no_one_collects_is_taken_back():
    clock = Clock()
    table = TokenTable(connections=1, rate=0, clock=clock, collect_within=10)
    (first,) = table.exchange("a", [(1, "h:80", 100, 300)], [])
    assert table.exchange("gone", [(1, "h:80", 100, 300)], []) == []  # queued; then its process dies
    assert table.exchange("a", [(2, "h:80", 100, 300)], [first.lease]) == []  # granted to "gone", not collected
    clock.now += 10.1
    (g,) = table.exchange("a", [], [])
    assert g.req == 2 and table.counts["revoked"] == 1
    assert table.collect("gone") == []


def test_a_queued_request_past_its_deadline_is_dropped():
    clock = Clock()
    table = TokenTable(connections=1, rate=0, clock=clock)
    (first,) = table.exchange("a", [(1, "h:80", 5, 30)], [])
    table.exchange("b", [(1, "h:80", 1, 30)], [])
    clock.now += 2
    assert table.exchange("a", [], [first.lease]) == [] and table.collect("b") == []
    assert table.counts["dropped"] == 1 and not table.waiting("b")


def test_the_rate_spaces_starts_job_wide_and_a_start_after_the_deadline_is_refused_at_once():
    clock = Clock()
    table = TokenTable(connections=0, rate=2.0, clock=clock)
    got = table.exchange("a", [(1, "h:80", 5, 30), (2, "h:80", 5, 30)], [])
    got += table.exchange("b", [(1, "h:80", 5, 30)], [])
    assert [g.delay for g in got] == pytest.approx([0.0, 0.5, 1.0])
    (late,) = table.exchange("c", [(1, "h:80", 1.2, 30)], [])  # its start would be 1.5 s away
    assert late.lease is None and late.delay == pytest.approx(1.5)
    (next_,) = table.exchange("c", [(2, "h:80", 5, 30)], [])  # the refusal did not take that start
    assert next_.delay == pytest.approx(1.5)
    for g in [*got, next_]:
        table.exchange("a", [], [g.lease])
    assert table.stats()["hosts"] == 1  # idle, but its next start is 2 s ahead
    clock.now += 2.1
    table.tick()
    assert table.stats()["hosts"] == 0  # an idle host is forgotten once its next start has passed


class Local:
    """The actor's exchange as a plain function per client, long-poll included, for TokenClient on threads."""

    def __init__(self, connections: int, rate: float = 0.0) -> None:
        self.table = TokenTable(connections, rate)
        self.cond = threading.Condition()
        self.block = threading.Event()
        self.block.set()

    def call(self, client: str):
        def exchange(acquires, releases, renews, wait):
            assert self.block.wait(30)
            with self.cond:
                grants = self.table.exchange(client, acquires, releases, renews)
                self.cond.notify_all()
                if not grants and wait > 0:
                    self.cond.wait_for(lambda: client in self.table.woken, wait)
                    self.table.tick()
                    grants = self.table.collect(client)
                self.table.woken.discard(client)
                self.cond.notify_all()
                return grants
        return exchange


def test_threads_of_many_processes_share_one_cap():
    service = Local(connections=2)
    clients = [TokenClient(service.call(f"p{i}")) for i in range(3)]
    limiters = [JobLimiter([c], hold=30, rate=0) for c in clients for _ in range(2)]  # 2 tasks per process
    lock, now, most, done = threading.Lock(), [0], [0], []

    def request(limiter: JobLimiter) -> None:
        with limiter.slot("h:80", time.monotonic() + 20):
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            time.sleep(0.002)  # the request's work while it holds the slot, not a synchronisation
            with lock:
                now[0] -= 1
        done.append(1)

    threads = [threading.Thread(target=request, args=(limiters[i % 6],)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(done) == 60 and most[0] == 2
    assert service.table.stats()["max_leases"] == 2
    assert sum(lim.counts.granted for lim in limiters) == 60
    assert sum(lim.counts.waited for lim in limiters) > 0
    with service.cond:  # every slot came back: the last release's call has reached the table
        assert service.cond.wait_for(lambda: service.table.stats()["leases_out"] == 0, 5)


def test_a_process_batches_its_threads_requests_and_releases_into_few_calls():
    service = Local(connections=2)
    client = TokenClient(service.call("p"))
    limiter = JobLimiter([client], hold=30, rate=0)
    n = 50
    together = threading.Barrier(n + 1)
    service.block.clear()  # the actor is busy: the threads' requests gather in the client meanwhile

    def request(i: int) -> None:
        with limiter.slot(f"host{i}:80", time.monotonic() + 20):
            together.wait(20)  # every thread holds its slot at once, then all release

    threads = [threading.Thread(target=request, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    with client._cond:  # every request is with the client (one call may be on its way already)
        assert client._cond.wait_for(lambda: len(client._pending) == n, 10)
    service.block.set()
    together.wait(20)
    for t in threads:
        t.join(20)
    assert limiter.counts.granted == n
    with service.cond:
        assert service.cond.wait_for(lambda: service.table.counts["released"] == n, 5)
    assert client.calls <= 10, client.calls  # 50 requests and 50 releases: a handful of calls, not 100


def test_the_rate_holds_across_processes_and_a_start_past_the_deadline_is_a_timeout():
    service = Local(connections=0, rate=5.0)
    a, b = (JobLimiter([TokenClient(service.call(p))], hold=30, rate=5.0) for p in "ab")
    with a.slot("h:80", time.monotonic() + 5) as first:
        pass
    with b.slot("h:80", time.monotonic() + 5) as second:  # another process: the same schedule
        pass
    assert second - first >= 0.2 - 0.02
    start = time.monotonic()
    with pytest.raises(NoSlot, match="per_host_rate 5/s across the whole crawl"), a.slot("h:80", start + 0.05):
        pass
    assert time.monotonic() - start < 0.5 and a.counts.timeouts == 1


def test_a_request_that_raises_releases_its_slot():
    service = Local(connections=1)
    limiter = JobLimiter([TokenClient(service.call("p"))], hold=30, rate=0)
    with pytest.raises(ZeroDivisionError), limiter.slot("h:80", time.monotonic() + 5):
        1 / 0  # noqa: B018
    with limiter.slot("h:80", time.monotonic() + 5):  # the slot is free again
        pass


def test_a_slow_service_fails_the_request_at_its_deadline_and_a_late_grant_is_given_back():
    service = Local(connections=1)
    limiter = JobLimiter([TokenClient(service.call("p"))], hold=30, rate=0)
    service.block.clear()  # the actor does not answer
    start = time.monotonic()
    with pytest.raises(NoSlot, match="host token service"), limiter.slot("h:80", start + 0.3):
        pass
    assert 0.29 <= time.monotonic() - start < 1.0
    assert limiter.counts.timeouts == 1
    service.block.set()  # it answers now: the grant for the request that gave up goes straight back
    with service.cond:
        assert service.cond.wait_for(lambda: service.table.counts["released"] == 1, 5)
        assert service.table.stats()["leases_out"] == 0


def test_a_process_renews_the_leases_its_threads_hold():
    service = Local(connections=1)
    holder = JobLimiter([TokenClient(service.call("a"), renew_every=0.05)], hold=0.3, rate=0)
    other = JobLimiter([TokenClient(service.call("b"))], hold=0.3, rate=0)
    with holder.slot("h:80", time.monotonic() + 5):
        # held three times its TTL: the renewals keep it, so the other process gets no slot in that time
        with pytest.raises(NoSlot), other.slot("h:80", time.monotonic() + 1.0):
            pass
    assert service.table.counts["expired"] == 0
    with other.slot("h:80", time.monotonic() + 5):  # released: the other one gets it
        pass


def test_a_failing_service_fails_the_request_as_no_slot():
    def broken(acquires, releases, renews, wait):
        raise ConnectionError("actor died")

    limiter = JobLimiter([TokenClient(broken)], hold=30, rate=0)
    with pytest.raises(NoSlot, match="actor died"), limiter.slot("h:80", time.monotonic() + 5):
        pass


def test_the_actor_answers_a_long_poll_as_soon_as_a_slot_is_granted():
    async def scenario() -> tuple[list, float]:
        actor = HostTokenService(connections=1, rate=0, token="t")
        (first,) = await actor.exchange("a", [(1, "h:80", 10, 30)], [], [], 0)
        poll = asyncio.create_task(actor.exchange("b", [(1, "h:80", 10, 30)], [], [], 10))
        await asyncio.sleep(0)  # let the poll reach its wait
        start = time.monotonic()
        await actor.exchange("a", [], [first.lease], [], 0)
        return await poll, time.monotonic() - start

    grants, took = asyncio.run(scenario())
    assert [(g.req, g.waited) for g in grants] == [(1, True)] and took < 1


def test_a_long_poll_that_comes_before_its_request_still_gets_the_grant_and_close_ends_polls():
    async def scenario() -> tuple[list, list]:
        actor = HostTokenService(connections=1, rate=0, token="t")
        early = asyncio.create_task(actor.exchange("a", [], [], [], 10))  # calls of one process run out of order
        await asyncio.sleep(0)
        await actor.exchange("a", [], [], [], 0)  # nothing yet: the poll goes on waiting
        assert not early.done()
        sent = await actor.exchange("b", [(1, "h:80", 10, 30)], [], [], 0)
        (held,) = sent
        await actor.exchange("a", [(1, "h:80", 10, 30)], [], [], 0)  # queued behind b
        await actor.exchange("b", [], [held.lease], [], 0)
        got = await asyncio.wait_for(early, 1)
        lingering = asyncio.create_task(actor.exchange("c", [], [], [], 10))
        await asyncio.sleep(0)
        stats = actor.close()
        assert stats["granted"] == 2
        return got, await asyncio.wait_for(lingering, 1)

    got, lingering = asyncio.run(scenario())
    assert [(g.req, g.waited) for g in got] == [(1, True)] and lingering == []
