"""Politeness towards each host a shard crawls: a connection cap, a request rate, and pauses on 429/503.

One `HostLimiter` is shared by the download threads of one `Fetcher` (one shard task), so the limits
hold per shard task, not across the cluster: N shard tasks crawling one host may reach it N times over.
Every wait is a `threading.Condition` wait bounded by the caller's deadline, and a release or a new
pause wakes the waiters, so nothing sleep-polls and nothing waits past its deadline.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import SplitResult

_DEFAULT_PORTS = {"http": 80, "https": 443}


class NoSlot(TimeoutError):
    """No connection or rate slot for the host before the request's deadline (classified as a timeout)."""


class HostPaused(Exception):
    """The host is paused (after a 429 or 503) for longer than the request may wait."""

    def __init__(self, host: str, seconds: float, status: int | None) -> None:
        super().__init__(f"{host} is paused for another {seconds:.3g} s"
                         + (f" after HTTP {status}" if status else ""))
        self.host, self.seconds, self.status = host, seconds, status


@dataclass
class _Host:
    active: int = 0  # requests in flight
    next_start: float = -math.inf  # earliest start of the next request (per_host_rate)
    paused_until: float = -math.inf
    pause_status: int | None = None  # the HTTP status that caused the latest pause
    strikes: int = 0  # consecutive refusals (429/503), for the backoff
    struck_at: float = -math.inf  # when the latest strike was counted


class HostLimiter:
    """Connection cap, rate and pauses per host key; thread-safe. 0 for `connections` or `rate`: no limit."""

    def __init__(self, connections: int = 0, rate: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if connections < 0 or rate < 0:
            raise ValueError("connections and rate must be >= 0")
        self.connections, self.rate, self._clock = connections, rate, clock
        self._cond = threading.Condition()
        self._hosts: dict[str, _Host] = {}

    @contextmanager
    def slot(self, host: str, deadline: float, max_pause: float = math.inf) -> Iterator[float]:
        """Hold one of the host's connection slots for a request; yields the (monotonic) start time.

        Waits while the host is paused, all its slots are taken, or its rate does not allow another
        start yet. Raises HostPaused at once if the pause ends after `deadline` or more than `max_pause`
        from now (waiting would be pointless or longer than allowed), and NoSlot when no slot is free
        by `deadline`.
        """
        with self._cond:
            st = self._hosts.setdefault(host, _Host())
            while True:
                now = self._clock()
                if st.paused_until > now:
                    if st.paused_until > deadline or st.paused_until - now > max_pause:
                        raise HostPaused(host, st.paused_until - now, st.pause_status)
                    ready_at = st.paused_until
                elif self.connections and st.active >= self.connections:
                    ready_at = deadline  # a release wakes us earlier
                elif st.next_start > now:
                    if st.next_start > deadline:
                        raise NoSlot(f"{host} allows its next request in {st.next_start - now:.3g} s "
                                     f"(per_host_rate {self.rate:g}/s), after this request's deadline")
                    ready_at = st.next_start
                else:
                    break
                if now >= deadline:
                    raise NoSlot(f"all {self.connections} connection slot(s) of {host} stayed busy "
                                 "until this request's deadline")
                self._cond.wait(min(ready_at, deadline) - now)
            st.active += 1
            if self.rate:
                st.next_start = now + 1.0 / self.rate
        try:
            yield now
        finally:
            with self._cond:
                st.active -= 1
                self._cond.notify_all()

    def pause(self, host: str, seconds: float, status: int | None = None) -> None:
        """No request to `host` starts for `seconds` from now (an existing longer pause stays)."""
        with self._cond:
            st = self._hosts.setdefault(host, _Host())
            until = self._clock() + max(seconds, 0.0)
            if until > st.paused_until:
                st.paused_until, st.pause_status = until, status
            self._cond.notify_all()  # waiters re-check: the pause may now exceed what they may wait

    def refused(self, host: str, started: float) -> float:
        """Count a 429/503 to a request that started at `started`; return the backoff it calls for.

        The backoff doubles per consecutive refusal: 1, 2, 4 ... s. Requests that were already under
        way when the previous refusal came are the same burst and do not double it again, else a burst
        of 16 concurrent requests would escalate to hours.
        """
        with self._cond:
            st = self._hosts.setdefault(host, _Host())
            if started >= st.struck_at or st.strikes == 0:
                st.strikes += 1
                st.struck_at = self._clock()
            return float(2 ** min(st.strikes - 1, 30))

    def succeeded(self, host: str) -> None:
        """A success ends the host's run of refusals: its next backoff starts at 1 s again."""
        with self._cond:
            if (st := self._hosts.get(host)) is not None:
                st.strikes = 0

    def paused_for(self, host: str) -> float:
        """Seconds until the host's pause ends; 0 when it is not paused."""
        with self._cond:
            st = self._hosts.get(host)
            return max(0.0, st.paused_until - self._clock()) if st else 0.0


def host_key(parts: SplitResult) -> str:
    """The lowercased host:port limits apply to; the default port spelled out, so h and h:80 share them."""
    host = parts.hostname or ""
    try:
        port: int | str = parts.port or _DEFAULT_PORTS.get(parts.scheme) or ""
    except ValueError:  # a malformed port: urllib reports it when it tries the request
        port = parts.netloc.rpartition(":")[2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP-date); None if absent or unreadable.

    `now` is the wall-clock time (time.time()) an HTTP-date is measured from; a date in the past is 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), 1e9)  # an absurd delay is just "too long"; keep it finite for messages
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are GMT
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
