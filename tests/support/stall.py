"""A loopback web whose `/stall/<i>` requests are held, for tests of a crawl's straggling shards.

`/img/<i>`, `/gate/<i>` and `/stall/<i>` answer the demo web's image i; `/robots.txt` is 404 (no rules). A
`/gate/` request is held until a `/stall/` request has arrived, so that its shard cannot finish before the
shard that stalls has sent its request (a test's way to order the shard tasks without timing; after
`GATE_LIMIT` seconds it is answered anyway, so that a cluster too busy to run both shards fails the test
instead of hanging it). The first request
for a `/stall/` path is held: with `hold="until_closed"` until the server closes (later requests for the path are
answered at once), with `hold="until_asked_again"` until a second request for the path arrives (that one is
then held until the server closes). A held request whose client goes away (its socket closed: the task was
killed, or gave up) is recorded in `abandoned`; `changed` (a Condition on `lock`) is notified then and on each
request, so a test waits for what it needs to see, never for a time.
"""

from __future__ import annotations

import math
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from pipelines.demo import web

GATE_LIMIT = 60.0


class _Handler(BaseHTTPRequestHandler):
    server: StallServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv, path = self.server, self.path.split("?", 1)[0]
        kind, _, index = path.strip("/").partition("/")
        if kind not in ("img", "gate", "stall") or not index.isdigit():
            return self._send(404, b"not here", "text/plain")
        with srv.changed:
            n = srv.hits[path] = srv.hits.get(path, 0) + 1
            srv.changed.notify_all()
        if kind == "gate" and not self._held(lambda: any(p.startswith("/stall/") for p in srv.hits), GATE_LIMIT):
            return None
        if kind == "stall" and (n == 1 or srv.hold == "until_asked_again"):
            again = srv.hold == "until_asked_again" and n == 1
            if not self._held(lambda: srv.hits[path] >= 2 if again else False):
                return None
        body, ctype = web.encoded(0, int(index), 96)
        return self._send(200, body, ctype)

    def _held(self, done, limit: float = math.inf) -> bool:
        """Hold this request until done() (under the lock), `limit` seconds pass or the server closes: True if it
        is to be answered."""
        srv, give_up = self.server, time.monotonic() + limit
        while True:
            with srv.changed:
                if srv.closing:
                    return False
                if done() or time.monotonic() > give_up:
                    return True
                srv.changed.wait(0.05)  # woken by a request; the timeout only to look at the socket below
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):  # the client closed its end
                with srv.changed:
                    srv.abandoned.append(self.path)
                    srv.changed.notify_all()
                return False

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away meanwhile
            pass


class StallServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, hold: Literal["until_closed", "until_asked_again"]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hold = hold
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.hits: dict[str, int] = {}
        self.abandoned: list[str] = []
        self.closing = False

    def url(self, kind: str, index: int) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{kind}/{index}"

    def __enter__(self) -> StallServer:
        threading.Thread(target=self.serve_forever, name="stall-web", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.shutdown()
        self.server_close()
