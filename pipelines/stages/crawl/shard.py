"""One crawl shard, run as a Ray task: fetch its rows with a thread pool, resize, write one Parquet file.

The shard's plan (plan.py) says which rows to fetch, which earlier results to copy from the output a
refresh starts from, and which rows are duplicates.  Per-row problems become a status and an error class
in the row, never an exception: only a failure to read the inputs or write the output fails the task
(and Ray retries it, `shard_retries` times).  The output is written atomically under its final name,
so a task killed half-way leaves nothing.
"""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import layout, storage
from pipelines.contracts import CRAWLED
from pipelines.prometheus import CRAWL_FETCHED, StageMetrics
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.stages.crawl.fetch import Fetcher
from pipelines.stages.crawl.hosttokens import JobLimiter, attach
from pipelines.stages.crawl.netpolicy import AddressPolicy
from pipelines.stages.crawl.plan import DUPLICATE, FETCH, REUSE

# the columns a crawl writes for a row; the others (uid, url, caption, source, source_row) come from the input
RESULT_COLUMNS = [n for n in CRAWLED.names if n not in ("uid", "url", "caption", "source", "source_row")]

Image.MAX_IMAGE_PIXELS = None  # we check max_pixels ourselves, from the header, before any decode


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the image header without decoding pixels; None if Pillow cannot tell."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - unidentifiable data is left to the decoder, which reports it
        return None


class ShardCrawler:
    def __init__(self, cfg: CrawlConfig, limiter: JobLimiter | None = None) -> None:
        from pipelines.stages.crawl.resize import Resizer  # cv2: imported in workers only

        self.cfg = cfg
        self.fetcher = Fetcher(
            timeout=cfg.timeout, max_bytes=cfg.max_bytes, max_redirects=cfg.max_redirects,
            policy=AddressPolicy.from_cidrs(cfg.allow_networks, cfg.deny_networks),
            user_agent_token=cfg.user_agent_token, contact=cfg.contact, disallowed=cfg.disallowed_header_directives,
            per_host_connections=cfg.per_host_connections, per_host_rate=cfg.per_host_rate,
            http_retries=cfg.http_retries, max_retry_wait=cfg.max_retry_wait,
            dns_ttl=cfg.dns_ttl, dns_negative_ttl=cfg.dns_negative_ttl, dns_threads=cfg.dns_threads,
            robots_txt=cfg.robots_txt, optout_user_agents=cfg.optout_user_agents, robots_ttl=cfg.robots_ttl,
            robots_error_ttl=cfg.robots_error_ttl, tdm_reservation=cfg.tdm_reservation, limiter=limiter,
        )
        self.resizer = Resizer(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, max_image_area=cfg.max_pixels,
        )

    def one(self, url: str | None, caption: str | None) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        if self.cfg.require_caption and (caption is None or not caption.strip()):
            return {"status": "invalid", "error_class": "missing_caption", "fetched_at": None,
                    "error_message": "no caption" if caption is None else "blank caption"}
        got = self.fetcher.fetch(url)
        row: dict[str, Any] = {"status": got.status, "error_class": got.error_class,
                               "error_message": got.error_message, "http_status": got.http_status,
                               "fetched_at": now if got.status != "invalid" else None, "retries": got.retries}
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
        img, w, h, ow, oh, err = self.resizer(got.data)
        if err is not None or img is None:
            row.update(status="failed_to_resize", error_class="decode", error_message=str(err)[:500])
            return row
        row.update(image=img, image_format=self.cfg.encode_format, width=w, height=h, original_width=ow,
                   original_height=oh, sha256=storage.sha256_bytes(img))
        return row


def crawl_shard(cfg: CrawlConfig, in_url: str, out_url: str, plan: pa.Table,
                prior_urls: list[str], metrics: StageMetrics | None = None) -> dict[str, Any]:
    """Crawl one staged input shard into out_url; return its shard record and status counts.  Each fetched
    row counts in `metrics` (CRAWL_FETCHED) as it comes back, so the fetch rate is live while the shard runs."""
    table = storage.read_parquet(in_url)
    urls, caps = table.column("url").to_pylist(), table.column("caption").to_pylist()
    action = plan.column("action").to_pylist()
    attempts = plan.column("attempts").to_pylist()
    results: list[dict[str, Any]] = [{} for _ in action]
    todo = [i for i, a in enumerate(action) if a == FETCH]
    # with per_host_scope: job, slots of the crawl's host token service, found from where the shard is written
    limiter = attach(cfg, out_url)
    crawler = ShardCrawler(cfg, limiter)
    with ThreadPoolExecutor(max_workers=cfg.threads) as pool:
        for i, row in zip(todo, pool.map(lambda i: crawler.one(urls[i], caps[i]), todo), strict=True):
            row["attempts"] = attempts[i] + (row.get("fetched_at") is not None)
            results[i] = row
            if metrics is not None:
                metrics.inc(CRAWL_FETCHED, status=row["status"])
    _copy_reused(plan, prior_urls, results)
    for i in (i for i, a in enumerate(action) if a == DUPLICATE):
        results[i] = {"status": "duplicate", "error_class": "duplicate", "attempts": 0,
                      "error_message": plan.column("duplicate_of")[i].as_py()}
    record = write_shard(assemble(table, results), out_url)
    record["fetched_success"] = sum(results[i].get("status") == "success" for i in todo)
    record["http_retries"] = sum(results[i].get("retries", 0) for i in todo)
    record |= {f"dns_{k}": v for k, v in crawler.fetcher.dns.as_dict().items()}  # the lookups of this shard's rows
    record |= {f"robots_{k}": v for k, v in crawler.fetcher.robots_counts.as_dict().items()}  # robots.txt lookups
    if limiter is not None:  # what its requests got from the host token service
        record |= {f"host_slots_{k}": v for k, v in limiter.counts.as_dict().items()}
    return record


def failed_shard(in_url: str, out_url: str, plan: pa.Table, error: str) -> dict[str, Any]:
    """A shard whose task kept failing, written by the driver with every row `shard_failed` (a refresh
    retries them), so that the output still accounts for each input row."""
    attempts = plan.column("attempts").to_pylist()
    results = [{"status": "failed_to_download", "error_class": "shard_failed", "attempts": a,
                "error_message": f"the shard task failed after its retries: {error}"[:500]} for a in attempts]
    return write_shard(assemble(storage.read_parquet(in_url), results), out_url)


def _copy_reused(plan: pa.Table, prior_urls: list[str], results: list[dict[str, Any]]) -> None:
    """Fill in the rows whose result an earlier output already holds, reading each of its shards once."""
    action = plan.column("action").to_numpy()
    shards, rows = plan.column("prior_shard").to_numpy(), plan.column("prior_row").to_numpy()
    for shard in sorted(set(shards[action == REUSE].tolist())):
        mine = np.flatnonzero((action == REUSE) & (shards == shard))
        fs, path = storage.filesystem(prior_urls[shard])
        with fs.open(path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
            prior = pq.read_table(f, columns=[c for c in RESULT_COLUMNS if c in names])
        for i, row in zip(mine.tolist(), prior.take(pa.array(rows[mine])).to_pylist(), strict=True):
            if row.get("attempts") is None:  # written before attempts were counted
                row["attempts"] = int(row["status"] not in ("invalid", "duplicate"))
            results[i] = row


def assemble(table: pa.Table, results: list[dict[str, Any]]) -> pa.Table:
    """The crawled-schema table of an input shard and its rows' results (passthrough columns last)."""
    columns: dict[str, Any] = {}
    for name in CRAWLED.names:
        if name in table.column_names:
            columns[name] = table.column(name)
        else:
            columns[name] = pa.array([r.get(name) for r in results], type=CRAWLED.field(name).type)
    extra = [c for c in table.column_names if c not in CRAWLED.names]
    out = pa.table({**columns, **{c: table.column(c) for c in extra}})
    return out.cast(pa.schema([CRAWLED.field(n) for n in CRAWLED.names] + [out.schema.field(c) for c in extra]))


def _counts(table: pa.Table) -> dict[str, Any]:
    return {"status": dict(Counter(table.column("status").to_pylist())),
            "errors": dict(Counter(e for e in table.column("error_class").to_pylist() if e))}


def write_shard(table: pa.Table, out_url: str) -> dict[str, Any]:
    """Write a crawled table to out_url; its rows, bytes and sha256 (layout.file_record) and status counts."""
    return {**storage.write_parquet(out_url, table), **_counts(table)}


def describe_shard(out_url: str) -> dict[str, Any]:
    """The same record for a shard a previous attempt already wrote (resume)."""
    fs, path = storage.filesystem(out_url)
    with fs.open(path, "rb") as f:
        data = f.read()
    table = pq.read_table(pa.BufferReader(data), columns=["status", "error_class"])
    return {**layout.file_record(table.num_rows, data), **_counts(table)}
