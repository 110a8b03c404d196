"""Ports and waiting for servers on loopback."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def die_with_parent() -> None:
    """For subprocess.Popen(preexec_fn=...): the child gets SIGTERM when the process that started it dies, so
    a test session killed by a timeout leaves no server behind (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port nothing listens on at this moment, on 127.0.0.1."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports nothing listens on at this moment, on 127.0.0.1 (all bound at once, so no two
    are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(ready: Callable[[], T], timeout: float, what: str, interval: float = 0.2,
               alive: Callable[[], bool] | None = None, errors: tuple[type[BaseException], ...] = (),
               detail: Callable[[], str] | None = None) -> T:
    """Poll `ready` until it returns something truthy, and return that; fail naming `what` after `timeout` s
    (TimeoutError), or at once once `alive` is false (RuntimeError). `errors`: exceptions `ready` may raise
    that mean "not yet" (a server still starting); the last one is named in the failure. `detail`: more to
    say on failure (a log's tail)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            got = ready()
            if got:
                return got
        except errors as exc:
            last = exc
        exited = alive is not None and not alive()
        if exited or time.monotonic() > deadline:
            more = (f" (last error: {last!r})" if last is not None else "") + (f"\n{detail()}" if detail else "")
            if exited:
                raise RuntimeError(f"{what}: the process exited{more}")
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s{more}")
        time.sleep(interval)  # the polling interval of a bounded wait


def answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2) -> bool:
    """Whether a GET of `url` (a loopback address) answers 200 now; a refused or failed request is False."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False
