"""Serve the synthetic web on 127.0.0.1, with routes for the faults a crawler meets on the real web.

Routes (all GET): `/img/<i>` an image; `/missing/<i>` 404; `/error/<i>` 500; `/html/<i>` an HTML page
instead of an image; `/optout/<i>` an image sent with `X-Robots-Tag: noai`; `/slow/<i>` holds the
response until the server stops, `release` is set, or `slow_seconds` pass; `/redirect/<i>?to=URL` answers
302 to URL (without `to` starts a chain of i redirects that ends at an image); `/bomb/<i>` a PNG whose
header claims 20,000 x 20,000 pixels; `/nolength/<i>` an image without Content-Length; `/busy/<i>?n=1&s=1`
answers 429 to the first n requests to its path, then the image, with `Retry-After: s` (`s=date`: an
HTTP-date at least 1 s ahead, `s=none`: no Retry-After); `/unavailable/<i>` the same with 503.

For tests that judge a crawler's politeness from the server's side, the server records under its lock
every request's (path, monotonic arrival time) in `arrivals`, the requests now in flight in `in_flight`
(from arrival until the response starts, so a client cannot see a response before it is counted out)
and their maximum in `max_in_flight`; `changed` (a Condition on that lock) is notified on each change.
"""

from __future__ import annotations

import email.utils
import math
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import SplitResult, parse_qs, urlsplit

import pandas as pd

from pipelines.demo import web

KINDS = ("img", "missing", "error", "html", "optout", "slow", "redirect", "bomb", "nolength", "busy", "unavailable")
REFUSALS = {"busy": (429, b"too many requests"), "unavailable": (503, b"service unavailable")}


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A few hundred bytes whose PNG header claims width x height pixels: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4)  # a few rows; the rest would be inflated on decode
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.1"
    _in_flight = False  # this request still counts in server.in_flight

    def log_message(self, *args) -> None:  # keep test and demo output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._answered()
        self.end_headers()
        self.wfile.write(body)

    def _answered(self) -> None:
        """Count this request out of `in_flight` (once), before any byte of its response leaves."""
        if self._in_flight:
            self._in_flight = False
            with self.server.lock:
                self.server.in_flight -= 1
                self.server.changed.notify_all()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        split = urlsplit(self.path)
        with self.server.lock:
            self.server.hits[split.path] = self.server.hits.get(split.path, 0) + 1
            self.server.arrivals.append((split.path, time.monotonic()))
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
            self.server.changed.notify_all()
        self._in_flight = True
        try:
            self._route(split)
        finally:
            self._answered()

    def _route(self, split: SplitResult) -> None:
        parts = split.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in KINDS or not parts[1].isdigit():
            return self._send(404, b"not found", "text/plain")
        kind, index = parts[0], int(parts[1])
        if kind == "missing":
            return self._send(404, b"not found", "text/plain")
        if kind == "error":
            return self._send(500, b"internal error", "text/plain")
        if kind == "html":
            return self._send(200, b"<html><body>not an image</body></html>", "text/html")
        if kind == "redirect":
            chain = f"/redirect/{index - 1}" if index > 1 else "/img/0"  # n hops before the image
            target = parse_qs(split.query).get("to", [chain])[0]
            return self._send(302, b"", "text/plain", {"Location": target})
        if kind in REFUSALS:
            query = parse_qs(split.query)
            n, s = query.get("n", ["1"])[0], query.get("s", ["1"])[0]
            if not (n.isascii() and n.isdigit()) or not (s.isascii() and s.isdigit() or s in ("date", "none")):
                return self._send(400, b"n: a count; s: seconds, date or none", "text/plain")
            with self.server.lock:
                refuse = self.server.hits[split.path] <= int(n)
            if refuse:
                code, text = REFUSALS[kind]
                # an HTTP-date has whole seconds: round up, so the date is at least 1 s ahead
                after = {"none": None, "date": email.utils.formatdate(math.ceil(time.time()) + 1, usegmt=True)}
                wait = after.get(s, s)
                return self._send(code, text, "text/plain", {"Retry-After": wait} if wait else None)
        if kind == "nolength":  # body delimited by closing the connection, as HTTP/1.0 servers do
            body, ctype = web.encoded(self.server.seed, index, self.server.size)
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Connection", "close")
            self._answered()
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return None
        if kind == "bomb":
            return self._send(200, bomb_png(), "image/png")
        if kind == "slow" and not self.server.release.wait(self.server.slow_seconds):
            return None  # held past any client timeout: the client gave up long ago
        if self.server.stopping.is_set():
            return None
        body, ctype = web.encoded(self.server.seed, index, self.server.size)
        headers = {"X-Robots-Tag": "noai"} if kind == "optout" else None
        return self._send(200, body, ctype, headers)


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops SYNs under a crawler's concurrency; Linux retries after 1 s
    request_queue_size = 1024

    def __init__(self, host: str = "127.0.0.1", port: int = 0, seed: int = 0, size: int = 96,
                 slow_seconds: float = 30.0) -> None:
        super().__init__((host, port), _Handler)
        self.seed, self.size, self.slow_seconds = seed, size, slow_seconds
        self.stopping = threading.Event()
        self.release = threading.Event()  # set: slow routes answer at once
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified when arrivals or in_flight change
        self.hits: dict[str, int] = {}
        self.arrivals: list[tuple[str, float]] = []  # (path, time.monotonic()) per request, in order
        self.in_flight = 0
        self.max_in_flight = 0
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = self.server_address[0]
        assert isinstance(host, str)  # an AF_INET server's address is (host, port)
        return f"http://{host}:{self.server_address[1]}"

    def __enter__(self) -> DemoServer:
        self._thread = threading.Thread(target=self.serve_forever, name="demo-web", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.release.set()
        self.shutdown()
        self.server_close()

    def url(self, kind: str, index: int) -> str:
        return f"{self.base_url}/{kind}/{index}"


def url_list(base_url: str, n: int, seed: int = 0, faults: dict[str, float] | None = None) -> pd.DataFrame:
    """n rows of (url, caption, expected kind); `faults` maps a route kind to the fraction of rows using it."""
    faults = faults or {}
    kinds = []
    for i in range(n):
        x = (i * 0.6180339887) % 1.0  # low-discrepancy: fractions hold exactly for small n too
        acc, kind = 0.0, "img"
        for k, frac in faults.items():
            acc += frac
            if x < acc:
                kind = k
                break
        kinds.append(kind)
    return pd.DataFrame({
        "url": [f"{base_url}/{k}/{i}" for i, k in enumerate(kinds)],
        "caption": [web.sample(seed, i).caption for i in range(n)],
        "kind": kinds,
    })
