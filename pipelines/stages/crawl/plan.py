"""Which input rows a crawl fetches: duplicates marked once, and on a refresh, earlier results reused.

uid = hash(url, caption) names a row across runs and list versions.  Once the inputs are staged, the driver
holds every row's uid (16 bytes) with its file and row number (12 bytes) - 28 bytes a row, about 2.8 GB
per 100 million rows - and decides for each row:

- `DUPLICATE`: an earlier row (in file order) has the same url and caption; it is not fetched, and its
  status `duplicate` names that row;
- `REUSE`: the previous output (`refresh_from`) holds a final result for it - a success, an invalid row,
  or a failure that `refetch` does not retry - which is copied, not fetched again;
- `FETCH`: everything else; `attempts` counts the fetches of a row across refreshes, so a transient
  failure is retried at most `max_attempts` times in all.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import manifest, storage
from pipelines.stages.crawl.config import CrawlConfig

FETCH, REUSE, DUPLICATE = 0, 1, 2

# parameters that shape a stored result: an earlier output made with other values is not reused
RESULT_PARAMS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                 "max_bytes", "max_pixels", "max_redirects", "require_caption", "disallowed_header_directives",
                 "allow_networks", "deny_networks")

PLAN = pa.schema([
    pa.field("action", pa.int8()),
    pa.field("prior_shard", pa.int32()),  # index into Prior.shard_urls, -1 if none
    pa.field("prior_row", pa.int32()),
    pa.field("attempts", pa.int32()),  # fetches before this run
    pa.field("duplicate_of", pa.string()),
])


@dataclass
class Prior:
    """A complete earlier output of this crawl stage whose results a refresh reuses."""

    location: str
    digest: str
    version: int
    shard_urls: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _differences(cfg: CrawlConfig, params: dict[str, Any]) -> list[str]:
    mine = asdict(cfg)
    return [f"{k}: {params.get(k)!r} there, {mine[k]!r} here" for k in RESULT_PARAMS if params.get(k) != mine[k]]


def find_prior(cfg: CrawlConfig, output: str, log: logging.Logger) -> Prior | None:
    """The output to refresh from: `refresh_from` as configured, or None for a crawl from scratch."""
    if cfg.refresh_from is None or cfg.refetch == "all":
        return None
    if cfg.refresh_from != "auto":
        m = manifest.read(cfg.refresh_from.rstrip("/"))
        if m is None or m.uses != "crawl":
            raise ValueError(f"refresh_from: {cfg.refresh_from} holds no complete crawl output (no _manifest.json "
                             "of a crawl stage)")
        diff = _differences(cfg, m.params)
        if diff:
            raise ValueError(f"refresh_from: {cfg.refresh_from} was crawled with other result parameters, so its "
                             f"images cannot be reused: {'; '.join(diff)}")
        return _prior(m)
    parent, own = output.rstrip("/").rsplit("/", 1)
    fs, path = storage.filesystem(parent)
    candidates = []
    for found in fs.glob(f"{path}/*/{manifest.MANIFEST}"):
        directory = found.rsplit("/", 1)[0]
        if directory.rsplit("/", 1)[-1] == own:
            continue
        m = manifest.read(directory if storage.is_local(parent) else fs.unstrip_protocol(directory))
        if m is None or m.uses != "crawl":
            continue
        diff = _differences(cfg, m.params)
        if diff:
            log.info("not refreshing from %s: %s", m.location, "; ".join(diff))
            continue
        candidates.append(m)
    if not candidates:
        return None
    # The newest version of the chain; finished_at only breaks ties between independent crawls (two runs can
    # finish within one timestamp, and glob order is no order).
    return _prior(max(candidates, key=lambda m: (int(m.extra.get("version", 1)), m.finished_at)))


def _prior(m: manifest.Manifest) -> Prior:
    return Prior(location=m.location, digest=m.digest, version=int(m.extra.get("version", 1)),
                 shard_urls=m.shard_urls())


def _prior_index(prior: Prior, cfg: CrawlConfig) -> dict[str, np.ndarray]:
    """The previous output's rows sorted by uid, with where they are and whether their result is final."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("uid", "shard", "row", "reuse", "attempts")}
    for i, url in enumerate(prior.shard_urls):
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
            t = pq.read_table(f, columns=[c for c in ("uid", "status", "error_class", "attempts") if c in names])
        status = t.column("status")
        fetched = pc.invert(pc.is_in(status, pa.array(["invalid", "duplicate"])))
        attempts = (t.column("attempts").fill_null(0) if "attempts" in names
                    else pc.cast(fetched, pa.int32()))  # outputs from before attempts were counted: one each
        success_or_invalid = pc.is_in(status, pa.array(["success", "invalid"]))
        if cfg.refetch == "failed":
            reuse = success_or_invalid
        else:  # transient: a failure is final unless its class is retried and attempts remain
            retry = pc.and_(pc.is_in(t.column("error_class").fill_null(""), pa.array(cfg.retry_errors)),
                            pc.less(attempts, cfg.max_attempts))
            reuse = pc.or_(success_or_invalid, pc.invert(retry))
        keep = pc.not_equal(status, "duplicate").to_numpy(zero_copy_only=False)
        rows = np.arange(t.num_rows, dtype=np.int32)[keep]
        parts["uid"].append(_uid_bytes(t.column("uid").to_pylist())[keep])
        parts["shard"].append(np.full(len(rows), i, dtype=np.int32))
        parts["row"].append(rows)
        parts["reuse"].append(reuse.to_numpy(zero_copy_only=False)[keep])
        parts["attempts"].append(attempts.to_numpy(zero_copy_only=False).astype(np.int32)[keep])
    dtypes: tuple[npt.DTypeLike, ...] = ("S16", np.int32, np.int32, bool, np.int32)
    cols = {k: np.concatenate(v) if v else np.array([], dtype=d) for (k, v), d in zip(parts.items(), dtypes, strict=True)}
    order = np.argsort(cols["uid"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def _uid_bytes(uids: list[str]) -> np.ndarray:
    return np.frombuffer(bytes.fromhex("".join(uids)), dtype="S16") if uids else np.array([], dtype="S16")


class Planner:
    """Collects the staged rows' uids chunk by chunk, then decides every row's action at once."""

    def __init__(self) -> None:
        self.uids: list[np.ndarray] = []
        self.files: list[str] = []
        self.file_idx: list[np.ndarray] = []
        self.source_rows: list[np.ndarray] = []

    def add(self, uids: list[str], file: str, source_rows: np.ndarray) -> None:
        if not self.files or self.files[-1] != file:
            self.files.append(file)
        self.uids.append(_uid_bytes(uids))
        self.file_idx.append(np.full(len(uids), len(self.files) - 1, dtype=np.int32))
        self.source_rows.append(np.asarray(source_rows, dtype=np.int64))

    def decide(self, cfg: CrawlConfig, prior: Prior | None) -> tuple[pa.Table, dict[str, int]]:
        """The plan (one row per staged row, in order) and its counts: rows_new, rows_retried, rows_reused."""
        uids = np.concatenate(self.uids) if self.uids else np.array([], dtype="S16")
        n = len(uids)
        index = np.arange(n)
        order = np.argsort(uids, kind="stable")  # stable: the first of equal uids is the earliest row
        starts = np.ones(n, dtype=bool)
        starts[1:] = uids[order][1:] != uids[order][:-1]
        first = np.empty(n, dtype=np.int64)
        first[order] = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
        duplicate = first != index
        found = np.zeros(n, dtype=bool)
        reuse = np.zeros(n, dtype=bool)
        prior_shard = np.full(n, -1, dtype=np.int32)
        prior_row = np.full(n, -1, dtype=np.int32)
        attempts = np.zeros(n, dtype=np.int32)
        if prior is not None:
            idx = _prior_index(prior, cfg)
            if len(idx["uid"]):
                pos = np.minimum(np.searchsorted(idx["uid"], uids), len(idx["uid"]) - 1)
                found = (idx["uid"][pos] == uids) & ~duplicate
                reuse = found & idx["reuse"][pos]
                prior_shard = np.where(reuse, idx["shard"][pos], -1).astype(np.int32)
                prior_row = np.where(reuse, idx["row"][pos], -1).astype(np.int32)
                attempts = np.where(found, idx["attempts"][pos], 0).astype(np.int32)
        action = np.where(duplicate, DUPLICATE, np.where(reuse, REUSE, FETCH)).astype(np.int8)
        files = np.concatenate(self.file_idx) if self.file_idx else np.array([], dtype=np.int32)
        rows = np.concatenate(self.source_rows) if self.source_rows else np.array([], dtype=np.int64)
        duplicate_of: list[str | None] = [None] * n
        for i in np.flatnonzero(duplicate):
            j = first[i]
            duplicate_of[i] = f"same url and caption as row {rows[j]} of {self.files[files[j]]}"
        table = pa.table([action, prior_shard, prior_row, attempts, pa.array(duplicate_of, pa.string())],
                         schema=PLAN)
        counts = {"rows_new": int(np.sum((action == FETCH) & ~found)),
                  "rows_retried": int(np.sum((action == FETCH) & found)),
                  "rows_reused": int(np.sum(action == REUSE))}
        return table, counts
