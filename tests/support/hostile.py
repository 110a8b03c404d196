"""A hostile web on 127.0.0.1: broken files of every image format Pillow writes, and misbehaving servers.

`corpus()` lists the cases; `HostileServer(corpus())` serves each at `/case/<name>` (a ThreadingHTTPServer
on port 0). Every case says what the crawl should make of it: a status and the error classes it may give.
Groups:

- format: for each format Pillow can write here, a valid file, the first half of it (truncated), its first
  32 bytes (header only) and its magic followed by random bytes (corrupt). A valid file succeeds only if the
  crawl's decoder reads the format (DECODED); the others fail to resize.
- dimensions: headers claiming 100000 x 100000 (or the format's 65535 maximum) over a few bytes of data, a
  GIF frame larger than its screen, a JPEG 2000 codestream larger than its JP2 header says, and a PNG that
  claims 9000 x 9000 (under the default cap) but holds four rows.
- content: wrong content types both ways, HTML, SVG and JSON for images, empty bodies, a gzip bomb sent
  with Content-Encoding: gzip, an image under a 404 status, a status of 999.
- protocol: slow drips (a byte every DRIP s: no read timeout fires, only a total deadline ends them) of the
  status line, the headers and the body; a 1 MB header line, 5000 headers, a status line without an end,
  a flood of 100 Continue responses, endless chunked trailers, bodies endless with and without chunking,
  lying Content-Lengths, bad chunk sizes, non-HTTP answers, a hang-up; and, as a control, 90 headers of
  60 KB each (inside http.client's limits) before a valid image.
- redirect: loops (A -> B -> A, A -> A), no Location, a 1 MB or unparsable Location, a redirect whose body
  is endless or dripped (a client must not read it), a redirect into a slow drip.

Each response is written raw (status line and headers too), one per connection. The server records per
case the bytes it wrote and whether the client hung up first (`served`, with `wait_served`), so a test can
check that a client stopped reading. "Endless" responses stop after ENDLESS bytes, so that a client that
does read them all cannot fill the machine's memory. Stdlib and Pillow only.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

DRIP = 0.25  # seconds between the bytes of a slow-drip response: shorter than any read timeout a crawl uses
ENDLESS = 256 << 20  # the most an "endless" response sends
# formats the crawl's decoder (OpenCV 4.14, as requirements.lock pins it) reads; MPO is a JPEG to it
DECODED = frozenset({"AVIF", "BMP", "GIF", "JPEG", "JPEG2000", "MPO", "PNG", "PPM", "TIFF", "WEBP"})
# the mode a format needs, where it cannot save RGB
_MODES = {"BLP": "P", "MSP": "1", "PALM": "1", "SPIDER": "F", "XBM": "1"}

Respond = Callable[["HostileServer"], Iterable[bytes]]


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    respond: Respond
    status: str  # the crawl's status for the row
    errors: frozenset[str | None]  # the error classes it may give (None: a success)

    def expects(self, status: str, error_class: str | None) -> bool:
        return status == self.status and error_class in self.errors


def _case(name: str, group: str, respond: Respond, status: str, *errors: str | None) -> Case:
    return Case(name, group, respond, status, frozenset(errors or (None,)))


@dataclass(frozen=True)
class Served:
    name: str
    sent: int  # bytes written, status line and headers included
    hung_up: bool  # the client closed the connection before the response was complete
    ended: float  # time.monotonic() when the handler finished


# --- responses ---------------------------------------------------------------------------------------------

def head(code: int = 200, reason: str = "OK", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {code} {reason}", *(f"{k}: {v}" for k, v in headers), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def respond(body: bytes, ctype: str | None = "image/jpeg", code: int = 200, reason: str = "OK",
            headers: Iterable[tuple[str, str]] = (), length: int | None = None) -> Respond:
    """A whole response at once; `length` overrides the Content-Length sent (a lie)."""
    fields = ([("Content-Type", ctype)] if ctype else []) + [("Content-Length", str(len(body) if length is None
                                                                                  else length)), *headers]
    data = head(code, reason, fields) + body
    return lambda server: (data,)


def raw(*chunks: bytes) -> Respond:
    return lambda server: chunks


def drip(prefix: bytes, payload: bytes) -> Respond:
    """prefix at once, then payload one byte every server.drip seconds."""
    def run(server: HostileServer) -> Iterator[bytes]:
        yield prefix
        for b in payload:
            if server.stopping.wait(server.drip):  # the fault itself: a server that takes its time
                return
            yield bytes([b])
    return run


def endless(prefix: bytes, unit: bytes) -> Respond:
    """prefix, then unit over and over, as fast as the client reads, up to ENDLESS bytes."""
    block = unit * max(1, (64 << 10) // len(unit))

    def run(server: HostileServer) -> Iterator[bytes]:
        yield prefix
        for _ in range(ENDLESS // len(block)):
            if server.stopping.is_set():
                return
            yield block
    return run


# --- images ------------------------------------------------------------------------------------------------

def source(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """RGB noise: nothing compresses it away, so half a file cuts through pixel data."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def encode(fmt: str, im: Image.Image | None = None, **params) -> bytes:
    im = im or source()
    if fmt in _MODES:
        im = im.convert(_MODES[fmt])
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def writable_formats() -> dict[str, bytes]:
    """Each format Pillow can write here (without an external handler), as a valid file."""
    Image.init()
    out = {}
    for fmt in sorted(Image.SAVE):
        try:
            out[fmt] = encode(fmt)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # BUFR, GRIB, HDF5, WMF: need a handler registered by an application
    return out


def png(width: int, height: int, rows: int = 4) -> bytes:
    """An RGB PNG whose IHDR claims width x height, with pixel data for `rows` rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\x00" * (1 + 3 * width) * rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 64
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def tiff(width: int, height: int) -> bytes:
    """A little-endian grayscale TIFF with one uncompressed strip of 16 bytes."""
    data = b"\x00" * 16
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, None),
            (277, 3, 1), (278, 4, height), (279, 4, len(data))]
    offset = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = offset if value is None else value
        ifd += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def ppm(width: int, height: int) -> bytes:
    return f"P6\n{width} {height}\n255\n".encode() + b"\x00" * 64


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode("JPEG"))
    sof = data.find(b"\xff\xc0")  # Pillow writes baseline JPEGs: SOF0, then length, precision, height, width
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_claiming(screen: tuple[int, int], frame: tuple[int, int] | None = None) -> bytes:
    data = bytearray(encode("GIF"))
    struct.pack_into("<HH", data, 6, *screen)  # the logical screen descriptor
    if frame is not None:
        desc = data.find(b"\x2c", 13 + 3 * 2 ** ((data[10] & 7) + 1))  # the image descriptor after the palette
        struct.pack_into("<HH", data, desc + 5, *frame)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A VP8X (extended) WebP whose canvas is width x height around a 64 x 48 lossy frame."""
    vp8 = encode("WEBP")[12:]  # Pillow's simple-format file: RIFF, size, WEBP, then the "VP8 " chunk
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x) + len(vp8)) + b"WEBP" + vp8x + vp8


def jp2_claiming(box: tuple[int, int], codestream: tuple[int, int]) -> bytes:
    """A JP2 file whose ihdr box says `box` and whose codestream's SIZ marker says `codestream` (w, h)."""
    data = bytearray(encode("JPEG2000", Image.new("RGB", (16, 16), "red"), no_jp2=False))
    ihdr = data.find(b"ihdr")
    struct.pack_into(">II", data, ihdr + 4, box[1], box[0])  # ihdr: height, then width
    siz = data.find(b"\xff\x51")  # Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz: one tile the whole image
    struct.pack_into(">IIIIII", data, siz + 6, *codestream, 0, 0, *codestream)
    return bytes(data)


# --- the corpus --------------------------------------------------------------------------------------------

def format_cases(formats: dict[str, bytes]) -> list[Case]:
    cases = []
    for fmt, data in formats.items():
        name = fmt.lower()
        ok = fmt in DECODED
        garbage = random.Random(fmt).randbytes(max(len(data) - 8, 64))
        cases += [
            _case(f"{name}_valid", "format", respond(data, "image/" + name),
                  *(("success", None) if ok else ("failed_to_resize", "decode"))),
            _case(f"{name}_truncated", "format", respond(data[: len(data) // 2], "image/" + name),
                  "failed_to_resize", "decode"),
            _case(f"{name}_header_only", "format", respond(data[:32], "image/" + name), "failed_to_resize", "decode"),
            # random bytes can spell any header: a size over the pixel cap is as good a refusal as a decode error
            _case(f"{name}_corrupt", "format", respond(data[:8] + garbage, "image/" + name), "failed_to_resize",
                  "decode", "too_many_pixels"),
        ]
    return cases


def dimension_cases() -> list[Case]:
    big = 100_000
    huge = [("png", png(big, big)), ("bmp", bmp(big, big)), ("tiff", tiff(big, big)), ("ppm", ppm(big, big)),
            ("jpeg", jpeg_claiming(65535, 65535)), ("gif", gif_claiming((65535, 65535))),
            ("jp2", jp2_claiming((big, big), (big, big))), ("gif_frame", gif_claiming((16, 16), (60000, 60000)))]
    cases = [_case(f"huge_{n}", "dimensions", respond(d, "image/*"), "failed_to_resize", "too_many_pixels")
             for n, d in huge]
    return cases + [
        # libwebp may refuse a canvas its only frame does not fill before Pillow reads the size
        _case("huge_webp", "dimensions", respond(webp_claiming(big, big), "image/webp"), "failed_to_resize",
              "too_many_pixels", "decode"),
        # the header Pillow reads says 16 x 16, the codestream OpenJPEG decodes says 30000 x 30000
        _case("jp2_codestream_larger", "dimensions", respond(jp2_claiming((16, 16), (30000, 30000)), "image/jp2"),
              "failed_to_resize", "decode"),
        # under the default max_pixels: the decoder allocates 9000 x 9000 x 3 bytes, then finds four rows
        _case("png_claims_9000", "dimensions", respond(png(9000, 9000), "image/png"), "failed_to_resize", "decode"),
    ]


def content_cases(jpeg: bytes) -> list[Case]:
    html = b"<!doctype html><html><body><img src=/x.jpg></body></html>"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"><rect width="1" height="1"/></svg>'
    bomb = gzip.compress(b"\x00" * (64 << 20), compresslevel=9)  # 64 MB inflated, ~64 KB sent
    undecodable = ("failed_to_resize", "decode")
    return [
        _case("image_as_html", "content", respond(jpeg, "text/html"), "success"),  # bytes decide, not the label
        _case("image_untyped", "content", respond(jpeg, None), "success"),
        _case("html_as_jpeg", "content", respond(html, "image/jpeg"), *undecodable),
        _case("html_page", "content", respond(html, "text/html; charset=utf-8"), *undecodable),
        _case("svg_image", "content", respond(svg, "image/svg+xml"), *undecodable),
        _case("json_as_png", "content", respond(b'{"error": "not found"}', "image/png"), *undecodable),
        _case("empty_200", "content", respond(b"", "image/png"), *undecodable),
        _case("no_content_204", "content", raw(head(204, "No Content")), *undecodable),
        _case("gzip_bomb", "content", respond(bomb, "image/png", headers=[("Content-Encoding", "gzip")]),
              *undecodable),  # never inflated: the crawl sends no Accept-Encoding and decodes none
        _case("image_with_404", "content", respond(jpeg, code=404, reason="Not Found"), "failed_to_download",
              "http_4xx"),
        _case("status_999", "content", respond(jpeg, code=999, reason="Whatever"), "failed_to_download",
              "http_other"),
    ]


def protocol_cases(jpeg: bytes) -> list[Case]:
    ok = head(headers=[("Content-Type", "image/jpeg"), ("Content-Length", str(len(jpeg)))])
    chunked = head(headers=[("Content-Type", "image/jpeg"), ("Transfer-Encoding", "chunked")])
    timeout, protocol = ("failed_to_download", "timeout"), ("failed_to_download", "protocol")
    many = "".join(f"X-Header-{i}: {i}\r\n" for i in range(5000)).encode()
    big_but_legal = [(f"X-Big-{i}", "b" * 60_000) for i in range(90)]
    return [
        _case("drip_status_line", "protocol", drip(b"", ok), *timeout),
        _case("drip_headers", "protocol", drip(b"HTTP/1.1 200 OK\r\n", ok.partition(b"\r\n")[2]), *timeout),
        _case("drip_body", "protocol", drip(ok, jpeg), *timeout),
        _case("header_line_1mb", "protocol", raw(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"),
              *protocol),
        _case("headers_5000", "protocol", raw(b"HTTP/1.1 200 OK\r\n" + many + b"\r\n" + jpeg), *protocol),
        _case("headers_large_legal", "protocol", respond(jpeg, headers=big_but_legal), "success"),
        _case("status_line_endless", "protocol", endless(b"HTTP/1.1 200 ", b"a"), *protocol),
        _case("continue_flood", "protocol", endless(b"", b"HTTP/1.1 100 Continue\r\n\r\n"), *timeout),
        _case("trailer_flood", "protocol", endless(chunked + b"0\r\n", b"X-Trailer: t\r\n"), *timeout),
        _case("endless_body", "protocol", endless(head(headers=[("Content-Type", "image/jpeg")]), b"\x00"),
              "failed_to_download", "too_large"),
        _case("endless_chunked", "protocol", endless(chunked, b"10000\r\n" + b"\x00" * 0x10000 + b"\r\n"),
              "failed_to_download", "too_large"),
        _case("length_huge", "protocol", respond(b"", length=10**15), "failed_to_download", "too_large"),
        # the body, then the connection closes, 100000 bytes short of the Content-Length
        _case("length_longer_than_body", "protocol", respond(jpeg, length=len(jpeg) + 100_000), *protocol),
        _case("chunk_size_garbage", "protocol", raw(chunked + b"zz\r\n" + jpeg), *protocol),
        _case("chunk_size_huge", "protocol", raw(chunked + b"ffffffffffffffff\r\n" + jpeg), *protocol),
        _case("not_http", "protocol", raw(b"SSH-2.0-OpenSSH_9.6\r\n"), *protocol),
        _case("http09_body", "protocol", raw(jpeg), *protocol),
        _case("hang_up", "protocol", raw(), *protocol),
    ]


def redirect_cases(jpeg: bytes, target: str) -> list[Case]:
    def to(location: str, code: int = 302) -> bytes:
        return head(code, "Found", [("Location", location), ("Content-Length", "0")])

    redirect = ("failed_to_download", "redirect")
    return [
        _case("loop_a", "redirect", raw(to("/case/loop_b")), *redirect),
        _case("loop_b", "redirect", raw(to("/case/loop_a")), *redirect),
        _case("loop_self", "redirect", raw(to("/case/loop_self")), *redirect),
        _case("redirect_no_location", "redirect", raw(head(302, "Found", [("Content-Length", "0")])), *redirect),
        _case("redirect_location_1mb", "redirect", raw(to("/case/" + "a" * (1 << 20))), "failed_to_download",
              "protocol"),
        _case("redirect_location_garbage", "redirect", raw(to("http://[::1/x")), *redirect),
        # a redirect's body is nobody's business: reading it to its end would take for ever and unbounded memory
        _case("redirect_endless_body", "redirect",
              endless(head(302, "Found", [("Location", target)]), b"\x00"), "success"),
        _case("redirect_drip_body", "redirect",
              drip(head(302, "Found", [("Location", target), ("Content-Length", "1000")]), b"x" * 1000), "success"),
        _case("redirect_into_drip", "redirect", raw(to("/case/drip_headers")), "failed_to_download", "timeout"),
    ]


def corpus() -> list[Case]:
    formats = writable_formats()
    jpeg = formats["JPEG"]
    return [*format_cases(formats), *dimension_cases(), *content_cases(jpeg), *protocol_cases(jpeg),
            *redirect_cases(jpeg, "/case/jpeg_valid")]


# captions the crawl must carry through unchanged, and blank ones it must refuse without a fetch
CAPTIONS = {
    "nul": "a\x00b\x00",
    "escape": "\x1b[31mred\x1b[0m \x1b]0;title\x07",
    "newlines": "line\r\nbreak\rcarriage\nfeed",
    "c0_c1": "".join(map(chr, [*range(1, 32), 0x7F, *range(0x80, 0xA0)])),
    "bidi": "\u202eevil\u202c \u2066isolate\u2069 \u200bzero\u200dwidth",
    "bom": "\ufeffbom \ufffe nonchar \uffff",
    "astral": "😀 𝕏 \U0010fffd",
    "combining": "e\u0301" + "\u0300" * 200,
    "long_100kb": ("caption with a \x00 and an \x1b inside " * 4000)[:100_000],
}
BLANK_CAPTIONS = {"empty": "", "whitespace": " \r\n\t\x0b\x0c "}


# --- the server --------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.split("?", 1)[0].removeprefix("/case/")
        case = self.server.cases.get(name)
        sent, hung_up = 0, False
        self.close_connection = True
        try:
            for chunk in case.respond(self.server) if case else (head(404, "Not Found", [("Content-Length", "0")]),):
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # a broken pipe, a reset (or a TLS EOF, if a test wraps the socket): the client left
            hung_up = True
        finally:
            with self.server.changed:
                self.server.served.append(Served(name, sent, hung_up, time.monotonic()))
                self.server.changed.notify_all()


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, cases: Iterable[Case], host: str = "127.0.0.1", drip: float = DRIP) -> None:
        super().__init__((host, 0), _Handler)
        self.cases = {c.name: c for c in cases}
        self.drip = drip
        self.stopping = threading.Event()
        self.changed = threading.Condition()
        self.served: list[Served] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def url(self, name: str) -> str:
        assert name in self.cases, name
        return f"{self.base_url}/case/{name}"

    def count(self, name: str) -> int:
        """How many responses to case `name` have finished so far."""
        with self.changed:
            return sum(s.name == name for s in self.served)

    def wait_served(self, name: str, timeout: float, after: int = 0) -> Served | None:
        """The finished response to case `name` after the first `after` ones, waiting up to `timeout` s for
        it; None if none came."""
        def nth() -> Served | None:
            return next(iter([s for s in self.served if s.name == name][after:]), None)

        with self.changed:
            self.changed.wait_for(nth, timeout)
            return nth()

    def __enter__(self) -> HostileServer:
        threading.Thread(target=self.serve_forever, name="hostile-web", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
