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
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines import manifest, storage
from pipelines.manifest import Manifest
from pipelines.models import ModelRef

if TYPE_CHECKING:
    from pipelines.spec import JobSpec

log = logging.getLogger("clipline.explore")

CACHE = "_explore"
EXACT_ROWS = 200_000  # exact search up to here; HNSW (32 links a node) beyond
MAX_ROWS = 5_000_000  # refused beyond, unless --max-rows says otherwise (everything is held in memory)
MAX_QUERY = 500  # characters of a text query
NEAR_DISTANCE = 4  # pHash bits for "near duplicate" when the curate stage ran no near_duplicate rule
THUMB = 160  # pixels, the longer side of a thumbnail
EXACT_FILTERED = 50_000  # a filtered search over at most this many rows is exact (a matrix product), not faiss
UNCLUSTERED = -1  # semantic_dedup clustered only the rows earlier rules left: the others' cluster


class ExploreError(ValueError):
    """A job, stage or model the explorer cannot open: the message says what to run or pass instead."""


@dataclass
class Version:
    """The curate output to explore, the crawl it curated and every stage's current output."""

    job: JobSpec
    stage: str
    curate: Manifest
    crawl: Manifest
    current: dict[str, Manifest | None]


def pick_stage(job: JobSpec, stage: str | None) -> str:
    """`stage`, checked to be a curate stage of the job, or the job's last curate stage."""
    if stage is not None:
        if stage not in job.stages:
            raise ExploreError(f"job {job.name!r} has no stage {stage!r} (its stages: {', '.join(job.stages)})")
        if job.stages[stage].uses != "curate":
            raise ExploreError(f"--stage {stage}: explore reads a curate stage's ledger (why each row was kept or "
                               f"dropped); {stage!r} uses {job.stages[stage].uses}")
        return stage
    curates = [n for n, s in job.stages.items() if s.uses == "curate"]
    if not curates:
        raise ExploreError(f"job {job.name!r} has no curate stage: explore reads a curate stage's ledger")
    return curates[-1]


def open_version(job: JobSpec, stage: str | None = None) -> Version:
    from pipelines.takedown import current_outputs

    name = pick_stage(job, stage)
    current = current_outputs(job)
    m = current[name]
    if m is None:
        raise ExploreError(f"stage {name!r} of job {job.name!r} has no output for this spec yet: run "
                           f"`clipline run {job.source} --until {name}` first")
    paths = [i["path"] for i in m.inputs.values() if isinstance(i, dict) and "path" in i]
    read = [manifest.read(p) for p in paths]
    crawl = next((u for u in read if u is not None and u.uses != "embed"), None)
    if crawl is None:
        raise ExploreError(f"{name}: the crawled shards it curated are gone ({', '.join(paths)})")
    return Version(job, name, m, crawl, current)


# ---- the model -----------------------------------------------------------------------------------------------


def _rules(m: Manifest) -> list[Any]:
    from pipelines import configschema
    from pipelines.stages.curate.config import CurateConfig

    return list(configschema.build(CurateConfig, m.params).instances())


def _stage_model(v: Version, name: str, why: str) -> ModelRef:
    from pipelines.models import trained

    st, out = v.job.stages[name], v.current.get(name)
    if st.uses not in ("train", "embed"):
        raise ExploreError(f"{why}: stage {name!r} uses {st.uses}; name a train or embed stage, an MLflow model "
                           "URI (models:/NAME@ALIAS) or an architecture (with --checkpoint)")
    if out is None:
        raise ExploreError(f"{why}: stage {name!r} has no output for this spec yet: run "
                           f"`clipline run {v.job.source} --until {name}` first")
    return trained(out) if st.uses == "train" else ModelRef(**out.params["model"])


def resolve_model(v: Version, model: str | None = None, checkpoint: str | None = None) -> tuple[ModelRef, str]:
    """The model that embeds rows and queries, and a line saying which and why."""
    if checkpoint and not model:
        raise ExploreError("--checkpoint needs --model ARCH (the architecture the weights are for)")
    if model:
        if model in v.job.stages:
            if checkpoint:
                raise ExploreError(f"--checkpoint: --model {model} is a stage of the job, which names its weights")
            return _stage_model(v, model, f"--model {model}"), f"the model of stage {model!r} (--model)"
        if model.startswith(("models:/", "runs:/")):
            if checkpoint:
                raise ExploreError("--checkpoint: an MLflow model URI names its weights")
            return ModelRef(model_uri=model), f"{model} (--model)"
        return ModelRef(arch=model, checkpoint=checkpoint), f"{model} {checkpoint or '(random weights)'} (--model)"
    for rule in _rules(v.curate):
        embeddings = getattr(rule.config, "embeddings", None)
        if embeddings:
            return (_stage_model(v, embeddings, f"{rule.name}.embeddings"),
                    f"the dataset's scoring model: {rule.name} reads stage {embeddings!r}'s embeddings")
        ref = getattr(rule.config, "model", None)
        if isinstance(ref, ModelRef):
            return ref, f"the dataset's scoring model: {rule.name}'s model"
    trains = [n for n, s in v.job.stages.items() if s.uses == "train" and v.stage in s.needs]
    if len(trains) == 1 and v.current.get(trains[0]) is not None:
        return (_stage_model(v, trains[0], "the model trained on it"),
                f"the model stage {trains[0]!r} trained on this version (its curate rules score with none)")
    raise ExploreError(
        f"{v.stage}: its rules score with no model (no clip_score or semantic_dedup) and "
        + (f"no train stage trained on it yet (run `clipline run {v.job.source} --until {trains[0]}`)"
           if len(trains) == 1 else f"{len(trains)} train stages read it")
        + ": name one with --model TRAIN_STAGE, --model models:/NAME@ALIAS or --model ARCH --checkpoint FILE")


def model_key(ref: ModelRef) -> str:
    """The model's part of the cache key: its reference and its files' keys; for `models:/NAME@ALIAS` also the
    version the alias names now (an alias moved to new weights is a new key)."""
    from pipelines.embedding import model_identity

    key: dict[str, Any] = {"model": asdict(ref), "files": model_identity(ref)}
    if ref.model_uri and ref.model_uri.startswith("models:/") and "@" in ref.model_uri:
        from mlflow import MlflowClient

        name, alias = ref.model_uri.removeprefix("models:/").split("@", 1)
        try:
            key["version"] = MlflowClient().get_model_version_by_alias(name, alias).version
        except Exception as exc:  # noqa: BLE001 - a registry that cannot answer: the model cannot load either
            raise ExploreError(f"--model {ref.model_uri}: the registry cannot resolve the alias: {exc}") from None
    return storage.canonical_digest(key)[:16]


# ---- the rows ------------------------------------------------------------------------------------------------


def load_rows(v: Version) -> pd.DataFrame:
    """The ledger, every row, with the crawled url and caption, in ledger order (crawled shard, row)."""
    entries = v.curate.extra.get("ledger", [])
    if not entries:
        raise ExploreError(f"{v.stage}: its manifest lists no ledger ({v.curate.location})")
    parts = [storage.read_parquet(storage.join(v.curate.location, e["path"])).to_pandas() for e in entries]
    rows = pd.concat(parts, ignore_index=True)
    urls = v.crawl.shard_urls()
    crawled = pd.concat([storage.read_parquet(u, ["uid", "url", "caption"]).to_pandas() for u in urls],
                        ignore_index=True)
    rows = rows.merge(crawled, on="uid", how="left", validate="one_to_one")
    rows = rows.sort_values(["shard", "row"], kind="stable").reset_index(drop=True)
    return rows


def score_columns(rows: pd.DataFrame) -> list[str]:
    """The ledger's numeric columns with at least one value: what the score filter and the cards show."""
    skip = {"shard", "row", "source_row"}
    return [c for c in rows.columns if c not in skip and pd.api.types.is_numeric_dtype(rows[c])
            and not pd.api.types.is_bool_dtype(rows[c]) and rows[c].notna().any()]


def phash_bits(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The ledger's hex pHashes as uint64, and which rows have one."""
    present = values.notna().to_numpy()
    out = np.zeros(len(values), dtype=np.uint64)
    out[present] = [int(h, 16) for h in values[present]]
    return out, present


def hamming64(a: np.ndarray, b: np.uint64) -> np.ndarray:
    x = np.bitwise_xor(a, b)
    return np.unpackbits(x.view(np.uint8).reshape(len(x), 8), axis=1).sum(axis=1)


# ---- embeddings, index and clusters ----------------------------------------------------------------------------


@dataclass
class Index:
    """Unit image embeddings of the rows that have one (`positions`: their rows in the table), a faiss index
    over them (its ids are positions in these arrays) and each embedded row's cluster."""

    vectors: np.ndarray  # float16 (as stored), n x dim; faiss holds its own float32 copy
    positions: np.ndarray  # int64, rows of the table
    clusters: np.ndarray  # int32 per vector
    cluster_source: str
    faiss_index: Any = field(repr=False)
    reused: int = 0  # embeddings read from an embed stage
    computed: int = 0  # embeddings computed here
    cached: bool = False


def cache_dir(v: Version, ref: ModelRef) -> str:
    return storage.join(v.job.storage, v.job.name, CACHE, f"{v.stage}-{v.curate.digest[:16]}-{model_key(ref)}")


def _embed_outputs(v: Version, ref: ModelRef) -> list[str] | None:
    """The shards of an embed stage of the job that embedded this crawl with this model (image embeddings, one
    shard per crawled shard), or None."""
    from pipelines.stages.curate.rules.semantic_dedup import embedding_shards

    for name, st in v.job.stages.items():
        out = v.current.get(name)
        if st.uses != "embed" or out is None or "image_embedding" not in out.extra.get("columns", []):
            continue
        if ModelRef(**out.params["model"]) != ref:
            continue
        try:
            return embedding_shards(f"embed stage {name!r}", out, v.crawl)
        except ValueError:  # it embedded another version (or the curated rows): not this crawl's shards
            continue
    return None


def _compute(v: Version, rows: pd.DataFrame, ref: ModelRef, progress: bool) -> tuple[np.ndarray, np.ndarray,
                                                                                        int, int]:
    """Unit embeddings of every crawled row with image bytes: (vectors, their table rows, reused, computed)."""
    from tqdm import tqdm

    from pipelines.embedding import embed_images, load_model, unit
    from pipelines.stages.curate.rules.semantic_dedup import stored_embeddings

    wanted = rows.index[(rows["status"] == "success").to_numpy()]
    stored = _embed_outputs(v, ref)
    urls = v.crawl.shard_urls()
    net = None
    vectors: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    reused = computed = 0
    bar = tqdm(total=len(wanted), desc="explore: embeddings", unit="img", disable=not progress)
    for shard, group in rows.loc[wanted].groupby("shard", sort=True):
        table = storage.read_parquet(urls[int(shard)], ["uid", "image"])
        uids = table.column("uid").to_pylist()
        take = group["row"].to_numpy()
        if [uids[r] for r in take] != group["uid"].tolist():
            raise ExploreError(f"{v.stage}: its ledger's rows of shard {shard} are not {urls[int(shard)]}'s rows")
        have = stored_embeddings(stored[int(shard)], group["uid"].tolist()) if stored else np.full(len(take), None)
        missing = [i for i, e in enumerate(have) if e is None]
        if missing:
            if net is None:
                import torch

                net, preprocess, _, device = load_model(ref, threads=torch.get_num_threads())
            images = table.column("image").take(take[missing]).to_pylist()
            emb, bad = embed_images(net, preprocess, [b or b"" for b in images], 64, device)
            unit_vectors, ok = unit(emb, bad, len(missing))
            for j, i in enumerate(missing):
                have[i] = unit_vectors[j] if ok[j] else None
            computed += int(ok.sum())
        reused += len(take) - len(missing)
        ok_rows = [i for i, e in enumerate(have) if e is not None]
        if ok_rows:
            vectors.append(np.stack([have[i] for i in ok_rows]).astype(np.float16))
            positions.append(group.index.to_numpy()[ok_rows])
        bar.update(len(take))
    bar.close()
    if not vectors:
        raise ExploreError(f"{v.stage}: none of its rows has an image that can be embedded")
    return np.concatenate(vectors), np.concatenate(positions).astype(np.int64), reused, computed


def _faiss_index(x: np.ndarray) -> Any:
    import faiss

    index: Any
    if len(x) <= EXACT_ROWS:
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    index.add(x)
    return index


def _clusters(rows: pd.DataFrame, positions: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, str]:
    """The ledger's semantic_dedup clusters (UNCLUSTERED for a row an earlier rule dropped, which semantic_dedup
    never saw), or, without them, faiss k-means with about sqrt(n) clusters (2 to 256)."""
    import faiss

    if "semantic_cluster" in rows and rows["semantic_cluster"].iloc[positions].notna().any():
        ledger = rows["semantic_cluster"].iloc[positions].to_numpy(dtype=np.float64, na_value=np.nan)
        return (np.where(np.isnan(ledger), UNCLUSTERED, ledger).astype(np.int32),
                f"semantic_dedup's k-means (cluster {UNCLUSTERED}: rows an earlier rule dropped)")
    k = int(min(256, max(2, round(math.sqrt(len(x))))))
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=0, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=10_000)
    km.train(x)
    _, assigned = km.index.search(x, 1)
    return assigned[:, 0].astype(np.int32), f"faiss k-means, k={k}"


def build_index(v: Version, rows: pd.DataFrame, ref: ModelRef, progress: bool = True) -> Index:
    """The cached index of (version, model), or a new one written to the cache."""
    import faiss
    import pyarrow as pa

    where = cache_dir(v, ref)
    meta_url = storage.join(where, "meta.json")
    if storage.exists(meta_url):
        meta = storage.read_json(meta_url)
        table = storage.read_parquet(storage.join(where, "vectors.parquet"))
        fs, path = storage.filesystem(storage.join(where, "index.faiss"))
        with fs.open(path, "rb") as f:
            index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
        x = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                       dtype=np.float16).reshape(len(table), -1)
        if index.ntotal != len(x) or index.d != x.shape[1] or meta.get("rows") != len(x):
            raise ExploreError(f"explore: the cache {where} is inconsistent (index of {index.ntotal} x {index.d}, "
                               f"{len(x)} x {x.shape[1]} embeddings, meta.json {meta.get('rows')} rows): delete it "
                               "and start again")
        at = pd.Series(rows.index, index=rows["uid"])
        positions = at.loc[table.column("uid").to_pylist()].to_numpy(dtype=np.int64)
        log.info("explore: index of %s rows read from the cache %s", f"{len(x):,}", where)
        return Index(x, positions, table.column("cluster").to_numpy().astype(np.int32), meta["cluster_source"],
                     index, meta["reused"], meta["computed"], cached=True)
    x16, positions, reused, computed = _compute(v, rows, ref, progress)
    x = x16.astype(np.float32)
    index = _faiss_index(x)
    clusters, source = _clusters(rows, positions, x)
    del x  # faiss holds its own copy; the float16 one is kept
    dim = x16.shape[1]
    table = pa.table({
        "uid": pa.array(rows["uid"].to_numpy()[positions], pa.string()),
        "cluster": pa.array(clusters, pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x16.reshape(-1), pa.float16()), dim)})
    storage.write_parquet(storage.join(where, "vectors.parquet"), table)
    storage.atomic_write(storage.join(where, "index.faiss"), faiss.serialize_index(index).tobytes())
    storage.write_json(meta_url, {"rows": len(x16), "dim": dim, "reused": reused, "computed": computed,
                                  "cluster_source": source, "index": type(index).__name__,
                                  "version": v.curate.digest, "model": asdict(ref)})
    log.info("explore: %s embeddings (%s read from an embed stage, %s computed) indexed in %s", f"{len(x16):,}",
             f"{reused:,}", f"{computed:,}", where)
    return Index(x16, positions, clusters, source, index, reused, computed)


# ---- the explorer ----------------------------------------------------------------------------------------------


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
        rules = {r.name: r.config for r in _rules(v.curate)}
        self.near_distance = rules["near_duplicate"].max_distance if "near_duplicate" in rules else NEAR_DISTANCE
        # a neighbour is called a semantic duplicate only as semantic_dedup decided it: same model, same cluster
        self.semantic_eps: float | None = None
        if "semantic_dedup" in rules:
            sd = rules["semantic_dedup"]
            model = _stage_model(v, sd.embeddings, "semantic_dedup.embeddings") if sd.embeddings else sd.model
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
