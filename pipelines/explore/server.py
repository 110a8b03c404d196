"""The explorer's HTTP server: a page, its script, a JSON API, thumbnails, a row page and a cluster page.

Listens on 127.0.0.1 unless told otherwise, and then answers only requests whose Host header is that address or
localhost with its port (a page that rebinds a DNS name to 127.0.0.1 cannot read the dataset). Everything from the web (captions, URLs, reasons a plugin rule
wrote) is escaped: the server-rendered pages through `html.escape`, the grid by the script, which writes text
with `textContent` only; the Content-Security-Policy allows this server's own script and images and nothing
inline, so markup that slipped through would not run. A URL becomes a link only when it is http(s).
"""

from __future__ import annotations

import html
import json
import logging
import re
import socket
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from pipelines.explore import Explorer, Filters

log = logging.getLogger("clipline.explore")

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/explore.js": ("explore.js", "text/javascript; charset=utf-8"),
          "/static/explore.css": ("explore.css", "text/css; charset=utf-8")}
UID = re.compile(r"^[\w.:-]{1,200}$")
PAGE_ROWS = 200  # the most rows one request returns


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _link(url: str | None) -> str:
    if url and url.lower().startswith(("http://", "https://")):
        return f"<a href='{_e(url)}' rel='noreferrer nofollow noopener' target=_blank>{_e(url)}</a>"
    return f"<code>{_e(url)}</code>" if url else "-"


def _card(c: dict[str, Any], extra: str = "") -> str:
    img = (f"<img src='/thumb/{urllib.parse.quote(c['uid'])}.jpg' alt=''>" if c["thumb"]
           else f"<div class=noimg>{_e(c['status'])}</div>")
    label = "kept" if c["kept"] else c["reason"]
    return (f"<figure class='card {'kept' if c['kept'] else 'dropped'}' data-uid='{_e(c['uid'])}'>"
            f"<a href='/row/{urllib.parse.quote(c['uid'])}'>{img}</a><figcaption><b class=label>{_e(label)}</b>"
            f"{extra} <span class=cap>{_e(c['caption'])}</span></figcaption></figure>")


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<link rel=stylesheet href='/static/explore.css'></head><body>"
            f"<nav><a href='/'>search</a> <a href='/clusters'>clusters</a></nav>{body}</body></html>").encode()


def row_page(ex: Explorer, uid: str) -> bytes:
    rec = ex.record(uid)
    c = rec["card"]
    ledger = "".join(f"<tr><th>{_e(k)}</th><td data-field='{_e(k)}'>{_e(v)}</td></tr>"
                     for k, v in rec["ledger"].items())
    decision = "kept" if c["kept"] else f"dropped: {c['reason']}"
    near = "".join(_card(n, f" <i>distance {n['distance']}</i>") for n in rec["near"]) or \
        f"<p class=note>No other row within {rec['near_distance']} pHash bits.</p>"
    eps = rec["semantic_eps"]
    neighbours = "".join(_card(n, f" <i>similarity {n['similarity']:.3f}"
                                  f"{' (semantic duplicate)' if n['semantic_duplicate'] else ''}</i>")
                         for n in rec["neighbours"]) or "<p class=note>No image embedding for this row.</p>"
    runs = []
    for r in rec["runs"]:
        if "error" in r:
            runs.append(f"<li class=err>{_e(r['error'])}</li>")
            continue
        models = f" &rarr; registered {_e(', '.join(r['models']))}" if r["models"] else ""
        runs.append(f"<li data-run='{_e(r['run_id'])}'><b>{_e(r['stage'])}</b> run <code>{_e(r['run_id'])}</code> "
                    f"{_e(r['run_name'])} (experiment {_e(r['experiment'])}){models}</li>")
    runs_html = f"<ul class=runs>{''.join(runs)}</ul>" if runs else \
        "<p class=note>No MLflow run has read this dataset version yet.</p>"
    cluster = f"cluster {rec['cluster']} ({_e(ex.index.cluster_source)})" if "cluster" in rec else "no cluster"
    semantic_note = (f"Rows more alike than 1 - eps = {1 - eps:.3f} are semantic duplicates (semantic_dedup's eps "
                     f"{eps})." if eps is not None else "The curate stage ran no semantic_dedup rule.")
    body = (f"<h1>Row <code>{_e(uid)}</code></h1><div class=row>"
            + (f"<img class=big src='/thumb/{urllib.parse.quote(uid)}.jpg' alt=''>" if c["thumb"] else "")
            + f"<div><p class=decision data-kept='{str(c['kept']).lower()}'>{_e(decision)}</p>"
            f"<p class=caption>{_e(c['caption'])}</p><p>{_link(c['url'])}</p><p>{cluster}</p></div></div>"
            f"<h2>Ledger record</h2><table class=ledger>{ledger}</table>"
            f"<h2>Near duplicates</h2><p class=note>pHash within {rec['near_distance']} bits.</p>"
            f"<div class='grid near'>{near}</div>"
            f"<h2>Nearest images</h2><p class=note>By image embedding. {_e(semantic_note)}</p>"
            f"<div class='grid neighbours'>{neighbours}</div>"
            f"<h2>Runs that read this dataset version</h2>{runs_html}")
    return _page(f"row {uid}", body)


def clusters_page(ex: Explorer) -> bytes:
    parts = []
    for c in ex.clusters():
        cards = "".join(_card(s) for s in c["sample"])
        parts.append(f"<section class=cluster data-cluster='{c['cluster']}' data-size='{c['size']}' "
                     f"data-dropped='{c['dropped']}'><h2>cluster {c['cluster']}: {c['size']} rows, "
                     f"{c['dropped']} dropped ({100 * c['drop_rate']:.1f}%)</h2><div class=grid>{cards}</div>"
                     f"</section>")
    body = (f"<h1>Clusters of {_e(ex.v.job.name)}/{_e(ex.v.stage)}</h1><p class=note>{_e(ex.index.cluster_source)} "
            f"over {len(ex.index.positions):,} image embeddings; each shows the rows nearest its mean embedding.</p>"
            + "".join(parts))
    return _page("clusters", body)


class Handler(BaseHTTPRequestHandler):
    explorer: Explorer  # set on the subclass `make_server` makes
    hosts: frozenset[str] | None = None  # Host headers answered (None: any, for a non-loopback --host)
    server_version = "clipline-explore"
    timeout = 30  # seconds a connection may sit idle or trickle a request

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("explore: %s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        if self.path.startswith("/api/"):
            self._json({"error": message}, status)
        else:
            self._send(status, _page("error", f"<h1>{status}</h1><p class=err>{_e(message)}</p>"),
                       "text/html; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.hosts is not None and (self.headers.get("Host") or "").lower() not in self.hosts:
            self._send(421, b"this server answers requests for its own address only", "text/plain")
            return
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        ex = self.explorer
        try:
            if path in STATIC:
                name, ctype = STATIC[path]
                self._send(200, resources.files("pipelines.explore").joinpath("static", name).read_bytes(), ctype)
            elif path == "/health":
                self._send(200, b"ok", "text/plain")
            elif path == "/api/info":
                self._json(ex.info())
            elif path == "/api/search":
                filters = Filters.parse(q, ex.scores)
                k = _int(q, "k", 48, 1, PAGE_ROWS)
                if q.get("q", "").strip():
                    self._json(ex.search(q["q"], filters, k))
                else:
                    self._json(ex.browse(filters, _int(q, "offset", 0, 0, 10**12), k))
            elif path == "/api/clusters":
                self._json(ex.clusters())
            elif path == "/clusters":
                self._send(200, clusters_page(ex), "text/html; charset=utf-8")
            elif (m := re.fullmatch(r"/api/row/(.+)", path)) and UID.match(m[1]):
                self._json(ex.record(m[1]))
            elif (m := re.fullmatch(r"/row/(.+)", path)) and UID.match(m[1]):
                self._send(200, row_page(ex, m[1]), "text/html; charset=utf-8")
            elif (m := re.fullmatch(r"/thumb/(.+)\.jpg", path)) and UID.match(m[1]):
                data = ex.thumbnail(m[1])
                if data is None:
                    self._error(404, f"row {m[1]} has no image that can be shown")
                else:
                    self._send(200, data, "image/jpeg")
            else:
                self._error(404, f"no page {path!r}")
        except KeyError as exc:
            self._error(404, str(exc.args[0]))
        except ValueError as exc:
            self._error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - one request's failure, logged; the server goes on
            log.exception("explore: %s failed", path)
            self._error(500, f"{type(exc).__name__}: {exc}")


def _int(q: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    text = q.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: expected a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name}: expected {low} to {high}, got {value}")
    return value


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 8737) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free port). On a loopback address it answers only Host headers naming
    loopback with its port."""
    cls = _Server6 if ":" in host.strip("[]") else ThreadingHTTPServer
    handler: type[Handler] = type("ExploreHandler", (Handler,), {"explorer": explorer})
    server = cls((host.strip("[]"), port), handler)
    server.daemon_threads = True
    if host in LOOPBACK:
        bound = server.server_address[1]
        handler.hosts = frozenset(f"{h}:{bound}" for h in ("127.0.0.1", "localhost", "[::1]"))
    return server
