"""Connections whose every read ends by the request's deadline, opened only to addresses the policy allows.

A socket timeout bounds one read only: a server that sends a byte of its status line, headers or body
every half second (each read well inside the timeout) would hold a thread for ever. The sockets here
(plain and TLS) also stop at a deadline fixed when the request starts, and the HTTP(S) connections open
them through `guarded_connect`, which resolves the host within the deadline (resolver.py: a cache per
process, and a wait that ends when the request's time does), refuses it if the address policy refuses any of
its addresses (netpolicy.py), then connects to an address it checked.
"""

from __future__ import annotations

import functools
import http.client
import math
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipelines.stages.crawl.netpolicy import AddressPolicy, check
from pipelines.stages.crawl.resolver import AddrInfo

# (host, port, wait until time.monotonic()) -> the host's stream addresses with that port: Resolver.lookup
Lookup = Callable[[str, int, float], list[AddrInfo]]


class Deadline:
    """A socket mixin: each read waits at most its timeout and at most until `deadline` (time.monotonic()).

    A timeout bounds one read only: a server that sends a byte of its status line or headers every half
    second keeps http.client reading them for ever, and a flood of `100 Continue` responses never pauses
    at all. A read that would start at or past the deadline raises instead.
    """

    deadline: float = math.inf
    read_timeout: float | None = None  # the timeout of one read; None: block (the connection's own setting)

    if TYPE_CHECKING:  # a mixin: the socket class it is mixed into has it
        def settimeout(self, value: float | None, /) -> None: ...

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(self._LATE)
        limit = left if self.read_timeout is None else min(left, self.read_timeout)
        self.settimeout(None if limit == math.inf else limit)

    def _within(self, read, *args, **kwargs):
        self._arm()
        try:
            return read(*args, **kwargs)
        except TimeoutError:
            if time.monotonic() >= self.deadline:  # the deadline cut this read short, not its own timeout
                raise TimeoutError(self._LATE) from None
            raise

    _LATE = ("response not complete by the request's deadline (3 x timeout): the server sends too slowly "
             "or without end")

    def recv_into(self, *args, **kwargs):
        return self._within(super().recv_into, *args, **kwargs)

    def recv(self, *args, **kwargs):
        return self._within(super().recv, *args, **kwargs)


class DeadlineSocket(Deadline, socket.socket):
    pass


class DeadlineSSLSocket(Deadline, ssl.SSLSocket):
    pass


# what http.client passes for "no timeout given"; private, so typeshed has no name for it
DEFAULT_TIMEOUT = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]


def guarded_connect(policy: AddressPolicy, address, timeout=DEFAULT_TIMEOUT, source_address=None,
                    *, deadline: float = math.inf, lookup: Lookup):
    """http.client's create_connection, to an address the policy allows (netpolicy.check), as a
    DeadlineSocket whose connect and reads end by `deadline`. The resolution (`lookup`), like the connect,
    waits at most the timeout and until the deadline."""
    host, port = address
    wait_until = deadline if timeout is DEFAULT_TIMEOUT or timeout is None else min(deadline, time.monotonic() + timeout)
    infos = check(policy, host, lookup(host, port, wait_until))
    last: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = DeadlineSocket(family, socktype, proto)
        try:
            sock.deadline = deadline
            if timeout is not DEFAULT_TIMEOUT:
                sock.read_timeout = timeout
            sock._arm()  # the connect, too, waits at most the timeout and until the deadline
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"no address for {host}")


class GuardedHTTP(http.client.HTTPConnection):
    """An HTTP connection opened through guarded_connect."""

    def __init__(self, *args, policy: AddressPolicy, deadline: float, lookup: Lookup, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(guarded_connect, policy, deadline=deadline, lookup=lookup)


class GuardedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection opened through guarded_connect; its TLS socket keeps the same deadline."""

    def __init__(self, *args, policy: AddressPolicy, deadline: float, lookup: Lookup, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = functools.partial(guarded_connect, policy, deadline=deadline, lookup=lookup)

    def connect(self):
        super().connect()  # TCP through guarded_connect, then the TLS handshake, within the timeout it left
        self.sock.deadline, self.sock.read_timeout = self._deadline, self.timeout  # a DeadlineSSLSocket
