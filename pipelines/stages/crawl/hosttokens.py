"""Per-host politeness for the whole crawl: a host token service that every shard task asks for connection slots.

`polite.HostLimiter` holds `per_host_connections` and `per_host_rate` within one shard task; with many tasks on
many nodes, one host would see the limit times the tasks in flight. With `per_host_scope: job` the crawl stage
starts this service for the run - `host_token_actors` Ray actors, a host's slots kept by the actor that
crc32(host) picks - and a request holds a *lease* from it while it talks to the host:

- a lease is one connection slot, granted while the host has fewer than `per_host_connections` leases out, with
  the delay before its request may start (the host's next start, `1 / per_host_rate` after the previous one);
- a lease ends when the request releases it, or when it expires: a lease lasts `LEASE_TTL` seconds and the
  holder's process renews every lease it holds every `RENEW_EVERY` seconds (one call for all of them), so the
  slots of a task that died, was cancelled or lost its node come back within `LEASE_TTL`;
- a request waits for its lease at most until its own deadline, as for a local slot: past it the row fails as a
  timeout (`NoSlot`), however slow the service is; a grant that comes later is given back at once.

Batching: a worker process has one `TokenClient` per actor for all its shard tasks and threads. Its sender thread
sends whatever its threads asked for or released meanwhile in one actor call (one in flight at a time), and its
poller thread keeps one long-poll open while a request waits in the queue, which the actor answers as soon as a
slot is granted to the process. So the actor sees at most a few calls per process at a time, each carrying many
requests, never one call per request. `TokenTable` is the actor's state and rules, plain Python, so that the
rules are tested without Ray.

What stays per shard task: pauses after a 429/503 and their backoff (polite.HostLimiter, per `Fetcher`). Rates
are spaced by the actor's clock and start when the grant arrives, so two starts may come closer than
`1 / per_host_rate` by the difference of their grants' trips back (milliseconds); over any longer window the rate
holds. An actor that restarts (its node lost) forgets the leases out: for at most one lease's length, a host
may see up to twice its cap.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import math
import os
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipelines.stages.crawl.polite import HostLimiter, NoSlot

log = logging.getLogger(__name__)

LEASE_TTL = 10.0  # seconds a lease lasts unless renewed: how long a dead holder keeps a slot
RENEW_EVERY = 2.5  # seconds between a process's renewals of the leases it holds: a slow call may take LEASE_TTL - this
COLLECT_WITHIN = 10.0  # a grant its process has not picked up by then is taken back (the process is gone)
POLL = 1.0  # seconds a long-poll waits at the actor for a grant before it asks again
IDLE_EXIT = 5.0  # a client thread with nothing to do for this long ends; the next request starts it again


class Grant(NamedTuple):
    req: int  # the client's request id
    lease: int | None  # None: refused, the host's next start is after the request's deadline
    delay: float  # seconds from the grant until the request may start (per_host_rate)
    waited: bool  # it waited in the host's queue behind other requests


@dataclass
class _Request:
    client: str
    req: int
    hold: float
    deadline: float  # on the table's clock; a request still queued then is dropped
    queued: bool = False


@dataclass
class _Host:
    leases: dict[int, float] = field(default_factory=dict)  # lease id -> expiry
    queue: deque[_Request] = field(default_factory=deque)
    next_start: float = -math.inf


class TokenTable:
    """Leases of connection slots and request starts per host, for any number of clients. Not thread-safe: the
    actor runs it on one event loop. `connections` or `rate` 0: no cap, no rate."""

    def __init__(self, connections: int, rate: float, clock: Callable[[], float] = time.monotonic,
                 collect_within: float = COLLECT_WITHIN) -> None:
        self.connections, self.rate, self.clock, self.collect_within = connections, rate, clock, collect_within
        self._hosts: dict[str, _Host] = {}
        self._lease_host: dict[int, str] = {}
        self._lease_ttl: dict[int, float] = {}
        self._expiries: list[tuple[float, int]] = []  # heap of (expiry, lease)
        self._uncollected: dict[int, str] = {}  # lease granted, not yet collected -> its client
        self._collect_by: list[tuple[float, int]] = []  # heap of (collect by, lease)
        self._queued: Counter[str] = Counter()  # client -> its requests in the hosts' queues
        self._mailbox: dict[str, list[Grant]] = {}
        self._ids = itertools.count(1)
        self.woken: set[str] = set()  # clients with new grants since the caller last looked
        self.counts: Counter[str] = Counter()
        self.max_leases = 0  # the most leases one host had out at once
        self._idle: list[tuple[float, str]] = []  # heap of (next start, host) of hosts kept only for their next start
        self.clients: set[str] = set()

    def exchange(self, client: str, acquires: list[tuple[int, str, float, float]], releases: list[int],
                 renews: Sequence[int] = ()) -> list[Grant]:
        """Apply a client's releases, renewals and requests ((request id, host, seconds it may wait, seconds its
        lease lasts unless renewed)); return every grant waiting for the client, these requests' included."""
        self.counts["calls"] += 1
        self.clients.add(client)
        now = self.clock()
        self.tick(now)
        for lease in releases:
            self._end(lease, "released")
        for lease in renews:
            if (host := self._lease_host.get(lease)) is not None:
                expiry = max(self._hosts[host].leases[lease], now + self._lease_ttl[lease])
                self._hosts[host].leases[lease] = expiry
                heapq.heappush(self._expiries, (expiry, lease))
        for req, host, wait, hold in acquires:
            r = _Request(client, req, hold, now + wait)
            self._hosts.setdefault(host, _Host()).queue.append(r)
            self._queued[client] += 1
            self._grant(host, now)
            r.queued = True  # if it is still in the queue, its grant will say it waited
        return self.collect(client)

    def collect(self, client: str) -> list[Grant]:
        grants = self._mailbox.pop(client, [])
        for g in grants:
            if g.lease is not None:
                self._uncollected.pop(g.lease, None)
        return grants

    def waiting(self, client: str) -> bool:
        """Whether the client has requests in the hosts' queues."""
        return self._queued[client] > 0

    def tick(self, now: float | None = None) -> None:
        """End leases past their expiry and grants no one collected in time; grant what that frees."""
        now = self.clock() if now is None else now
        while self._expiries and self._expiries[0][0] <= now:
            expiry, lease = heapq.heappop(self._expiries)
            host = self._lease_host.get(lease)
            if host is not None and self._hosts[host].leases.get(lease) == expiry:
                self._end(lease, "expired")
        while self._collect_by and self._collect_by[0][0] <= now:
            _, lease = heapq.heappop(self._collect_by)
            if (client := self._uncollected.get(lease)) is not None:
                self._mailbox[client] = [g for g in self._mailbox.get(client, []) if g.lease != lease]
                self._end(lease, "revoked")
        while self._idle and self._idle[0][0] <= now:  # forget hosts whose next start has come and gone
            _, host = heapq.heappop(self._idle)
            st = self._hosts.get(host)
            if st is not None and not st.queue and not st.leases and st.next_start <= now:
                del self._hosts[host]

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "max_leases": self.max_leases, "clients": sorted(self.clients),
                "leases_out": len(self._lease_host), "hosts": len(self._hosts)}

    def _end(self, lease: int, why: str) -> None:
        host = self._lease_host.pop(lease, None)
        self._lease_ttl.pop(lease, None)
        self._uncollected.pop(lease, None)
        if host is None:  # released twice, or after it expired, or by a client of an earlier incarnation
            return
        self._hosts[host].leases.pop(lease, None)
        self.counts[why] += 1
        self._grant(host, self.clock())

    def _grant(self, host: str, now: float) -> None:
        st = self._hosts[host]
        while st.queue and (not self.connections or len(st.leases) < self.connections):
            r = st.queue.popleft()
            self._queued[r.client] -= 1
            if r.deadline <= now:
                self.counts["dropped"] += 1  # its requester has given up (NoSlot)
                continue
            delay = max(0.0, st.next_start - now) if self.rate else 0.0
            if now + delay > r.deadline:  # the next start is after its deadline: say so now, keep the schedule
                self._deliver(r.client, Grant(r.req, None, delay, r.queued))
                self.counts["refused"] += 1
                continue
            lease = next(self._ids)
            expiry = now + delay + r.hold
            st.leases[lease] = expiry
            heapq.heappush(self._expiries, (expiry, lease))
            self._lease_host[lease] = host
            self._lease_ttl[lease] = r.hold
            self._uncollected[lease] = r.client
            heapq.heappush(self._collect_by, (now + self.collect_within, lease))
            if self.rate:
                st.next_start = now + delay + 1.0 / self.rate
            self.max_leases = max(self.max_leases, len(st.leases))
            self.counts["granted"] += 1
            self.counts["waited"] += r.queued
            self._deliver(r.client, Grant(r.req, lease, delay, r.queued))
        if not st.queue and not st.leases:  # a host is state only while it has leases, waiters or a start ahead
            if self.rate and st.next_start > now:
                heapq.heappush(self._idle, (st.next_start, host))
            else:
                del self._hosts[host]

    def _deliver(self, client: str, grant: Grant) -> None:
        self._mailbox.setdefault(client, []).append(grant)
        self.woken.add(client)


class HostTokenService:
    """The Ray actor (async, one event loop): a TokenTable whose calls may wait for a grant (long-poll)."""

    def __init__(self, connections: int, rate: float, token: str) -> None:
        self.table = TokenTable(connections, rate)
        self.token = token
        self._events: dict[str, asyncio.Event] = {}
        self._closing = False

    def incarnation(self) -> str:
        return self.token

    async def exchange(self, client: str, acquires: list[tuple[int, str, float, float]], releases: list[int],
                       renews: list[int], wait: float) -> list[Grant]:
        grants = self.table.exchange(client, acquires, releases, renews)
        self._wake()
        # a long-poll waits even when none of the client's requests is queued yet: the call that carries them may
        # arrive after this one (calls of one process run out of order); after an actor restart forgot them, this
        # keeps a client that still waits for them to one call a `wait` until their deadlines, not a busy loop
        if not grants and wait > 0 and not self._closing:
            event = self._events.setdefault(client, asyncio.Event())
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), wait)
            except TimeoutError:
                pass
            self.table.tick()
            grants = self.table.collect(client)
            self._wake()
        return grants

    def stats(self) -> dict[str, Any]:
        self.table.tick()
        return self.table.stats()

    def close(self) -> dict[str, Any]:
        """The stats, and no more waiting: open long-polls return now (so none is cut off by the kill that follows)."""
        self._closing = True
        for event in self._events.values():
            event.set()
        return self.stats()

    def _wake(self) -> None:
        for client in self.table.woken:
            if (event := self._events.get(client)) is not None:
                event.set()
        self.table.woken.clear()


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    grant: Grant | None = None
    error: BaseException | None = None
    sent: bool = False


Call = Callable[[list[tuple[int, str, float, float]], list[int], list[int], float], list[Grant]]


class TokenClient:
    """One worker process's link to one actor, for all its threads: `acquire` blocks until a grant or the
    request's deadline; a sender thread batches requests, releases and the renewals of the leases held, a poller
    keeps a long-poll open while any request waits. `call(acquires, releases, renews, wait)` is the actor call (a
    plain function in tests)."""

    def __init__(self, call: Call, poll: float = POLL, idle_exit: float = IDLE_EXIT,
                 renew_every: float = RENEW_EVERY) -> None:
        self._call, self.poll, self.idle_exit, self.renew_every = call, poll, idle_exit, renew_every
        self._held: set[int] = set()  # leases granted to this process's threads and not yet released
        self._renew_at = math.inf
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._new: list[tuple[int, str, float, float]] = []
        self._releases: list[int] = []
        self._pending: dict[int, _Pending] = {}
        self._sender: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self.calls = 0

    def acquire(self, host: str, deadline: float, hold: float) -> Grant:
        """A grant for one request to `host` (its lease may be None: refused for the rate); NoSlot at the deadline."""
        p = _Pending()
        with self._cond:
            req = next(self._ids)
            self._pending[req] = p
            self._new.append((req, host, max(0.0, deadline - time.monotonic()), hold))
            self._start_threads()
            self._cond.notify_all()
        p.event.wait(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._pending.pop(req, None)  # a grant that arrives later is given back (_deliver)
            if p.grant is not None:
                return p.grant
        if p.error is not None:
            raise NoSlot(f"the host token service failed: {type(p.error).__name__}: {p.error}"[:300])
        raise NoSlot(f"no connection slot of {host} from the crawl's host token service before this request's "
                     "deadline (per_host_connections across the whole crawl)")

    def release(self, lease: int) -> None:
        with self._cond:
            self._held.discard(lease)
            self._releases.append(lease)
            self._start_threads()
            self._cond.notify_all()

    def _start_threads(self) -> None:
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="host-tokens-send", daemon=True)
            self._sender.start()
        if self._poller is None and self._awaited():
            self._poller = threading.Thread(target=self._poll_loop, name="host-tokens-poll", daemon=True)
            self._poller.start()

    def _awaited(self) -> bool:
        """Whether a request sent to the actor still waits for its grant: worth a long-poll."""
        return any(p.sent and p.grant is None and p.error is None for p in self._pending.values())

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not (self._new or self._releases or (self._held and time.monotonic() >= self._renew_at)):
                    timeout = self._renew_at - time.monotonic() if self._held else self.idle_exit
                    if not self._cond.wait(max(timeout, 0.0)) and not (self._held or self._new or self._releases):
                        self._sender = None
                        return
                acquires, releases, self._new, self._releases = self._new, self._releases, [], []
                for req, *_ in acquires:
                    if (p := self._pending.get(req)) is not None:
                        p.sent = True
                renews = []
                if self._held and time.monotonic() >= self._renew_at:
                    renews, self._renew_at = sorted(self._held), time.monotonic() + self.renew_every
            self._exchange(acquires, releases, renews, 0.0)

    def _poll_loop(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(self._awaited, self.idle_exit):
                    self._poller = None
                    return
            self._exchange([], [], [], self.poll)

    def _exchange(self, acquires: list[tuple[int, str, float, float]], releases: list[int], renews: list[int],
                  wait: float) -> None:
        self.calls += 1
        try:
            grants = self._call(acquires, releases, renews, wait)
        except Exception as exc:  # noqa: BLE001 - the service's failure fails these requests, as NoSlot
            log.warning("host token service call failed: %s: %s", type(exc).__name__, exc)
            with self._cond:
                for req, *_ in acquires:
                    if (p := self._pending.get(req)) is not None:
                        p.error = exc
                        p.event.set()
            return
        with self._cond:
            for g in grants:
                p = self._pending.get(g.req)
                if p is None:  # its request gave up (deadline): give the slot back
                    if g.lease is not None:
                        self._releases.append(g.lease)
                        self._cond.notify_all()
                    continue
                if g.lease is not None:
                    if not self._held:
                        self._renew_at = time.monotonic() + self.renew_every
                    self._held.add(g.lease)
                p.grant = g
                p.event.set()
            self._start_threads()  # requests the actor queued: the poller waits for their grants
            self._cond.notify_all()


@dataclass
class TokenCounts:
    """What one Fetcher's requests got from the service: grants, grants that waited in a host's queue, timeouts."""

    granted: int = 0
    waited: int = 0
    timeouts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str) -> None:
        with self._lock:
            setattr(self, key, getattr(self, key) + 1)

    def as_dict(self) -> dict[str, int]:
        return {"granted": self.granted, "waited": self.waited, "timeouts": self.timeouts}


class JobLimiter:
    """HostLimiter's interface with slots and starts from the service; pauses and backoff stay local (`local`)."""

    def __init__(self, clients: list[TokenClient], hold: float, rate: float, local: HostLimiter | None = None) -> None:
        self.clients, self.hold, self.rate = clients, hold, rate
        self.local = local if local is not None else HostLimiter()
        self.counts = TokenCounts()

    @contextmanager
    def slot(self, host: str, deadline: float, max_pause: float = math.inf) -> Iterator[float]:
        client = self.clients[zlib.crc32(host.encode()) % len(self.clients)]
        while True:
            with self.local.slot(host, deadline, max_pause):  # waits out a pause (or raises HostPaused)
                pass
            try:
                grant = client.acquire(host, deadline, self.hold)
            except NoSlot:
                self.counts.add("timeouts")
                raise
            if grant.lease is None:
                self.counts.add("timeouts")
                raise NoSlot(f"{host} allows its next request in {grant.delay:.3g} s (per_host_rate {self.rate:g}/s "
                             "across the whole crawl), after this request's deadline")
            self.counts.add("granted")
            if grant.waited:
                self.counts.add("waited")
            try:
                if time.monotonic() + grant.delay > deadline:  # the service's clock saw a little more time left
                    self.counts.add("timeouts")
                    raise NoSlot(f"{host} allows its next request in {grant.delay:.3g} s (per_host_rate "
                                 f"{self.rate:g}/s across the whole crawl), after this request's deadline")
                if grant.delay > 0:
                    time.sleep(grant.delay)  # the request's start in the host's schedule
            except BaseException:
                client.release(grant.lease)
                raise
            if self.local.paused_for(host) <= 0:
                break
            client.release(grant.lease)  # a 429 paused the host meanwhile: wait that out, then ask again
        try:
            yield time.monotonic()
        finally:
            client.release(grant.lease)

    def pause(self, host: str, seconds: float, status: int | None = None) -> None:
        self.local.pause(host, seconds, status)

    def refused(self, host: str, started: float) -> float:
        return self.local.refused(host, started)

    def succeeded(self, host: str) -> None:
        self.local.succeeded(host)

    def paused_for(self, host: str) -> float:
        return self.local.paused_for(host)


# ---------------------------------------------------------------- the service on Ray

def service_names(output: str, actors: int) -> list[str]:
    """The actors' names for a crawl writing to `output`: a shard task finds them from its output URL."""
    digest = hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]
    return [f"clipline-host-tokens-{digest}-{i}" for i in range(actors)]


def enabled(cfg: Any) -> bool:
    return cfg.per_host_scope == "job" and bool(cfg.per_host_connections or cfg.per_host_rate)


@dataclass
class Service:
    """The running service of one crawl (driver side), and its actors' stats once stopped."""

    handles: list[Any]
    stats: dict[str, Any] = field(default_factory=dict)


@contextmanager
def running(cfg: Any, output: str) -> Iterator[Service | None]:
    """Start the crawl's host token actors (on the driver's node, no CPU) for the block, then stop them; their
    stats are summed into the Service. None without `per_host_scope: job` and a limit."""
    if not enabled(cfg):
        yield None
        return
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    actor = ray.remote(HostTokenService)
    options = dict(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=10_000,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                      soft=True))
    names = service_names(output, cfg.host_token_actors)
    for name in names:  # an actor of an earlier attempt of this stage in this driver, if it was not stopped
        try:
            ray.kill(ray.get_actor(name))
        except ValueError:
            pass
    service = Service([actor.options(name=name, **options).remote(cfg.per_host_connections, cfg.per_host_rate, token)
                       for name in names])
    try:
        yield service
    finally:
        try:
            stats = ray.get([h.close.remote() for h in service.handles], timeout=30)
            service.stats = _sum_stats(stats)
        except Exception as exc:  # noqa: BLE001 - stats are a report; the crawl's rows are what matter
            log.warning("host token service stats not read: %s: %s", type(exc).__name__, exc)
        for h in service.handles:
            ray.kill(h)


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = Counter()
    clients: set[str] = set()
    most = 0
    for s in stats:
        for k, v in s.items():
            if k == "clients":
                clients.update(v)
            elif k == "max_leases":
                most = max(most, v)
            elif isinstance(v, int):
                out[k] += v
    return {**out, "max_leases": most, "clients": len(clients), "nodes": len({c.split(":")[0] for c in clients})}


_clients: dict[tuple[str, str], TokenClient] = {}  # (actor name, incarnation) -> this process's client
_clients_lock = threading.Lock()


def attach(cfg: Any, out_url: str) -> JobLimiter | None:
    """In a shard task: a JobLimiter on the service of the crawl writing `out_url` (named after the directory it is
    in, the stage's output: any copy of a shard task must write there too); None when the limits hold per task.
    Raises if the service is not running (the shard task was started outside its crawl stage)."""
    if not enabled(cfg):
        return None
    import ray

    output = out_url.rsplit("/", 1)[0]
    clients = []
    for name in service_names(output, cfg.host_token_actors):
        try:
            handle = ray.get_actor(name)
            token = ray.get(handle.incarnation.remote(), timeout=60)
        except Exception as exc:
            raise RuntimeError(f"per_host_scope: job, but the crawl's host token service ({name}) is not running "
                               f"for {output}: {type(exc).__name__}: {exc}. A shard task run outside its crawl stage "
                               "needs per_host_scope: task") from exc
        with _clients_lock:
            client = _clients.get((name, token))
            if client is None:
                for key in [k for k in _clients if k[0] == name]:  # an earlier run's service of the same name
                    del _clients[key]
                me = f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"
                client = _clients[(name, token)] = TokenClient(_actor_call(handle, me))
        clients.append(client)
    return JobLimiter(clients, hold=LEASE_TTL, rate=cfg.per_host_rate)


def _actor_call(handle: Any, me: str) -> Call:
    import ray

    def call(acquires: list[tuple[int, str, float, float]], releases: list[int], renews: list[int],
             wait: float) -> list[Grant]:
        return [Grant(*g) for g in ray.get(handle.exchange.remote(me, acquires, releases, renews, wait))]

    return call
