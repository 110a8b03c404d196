"""Loopback hosts that record the load a crawl puts on each: requests in flight per Host header, their maximum,
and every request's arrival time.

`HostLoad(n)` serves `n` hosts - one ThreadingHTTPServer each on 127.0.0.1, so `127.0.0.1:<port>` is a host of
its own to the crawler (its limits are per host:port) - that share one record. Every GET of `/img/<i>` waits
`hold` seconds (the host's latency, so that concurrent requests overlap) and answers the demo web's image `i`;
`/robots.txt` is a 404 (everything allowed) after the same wait. A request counts as in flight from its
arrival until its response is written.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipelines.demo import web


class _Handler(BaseHTTPRequestHandler):
    server: _Host

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        load = self.server.load
        host = self.headers.get("Host", "")
        with load.lock:
            load.arrivals.setdefault(host, []).append(time.monotonic())
            load.in_flight[host] += 1
            load.max_in_flight[host] = max(load.max_in_flight[host], load.in_flight[host])
        try:
            load.stopping.wait(load.hold)  # the host's latency, cut short when the servers stop
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "img" and parts[1].isdigit():
                body, ctype, code = *web.encoded(0, int(parts[1]), 48), 200
            else:
                body, ctype, code = b"not found", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with load.lock:
                load.in_flight[host] -= 1


class _Host(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, load: HostLoad) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.load = load


class HostLoad:
    def __init__(self, hosts: int, hold: float = 0.1) -> None:
        self.hold = hold
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.arrivals: dict[str, list[float]] = {}  # Host header -> monotonic arrival times, in order
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self._servers = [_Host(self) for _ in range(hosts)]
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self._servers]

    @property
    def hosts(self) -> list[str]:
        """Each host as a Host header names it: 127.0.0.1:<port>."""
        return [f"127.0.0.1:{s.server_address[1]}" for s in self._servers]

    def __enter__(self) -> HostLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()
