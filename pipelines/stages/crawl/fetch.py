"""One HTTP(S) fetch, safe by default: scheme check, address policy on every connection, byte cap.

Every connection urllib opens - the first request and each redirect hop - resolves the host itself,
refuses if any resolved address is not public (unless an `allow_networks` CIDR covers it) and then
connects to the address it checked, so DNS cannot answer differently between check and connect.
Proxies from the environment are ignored: through a proxy the check would see the proxy, not the host.
Every read on those connections waits at most until the request's deadline, so a server that drips its
status line, headers or body a byte at a time (each read well inside the timeout) cannot hold a thread
past it, and a redirect's body is never read.
Politeness per host (a connection cap, a rate, pauses and retries on 429/503) lives in polite.py.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import math
import socket
import ssl
import string
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from img2dataset.downloader import is_disallowed  # img2dataset's X-Robots-Tag opt-out parser

from pipelines import __version__
from pipelines.stages.crawl.polite import HostLimiter, HostPaused, NoSlot, host_key, retry_after

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(OSError):
    """The host resolves to an address the policy refuses."""


class TooLarge(Exception):
    pass


@dataclass(frozen=True)
class AddressPolicy:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def from_cidrs(cls, allow: list[str], deny: list[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in allow),
                   tuple(ipaddress.ip_network(c, strict=False) for c in deny))

    def refuses(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        # an IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64, compatible) is judged by both
        return any(self._refuses(a) for a in (ip, *_embedded_ipv4(ip)))

    def _refuses(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(ip in net for net in self.deny):
            return True
        if any(ip in net for net in self.allow):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6 and ip not in _NAT64:
            return True  # site-local fec0::/10, IPv4-compatible ::a.b.c.d and other legacy space
        if isinstance(ip, ipaddress.IPv4Address) and ip in _IETF_V4:
            return True  # Python counts some of it global; Oracle Cloud's legacy metadata service is 192.0.0.192
        # not global: loopback, private, link-local (cloud metadata), shared, reserved, unspecified
        return not ip.is_global or ip.is_multicast


_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")  # IETF protocol assignments: anycast relays, no web servers


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


class _Deadline:
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


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    pass


# what http.client passes for "no timeout given"; private, so typeshed has no name for it
_DEFAULT_TIMEOUT = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]


def _guarded_connect(policy: AddressPolicy, address, timeout=_DEFAULT_TIMEOUT, source_address=None,
                     *, deadline: float = math.inf):
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if policy.refuses(str(sockaddr[0])):
            raise BlockedAddress(f"{host} resolves to {sockaddr[0]}, which is not a public address "
                                 "(add its network to allow_networks to crawl it)")
    last: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = _DeadlineSocket(family, socktype, proto)
        try:
            sock.deadline = deadline
            if timeout is not _DEFAULT_TIMEOUT:
                sock.read_timeout = timeout
            sock._arm()  # the connect, too, waits at most the timeout and until the deadline
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"no address for {host}")


class _GuardedHTTP(http.client.HTTPConnection):
    def __init__(self, *args, policy: AddressPolicy, deadline: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_connect, policy, deadline=deadline)


class _GuardedHTTPS(http.client.HTTPSConnection):
    def __init__(self, *args, policy: AddressPolicy, deadline: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = functools.partial(_guarded_connect, policy, deadline=deadline)

    def connect(self):
        super().connect()  # TCP through _guarded_connect, then the TLS handshake, within the timeout it left
        self.sock.deadline, self.sock.read_timeout = self._deadline, self.timeout  # a _DeadlineSSLSocket


class _TimedRequest(urllib.request.Request):
    deadline: float = math.inf  # time.monotonic() by which every hop ends; a redirect's Request gets it too


def _deadline(req: urllib.request.Request) -> float:
    return getattr(req, "deadline", math.inf)  # set by Fetcher._attempt and carried over redirects


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTP, policy=self.policy, deadline=_deadline(req)), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy):
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(context=context)
        self.policy = policy

    def https_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTPS, policy=self.policy, deadline=_deadline(req)), req,
                            context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limit: int):
        super().__init__()
        # typeshed declares a ClassVar; urllib reads it through self, so this sets the limit of this handler only
        self.max_redirections = limit  # type: ignore[misc]

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if self.max_redirections == 0:  # urllib checks its limit only from the second hop on
            raise urllib.error.HTTPError(req.full_url, code, "redirects are not followed (max_redirects: 0)",
                                         headers, fp)
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl!r}", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.deadline = _deadline(req)
            # urllib reads a redirect's body to its end before it follows: without a bound on size or time
            fp.close()
        return new

    def http_error_302(self, req, fp, code, msg, headers):
        try:
            return super().http_error_302(req, fp, code, msg, headers)
        except ValueError as exc:  # an unparsable Location such as http://[::1/x: the answer is bad, not the URL
            raise urllib.error.HTTPError(req.full_url, code, f"redirect to an unusable Location: {exc}", headers,
                                         fp) from None

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


@dataclass
class Fetched:
    data: bytes | None = None
    status: str = "success"  # success | failed_to_download | opted_out | blocked | invalid
    error_class: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    retries: int = 0  # 429/503 answers retried after their Retry-After (or a backoff)


_REFUSALS = (429, 503)  # "not now": the host asks us to come back later


class Fetcher:
    """Thread-safe: one opener and one HostLimiter shared by a shard's download threads.

    Politeness, per host (lowercased host:port of the requested URL) and per Fetcher, i.e. per shard
    task: at most `per_host_connections` requests in flight (0: no cap), starts at least
    1/`per_host_rate` s apart (0: no limit). A 429 or 503 pauses the host for every thread for its
    Retry-After, or without one for a backoff of 1, 2, 4 ... s per consecutive refusal; the request is
    retried after the pause up to `http_retries` times, unless the wait is longer than `max_retry_wait`
    or than the request has left, in which case it gives up at once (a refresh retries such rows).

    Every fetch returns within `budget` = 3*timeout*(1 + http_retries) + max_retry_wait*http_retries
    seconds of its start (plus DNS resolution, which the resolver bounds): each attempt gets at most
    3*timeout, each retry wait at most max_retry_wait, and waits for a connection slot, a rate slot or a
    pause count against the same deadline - a request that cannot start in time fails as a timeout.
    """

    def __init__(self, *, timeout: float, max_bytes: int, max_redirects: int, policy: AddressPolicy,
                 user_agent_token: str, contact: str | None, disallowed: list[str], per_host_connections: int = 0,
                 per_host_rate: float = 0.0, http_retries: int = 0, max_retry_wait: float = 60.0) -> None:
        self.timeout, self.max_bytes = timeout, max_bytes
        self.http_retries, self.max_retry_wait = http_retries, max_retry_wait
        self.budget = 3 * timeout * (1 + http_retries) + max_retry_wait * http_retries
        self.limiter = HostLimiter(per_host_connections, per_host_rate)
        # img2dataset's parser lowercases the header's token before comparing it with ours
        self.token, self.disallowed = user_agent_token.lower(), [d.lower() for d in disallowed]
        extra = f"; +{contact}" if contact else ""
        self.user_agent = f"Mozilla/5.0 (compatible; {user_agent_token}/{__version__}{extra})"
        self.opener = urllib.request.OpenerDirector()
        for h in (urllib.request.ProxyHandler({}), urllib.request.UnknownHandler(), _HTTPHandler(policy),
                  _HTTPSHandler(policy), urllib.request.HTTPDefaultErrorHandler(), _Redirects(max_redirects),
                  urllib.request.HTTPErrorProcessor()):
            self.opener.add_handler(h)

    def fetch(self, url: str | None) -> Fetched:
        try:
            parts = urlsplit(url or "")
            if url is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("not an http(s) URL with a host")
            # spaces and non-ASCII characters are common in web-scale lists: encode them as browsers do
            url = quote(url, safe=string.punctuation).encode("ascii").decode()
        except (ValueError, UnicodeError) as exc:
            return Fetched(status="invalid", error_class="invalid_url",
                           error_message=f"expected an http(s) URL, got {url!r}: {exc}"[:500])
        host, deadline = host_key(parts), time.monotonic() + self.budget
        retries, got = 0, None
        while True:
            try:
                # the slot is held for the request only: a retry's wait happens in slot(), holding none
                with self.limiter.slot(host, deadline, max_pause=self.max_retry_wait) as started:
                    got, asked = self._attempt(url, min(started + 3 * self.timeout, deadline))
                    refused = got.status == "failed_to_download" and got.http_status in _REFUSALS
                    wait = 0.0
                    if refused:
                        backoff = self.limiter.refused(host, started)
                        wait = backoff if asked is None else asked
                        self.limiter.pause(host, wait, got.http_status)  # before the slot frees: no one slips in
                    elif got.status == "success":
                        self.limiter.succeeded(host)
            except HostPaused as exc:  # a refusal paused the host for longer than this request may wait
                why = f"not {'retried' if got else 'requested'}: {exc}, longer than this request may wait"
                if got is not None:
                    return replace(got, error_message=f"{got.error_message}; {why}"[:500], retries=retries)
                return Fetched(status="failed_to_download", error_class=_http_class(exc.status or 503),
                               error_message=why[:500])
            except NoSlot as exc:
                if got is not None:
                    return replace(got, error_message=f"{got.error_message}; not retried: {exc}"[:500],
                                   retries=retries)
                return Fetched(status="failed_to_download", error_class="timeout",
                               error_message=f"not requested: {exc}"[:500])
            got.retries = retries
            if not refused or retries >= self.http_retries:
                return got
            said = f"Retry-After {wait:g} s" if asked is not None else f"backoff {wait:g} s"
            if wait > self.max_retry_wait:
                return replace(got, error_message=f"HTTP {got.http_status}: {said} is longer than max_retry_wait "
                                                  f"{self.max_retry_wait:g} s; not retried in this run"[:500])
            if time.monotonic() + wait >= deadline:
                return replace(got, error_message=f"HTTP {got.http_status}: {said} is longer than this request "
                                                  f"has left of its {self.budget:g} s; not retried in this run"[:500])
            retries += 1

    def _attempt(self, url: str, deadline: float) -> tuple[Fetched, float | None]:
        """One request, redirects followed, finished by `deadline`; with a refusal's Retry-After in seconds."""
        try:
            req = _TimedRequest(url, headers={"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.8"})
            req.deadline = deadline  # every read of every hop's connection ends by it (_Deadline)
            timeout = max(min(self.timeout, deadline - time.monotonic()), 0.001)
            with self.opener.open(req, timeout=timeout) as resp:
                if self.disallowed and is_disallowed(resp.headers, self.token, self.disallowed):
                    tags = ", ".join(resp.headers.get_all("X-Robots-Tag"))
                    return Fetched(status="opted_out", error_class="opted_out", http_status=resp.status,
                                   error_message=f"X-Robots-Tag: {tags}"), None
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise TooLarge(f"Content-Length {length} exceeds max_bytes {self.max_bytes}")
                data = self._read(resp, deadline)
                return Fetched(data=data, http_status=resp.status), None
        except urllib.error.HTTPError as exc:
            code = exc.code
            wait = retry_after(exc.headers.get("Retry-After")) if code in _REFUSALS and exc.headers else None
            exc.close()
            return Fetched(status="failed_to_download", error_class=_http_class(code), http_status=code,
                           error_message=f"HTTP {code}: {exc.reason}"[:500]), wait
        except TooLarge as exc:
            return Fetched(status="failed_to_download", error_class="too_large", error_message=str(exc)), None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            cls = classify(reason)
            status = {"ssrf": "blocked", "invalid_url": "invalid"}.get(cls, "failed_to_download")
            return Fetched(status=status, error_class=cls,
                           error_message=f"{type(reason).__name__}: {reason}"[:500]), None

    def _read(self, resp, deadline: float) -> bytes:
        """The body, cut off past max_bytes, and abandoned past the deadline (a slow-drip server).

        read1 does at most one socket read, each bounded by the timeout and the deadline (_Deadline), so
        a server that drips a byte at a time cannot hold the thread for a whole 64 KiB block's worth of reads.
        """
        chunks, size = [], 0
        while block := resp.read1(min(1 << 16, self.max_bytes + 1 - size)):
            chunks.append(block)
            size += len(block)
            if size > self.max_bytes:
                raise TooLarge(f"body exceeds max_bytes {self.max_bytes}; cut off")
            if time.monotonic() > deadline:
                raise TimeoutError(f"body not complete within 3 x timeout ({3 * self.timeout:g} s)")
        if resp.length:  # read1 ends quietly where the connection closed short of the Content-Length
            raise http.client.IncompleteRead(b"".join(chunks), resp.length)
        return b"".join(chunks)


def _http_class(code: int) -> str:
    return ("redirect" if 300 <= code < 400 else "http_429" if code == 429 else
            "http_4xx" if 400 <= code < 500 else "http_5xx" if 500 <= code < 600 else "http_other")


def classify(exc: object) -> str:
    if isinstance(exc, BlockedAddress):
        return "ssrf"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, http.client.HTTPException):
        return "protocol"
    if isinstance(exc, ValueError):
        return "invalid_url"
    return "connection"
