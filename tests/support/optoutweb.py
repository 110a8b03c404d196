"""A small loopback web for the opt-out tests: images under /img/ sent with the headers a URL asks for, and one
robots.txt whose answer (status, body, headers) the test sets and can hold back; every request counted."""

from __future__ import annotations

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

from PIL import Image

PNG = io.BytesIO()
Image.new("RGB", (16, 16), (200, 30, 30)).save(PNG, format="PNG")
PNG_BYTES = PNG.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: OptoutWeb

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        split = urlsplit(self.path)
        with self.server.lock:
            self.server.hits[split.path] += 1
        if split.path == "/robots.txt":
            assert self.server.gate.wait(30), "the test never released robots.txt"
            code, body, headers = self.server.robots
            return self._send(code, body, headers)
        if not split.path.startswith("/img/"):
            return self._send(404, b"not found", {})
        # /img/<anything>?h=Name:Value&h=...: an image sent with those headers
        headers = dict(v.split(":", 1) for k, v in parse_qsl(split.query) if k == "h")
        return self._send(200, PNG_BYTES, {"Content-Type": "image/png", **headers})

    def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class OptoutWeb(ThreadingHTTPServer):
    """Images under /img/ (headers from the query) and one robots.txt: (status, body, headers); counts requests."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.robots: tuple[int, bytes, dict[str, str]] = (404, b"not found", {})
        self.gate = threading.Event()  # robots.txt answers once set
        self.gate.set()
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()

    @property
    def origin(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def img(self, name: str, **headers: str) -> str:
        query = urlencode([("h", f"{k.replace('_', '-')}:{v}") for k, v in headers.items()])
        return f"{self.origin}/img/{name}" + (f"?{query}" if query else "")

    def serve(self, robots_txt: str | None = None, status: int = 200, **headers: str) -> OptoutWeb:
        self.robots = (status, (robots_txt or "").encode(), headers)
        return self

    def __enter__(self) -> OptoutWeb:
        # a short poll: shutdown() waits for it, and every test stops a server or two
        threading.Thread(target=self.serve_forever, args=(0.02,), name="optout-web", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.shutdown()
        self.server_close()
