"""`semantic_dedup`: SemDeDup's method (Abbas et al., 2023) on CLIP image embeddings, as a curate rule.

A pool of Ray actors embeds every candidate row's image with an open_clip model (`embedding.embed_images`, as the
head rule does), L2-normalised, into the working table's `_embedding` column; or, with `embeddings: <stage>`, the
featurize task of each crawled shard reads them from an embed stage's shard of the same number, by uid
(`stored_embeddings`), and no model runs.  Over the set: k-means
(scikit-learn's `KMeans`, seeded, on one OpenMP thread so that a seed gives the same clusters in every run) is
fitted on the embeddings of at most about `sample` rows (a fixed sample by uid), every row is assigned its nearest
centroid in a distributed pass, and the rows are hash-partitioned by cluster so that each cluster lands whole in
one block; the blocks are decided in parallel.  Within a cluster, rows are visited in the `keep` order (SemDeDup's
default: farthest from the centroid first, by cosine similarity; ties in input order) and a row is dropped when its
cosine similarity to a row of the cluster already kept exceeds 1 - eps.  So no two rows a cluster keeps are more
alike than 1 - eps, and each row it drops is more alike than that to one it keeps; but a group of near-identical
images may keep more than one row: comparing with kept rows only, as near_duplicate does, keeps both ends of a
chain a~b~c whose ends are not alike when b is dropped (SemDeDup's code compares a row with every row before it,
kept or not, and keeps only a).  Images alike but in different clusters are never compared.

`clusters` is a fixed number, not one per so many rows: of n rows, a cluster holds about n/k, decided whole in
one pandas block with their embeddings (its comparisons growing with its square), so choose about n/10,000
clusters, as SemDeDup did.  On CUDA the embeddings come from bf16 autocast (about 3 significant digits): an eps
much smaller than that decides on rounding, and a CPU and a GPU run may differ.

The embeddings are dropped with the decision: the ledger and the curated shards get `semantic_cluster` and
`semantic_similarity`, the highest cosine similarity to another row that the cluster keeps (above 1 - eps for a
dropped row and at most that for a kept one, up to float32 rounding: the decision and this column take their
dot products in different blocks, so a value within a unit in the last place of 1 - eps may read the other
way).  A row whose image cannot be decoded, or whose embedding is not finite, has no embedding: the rule does not
see it (no cluster, NaN similarity) and it goes on, as a row without a pHash goes past near_duplicate: a dedup
rule says nothing of a row it cannot compare (a filtering model rule, clip_score or head, drops such a row
instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipelines.configschema import field
from pipelines.embedding import ActorPool, model_identity
from pipelines.models import ModelRef
from pipelines.stages.curate.rules import Rule, ScoreField, mark, register_rule

if TYPE_CHECKING:
    import logging

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import ray.data

    from pipelines.manifest import Manifest
    from pipelines.stage import StageContext
    from pipelines.stages.curate.rules import Work

REASON = "semantic_duplicate"
EMBEDDING = "_embedding"  # the working table's column (rules.EXTRA), between the model pass and the decision
CLUSTER, SIMILARITY = "semantic_cluster", "semantic_similarity"
KEEP = ("farthest_from_centroid", "nearest_to_centroid", "input_order")
PART_ROWS = 50_000  # candidate rows per hash partition of the clusters
CHUNK = 1024  # rows compared at once: similarity blocks of CHUNK x CHUNK bound the memory of a large cluster


@dataclass(kw_only=True)
class SemanticDedupConfig(ActorPool):
    """SemDeDup: k-means on CLIP image embeddings; within a cluster, a row whose cosine similarity to a row kept
    before it exceeds 1 - eps is a duplicate."""

    model: ModelRef = field(ModelRef, "the open_clip model whose image embeddings are clustered and compared")
    eps: float = field(0.05, "rows of one cluster whose cosine similarity exceeds 1 - eps are duplicates",
                       exclusiveMinimum=0, exclusiveMaximum=1)
    clusters: int = field(100, "k-means clusters (SemDeDup used about one per 10,000 rows); fewer when the sample "
                               "has fewer distinct embeddings", minimum=1)
    keep: Literal["farthest_from_centroid", "nearest_to_centroid", "input_order"] = field(
        "farthest_from_centroid", "the order in which a cluster's rows are kept: by cosine similarity to the "
        "centroid, lowest first (SemDeDup's) or highest first, or input order; ties in input order")
    sample: int = field(100_000, "rows k-means is fitted on (about as many, a fixed sample by uid, when there are "
                                 "more; every row is then assigned its nearest centroid)", minimum=100)
    seed: int = field(0, "k-means' random state")
    n_init: int = field(1, "k-means runs from different k-means++ starts; the one of least inertia is kept",
                        minimum=1)
    embeddings: str | None = field(
        None, "an embed stage of this job (listed in the curate stage's needs, embedding the crawl it curates) whose "
              "image embeddings the rule reads by uid instead of running model; model and the actor pool settings "
              "are then not used")

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelRef(**self.model)
        if not 0 < self.eps < 1:
            raise ValueError(f"semantic_dedup.eps: must be between 0 and 1 (both excluded), got {self.eps}")
        if self.keep not in KEEP:
            raise ValueError(f"semantic_dedup.keep: expected one of {', '.join(KEEP)}, got {self.keep!r}")


@register_rule
class SemanticDedupRule(Rule):
    """SemDeDup: k-means on CLIP image embeddings; within each cluster, rows visited in a stated order, a row more
    alike than 1 - eps to one kept before it is dropped."""

    name = "semantic_dedup"
    Config = SemanticDedupConfig
    scores = (ScoreField(CLUSTER, "int32", "k-means cluster of the image embedding (semantic_dedup)"),
              ScoreField(SIMILARITY, "float32", "highest cosine similarity of the image embedding to another row "
                                                "its cluster keeps; above 1 - eps (to float32 rounding): dropped "
                                                "(semantic_dedup)"))
    uses_images = True

    def __init__(self, config: Any, position: int) -> None:
        super().__init__(config, position)
        # embeddings from an embed stage: read in the featurize task (`score`), no model pass and no image bytes kept
        self.uses_images = not config.embeddings
        self.embedding_shards: list[str] = []  # the embed stage's shard per crawled shard, once attached

    def reasons(self) -> tuple[str, ...]:
        return (REASON,)

    def identity(self) -> dict[str, Any]:
        return {} if self.config.embeddings else model_identity(self.config.model)

    def reads(self) -> dict[str, str]:
        return {self.config.embeddings: "embeddings"} if self.config.embeddings else {}

    def attach(self, crawl: Manifest, upstream: dict[str, Manifest]) -> None:
        """The embed stage's output: it must hold image embeddings of the crawl this stage curates, one shard per
        crawled shard (its rows the crawled shard's, by uid)."""
        if not self.config.embeddings:
            return
        name = self.config.embeddings
        m = upstream[name]
        what = f"semantic_dedup.embeddings: stage {name!r} (uses: {m.uses})"
        if "image_embedding" not in m.extra.get("columns", []):
            raise ValueError(f"{what} wrote no image embeddings; name an embed stage whose embeddings include image")
        self.embedding_shards = embedding_shards(what, m, crawl)

    def score(self, crawled: pa.Table, work: pd.DataFrame) -> dict[str, Any]:
        """With `embeddings`: the crawled shard's image embeddings read from the embed stage's shard of the same
        number, by uid, into `_embedding` (float32, normalised again after float16 storage)."""
        if not self.config.embeddings or not len(work):
            return {}
        return {EMBEDDING: stored_embeddings(self.embedding_shards[int(work["shard"].iloc[0])], work["uid"])}

    def stream(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        from pipelines.embedding import model_pass

        return model_pass(ds, ImageEmbedder, self.config, self.work)

    def decide_set(self, work: ray.data.Dataset, ctx: StageContext) -> tuple[ray.data.Dataset, dict[str, float]]:
        return deduplicate(work, self, ctx.log)


class ImageEmbedder:
    """A Ray Data actor for `embedding.model_pass`: the model loaded once, each batch's images embedded as the head
    rule's actors embed them (`embedding.embed_images`), L2-normalised, into `_embedding`.  A row with no image
    (dropped before this rule, or not downloaded), one whose image cannot be decoded and one whose embedding is not
    finite get none (`unit_rows`)."""

    def __init__(self, model: ModelRef, batch_size: int, threads: int, work: Work | None = None,
                 device: str | None = None) -> None:
        from pipelines.embedding import load_model

        self.model, self.preprocess, _, self.device = load_model(model, threads, device)
        self.batch_size = batch_size
        self.work = work  # None: return pandas batches (embedding outside a curate stage)

    def embeddings(self, images: list[bytes]) -> np.ndarray:
        """Unit embeddings (float32), an object array: None for an image without one (`unit_rows`)."""
        from pipelines.embedding import embed_images

        emb, bad = embed_images(self.model, self.preprocess, images, self.batch_size, self.device)
        return unit_rows(emb, bad, len(images))

    def __call__(self, batch: pd.DataFrame) -> pa.Table | pd.DataFrame:
        import numpy as np

        vectors = np.full(len(batch), None, dtype=object)
        todo = np.flatnonzero(batch["image"].notna().to_numpy())
        if len(todo):
            vectors[todo] = self.embeddings(list(batch["image"].iloc[todo]))
        batch = batch.assign(**{EMBEDDING: vectors})
        return self.work.table(batch) if self.work is not None else batch


def embedding_shards(what: str, embed: Manifest, crawl: Manifest) -> list[str]:
    """The embed stage's shard per crawled shard (its rows the crawled shard's, by uid): it must have embedded the
    crawl the curate stage curates, one shard for each of its shards. `what` names the setting in errors."""
    if not any(isinstance(i, dict) and i.get("digest") == crawl.digest for i in embed.inputs.values()):
        read = ", ".join(str(i.get("path")) for i in embed.inputs.values() if isinstance(i, dict))
        raise ValueError(f"{what} embedded {read}, not the crawl this stage curates ({crawl.location}); its "
                         "needs must be the same crawl stage")
    if len(embed.shards) != len(crawl.shards):
        raise ValueError(f"{what} has {len(embed.shards)} shards for the crawl's {len(crawl.shards)}")
    return embed.shard_urls()


def stored_embeddings(url: str, uids: Any, column_name: str = "image_embedding") -> np.ndarray:
    """The image embeddings (or those of `column_name`: `text_embedding`, as query_subset may read) an embed stage
    wrote in one shard, for `uids` in their order: unit float32 vectors in an object array, None for a uid the shard
    does not have or has no such embedding for (as `unit_rows`)."""
    import numpy as np

    from pipelines import storage

    table = storage.read_parquet(url).select(["uid", column_name])
    at = {u: i for i, u in enumerate(table.column("uid").to_pylist())}
    column = table.column(column_name).combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    out = np.full(len(uids), None, dtype=object)
    rows = [(j, at[u]) for j, u in enumerate(uids) if u in at and valid[at[u]]]
    if not rows:
        return out
    wanted = column.take([i for _, i in rows])
    x = wanted.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    ok = np.isfinite(x).all(axis=1) & (norms[:, 0] > 0)
    x = x / np.where(norms > 0, norms, 1.0)
    for (j, _), vector, good in zip(rows, x, ok, strict=True):
        if good:
            out[j] = vector
    return out


def unit_rows(emb: Any, bad: list[int], n: int) -> np.ndarray:
    """The `n` images' embeddings (`embedding.embed_images`' tensor, or None) L2-normalised, one float32 vector per
    element of an object array; None for an image that could not be decoded (in `bad`) and for one whose unit
    embedding is not finite (a bf16 overflow on CUDA, say): a NaN kept in a cluster would make every similarity
    to it NaN, which the greedy decision cannot order, and a NaN in the sample makes k-means fail."""
    import numpy as np

    from pipelines.embedding import unit

    out = np.full(n, None, dtype=object)
    vectors, ok = unit(emb, bad, n)
    for i in np.flatnonzero(ok):
        out[i] = vectors[i]
    return out


# ---- the set decision, on Ray Data ---------------------------------------------------------------------------

def deduplicate(ds: ray.data.Dataset, rule: Rule, log: logging.Logger, parts: int | None = None
                ) -> tuple[ray.data.Dataset, dict[str, float]]:
    """The working table with the rule's duplicates dropped, its scores filled in and the embeddings removed, and
    metrics: clusters fitted, rows k-means was fitted on, rows dropped.  `parts`: blocks the clusters are decided in,
    hash-partitioned by cluster when more than one (by default one per PART_ROWS candidates, at most 256 and at most
    one per cluster)."""
    import numpy as np

    from pipelines.stages.curate.select import count_candidates

    c, pos, work = rule.config, rule.position, rule.work
    assert work is not None
    n = count_candidates(ds, pos, EMBEDDING)
    if n == 0:
        log.info("semantic_dedup: no candidate row has an image embedding; nothing to cluster")
        out = ds.map_batches(_rest, batch_format="pandas", fn_kwargs={"work": work, "pos": pos}).materialize()
        return out, {"semantic_clusters": 0.0, "semantic_sampled": 0.0, "semantic_dropped": 0.0}

    x = sample(ds, pos, min(1.0, c.sample / n))
    if not len(x):  # about exp(-sample) likely, sample being at least 100
        raise RuntimeError(f"semantic_dedup: the sample of {c.sample} of {n} rows drew none; raise sample")
    centroids = fit(x, c.clusters, c.n_init, c.seed)
    k = len(centroids)
    if k < c.clusters:
        log.info("semantic_dedup: clusters is %d, but the %d sampled rows have %d distinct embeddings: %d clusters",
                 c.clusters, len(x), k, k)
    parts = parts or max(1, min(k, 256, math.ceil(n / PART_ROWS)))
    kw = {"work": work, "pos": pos}
    rows = ds.map_batches(_assign, batch_format="pandas", fn_kwargs={**kw, "centroids": centroids})
    # one block, or hash partitions by cluster: either way each cluster lies whole in one block
    rows = rows.repartition(1) if parts == 1 else rows.repartition(parts, keys=[CLUSTER])
    decided = rows.map_batches(_decide_block, batch_size=None, batch_format="pandas", fn_kwargs={
        **kw, "centroids": centroids, "keep": c.keep, "threshold": 1.0 - c.eps}).materialize()
    dropped = int(np.sum(decided.map_batches(_dropped, batch_format="pandas",
                                             fn_kwargs={"pos": pos}).to_pandas()["n"]))
    log.info("semantic_dedup: k-means with %d clusters on %d of %d rows (decided in %d blocks); %d dropped as "
             "duplicates (eps %g, keep %s)", k, len(x), n, parts, dropped, c.eps, c.keep)
    rest = ds.map_batches(_rest, batch_format="pandas", fn_kwargs=kw)
    return rest.union(decided).materialize(), {"semantic_clusters": float(k), "semantic_sampled": float(len(x)),
                                               "semantic_dropped": float(dropped)}


def sample(ds: ray.data.Dataset, pos: int, fraction: float) -> np.ndarray:
    """The embeddings k-means is fitted on, in input order (k-means sees the same sequence in every run): every
    candidate's when `fraction` is 1, else those whose uid hashes below it (about that fraction of them, the same
    rows in every run)."""
    from pipelines.stages.curate.select import ORDER

    rows = ds.map_batches(_sample, batch_format="pandas", fn_kwargs={"pos": pos, "fraction": fraction}).to_pandas()
    return matrix(rows.sort_values(ORDER, kind="stable")[EMBEDDING])


def matrix(column: Any) -> np.ndarray:
    """Embeddings (none null) as one float32 array, rows x dimensions: from the Arrow list array behind a column of
    Ray's pandas batches without a Python object a row."""
    import numpy as np
    import pyarrow as pa

    arr = pa.array(column)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not len(arr):
        return np.zeros((0, 0), dtype=np.float32)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(arr), -1)


def unit_hash(uids: Any) -> np.ndarray:
    """A number in [0, 1) for each uid, the same in every run and on every worker."""
    import hashlib

    import numpy as np

    return np.array([int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "big") / 2.0 ** 64
                     for u in uids], dtype=np.float64)


def _sample(df: pd.DataFrame, pos: int, fraction: float) -> pa.Table:
    """A block's rows of the sample (see `sample`): their input positions and embeddings."""
    import pyarrow as pa

    from pipelines.stages.curate.select import candidates

    c = candidates(df, pos, EMBEDDING)
    if fraction < 1.0:
        c = c[unit_hash(c["uid"]) < fraction]
    return pa.table({"shard": pa.array(c["shard"], pa.int32()), "row": pa.array(c["row"], pa.int32()),
                     EMBEDDING: pa.array(c[EMBEDDING]).cast(pa.list_(pa.float32()))})


def _assign(df: pd.DataFrame, work: Work, pos: int, centroids: np.ndarray) -> pa.Table:
    """The rule's rows, each with its cluster."""
    from pipelines.stages.curate.select import candidates

    c = candidates(df, pos, EMBEDDING)
    return work.table(c.assign(**{CLUSTER: assign_clusters(matrix(c[EMBEDDING]), centroids)}))


def _decide_block(df: pd.DataFrame, work: Work, pos: int, centroids: np.ndarray, keep: str, threshold: float
                  ) -> pa.Table:
    """A hash partition holding whole clusters, each decided by `decide_cluster` (its rows visited in the `keep`
    order, ties in input order); the embeddings dropped."""
    import numpy as np

    from pipelines.stages.curate.select import ORDER

    df = df.sort_values([CLUSTER, *ORDER], kind="stable").reset_index(drop=True)
    x, labels = matrix(df[EMBEDDING]), df[CLUSTER].to_numpy(dtype=np.int64)
    kept, similarity = np.ones(len(df), dtype=bool), np.full(len(df), np.nan, dtype=np.float32)
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(df) else np.zeros(0, dtype=np.int64)
    for s, e in zip(starts, np.r_[starts[1:], len(df)], strict=True):
        kept[s:e], similarity[s:e] = decide_cluster(x[s:e], centroids[labels[s]], keep, threshold)
    df = df.assign(**{SIMILARITY: similarity}).drop(columns=[EMBEDDING])
    return work.table(mark(df, ~kept, pos, REASON))


def _dropped(df: pd.DataFrame, pos: int) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"n": [int((df["drop_at"].to_numpy() == pos).sum())]})


def _rest(df: pd.DataFrame, work: Work, pos: int) -> pa.Table:
    """The rows the rule does not decide, as they are, without embeddings."""
    from pipelines.stages.curate.select import part

    return part(df, work, pos, EMBEDDING, want=False).drop_columns([EMBEDDING])


# ---- k-means and the decision within a cluster (numpy; no Ray) -------------------------------------------------

def fit(x: np.ndarray, clusters: int, n_init: int, seed: int) -> np.ndarray:
    """Centroids of k-means (scikit-learn's KMeans, k-means++ starts from `seed`) on the rows of `x`, with k the
    number of clusters asked for or, when fewer, of distinct rows (more centroids than points cannot be placed)."""
    import numpy as np

    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise ImportError("the semantic_dedup rule needs scikit-learn: pip install scikit-learn") from exc

    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    k = min(clusters, len(np.unique(x, axis=0)))
    # one OpenMP thread: scikit-learn's Lloyd step adds the threads' partial centroids (chunks of 256 rows) in the
    # order they finish, so with more threads the centroids' last bits, and then the clusters, vary run to run
    with threadpool_limits(1, user_api="openmp"):
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return np.asarray(model.cluster_centers_, dtype=np.float32)


def assign_clusters(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid by Euclidean distance, as k-means assigns (int32), in slices of rows that keep
    the rows x centroids distance block near 2**24 numbers."""
    import numpy as np

    out = np.zeros(len(x), dtype=np.int32)
    c = centroids.astype(np.float64)
    norms = (c * c).sum(axis=1)
    step = max(1, 2 ** 24 // max(1, len(c)))
    for s in range(0, len(x), step):
        out[s:s + step] = np.argmin(norms - 2.0 * (x[s:s + step].astype(np.float64) @ c.T), axis=1)
    return out


def visit_order(x: np.ndarray, centroid: np.ndarray, keep: str) -> np.ndarray:
    """The order in which a cluster's rows (given in input order) are considered for keeping."""
    import numpy as np

    if keep == "input_order":
        return np.arange(len(x))
    norm = float(np.linalg.norm(centroid))
    unit = centroid.astype(np.float64) / (norm if norm > 0 else 1.0)
    # row by row, not a matrix product (whose blocking may round rows differently): equal rows tie exactly
    sim = (x.astype(np.float64) * unit).sum(axis=1)
    return np.argsort(sim if keep == "farthest_from_centroid" else -sim, kind="stable")


def greedy(x: np.ndarray, threshold: float, chunk: int = CHUNK) -> np.ndarray:
    """Which rows (unit vectors, in visiting order) are kept: each one unless its cosine similarity to a row kept
    before it exceeds `threshold`.  Rows are taken `chunk` at a time: one product against the rows kept so far,
    one within the chunk."""
    import numpy as np

    keep = np.zeros(len(x), dtype=bool)
    kept = np.empty_like(x)
    m = 0
    for s in range(0, len(x), chunk):
        block = x[s:s + chunk]
        prior = max_similarity(block, kept[:m], chunk)
        inner = block @ block.T
        local: list[int] = []
        for j in range(len(block)):
            best = float(prior[j])
            if local:
                best = max(best, float(inner[j, local].max()))
            if best <= threshold:
                local.append(j)
        kept[m:m + len(local)] = block[local]
        m += len(local)
        keep[s + np.asarray(local, dtype=np.int64)] = True
    return keep


def max_similarity(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Each row of `a`'s highest cosine similarity to a row of `b` (unit rows); -inf when `b` is empty."""
    import numpy as np

    out = np.full(len(a), -np.inf, dtype=np.float32)
    for s in range(0, len(b), chunk):
        out = np.maximum(out, (a @ b[s:s + chunk].T).max(axis=1))
    return out


def nearest_kept(x: np.ndarray, kept: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Each row's highest cosine similarity to another kept row (float32); NaN where there is none."""
    import numpy as np

    idx = np.flatnonzero(kept)
    out = np.full(len(x), -np.inf, dtype=np.float32)
    for s in range(0, len(x), chunk):
        rows = np.arange(s, min(s + chunk, len(x)))
        for t in range(0, len(idx), chunk):
            cols = idx[t:t + chunk]
            sims = x[rows] @ x[cols].T
            sims[rows[:, None] == cols[None, :]] = -np.inf  # not itself
            out[rows] = np.maximum(out[rows], sims.max(axis=1))
    out[np.isneginf(out)] = np.nan
    return out


def decide_cluster(x: np.ndarray, centroid: np.ndarray, keep: str, threshold: float, chunk: int = CHUNK
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One cluster's rows (unit vectors, in input order): which are kept, visited in the `keep` order, and each
    row's highest cosine similarity to another kept row."""
    import numpy as np

    order = visit_order(x, centroid, keep)
    kept = np.zeros(len(x), dtype=bool)
    kept[order] = greedy(x[order], threshold, chunk)
    return kept, nearest_kept(x, kept, chunk)
