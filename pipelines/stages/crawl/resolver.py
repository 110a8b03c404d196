"""Name resolution for the crawl: a cache per process, shared by its fetch threads, bounded by each request's deadline.

`socket.getaddrinfo` cannot be given a timeout: a resolver that does not answer holds the calling thread as long
as the system lets it (often 5 s times attempts times name servers, per address family). So a lookup never calls
it on the fetch thread: the host is resolved on one of at most `threads` resolver threads, and the fetch waits
for the answer at most until the time its request has left, then fails with error_class `dns` (ResolveTimeout)
while the resolution carries on and fills the cache for the next request. A host whose resolution is in flight
is not resolved again: later lookups wait for the same answer, each within its own deadline. Hosts waiting for a
resolver thread queue up, one entry per host, so a stuck resolver costs at most `threads` threads.

Answers are kept for `ttl` seconds (0: nothing is kept; every lookup resolves, still coalesced and bounded) and
"no such name" answers for `negative_ttl`; other failures (a resolver that answers "try again") are not kept.
What the cache returns is only addresses: the address policy (netpolicy.check) judges them on every connection.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

AddrInfo = tuple[Any, ...]  # one getaddrinfo tuple: (family, type, proto, canonname, sockaddr)
ResolveFn = Callable[[str], list[AddrInfo]]  # host -> its stream addresses, the port in sockaddr unused

# "no such name" and "no address of that kind": answers, kept for negative_ttl; anything else may pass
_NEGATIVE = {socket.EAI_NONAME} | ({socket.EAI_NODATA} if hasattr(socket, "EAI_NODATA") else set())
MAX_ENTRIES = 100_000  # hosts kept per process; past it the oldest go first (a web-scale list has millions)


class ResolveTimeout(socket.gaierror):
    """The host's resolution did not finish within the time the request had left (classified as `dns`)."""


def system_resolve(host: str) -> list[AddrInfo]:
    """The system resolver's stream addresses of `host` (port 0)."""
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)


@dataclass
class _Pending:
    """One resolution in flight; its waiters wait on `done`."""

    done: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0  # lookups waiting for it, the one that started it included
    infos: list[AddrInfo] | None = None
    error: OSError | None = None


@dataclass
class _Entry:
    expires: float
    infos: list[AddrInfo] | None
    error: OSError | None


class Counts:
    """Counters of one fetcher's (one shard task's) events, added from its fetch threads; `as_dict` gives the
    class's KEYS, in order, those never added as 0."""

    KEYS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: self._counts[k] for k in self.KEYS}


class DNSCounts(Counts):
    """What the lookups of one fetcher did.

    `hits`: answered from the cache or by a resolution another request had started; `misses`: resolutions
    started; `timeouts`: lookups that gave up at their request's deadline (counted besides their hit or miss).
    """

    KEYS = ("hits", "misses", "timeouts")


class Resolver:
    """A TTL cache of host -> addresses in front of `resolve`, run on at most `threads` threads; thread-safe.

    `clock` times the cache's entries only; a lookup's wait is measured with time.monotonic(), as its deadline is.
    """

    def __init__(self, *, ttl: float = 300.0, negative_ttl: float = 30.0, threads: int = 8,
                 resolve: ResolveFn = system_resolve, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 0 or negative_ttl < 0 or threads < 1:
            raise ValueError("ttl and negative_ttl must be >= 0 and threads >= 1")
        self.ttl, self.negative_ttl, self.threads = ttl, negative_ttl, threads
        self._resolve, self._clock = resolve, clock
        self._lock = threading.Condition()  # notified when a lookup starts waiting for a resolution
        self._cache: dict[str, _Entry] = {}  # in insertion order, which is expiry order within each kind
        self._inflight: dict[str, _Pending] = {}
        self._queue: deque[str] = deque()  # hosts whose resolution waits for a resolver thread
        self._workers = 0

    def lookup(self, host: str, port: int, wait_until: float, counts: DNSCounts | None = None) -> list[AddrInfo]:
        """`host`'s stream addresses with `port`, waiting for them until `wait_until` (time.monotonic()) at most.

        An IP literal needs no resolver and is answered at once. Raises what the resolution raised
        (socket.gaierror for a name that does not exist), or ResolveTimeout.
        """
        if _is_literal(host):
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        key, start = host.lower(), time.monotonic()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry.expires > self._clock():
                pending: _Pending | None = None
                infos, error = entry.infos, entry.error
            else:
                pending = self._inflight.get(key)
                if pending is None:
                    pending = self._inflight[key] = _Pending()
                    self._queue.append(key)
                    self._start_worker()
                    what = "misses"
                else:
                    what = "hits"  # another request's resolution answers this one too
                pending.waiters += 1
                self._lock.notify_all()
        if pending is None:
            what = "hits"
        elif not pending.done.wait(None if wait_until == math.inf else max(wait_until - start, 0.0)):
            if counts is not None:
                counts.add(what)
                counts.add("timeouts")
            waited = time.monotonic() - start
            raise ResolveTimeout(f"resolving {host} did not finish in the {waited:.3g} s this request had left "
                                 f"(the resolution goes on for later requests)")
        else:
            infos, error = pending.infos, pending.error
        if counts is not None:
            counts.add(what)
        if error is not None:
            raise copy.copy(error)  # a copy per raise: threads raising one cached exception would share its traceback
        assert infos is not None
        return [(*info[:4], (info[4][0], port, *info[4][2:])) for info in infos]

    def wait_for_waiters(self, host: str, count: int, timeout: float) -> bool:
        """Wait until `count` lookups have waited for the resolution of `host` now in flight (False after `timeout`):
        how a test knows concurrent requests share one resolution."""
        key = host.lower()
        with self._lock:
            return self._lock.wait_for(lambda: key in self._inflight and self._inflight[key].waiters >= count,
                                       timeout)

    def _start_worker(self) -> None:
        """A resolver thread for the queue, unless `threads` already serve it (under the lock)."""
        if self._workers < self.threads:
            self._workers += 1
            # a daemon: a resolution stuck in the system resolver must not hold the process at exit
            threading.Thread(target=self._work, name="clipline-resolver", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._workers -= 1
                    return
                key = self._queue.popleft()
            infos: list[AddrInfo] | None = None
            error: OSError | None = None
            try:
                infos = list(self._resolve(key))
                if not infos:
                    error = socket.gaierror(socket.EAI_NONAME, f"{key} has no address")
            except UnicodeError as exc:  # a label the IDNA codec refuses: no name to look up
                error = socket.gaierror(socket.EAI_NONAME, f"{key} is not a valid host name: {exc}")
            except socket.gaierror as exc:  # the system's message does not say which name it could not resolve
                error = socket.gaierror(exc.errno, f"cannot resolve {key}: {exc.strerror}")
            except OSError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - the waiters get it as a failed lookup, not a dead thread
                error = OSError(f"resolving {key} failed: {type(exc).__name__}: {exc}")
            self._finish(key, infos, error)

    def _finish(self, key: str, infos: list[AddrInfo] | None, error: OSError | None) -> None:
        with self._lock:
            pending = self._inflight.pop(key)
            pending.infos, pending.error = infos, error
            negative = isinstance(error, socket.gaierror) and error.errno in _NEGATIVE
            keep = self.ttl if error is None else self.negative_ttl if negative else 0.0
            if keep > 0 and self.ttl > 0:
                self._cache.pop(key, None)  # re-inserted at the end: insertion order stays expiry order
                self._cache[key] = _Entry(self._clock() + keep, infos, error)
                while len(self._cache) > MAX_ENTRIES:
                    del self._cache[next(iter(self._cache))]
        pending.done.set()


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


_shared: dict[tuple[float, float, int], Resolver] = {}
_shared_lock = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child has none of its parent's resolver threads: a resolver it inherited would queue for ever."""
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def shared(ttl: float, negative_ttl: float, threads: int) -> Resolver:
    """The process's resolver for these settings: one cache for every fetcher (shard task) the process runs."""
    key = (float(ttl), float(negative_ttl), int(threads))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Resolver(ttl=ttl, negative_ttl=negative_ttl, threads=threads)
        return _shared[key]
