"""Read URL lists of any format from any fsspec path and stage them as fixed-size input shards.

The driver streams each file in chunks (never the whole list in memory), keeps the URL, caption and
passthrough columns, and writes `_inputs/shard-NNNNN.parquet` of `samples_per_shard` rows each, then
`_inputs/plan.parquet`: every row's action (fetch, reuse an earlier result, or duplicate; see plan.py).
A `_SUCCESS.json` written last makes the staged inputs and their plan reusable when an interrupted crawl
resumes, so a resumed crawl decides exactly as the interrupted one did.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.contracts import CRAWLED, uid
from pipelines.stages.crawl.config import CAPTION_COLS, URL_COLS, CrawlConfig
from pipelines.stages.crawl.plan import Planner, Prior
from pipelines.stages.crawl.preflight import input_format

_CHUNK = 50_000


class InputError(ValueError):
    """A URL list that cannot be read as configured; the message names the file."""


def list_files(cfg: CrawlConfig) -> list[str]:
    """Every input file, globs expanded, in a stable order; an error names a pattern that matched nothing."""
    out: list[str] = []
    for pattern in cfg.input:
        matches = storage.expand(pattern)
        if not matches:
            glob = any(c in pattern for c in "*?[")
            raise InputError(f"crawl input {pattern!r}: {'the glob matches no file' if glob else 'no such file'}")
        out.extend(matches)
    return out


def identity(cfg: CrawlConfig) -> dict[str, Any]:
    """What changes when an input changes: each file's fsspec key (size and modification time or ETag)."""
    return {"files": storage.file_keys(list_files(cfg))}


def file_format(path: str, cfg: CrawlConfig) -> str:
    fmt = input_format(path, cfg)
    if fmt is None:
        raise InputError(f"crawl input {path}: cannot tell the format from the extension; "
                         "set format: parquet|csv|tsv|jsonl")
    return fmt


def _chunks(path: str, fmt: str) -> Iterator[pd.DataFrame]:
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=_CHUNK):
                yield batch.to_pandas()
        elif fmt in ("csv", "tsv"):
            text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
            yield from pd.read_csv(text, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                                   na_values=[], chunksize=_CHUNK)
        else:
            yield from pd.read_json(f, lines=True, dtype=False, precise_float=True, chunksize=_CHUNK)


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"crawl input {path}: no column {wanted!r} ({what}); columns are {', '.join(columns)}")
        return wanted
    for c in defaults:
        if c in columns:
            return c
    raise InputError(
        f"crawl input {path}: no {what} column; expected one of {', '.join(defaults)} "
        f"(or set {'url_col' if what == 'URL' else 'caption_col'}); columns are {', '.join(columns)}"
    )


def _text(series: pd.Series) -> list[str | None]:
    return [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in series.tolist()]


def rows(cfg: CrawlConfig) -> Iterator[pd.DataFrame]:
    """Normalised chunks: uid, url, caption, source, source_row and the passthrough columns."""
    for path in list_files(cfg):
        fmt = file_format(path, cfg)
        offset = 0
        try:
            for chunk in _chunks(path, fmt):
                cols = [str(c) for c in chunk.columns]
                url_col = _pick(cols, cfg.url_col, URL_COLS, "URL", path)
                cap_col = _pick(cols, cfg.caption_col, CAPTION_COLS, "caption", path)
                missing = [c for c in cfg.passthrough if c not in cols]
                if missing:
                    raise InputError(f"crawl input {path}: passthrough column(s) {', '.join(missing)} not found; "
                                     f"columns are {', '.join(cols)}")
                urls, caps = _text(chunk[url_col]), _text(chunk[cap_col])
                out = pd.DataFrame({
                    "uid": [uid(u, c) for u, c in zip(urls, caps, strict=True)],
                    "url": urls,
                    "caption": caps,
                    "source": path,
                    "source_row": range(offset, offset + len(chunk)),
                })
                for c in cfg.passthrough:  # DataComp's own uid, say, becomes source_uid
                    out[f"source_{c}" if c in CRAWLED.names else c] = chunk[c].to_numpy()
                offset += len(chunk)
                yield out
        except InputError:
            raise
        except (ValueError, OSError, pa.ArrowException, UnicodeError) as exc:
            raise InputError(f"crawl input {path}: cannot read it as {fmt}: {exc}") from exc


def stage(cfg: CrawlConfig, inputs_dir: str, find_prior: Callable[[], Prior | None]) -> dict[str, Any]:
    """Write the input shards and their plan (or reuse them if a previous attempt finished staging).

    Returns `shards` (id, url, rows), `rows`, `plan` (its URL), `counts` (rows_new, rows_retried,
    rows_reused) and `prior` (the output refreshed from, or None)."""
    done_url = storage.join(inputs_dir, "_SUCCESS.json")
    if storage.exists(done_url):
        return storage.read_json(done_url)
    storage.remove_tree(inputs_dir)
    prior = find_prior()
    planner = Planner()
    shards: list[dict[str, Any]] = []
    pending: list[pd.DataFrame] = []
    pending_rows = 0

    def flush(frame: pd.DataFrame) -> None:
        url = storage.join(inputs_dir, f"shard-{len(shards):05d}.parquet")
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
        storage.atomic_write(url, buf.getvalue().to_pybytes())
        shards.append({"id": len(shards), "url": url, "rows": len(frame)})

    for chunk in rows(cfg):
        planner.add(chunk["uid"].tolist(), chunk["source"].iat[0] if len(chunk) else "", chunk["source_row"].to_numpy())
        pending.append(chunk)
        pending_rows += len(chunk)
        while pending_rows >= cfg.samples_per_shard:
            frame = pd.concat(pending, ignore_index=True)
            flush(frame.iloc[: cfg.samples_per_shard])
            rest = frame.iloc[cfg.samples_per_shard :]
            pending, pending_rows = ([rest] if len(rest) else []), len(rest)
    if pending_rows:
        flush(pd.concat(pending, ignore_index=True))
    table, counts = planner.decide(cfg, prior)
    plan_url = storage.join(inputs_dir, "plan.parquet")
    storage.write_parquet(plan_url, table)
    staged = {"shards": shards, "rows": sum(s["rows"] for s in shards), "plan": plan_url, "counts": counts,
              "prior": prior.to_json() if prior else None}
    storage.write_json(done_url, staged)
    return staged
