"""One HTTP(S) fetch, safe by default: scheme check, address policy on every connection, byte cap.

Every connection urllib opens - the first request and each redirect hop - resolves the host itself
(through the process's cache, within the request's deadline: resolver.py), refuses if any resolved
address is not public (unless an `allow_networks` CIDR covers it) and then connects to the address it
checked, so DNS cannot answer differently between check and connect (the policy: netpolicy.py). Proxies from the environment are ignored: through a proxy the check would
see the proxy, not the host. Every read on those connections waits at most until the request's
deadline, so a server that drips its status line, headers or body a byte at a time (each read well
inside the timeout) cannot hold a thread past it (the sockets: sockets.py), and a redirect's body is
never read. Politeness per host (a connection cap, a rate, pauses and retries on 429/503) lives in polite.py.

Opt-outs: before the first request to an origin, its robots.txt (robots.py: cached per worker process, fetched
through this same opener, slot and deadline as the image); then, on the image's response, X-Robots-Tag
directives (img2dataset's parser) and a TDMRep `tdm-reservation: 1` header. Each is `opted_out` with its own
error_class: robots_txt, x_robots_tag, tdm_reservation.
"""

from __future__ import annotations

import functools
import http.client
import math
import socket
import ssl
import string
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from urllib.parse import SplitResult, quote, urlsplit

from img2dataset.downloader import is_disallowed  # img2dataset's X-Robots-Tag opt-out parser

from pipelines import __version__
from pipelines.stages.crawl.hosttokens import JobLimiter
from pipelines.stages.crawl.netpolicy import AddressPolicy, BlockedAddress
from pipelines.stages.crawl.polite import HostLimiter, HostPaused, NoSlot, host_key, retry_after
from pipelines.stages.crawl.resolver import DNSCounts, Resolver, ResolveTimeout, shared
from pipelines.stages.crawl.robots import (
    MAX_ROBOTS_BYTES,
    RobotsAnswer,
    RobotsCache,
    RobotsCounts,
    RobotsTimeout,
    shared_cache,
)
from pipelines.stages.crawl.sockets import DeadlineSSLSocket, GuardedHTTP, GuardedHTTPS, Lookup


class TooLarge(Exception):
    pass


class _TimedRequest(urllib.request.Request):
    deadline: float = math.inf  # time.monotonic() by which every hop ends; a redirect's Request gets it too


def _deadline(req: urllib.request.Request) -> float:
    return getattr(req, "deadline", math.inf)  # set by Fetcher._attempt and carried over redirects


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy, lookup: Lookup):
        super().__init__()
        self.policy, self.lookup = policy, lookup

    def http_open(self, req):
        return self.do_open(functools.partial(GuardedHTTP, policy=self.policy, deadline=_deadline(req),
                                              lookup=self.lookup), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy, lookup: Lookup):
        context = ssl.create_default_context()
        context.sslsocket_class = DeadlineSSLSocket
        super().__init__(context=context)
        self.policy, self.lookup = policy, lookup

    def https_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPS, policy=self.policy, deadline=_deadline(req),
                                              lookup=self.lookup), req, context=self._context)


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
    1/`per_host_rate` s apart (0: no limit); given a `limiter` from the crawl's host token service
    (hosttokens.JobLimiter), the cap and rate hold for the whole crawl instead. A 429 or 503 pauses the host
    for every thread of the Fetcher for its
    Retry-After, or without one for a backoff of 1, 2, 4 ... s per consecutive refusal; the request is
    retried after the pause up to `http_retries` times, unless the wait is longer than `max_retry_wait`
    or than the request has left, in which case it gives up at once (a refresh retries such rows).

    Every fetch returns within `budget` = 3*timeout*(1 + http_retries) + max_retry_wait*http_retries
    seconds of its start: each attempt gets at most 3*timeout, each retry wait at most max_retry_wait, and
    waits for a connection slot, a rate slot or a pause count against the same deadline - a request that
    cannot start in time fails as a timeout. Name resolution counts too: each connection waits for its
    host's addresses at most the timeout and until the deadline (resolver.py), else the row fails as `dns`.

    Names are resolved through `resolver`, by default the process's own (resolver.shared) for `dns_ttl`,
    `dns_negative_ttl` and `dns_threads`, so every shard task a worker process runs shares its cache;
    `dns` counts this fetcher's lookups (hits, misses, timeouts).

    With `robots_txt`, a URL is fetched only if the robots.txt of its origin lets every token in `tokens`
    (`user_agent_token` first, then `optout_user_agents`) fetch it; the rules come from `robots` (by default the
    process's cache, robots.shared), and fetching them counts against the row's deadline and takes a connection
    slot of the host like any request. `robots_counts` counts this fetcher's fetches, cache hits and timeouts.
    X-Robots-Tag directives in `disallowed` opt out for any of the tokens too; `tdm_reservation` honours TDMRep.
    """

    def __init__(self, *, timeout: float, max_bytes: int, max_redirects: int, policy: AddressPolicy,
                 user_agent_token: str, contact: str | None, disallowed: list[str], per_host_connections: int = 0,
                 per_host_rate: float = 0.0, http_retries: int = 0, max_retry_wait: float = 60.0,
                 dns_ttl: float = 300.0, dns_negative_ttl: float = 30.0, dns_threads: int = 8,
                 resolver: Resolver | None = None, robots_txt: bool = False, optout_user_agents: list[str] | None = None,
                 robots_ttl: float = 3600.0, robots_error_ttl: float = 300.0, robots: RobotsCache | None = None,
                 tdm_reservation: bool = True, limiter: HostLimiter | JobLimiter | None = None) -> None:
        self.timeout, self.max_bytes = timeout, max_bytes
        self.http_retries, self.max_retry_wait = http_retries, max_retry_wait
        self.budget = 3 * timeout * (1 + http_retries) + max_retry_wait * http_retries
        # per shard task, unless the crawl's host token service holds the limits for the whole job (hosttokens.py)
        self.limiter = limiter if limiter is not None else HostLimiter(per_host_connections, per_host_rate)
        # img2dataset's parser lowercases the header's token before comparing it with ours
        self.tokens = tuple(dict.fromkeys(t.lower() for t in [user_agent_token, *(optout_user_agents or [])]))
        self.disallowed, self.tdm_reservation = [d.lower() for d in disallowed], tdm_reservation
        extra = f"; +{contact}" if contact else ""
        self.user_agent = f"Mozilla/5.0 (compatible; {user_agent_token}/{__version__}{extra})"
        self.resolver = resolver if resolver is not None else shared(dns_ttl, dns_negative_ttl, dns_threads)
        self.dns = DNSCounts()
        self.robots: RobotsCache | None = None
        if robots_txt:
            self.robots = robots if robots is not None else shared_cache(
                robots_ttl, robots_error_ttl, (self.tokens, policy, max_bytes, max_redirects))
        self.robots_counts = RobotsCounts()
        lookup = functools.partial(self.resolver.lookup, counts=self.dns)
        self.opener = urllib.request.OpenerDirector()
        for h in (urllib.request.ProxyHandler({}), urllib.request.UnknownHandler(), _HTTPHandler(policy, lookup),
                  _HTTPSHandler(policy, lookup), urllib.request.HTTPDefaultErrorHandler(), _Redirects(max_redirects),
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
        if self.robots is not None and (kept_out := self._robots(url, parts, host, deadline)) is not None:
            return kept_out
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

    def _robots(self, url: str, parts: SplitResult, host: str, deadline: float) -> Fetched | None:
        """The row's result when the origin's robots.txt keeps it from being fetched (or cannot be read); else None."""
        origin = f"{parts.scheme}://{host}"
        # from the URL as requested (encoded), without userinfo
        robots_url = f"{parts.scheme}://{urlsplit(url).netloc.rpartition('@')[2]}/robots.txt"
        assert self.robots is not None
        try:
            rules = self.robots.rules(origin, robots_url, self._fetch_robots, self.tokens, deadline, self.robots_counts)
        except (RobotsTimeout, NoSlot) as exc:
            return Fetched(status="failed_to_download", error_class="timeout",
                           error_message=f"not requested: robots.txt: {exc}"[:500])
        except HostPaused as exc:
            return Fetched(status="failed_to_download", error_class=_http_class(exc.status or 503),
                           error_message=f"not requested: robots.txt: {exc}, longer than this request may wait"[:500])
        answer = rules.answer
        if rules.kind == "failed":  # unreachable: everything disallowed (RFC 9309); the failure's own class
            return Fetched(status=answer.status or "failed_to_download", error_class=answer.error_class,
                           error_message=f"not requested: {robots_url} could not be fetched ({answer.error_message}), "
                                         "so the host counts as disallowing everything"[:500])
        if rules.kind == "unreachable":
            return Fetched(status="failed_to_download", error_class="robots_unavailable",
                           error_message=f"not requested: {robots_url} answered HTTP {answer.http_status}, so the host "
                                         "counts as disallowing everything for now (RFC 9309); a refresh retries"[:500])
        who = rules.disallowing(url, self.tokens)
        if who is not None:
            return Fetched(status="opted_out", error_class="robots_txt",
                           error_message=f"{robots_url} disallows this URL for user-agent {who}"[:500])
        return None

    def _fetch_robots(self, url: str, deadline: float) -> RobotsAnswer:
        """GET robots.txt as an image is fetched (a slot of the host, the guarded opener, deadline sockets), its body
        cut at MAX_ROBOTS_BYTES or max_bytes; a refusal's pause (HostPaused) or no slot in time (NoSlot) raises."""
        with self.limiter.slot(host_key(urlsplit(url)), deadline, max_pause=self.max_retry_wait) as started:
            deadline = min(started + 3 * self.timeout, deadline)
            try:
                req = _TimedRequest(url, headers={"User-Agent": self.user_agent, "Accept": "text/plain,*/*;q=0.8"})
                req.deadline = deadline
                timeout = max(min(self.timeout, deadline - time.monotonic()), 0.001)
                with self.opener.open(req, timeout=timeout) as resp:
                    return RobotsAnswer(http_status=resp.status,
                                        body=self._read(resp, deadline, min(MAX_ROBOTS_BYTES, self.max_bytes), cut=True))
            except urllib.error.HTTPError as exc:
                exc.close()
                return RobotsAnswer(http_status=exc.code)
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                cls = classify(reason)
                return RobotsAnswer(status={"ssrf": "blocked", "invalid_url": "invalid"}.get(cls, "failed_to_download"),
                                    error_class=cls, error_message=f"{type(reason).__name__}: {reason}"[:300])

    def _attempt(self, url: str, deadline: float) -> tuple[Fetched, float | None]:
        """One request, redirects followed, finished by `deadline`; with a refusal's Retry-After in seconds."""
        try:
            req = _TimedRequest(url, headers={"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.8"})
            req.deadline = deadline  # every read of every hop's connection ends by it (sockets.Deadline)
            timeout = max(min(self.timeout, deadline - time.monotonic()), 0.001)
            with self.opener.open(req, timeout=timeout) as resp:
                if self.disallowed and any(is_disallowed(resp.headers, t, self.disallowed) for t in self.tokens):
                    tags = ", ".join(resp.headers.get_all("X-Robots-Tag"))
                    return Fetched(status="opted_out", error_class="x_robots_tag", http_status=resp.status,
                                   error_message=f"X-Robots-Tag: {tags}"[:500]), None
                if self.tdm_reservation and (resp.headers.get("tdm-reservation") or "").strip() == "1":
                    policy = resp.headers.get("tdm-policy")
                    return Fetched(status="opted_out", error_class="tdm_reservation", http_status=resp.status,
                                   error_message=("tdm-reservation: 1 (TDMRep)"
                                                  + (f"; tdm-policy: {policy}" if policy else ""))[:500]), None
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise TooLarge(f"Content-Length {length} exceeds max_bytes {self.max_bytes}")
                data = self._read(resp, deadline, self.max_bytes)
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

    def _read(self, resp, deadline: float, limit: int, cut: bool = False) -> bytes:
        """The body, abandoned past the deadline (a slow-drip server) and past `limit` bytes: TooLarge, or with `cut`
        its first `limit` bytes (robots.txt: the rest is ignored).

        read1 does at most one socket read, each bounded by the timeout and the deadline (sockets.Deadline), so
        a server that drips a byte at a time cannot hold the thread for a whole 64 KiB block's worth of reads.
        """
        chunks, size = [], 0
        while block := resp.read1(min(1 << 16, limit + 1 - size)):
            chunks.append(block)
            size += len(block)
            if size > limit:
                if cut:
                    return b"".join(chunks)[:limit]
                raise TooLarge(f"body exceeds max_bytes {limit}; cut off")
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
    if isinstance(exc, ResolveTimeout):  # the resolver, not the server, ran out of the request's time
        return "dns"
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
