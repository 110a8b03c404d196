"""robots.txt for the crawl: fetched once per origin per worker process, cached, honoured for several tokens.

An origin (scheme, host, port) has its /robots.txt requested once per `ttl` per worker process, whichever shard
task or fetch thread needs it first; concurrent requests for the same origin wait for that one answer, each
within its own request's deadline (as resolver.py does for names). The request itself is the caller's: the
Fetcher sends it through the same guarded opener as an image (address policy on every hop, deadline sockets,
byte cap), so robots.txt cannot reach an address an image could not.

What an answer means (RFC 9309, section 2.3.1):
- 2xx: the rules, parsed by urllib.robotparser.RobotFileParser from the text we fetched (it never fetches);
  at most MAX_ROBOTS_BYTES are read and parsed, the rest ignored (the RFC asks parsers for at least 500 KiB).
- 4xx other than 429, and a redirect chain we do not follow to its end: "unavailable", everything allowed.
- 5xx or 429: "unreachable", everything disallowed; the rows are `failed_to_download` with error_class
  `robots_unavailable`, which a refresh retries. The answer is kept `error_ttl` seconds, not `ttl`.
- A network failure (dns, connection, timeout, tls, protocol): everything disallowed too; the row keeps the
  failure's own class (the host is unreachable for the image as well) and says it was robots.txt's. Kept
  `error_ttl` seconds.
- Refused by the address policy: the row is `blocked` (ssrf), as an image there would be. Kept `error_ttl`.

A URL is allowed only if every token in `tokens` may fetch it: the crawler's own token and the AI crawlers'
tokens whose rules a site uses to opt out of AI training. A site that keeps GPTBot or CCBot out is taken to
object to its images training a model, whoever crawls them.

RobotFileParser's matching is not quite RFC 9309's: the first group whose user-agent is a substring of the
token applies (so a `Google` group applies to `Google-Extended`: stricter, never looser), the first matching
rule of a group wins (not the longest), and `*` and `$` in paths are not patterns. Known; see the README.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from urllib.robotparser import RobotFileParser

from pipelines.stages.crawl.resolver import Counts

MAX_ROBOTS_BYTES = 512 * 1024  # read and parsed per robots.txt (RFC 9309: at least 500 KiB)
MAX_ENTRIES = 20_000  # origins kept per process; past it the oldest go first


@dataclass(frozen=True)
class RobotsAnswer:
    """What fetching /robots.txt gave: an HTTP status and the body read, or a failure (error_class, message)."""

    http_status: int | None = None
    body: bytes | None = None
    status: str | None = None  # the row status a failure gives: failed_to_download or blocked
    error_class: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Rules:
    """One origin's robots.txt as the cache keeps it."""

    kind: str  # parsed | unavailable (4xx: all allowed) | unreachable (5xx/429: none) | failed (network: none)
    parser: RobotFileParser | None = None
    answer: RobotsAnswer = field(default_factory=RobotsAnswer)

    def disallowing(self, url: str, tokens: tuple[str, ...]) -> str | None:
        """The first token the rules keep out of `url`, or None when every token may fetch it."""
        if self.kind == "unavailable":
            return None
        if self.parser is None:
            return tokens[0] if tokens else "*"
        return next((t for t in tokens if not self.parser.can_fetch(t, url)), None)


def rules_from(answer: RobotsAnswer, tokens: tuple[str, ...]) -> Rules:
    """Rules for an answer (the RFC 9309 reading in the module docstring)."""
    code = answer.http_status
    if answer.error_class is not None:
        return Rules("failed", answer=answer)
    if code is not None and 200 <= code < 300:
        parser = RobotFileParser()
        parser.parse((answer.body or b"").decode("utf-8", errors="replace").splitlines())
        # only the groups our tokens read are kept: a cache of thousands of origins stays small
        # (typeshed does not declare `entries`, the parser's list of groups in file order)
        parser.entries = [e for e in parser.entries if any(e.applies_to(t) for t in tokens)]  # type: ignore[attr-defined]
        return Rules("parsed", parser=parser, answer=answer)
    if code is not None and (code == 429 or code >= 500):
        return Rules("unreachable", answer=answer)
    return Rules("unavailable", answer=answer)  # 4xx, or 3xx: redirects not followed to an answer


class RobotsCounts(Counts):
    """What one fetcher's robots lookups did. `fetches`: robots.txt requests it sent; `hits`: answered by the
    cache or by a fetch another request had started; `timeouts`: gave up waiting."""

    KEYS = ("fetches", "hits", "timeouts")


class RobotsTimeout(TimeoutError):
    """Another request's fetch of the origin's robots.txt did not finish within this request's deadline."""


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0
    rules: Rules | None = None


Fetch = Callable[[str, float], RobotsAnswer]  # (robots.txt URL, deadline) -> its answer


class RobotsCache:
    """origin -> Rules for `ttl` seconds (failures `error_ttl`); one fetch per origin at a time; thread-safe.

    `clock` times the entries only; waits are measured with time.monotonic(), as deadlines are.
    """

    def __init__(self, *, ttl: float = 3600.0, error_ttl: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 0 or error_ttl < 0:
            raise ValueError("ttl and error_ttl must be >= 0")
        self.ttl, self.error_ttl, self._clock = ttl, error_ttl, clock
        self._lock = threading.Condition()
        self._cache: dict[str, tuple[float, Rules]] = {}
        self._inflight: dict[str, _Pending] = {}

    def rules(self, origin: str, url: str, fetch: Fetch, tokens: tuple[str, ...], deadline: float,
              counts: RobotsCounts | None = None) -> Rules:
        """The rules of `origin` (its cache key), fetched from `url` with `fetch` by this thread unless cached or
        already being fetched, in which case this waits for that fetch until `deadline` (RobotsTimeout). What
        `fetch` raises propagates and is not kept; the requests waiting for it get a RobotsTimeout."""
        key = origin.lower()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > self._clock():
                if counts is not None:
                    counts.add("hits")
                return hit[1]
            pending = self._inflight.get(key)
            mine = pending is None
            if pending is None:
                pending = self._inflight[key] = _Pending()
            pending.waiters += 1
            self._lock.notify_all()
        if not mine:
            if counts is not None:
                counts.add("hits")
            wait = None if deadline == math.inf else max(deadline - time.monotonic(), 0.0)
            if not pending.done.wait(wait) or pending.rules is None:
                if counts is not None:
                    counts.add("timeouts")
                raise RobotsTimeout(f"{url} was still being fetched at this request's deadline"
                                    if not pending.done.is_set() else f"the fetch of {url} gave no answer")
            return pending.rules
        rules: Rules | None = None
        try:
            if counts is not None:
                counts.add("fetches")
            rules = rules_from(fetch(url, deadline), tokens)
        finally:  # however the fetch ends, its waiters are let go (with nothing, if it raised)
            with self._lock:
                del self._inflight[key]
                keep = self.ttl if rules is not None and rules.kind in ("parsed", "unavailable") else self.error_ttl
                if rules is not None and keep > 0:
                    self._cache.pop(key, None)  # re-inserted at the end: insertion order stays roughly expiry order
                    self._cache[key] = (self._clock() + keep, rules)
                    while len(self._cache) > MAX_ENTRIES:
                        del self._cache[next(iter(self._cache))]
            pending.rules = rules
            pending.done.set()
        return rules

    def wait_for_waiters(self, origin: str, count: int, timeout: float) -> bool:
        """Wait until `count` requests wait for the fetch of `origin`'s robots.txt now in flight (False after
        `timeout`): how a test knows concurrent requests share one fetch."""
        key = origin.lower()
        with self._lock:
            return self._lock.wait_for(lambda: key in self._inflight and self._inflight[key].waiters >= count,
                                       timeout)


_shared: dict[tuple[float, float, Hashable], RobotsCache] = {}
_shared_lock = threading.Lock()


def shared_cache(ttl: float, error_ttl: float, scope: Hashable) -> RobotsCache:
    """The process's robots.txt cache for these TTLs and `scope`: one for every fetcher (shard task) the process
    runs with the same scope. The scope holds what a cached answer depends on besides the origin: the tokens
    (only their groups are kept) and the address policy (an answer may be a refusal)."""
    key = (float(ttl), float(error_ttl), scope)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = RobotsCache(ttl=ttl, error_ttl=error_ttl)
        return _shared[key]


def _forget_after_fork() -> None:
    """A forked child starts with no cache: a lock or a fetch in flight in the parent would never finish in it."""
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
