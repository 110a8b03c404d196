"""The Arrow schema of crawled shards (see DESIGN.md, data contracts)."""

from __future__ import annotations

import hashlib

import pyarrow as pa

STATUSES = ("success", "failed_to_download", "failed_to_resize", "opted_out", "blocked", "invalid", "duplicate")

CRAWLED = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False, metadata={"doc": "128-bit hex id of (url, caption)"}),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("status", pa.string(), nullable=False, metadata={"doc": " | ".join(STATUSES)}),
        pa.field("error_class", pa.string(), metadata={
            "doc": "invalid_url, missing_caption, ssrf, dns, connection, timeout, tls, redirect, protocol, "
                   "http_4xx, http_429, http_5xx, http_other, too_large, too_many_pixels, decode, opted_out, duplicate, "
                   "shard_failed"}),
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("image", pa.binary(), metadata={"doc": "encoded image bytes"}),
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string(), metadata={"doc": "sha256 of the encoded image bytes"}),
        pa.field("fetched_at", pa.timestamp("ms", tz="UTC")),
        pa.field("attempts", pa.int32(), metadata={
            "doc": "fetches of this (url, caption) so far, across refreshes; 0 if never fetched"}),
        pa.field("source", pa.string(), nullable=False, metadata={"doc": "input file the row came from"}),
        pa.field("source_row", pa.int64(), nullable=False, metadata={"doc": "0-based row index in that file"}),
    ]
)


def uid(url: str | None, caption: str | None) -> str:
    """Stable 128-bit id of a (url, caption) pair: the same pair has the same uid in every run."""
    return hashlib.sha256(f"{url or ''}\x1f{caption or ''}".encode()).hexdigest()[:32]
