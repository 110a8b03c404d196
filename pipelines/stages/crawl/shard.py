"""One crawl shard, run as a Ray task: fetch every row with a thread pool, resize, write one Parquet file.

Per-row problems become a status and an error class in the row, never an exception: only a failure
to read the input shard or write the output shard fails the task (and Ray or the runner retries it).
The output is written atomically under its final name, so a task killed half-way leaves nothing.
"""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import storage
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.stages.crawl.fetch import AddressPolicy, Fetcher
from pipelines.stages.crawl.schema import CRAWLED

Image.MAX_IMAGE_PIXELS = None  # we check max_pixels ourselves, from the header, before any decode


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the image header without decoding pixels; None if Pillow cannot tell."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - unidentifiable data is left to the decoder, which reports it
        return None


class ShardCrawler:
    def __init__(self, cfg: CrawlConfig) -> None:
        from img2dataset.resizer import Resizer  # heavy import (cv2, albumentations): only in workers

        self.cfg = cfg
        self.fetcher = Fetcher(
            timeout=cfg.timeout, max_bytes=cfg.max_bytes, max_redirects=cfg.max_redirects,
            policy=AddressPolicy.from_cidrs(cfg.allow_networks, cfg.deny_networks),
            user_agent_token=cfg.user_agent_token, contact=cfg.contact, disallowed=cfg.disallowed_header_directives,
        )
        self.resizer = Resizer(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, max_image_area=cfg.max_pixels,
        )

    def one(self, url: str | None, caption: str | None) -> dict[str, Any]:
        now = dt.datetime.now(dt.timezone.utc)
        if caption is None:
            return {"status": "invalid", "error_class": "missing_caption", "error_message": "no caption",
                    "fetched_at": None}
        got = self.fetcher.fetch(url)
        row: dict[str, Any] = {"status": got.status, "error_class": got.error_class,
                               "error_message": got.error_message, "http_status": got.http_status,
                               "fetched_at": now if got.status != "invalid" else None}
        if got.data is None:
            return row
        size = _header_size(got.data)
        if size is None:
            # no header Pillow can read: decoding it blind could allocate without bound (e.g. a tiny HDR file)
            row.update(status="failed_to_resize", error_class="decode",
                       error_message="not an image format whose dimensions can be read before decoding")
            return row
        if size[0] * size[1] > self.cfg.max_pixels:
            row.update(status="failed_to_resize", error_class="too_many_pixels",
                       error_message=f"{size[0]}x{size[1]} exceeds max_pixels {self.cfg.max_pixels}")
            return row
        img, w, h, ow, oh, err = self.resizer(io.BytesIO(got.data))
        if err is not None or img is None:
            row.update(status="failed_to_resize", error_class="decode", error_message=str(err)[:500])
            return row
        row.update(image=img, image_format=self.cfg.encode_format, width=w, height=h, original_width=ow,
                   original_height=oh, sha256=storage.sha256_bytes(img))
        return row


def crawl_shard(cfg: CrawlConfig, in_url: str, out_url: str) -> dict[str, Any]:
    """Crawl one staged input shard into out_url; return its shard record and status counts."""
    fs, path = storage.filesystem(in_url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    urls, caps = table.column("url").to_pylist(), table.column("caption").to_pylist()
    crawler = ShardCrawler(cfg)
    with ThreadPoolExecutor(max_workers=cfg.threads) as pool:
        results = list(pool.map(crawler.one, urls, caps))
    columns: dict[str, Any] = {}
    for name in CRAWLED.names:
        if name in table.column_names:
            columns[name] = table.column(name)
        else:
            columns[name] = pa.array([r.get(name) for r in results], type=CRAWLED.field(name).type)
    extra = [c for c in table.column_names if c not in CRAWLED.names]
    out = pa.table({**columns, **{c: table.column(c) for c in extra}})
    out = out.cast(pa.schema([CRAWLED.field(n) for n in CRAWLED.names] + [out.schema.field(c) for c in extra]))
    return write_shard(out, out_url)


def _counts(table: pa.Table) -> dict[str, Any]:
    return {"status": dict(Counter(table.column("status").to_pylist())),
            "errors": dict(Counter(e for e in table.column("error_class").to_pylist() if e))}


def write_shard(table: pa.Table, out_url: str) -> dict[str, Any]:
    return {**storage.write_parquet(out_url, table), **_counts(table)}


def describe_shard(out_url: str) -> dict[str, Any]:
    """The same record for a shard a previous attempt already wrote (resume)."""
    fs, path = storage.filesystem(out_url)
    with fs.open(path, "rb") as f:
        data = f.read()
    table = pq.read_table(pa.BufferReader(data), columns=["status", "error_class"])
    return {"rows": table.num_rows, "bytes": len(data), "sha256": storage.sha256_bytes(data), **_counts(table)}
