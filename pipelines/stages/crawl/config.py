"""The crawl stage's parameters: what a job writes under `stages.<name>.with` for `uses: crawl`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal


def _f(default, help, **bounds):  # noqa: A002 - short helper for field metadata
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(kw_only=True)
class CrawlConfig:
    """Download, resize and store the images of a URL list."""

    input: str | list[str] = field(metadata={"help": "fsspec path(s) or glob(s) of URL lists (parquet, csv, tsv, jsonl)"})
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = _f("auto", "input format; auto: by file extension")
    url_col: str | None = _f(None, "URL column; default: the first of url, URL")
    caption_col: str | None = _f(None, "caption column; default: the first of caption, TEXT, text")
    passthrough: list[str] = _f([], "input columns copied into the output; one named like a crawl column (e.g. "
                                "DataComp's uid) is written as source_<name>")
    require_caption: bool = _f(True, "a row without a caption (missing or blank) is kept as invalid, not fetched")
    image_size: int = _f(256, "target side in pixels", minimum=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = _f(
        "border", "img2dataset resize mode"
    )
    resize_only_if_bigger: bool = _f(False, "never upscale")
    encode_format: Literal["jpg", "png", "webp"] = _f("jpg", "output image encoding")
    encode_quality: int = _f(95, "jpg/webp quality 0-100, png compression 0-9", minimum=0, maximum=100)
    samples_per_shard: int = _f(1000, "rows per output shard (one Ray task each)", minimum=1)
    threads: int = _f(16, "download threads per shard task", minimum=1)
    timeout: float = _f(10.0, "connect and read timeout per request, seconds", exclusiveMinimum=0)
    max_bytes: int = _f(20 * 2**20, "largest response body read; larger ones are cut off", minimum=1)
    max_pixels: int = _f(89_478_485, "largest width*height, checked from the header before decoding", minimum=1)
    max_redirects: int = _f(5, "redirect hops followed", minimum=0)
    user_agent_token: str = _f("clipline", "crawler name sent in the User-Agent and matched in X-Robots-Tag")
    contact: str | None = _f(None, "contact URL or e-mail added to the User-Agent")
    disallowed_header_directives: list[str] = _f(
        ["noai", "noimageai", "noindex", "noimageindex"], "X-Robots-Tag directives that opt an image out"
    )
    per_host_connections: int = _f(4, "concurrent requests to one host per shard task; 0: no cap", minimum=0)
    per_host_rate: float = _f(0.0, "requests per second to one host per shard task; 0: no limit", minimum=0)
    http_retries: int = _f(2, "retries, within the run, of a 429 or 503 answer after its Retry-After (or a "
                           "backoff) during which the host gets no request", minimum=0)
    max_retry_wait: float = _f(60.0, "longest wait for one retry, seconds; a longer Retry-After gives up the row "
                               "(a refresh retries it)", minimum=0)
    refresh_from: str | None = _f("auto", "previous output whose results are reused: auto (this stage's newest "
                                  "complete output with the same image parameters), a directory, or null (none)")
    refetch: Literal["transient", "failed", "all"] = _f(
        "transient", "on refresh, fetch again: rows that failed transiently (retry_errors, below max_attempts), "
        "every failed row, or every row")
    retry_errors: list[str] = _f(["timeout", "dns", "connection", "protocol", "http_429", "http_5xx", "shard_failed"],
                                 "error classes a refresh fetches again")
    max_attempts: int = _f(3, "fetches of one row across refreshes before a transient failure is final", minimum=1)
    shard_retries: int = _f(3, "times a shard task is rerun after its worker dies or it raises", minimum=0)
    max_failed_shards: int = _f(0, "shards allowed to fail after their retries; their rows are written with "
                                "error_class shard_failed. More fail the stage, naming them", minimum=0)
    allow_networks: list[str] = _f([], "CIDRs allowed although non-public (e.g. 127.0.0.0/8 for a loopback demo)")
    deny_networks: list[str] = _f([], "CIDRs refused in addition to all non-public addresses")

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ValueError("input: expected at least one path or glob")
        from pipelines.stages.crawl.schema import CRAWLED

        clash = [c for c in self.passthrough if c.startswith("source_") and c.removeprefix("source_") in CRAWLED.names]
        if clash:
            raise ValueError(f"passthrough: {', '.join(clash)} would clash with the name a passthrough column "
                             f"named like a crawl column is written as; rename it in the input")
        for key in ("allow_networks", "deny_networks"):
            for cidr in getattr(self, key):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ValueError(f"{key}: {cidr!r} is not a CIDR network such as 127.0.0.0/8") from None
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError(
                f"encode_quality: {self.encode_quality} is out of range for png, whose compression level is 0-9"
            )
