"""The crawl stage's parameters: what a job writes under `stages.<name>.with` for `uses: crawl`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipelines.configschema import field

if TYPE_CHECKING:
    from pipelines.preflight import Check

URL_COLS = ("url", "URL")  # the URL column when url_col is not set: the first of these the list has
CAPTION_COLS = ("caption", "TEXT", "text")
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
              ".ndjson": "jsonl"}


@dataclass(kw_only=True)
class CrawlConfig:
    """Download, resize and store the images of a URL list."""

    input: str | list[str] = field(help="fsspec path(s) or glob(s) of URL lists (parquet, csv, tsv, jsonl)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = field("auto", "input format; auto: by file extension")
    url_col: str | None = field(None, "URL column; default: the first of url, URL")
    caption_col: str | None = field(None, "caption column; default: the first of caption, TEXT, text")
    passthrough: list[str] = field([], "input columns copied into the output; one named like a crawl column (e.g. "
                                   "DataComp's uid) is written as source_<name>")
    require_caption: bool = field(True, "a row without a caption (missing or blank) is kept as invalid, not fetched")
    image_size: int = field(256, "target side in pixels", minimum=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = field(
        "border", "img2dataset resize mode"
    )
    resize_only_if_bigger: bool = field(False, "never upscale")
    encode_format: Literal["jpg", "png", "webp"] = field("jpg", "output image encoding")
    encode_quality: int = field(95, "jpg/webp quality 0-100, png compression 0-9", minimum=0, maximum=100)
    samples_per_shard: int = field(1000, "rows per output shard (one Ray task each)", minimum=1)
    threads: int = field(16, "download threads per shard task", minimum=1)
    timeout: float = field(10.0, "connect and read timeout per request, seconds", exclusiveMinimum=0)
    max_bytes: int = field(20 * 2**20, "largest response body read; larger ones are cut off", minimum=1)
    max_pixels: int = field(89_478_485, "largest width*height, checked from the header before decoding", minimum=1)
    max_redirects: int = field(5, "redirect hops followed", minimum=0)
    user_agent_token: str = field("clipline", "crawler name sent in the User-Agent and matched in robots.txt and "
                                  "X-Robots-Tag")
    contact: str | None = field(None, "contact URL or e-mail added to the User-Agent")
    disallowed_header_directives: list[str] = field(
        ["noai", "noimageai", "noml", "noindex", "noimageindex"], "X-Robots-Tag directives that opt an image out"
    )
    robots_txt: bool = field(True, "honour each host's robots.txt (fetched once per origin and worker process, "
                             "through the same address policy, byte cap and deadline as an image)")
    optout_user_agents: list[str] = field(
        ["GPTBot", "CCBot", "Google-Extended", "anthropic-ai", "ClaudeBot", "img2dataset"],
        "user-agent tokens besides user_agent_token whose robots.txt rules and X-Robots-Tag directives also opt an "
        "image out: a URL disallowed for any of them is not fetched")
    robots_ttl: float = field(3600.0, "seconds a host's robots.txt (or its 4xx: everything allowed) is kept per "
                              "worker process", minimum=0)
    robots_error_ttl: float = field(300.0, "seconds a robots.txt that answered 5xx or 429 or could not be fetched "
                                    "keeps the host disallowed (RFC 9309) before it is asked again", minimum=0)
    tdm_reservation: bool = field(True, "a TDMRep `tdm-reservation: 1` response header opts the image out")
    per_host_connections: int = field(4, "concurrent requests to one host across the whole crawl (per shard task "
                                      "with per_host_scope: task); 0: no cap", minimum=0)
    per_host_rate: float = field(0.0, "request starts per second to one host across the whole crawl (per shard task "
                                 "with per_host_scope: task); 0: no limit", minimum=0)
    per_host_scope: Literal["job", "task"] = field(
        "job", "where the per-host limits hold: job (every shard task on every node, through the crawl's host token "
        "service) or task (within each shard task, so N tasks may reach a host N times the limit)")
    host_token_actors: int = field(1, "Ray actors of the host token service (per_host_scope: job); hosts are spread "
                                   "over them by hash", minimum=1)
    http_retries: int = field(2, "retries, within the run, of a 429 or 503 answer after its Retry-After (or a "
                              "backoff) during which the host gets no request", minimum=0)
    max_retry_wait: float = field(60.0, "longest wait for one retry, seconds; a longer Retry-After gives up the row "
                                  "(a refresh retries it)", minimum=0)
    dns_ttl: float = field(300.0, "seconds a host's resolved addresses are kept, per worker process, for every shard "
                           "task it runs; 0: resolve on every connection", minimum=0)
    dns_negative_ttl: float = field(30.0, "seconds a host that does not exist (NXDOMAIN) is remembered as such",
                                    minimum=0)
    dns_threads: int = field(8, "resolver threads per worker process: a stuck resolver holds at most these, and a "
                             "request waits for its host's addresses at most its timeout and deadline", minimum=1)
    refresh_from: str | None = field("auto", "previous output whose results are reused: auto (this stage's newest "
                                     "complete output with the same image parameters), a directory, or null (none)")
    refetch: Literal["transient", "failed", "all"] = field(
        "transient", "on refresh, fetch again: rows that failed transiently (retry_errors, below max_attempts), "
        "every failed row, or every row")
    retry_errors: list[str] = field(
        ["timeout", "dns", "connection", "protocol", "http_429", "http_5xx", "robots_unavailable", "shard_failed"],
        "error classes a refresh fetches again")
    max_attempts: int = field(3, "fetches of one row across refreshes before a transient failure is final", minimum=1)
    shard_retries: int = field(3, "times a shard task is rerun after its worker dies or it raises", minimum=0)
    max_failed_shards: int = field(0, "shards allowed to fail after their retries; their rows are written with "
                                   "error_class shard_failed. More fail the stage, naming them", minimum=0)
    speculate: bool = field(True, "near the end of the crawl, start one speculative copy of a shard task that runs far "
                            "longer than the others (speculate_*); the first copy to finish is kept, the other "
                            "cancelled. A copy sends the shard's requests again, to the same hosts")
    speculate_after: float = field(0.9, "fraction of the shard tasks finished, none waiting to start, before a copy "
                                   "may start", minimum=0, maximum=1)
    speculate_factor: float = field(3.0, "a running shard is copied once it has run this many times the median "
                                    "finished shard's time", minimum=1)
    speculate_min_seconds: float = field(60.0, "seconds a running shard has run, at least, before it is copied",
                                         minimum=0)
    speculate_max_copies: int = field(2, "copies running at once; a shard is copied at most once", minimum=1)
    allow_networks: list[str] = field([], "CIDRs allowed although non-public (e.g. 127.0.0.0/8 for a loopback demo)")
    deny_networks: list[str] = field([], "CIDRs refused in addition to all non-public addresses")

    def output_columns(self) -> list[str]:
        """The columns of the crawled shards: the contract's, then the passthrough ones as they are written."""
        from pipelines.contracts import CRAWLED

        return [*CRAWLED.names, *(f"source_{c}" if c in CRAWLED.names else c for c in self.passthrough)]

    def preflight(self, check: Check) -> None:
        """Before the run: every URL list exists and has the URL, caption and passthrough columns."""
        from pipelines.stages.crawl.preflight import check_inputs

        check_inputs(self, check)

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ValueError("input: expected at least one path or glob")
        from pipelines.contracts import CRAWLED

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
