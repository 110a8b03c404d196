"""`clipline explore JOB`: one curated dataset version, searchable by text, with every row's ledger record.

What it reads (nothing is recomputed that a stage already wrote):
- the curate stage's current output for the spec (`takedown.current_outputs`: the version `clipline run` would read
  now, a takedown's replacement included), its ledger (one row per crawled row: kept, reason, every score), and the
  crawled shards it curated (url, caption, image bytes);
- image embeddings: an embed stage's output over the same crawl with the same model is read by uid; the rest are
  computed here with that model (`pipelines.embedding`, the batch loop the stages use), CPU or CUDA;
- the MLflow runs that read the version (`takedown.consumers`: the train runs whose inputs hold its digest, and
  the runs downstream of them).

What it builds, once per (version digest, model) and cached under `{storage}/{job}/_explore/`: the unit image
embeddings (float16, as the embed stage stores them), a faiss index over them (exact inner product,
`IndexFlatIP`, up to `EXACT_ROWS` rows; HNSW beyond), and a cluster per row: the ledger's `semantic_cluster` when
the curate stage ran semantic_dedup, else faiss k-means on the embeddings. `meta.json` is written last: a cache
directory without it is rebuilt.

The model that embeds text queries (and the rows): `--model` (a train or embed stage of the job, an MLflow
`models:/` or `runs:/` URI, or an architecture with `--checkpoint`), else the dataset's scoring model (the model of
its first rule that has one: clip_score, semantic_dedup, head; or of the embed stage a rule reads), else the model
of the one train stage that trained on the version. Rows and queries must be embedded by the same model, so the
cache key includes it (for `models:/NAME@ALIAS`, the version the alias names now).

Memory: the ledger (~0.3-0.5 KB a row in pandas), the embeddings (float16, 2 x dim bytes a row), faiss's copy
(float32, 4 x dim bytes a row, plus ~270 bytes of links a row for HNSW) and the cluster ids live in the process:
sized for versions of up to a few million rows; a larger version is refused with the figure unless `--max-rows`
is raised.

The server answers only requests whose Host header names the address it listens on (127.0.0.1 or localhost by
default), so a web page that rebinds a DNS name to 127.0.0.1 cannot read it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines import storage
from pipelines.explore.index import CACHE, EXACT_ROWS, UNCLUSTERED, Index, build_index, cache_dir
from pipelines.explore.version import (
    ExploreError,
    Version,
    hamming64,
    load_rows,
    model_key,
    open_version,
    phash_bits,
    pick_stage,
    resolve_model,
    rules_of,
    score_columns,
    stage_model,
)
from pipelines.models import ModelRef

__all__ = ["CACHE", "EXACT_ROWS", "MAX_ROWS", "UNCLUSTERED", "Explorer", "ExploreError", "Filters", "Index",
           "Version", "build_index", "cache_dir", "load_rows", "model_key", "open_version", "pick_stage",
           "resolve_model", "score_columns"]

log = logging.getLogger("clipline.explore")

MAX_ROWS = 5_000_000  # refused beyond, unless --max-rows says otherwise (everything is held in memory)
MAX_QUERY = 500  # characters of a text query
NEAR_DISTANCE = 4  # pHash bits for "near duplicate" when the curate stage ran no near_duplicate rule
THUMB = 160  # pixels, the longer side of a thumbnail
EXACT_FILTERED = 50_000  # a filtered search over at most this many rows is exact (a matrix product), not faiss


@dataclass
class Filters:
    """What the grid shows: kept, dropped or all rows; one reason; a score column within [low, high]."""

    status: str = "all"
    reason: str = ""
    score: str = ""
    low: float | None = None
    high: float | None = None

    @classmethod
    def parse(cls, q: dict[str, str], scores: list[str]) -> Filters:
        f = cls(status=q.get("status", "all") or "all", reason=q.get("reason", ""), score=q.get("score", ""))
        if f.status not in ("all", "kept", "dropped"):
            raise ValueError(f"status: expected all, kept or dropped, got {f.status!r}")
        if f.score and f.score not in scores:
            raise ValueError(f"score: expected one of {', '.join(scores)}, got {f.score!r}")
        for name in ("low", "high"):
            text = q.get(name, "")
            if text:
                try:
                    number = float(text)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number):
                    raise ValueError(f"{name}: expected a finite number, got {text!r}")
                setattr(f, name, number)
        return f

    def mask(self, rows: pd.DataFrame) -> np.ndarray:
        m = np.ones(len(rows), dtype=bool)
        if self.status != "all":
            m &= rows["kept"].to_numpy(dtype=bool) == (self.status == "kept")
        if self.reason:
            m &= (rows["reason"] == self.reason).to_numpy()
        if self.score:
            values = rows[self.score].to_numpy(dtype=np.float64, na_value=np.nan)
            m &= ~np.isnan(values)
            if self.low is not None:
                m &= values >= self.low
            if self.high is not None:
                m &= values <= self.high
        return m


class Explorer:
    """One version's rows, index and model, answering the page's requests (thread-safe: the server's threads
    share it; the model runs one query at a time)."""

    def __init__(self, v: Version, ref: ModelRef, why: str, progress: bool = True, max_rows: int = MAX_ROWS) -> None:
        self.v, self.ref, self.why = v, ref, why
        rows_in = v.curate.counts.get("rows_in", 0)
        if rows_in > max_rows:
            raise ExploreError(f"{v.stage}: {rows_in:,} rows; the explorer holds every row's ledger record and "
                               f"embedding in memory (~{rows_in * 500 / 1e6:,.0f} MB of ledger plus 6 x dim bytes a "
                               f"row of embeddings and index): raise --max-rows ({max_rows:,}) if this machine has "
                               "the memory")
        self.rows = load_rows(v)
        self.scores = score_columns(self.rows)
        self.index = build_index(v, self.rows, ref, progress)
        self.vector_of = np.full(len(self.rows), -1, dtype=np.int64)
        self.vector_of[self.index.positions] = np.arange(len(self.index.positions))
        self.position = pd.Series(self.rows.index, index=self.rows["uid"])
        self.phash: np.ndarray = np.zeros(len(self.rows), np.uint64)
        self.has_phash: np.ndarray = np.zeros(len(self.rows), bool)
        if "phash" in self.rows:
            self.phash, self.has_phash = phash_bits(self.rows["phash"])
        rules = {r.name: r.config for r in rules_of(v.curate)}
        self.near_distance = rules["near_duplicate"].max_distance if "near_duplicate" in rules else NEAR_DISTANCE
        # a neighbour is called a semantic duplicate only as semantic_dedup decided it: same model, same cluster
        self.semantic_eps: float | None = None
        if "semantic_dedup" in rules:
            sd = rules["semantic_dedup"]
            model = stage_model(v, sd.embeddings, "semantic_dedup.embeddings") if sd.embeddings else sd.model
            if model == ref:
                self.semantic_eps = sd.eps
        self._model: tuple[Any, Any] | None = None
        self._model_lock = threading.Lock()
        self._shards: OrderedDict[int, Any] = OrderedDict()
        self._thumbs: OrderedDict[str, bytes | None] = OrderedDict()
        self._io_lock = threading.Lock()
        self._runs_lock = threading.Lock()
        self._runs: list[Any] | None = None
        self._runs_failed: tuple[float, str] | None = None  # when and why the last lookup failed
        self._clusters: list[dict[str, Any]] | None = None

    # -- facts the page shows
    def info(self) -> dict[str, Any]:
        reasons = self.rows.loc[~self.rows["kept"].to_numpy(dtype=bool), "reason"].value_counts()
        return {"job": self.v.job.name, "stage": self.v.stage, "fingerprint": self.v.curate.fingerprint,
                "digest": self.v.curate.digest, "rows": len(self.rows), "kept": int(self.rows["kept"].sum()),
                "embedded": len(self.index.positions), "model": self.why, "scores": self.scores,
                "reasons": [{"reason": r, "rows": int(n)} for r, n in reasons.items()],
                "clusters": self.index.cluster_source, "cached": self.index.cached}

    def card(self, pos: int, similarity: float | None = None) -> dict[str, Any]:
        r = self.rows.iloc[pos]
        out = {"uid": r["uid"], "caption": _text(r.get("caption")), "url": _text(r.get("url")),
               "kept": bool(r["kept"]), "reason": _text(r["reason"]), "status": r["status"],
               "thumb": bool(r["status"] == "success"),
               "scores": {c: _number(r[c]) for c in self.scores if _number(r[c]) is not None}}
        if similarity is not None:
            out["similarity"] = round(float(similarity), 4)
        return out

    # -- search and browse
    def embed_text(self, text: str) -> np.ndarray:
        from pipelines.embedding import embed_texts, load_model, unit

        with self._model_lock:
            if self._model is None:
                net, _, tokenizer, device = load_model(self.ref, threads=2, device="cpu")
                self._model = (net, tokenizer)
            net, tokenizer = self._model
            vectors, ok = unit(embed_texts(net, tokenizer, [text], 1, "cpu"), [], 1)
        if not ok[0] or vectors.shape[1] != self.index.vectors.shape[1]:
            raise ValueError(f"the query's embedding is not usable (dimension {vectors.shape[1]}, finite "
                             f"{bool(ok[0])}; the index has {self.index.vectors.shape[1]})")
        return vectors[0].astype(np.float32)

    def search(self, text: str, filters: Filters, k: int = 48) -> dict[str, Any]:
        """The k embedded rows nearest to the text that pass the filters, most similar first (ties: ledger
        order)."""
        text = text.strip()
        if not text:
            raise ValueError("q: an empty query")
        if len(text) > MAX_QUERY:
            raise ValueError(f"q: at most {MAX_QUERY} characters, got {len(text)}")
        q = self.embed_text(text)
        allowed = filters.mask(self.rows)[self.index.positions]
        n, want = len(self.index.positions), int(allowed.sum())
        if want < n and want <= EXACT_FILTERED:  # few rows pass: compare with each of them
            ids = np.flatnonzero(allowed)
            sims = self.index.vectors[ids].astype(np.float32) @ q
            hits = [(float(s), int(i)) for s, i in zip(sims, ids, strict=True)]
        else:
            ask = min(n, max(4 * k, 64))
            while True:
                found_sims, found_ids = self.index.faiss_index.search(q[None, :], ask)
                hits = [(float(s), int(i)) for s, i in zip(found_sims[0], found_ids[0], strict=True)
                        if i >= 0 and allowed[i]]
                if len(hits) >= min(k, want) or ask >= n:
                    break
                ask = min(n, ask * 4)
        hits.sort(key=lambda h: (-h[0], self.index.positions[h[1]]))
        cards = [self.card(int(self.index.positions[i]), s) for s, i in hits[:k]]
        return {"query": text, "rows": cards, "matching": want}

    def browse(self, filters: Filters, offset: int = 0, k: int = 48) -> dict[str, Any]:
        chosen = np.flatnonzero(filters.mask(self.rows))
        return {"query": "", "rows": [self.card(int(p)) for p in chosen[offset:offset + k]],
                "matching": len(chosen), "offset": offset}

    # -- one row
    def locate(self, uid: str) -> int:
        if uid not in self.position.index:
            raise KeyError(f"no row with uid {uid!r} in {self.v.stage}@{self.v.curate.fingerprint[:12]}")
        return int(self.position[uid])

    def record(self, uid: str) -> dict[str, Any]:
        """The row's whole ledger record, its near duplicates (pHash within the near_duplicate rule's distance)
        and semantic neighbours (the 8 nearest image embeddings), and the runs that read its version."""
        pos = self.locate(uid)
        r = self.rows.iloc[pos]
        out: dict[str, Any] = {"card": self.card(pos),
                               "ledger": {c: _plain(r[c]) for c in self.rows.columns if c not in ("url", "caption")}}
        near: list[dict[str, Any]] = []
        if self.has_phash[pos]:
            d = hamming64(self.phash, self.phash[pos])
            hit = np.flatnonzero(self.has_phash & (d <= self.near_distance))
            hit = hit[hit != pos]
            near = [{**self.card(int(p)), "distance": int(d[p])} for p in hit[np.argsort(d[hit], kind="stable")][:24]]
        out["near"], out["near_distance"] = near, self.near_distance
        neighbours: list[dict[str, Any]] = []
        if (j := self.vector_of[pos]) >= 0:
            mine = int(self.index.clusters[j])
            query = self.index.vectors[j].astype(np.float32)[None, :]
            sims, ids = self.index.faiss_index.search(query, min(9, len(self.index.vectors)))
            for s, i in zip(sims[0], ids[0], strict=True):
                if i >= 0 and i != j and len(neighbours) < 8:
                    c = self.card(int(self.index.positions[i]), float(s))
                    c["semantic_duplicate"] = bool(self.semantic_eps is not None and mine != UNCLUSTERED
                                                   and int(self.index.clusters[i]) == mine
                                                   and float(s) > 1 - self.semantic_eps)
                    neighbours.append(c)
            out["cluster"] = mine
        out["neighbours"], out["semantic_eps"] = neighbours, self.semantic_eps
        out["runs"] = self.runs()
        return out

    def runs(self) -> list[dict[str, Any]]:
        """The MLflow runs whose inputs hold this version's digest, and those downstream of them (looked up once
        per server: a restart sees later runs)."""
        import time

        with self._runs_lock:  # not the thumbnails' lock: a slow tracking server stalls only row pages
            if self._runs is None:
                if self._runs_failed is not None and time.monotonic() - self._runs_failed[0] < 60:
                    return [{"error": self._runs_failed[1]}]
                from mlflow import MlflowClient

                from pipelines.takedown import consumers
                from pipelines.tracking import resolve_uri

                uri = resolve_uri(self.v.job.tracking_uri, self.v.job.storage)
                try:
                    found = consumers(MlflowClient(tracking_uri=uri), {self.v.curate.digest[:36]: 0})
                except Exception as exc:  # noqa: BLE001 - a tracking server down: the row page says so
                    log.warning("explore: the runs that read %s cannot be listed: %s", self.v.stage, exc)
                    why = f"the tracking store cannot be read (tried again after a minute): {type(exc).__name__}: {exc}"
                    self._runs_failed = (time.monotonic(), why)
                    return [{"error": why}]
                self._runs = [{"run_id": c.run_id, "run_name": c.run_name, "experiment": c.experiment,
                               "stage": c.stage, "models": [f"{n}/{ver}" for n, ver in c.models]} for c in found]
            return self._runs

    # -- clusters
    def clusters(self, per_cluster: int = 8) -> list[dict[str, Any]]:
        """Each cluster: its size, kept and dropped rows, drop rate, and the rows nearest its mean embedding
        (computed once)."""
        if self._clusters is not None:
            return self._clusters
        kept = self.rows["kept"].to_numpy(dtype=bool)[self.index.positions]
        out = []
        for c in np.unique(self.index.clusters):
            members = np.flatnonzero(self.index.clusters == c)
            x = self.index.vectors[members].astype(np.float32)
            centre = x.mean(axis=0)
            order = members[np.argsort(-(x @ centre), kind="stable")[:per_cluster]]
            dropped = int((~kept[members]).sum())
            out.append({"cluster": int(c), "size": len(members), "dropped": dropped,
                        "drop_rate": round(dropped / len(members), 4),
                        "sample": [self.card(int(self.index.positions[i])) for i in order]})
        self._clusters = sorted(out, key=lambda c: (-c["size"], c["cluster"]))
        return self._clusters

    # -- images
    def thumbnail(self, uid: str) -> bytes | None:
        """A JPEG of at most THUMB pixels a side, re-encoded from the crawled bytes (never the bytes as served)."""
        pos = self.locate(uid)
        with self._io_lock:
            if uid in self._thumbs:
                self._thumbs.move_to_end(uid)
                return self._thumbs[uid]
        r = self.rows.iloc[pos]
        from pipelines.report import jpeg_thumbnail

        data = self._image(int(r["shard"]), int(r["row"]), uid)
        thumb = jpeg_thumbnail(data, THUMB)
        with self._io_lock:
            self._thumbs[uid] = thumb
            while len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return thumb

    def _image(self, shard: int, row: int, uid: str) -> bytes | None:
        with self._io_lock:
            table = self._shards.get(shard)
            if table is not None:
                self._shards.move_to_end(shard)
        if table is None:
            table = storage.read_parquet(self.v.crawl.shard_urls()[shard], ["uid", "image"])
            with self._io_lock:
                self._shards[shard] = table
                while len(self._shards) > 4:  # the last few shards' image columns
                    self._shards.popitem(last=False)
        if table.column("uid")[row].as_py() != uid:
            raise RuntimeError(f"explore: ledger row {uid} is not row {row} of shard {shard}")
        data: bytes | None = table.column("image")[row].as_py()
        return data


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _number(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


def _plain(value: Any) -> Any:
    """A ledger value as JSON: numpy scalars as Python numbers, NaN as null."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):  # None, NaN, pd.NA, NaT
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool)) else json.loads(json.dumps(value, default=str))
