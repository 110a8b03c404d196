"""Ports and waiting for servers on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def die_with_parent() -> None:
    """For subprocess.Popen(preexec_fn=...): the child gets SIGTERM when the process that started it dies, so
    a test session killed by a timeout leaves no server behind (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port nothing listens on at this moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.2,
               alive: Callable[[], bool] | None = None) -> None:
    """Poll `ready` until it is true; fail naming `what` after `timeout` s, or at once once `alive` is false."""
    deadline = time.monotonic() + timeout
    while not ready():
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(interval)


def answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
