"""`query_subset`: keep the rows nearest to text or image queries (kNN over an embed stage's embeddings), as
clip-retrieval's users build domain subsets.

The rule reads each row's image (or, `modality: text`, caption) embedding from an embed stage of the same job
(`embeddings: <stage>`, as semantic_dedup can), by uid in the featurize task of each crawled shard, into the working
table's `_query_embedding` column; no model pass runs over the rows.  The queries (captions, or image files read
through fsspec) are embedded once on the driver, with the model that stage's manifest names (its `params.model`),
on the CPU, L2-normalised.  A row's similarity to a query is the dot product of the two unit vectors, computed row
by row in float64 (the same value in every block and pass, whatever the batch) and kept as float32.

A query selects a row when the row is among its `k_per_query` nearest, by similarity, highest first and ties by uid
ascending (so exactly k rows when there are k), and/or the similarity is at least `min_similarity`; with both, a
query selects at most k rows, each at least that similar.  A row is kept when any query selects it; the others the
rule sees are dropped with the reason `query_subset`, among them rows without an embedding (nothing to compare).
The ledger and curated shards get `query_match`, the label of the query that selected the row (of several, the
most similar; ties to the first listed) or, for a dropped row, of its nearest query; and `query_similarity`, the
similarity to that query.  The queries themselves are the rule's settings, so they are in the curate manifest's
params (and its fingerprint); the kept rows each query matched are metrics `query_subset_rows_<i>`.

Distributed as semantic_dedup's set decision is: the working table stays in Ray's object store.  With
`k_per_query`, each block returns, per query, its own k best rows (only the similarity and uid: numpy
`argpartition`, then the ties at the k-th value), the driver merges those lists into each query's k-th (similarity,
uid), and a second pass over the blocks keeps the rows at or above it: the driver holds at most queries x
min(rows, k x blocks) (similarity, uid) pairs, never an embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipelines.configschema import field
from pipelines.stages.curate.rules import Rule, ScoreField, mark, register_rule

if TYPE_CHECKING:
    import logging

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import ray.data

    from pipelines.manifest import Manifest
    from pipelines.models import ModelRef
    from pipelines.preflight import Check
    from pipelines.stage import StageContext
    from pipelines.stages.curate.rules import Work

NAME = REASON = "query_subset"
EMBEDDING = "_query_embedding"  # the working table's column (rules.EXTRA), from the featurize task to the decision
MATCH, SIMILARITY = "query_match", "query_similarity"
COLUMN = {"image": "image_embedding", "text": "text_embedding"}  # the embed stage's columns
WEB = ("http://", "https://", "ftp://")


@dataclass(kw_only=True)
class Query:
    """One query: a text (embedded by the model's text tower) or an image file (by its image tower)."""

    text: str | None = field(None, "a text query, e.g. 'a photo of a lighthouse'")
    image: str | None = field(None, "an image file to search by (a local path or a storage URL read with fsspec; "
                                    "not a web address)")
    name: str | None = field(None, "the query's label in the ledger's query_match (default: the text or the image "
                                   "path)")

    @property
    def label(self) -> str:
        return self.name or self.text or self.image or ""


@dataclass(kw_only=True)
class QuerySubsetConfig:
    """Keep the rows nearest to text or image queries: the k nearest of each query and/or those at least
    min_similarity alike, by cosine similarity of an embed stage's embeddings."""

    embeddings: str | None = field(
        None, "the embed stage of this job (listed in the curate stage's needs, embedding the crawl it curates) whose "
              "embeddings the rule compares; the queries are embedded with the model it names")
    queries: list[Query] = field([], "the queries: each a text or an image file")
    modality: Literal["image", "text"] = field(
        "image", "which row embedding is compared with the queries: the image's or the caption's")
    k_per_query: int | None = field(
        None, "keep each query's k nearest rows (ties by uid ascending)", minimum=1)
    min_similarity: float | None = field(
        None, "keep rows whose cosine similarity to a query is at least this (with k_per_query: of its k nearest)",
        minimum=-1, maximum=1)

    def __post_init__(self) -> None:
        self.queries = [Query(**q) if isinstance(q, dict) else q for q in self.queries]
        if self.k_per_query is not None and self.k_per_query < 1:
            raise ValueError(f"query_subset.k_per_query: must be at least 1, got {self.k_per_query}")
        if self.min_similarity is not None and not -1 <= self.min_similarity <= 1:
            raise ValueError(f"query_subset.min_similarity: a cosine similarity is within [-1, 1], got "
                             f"{self.min_similarity}")
        if self.modality not in COLUMN:
            raise ValueError(f"query_subset.modality: expected image or text, got {self.modality!r}")
        for i, q in enumerate(self.queries):
            if (q.text is None) == (q.image is None):
                raise ValueError(f"query_subset.queries[{i}]: give text or image (one of them)")
            if q.text is not None and not q.text.strip():
                raise ValueError(f"query_subset.queries[{i}].text: empty")
            if q.image is not None and q.image.lower().startswith(WEB):
                raise ValueError(f"query_subset.queries[{i}].image: {q.image}: the rule does not fetch from the web; "
                                 "download the image and name the file")
        labels = [q.label for q in self.queries]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"query_subset.queries: the labels {', '.join(map(repr, dup))} name more than one query; "
                             "give each a distinct name")


@register_rule
class QuerySubsetRule(Rule):
    """Keeps the rows nearest to text or image queries (kNN over an embed stage's embeddings); drops the others."""

    name = NAME
    Config = QuerySubsetConfig
    scores = (ScoreField(MATCH, "string", "the query that selected the row (for a dropped row, its nearest query), "
                                          "by its label (query_subset)"),
              ScoreField(SIMILARITY, "float32", "cosine similarity of the row's embedding to that query "
                                                "(query_subset)"))

    def __init__(self, config: Any, position: int) -> None:
        super().__init__(config, position)
        self.embedding_shards: list[str] = []  # the embed stage's shard per crawled shard, once attached
        self.model: ModelRef | None = None  # the embed stage's model, once attached
        self.dim: int | None = None
        self.vectors: np.ndarray | None = None  # the queries' unit embeddings, once prepared

    def reasons(self) -> tuple[str, ...]:
        return (REASON,)

    def check(self) -> None:
        c = self.config
        if not c.embeddings:
            raise ValueError("query_subset.embeddings: the rule reads an embed stage's embeddings; name an embed stage "
                             "of this job (and list it in the curate stage's needs)")
        if not c.queries:
            raise ValueError("query_subset.queries: the rule is listed but names no query")
        if c.k_per_query is None and c.min_similarity is None:
            raise ValueError("query_subset: give k_per_query, min_similarity or both (which rows a query keeps)")

    def reads(self) -> dict[str, str]:
        return {self.config.embeddings: "embeddings"} if self.config.embeddings else {}

    def images(self) -> list[tuple[str, str]]:
        """(field, path) of each image query."""
        return [(f"{NAME}.queries[{i}].image", q.image) for i, q in enumerate(self.config.queries) if q.image]

    def identity(self) -> dict[str, Any]:
        """The image query files' keys: a new image at the same path is a new subset."""
        from pipelines import storage

        out: dict[str, Any] = {}
        for key, path in self.images():
            if not storage.is_file(path):
                raise FileNotFoundError(f"{key}: {path}: no such file")
            out.update(storage.file_keys([path]))
        return out

    def preflight(self, check: Check) -> None:
        from pipelines import storage

        for key, path in self.images():
            with check.reading(key, path):
                if not storage.is_file(path):
                    check.problem(key, f"{path}: no such file")

    def attach(self, crawl: Manifest, upstream: dict[str, Manifest]) -> None:
        """The embed stage's output: embeddings of the modality compared, of the crawl this stage curates, one shard
        per crawled shard; and the model that made them, which embeds the queries."""
        from pipelines.models import ModelRef
        from pipelines.stages.curate.rules.semantic_dedup import embedding_shards

        name = self.config.embeddings
        m = upstream[name]
        what = f"{NAME}.embeddings: stage {name!r} (uses: {m.uses})"
        column = COLUMN[self.config.modality]
        if column not in m.extra.get("columns", []):
            raise ValueError(f"{what} wrote no {self.config.modality} embeddings ({column}); name an embed stage whose "
                             f"embeddings include {self.config.modality}, or change {NAME}.modality")
        if not isinstance(m.params.get("model"), dict):
            raise ValueError(f"{what} names no model in its params; the rule reads an embed stage's output")
        self.embedding_shards = embedding_shards(what, m, crawl)
        self.model = ModelRef(**m.params["model"])
        self.dim = m.extra.get("dim")

    def prepare(self, log: logging.Logger) -> None:
        """The queries' unit embeddings, on the driver's CPU, with the embed stage's model."""
        if self.model is None:
            raise RuntimeError(f"rule {NAME}: prepare() before attach()")
        self.vectors = embed_queries(self.config.queries, self.model)
        if self.dim is not None and self.vectors.shape[1] != self.dim:
            raise ValueError(f"{NAME}: the queries' embeddings have {self.vectors.shape[1]} dimensions but stage "
                             f"{self.config.embeddings!r} wrote {self.dim}")
        log.info("%s: %d queries embedded with %s; comparing rows' %s embeddings", NAME, len(self.vectors),
                 self.model.model_uri or self.model.arch, self.config.modality)

    def score(self, crawled: pa.Table, work: pd.DataFrame) -> dict[str, Any]:
        """The crawled shard's embeddings, read from the embed stage's shard of the same number by uid."""
        from pipelines.stages.curate.rules.semantic_dedup import stored_embeddings

        if not len(work):
            return {}
        url = self.embedding_shards[int(work["shard"].iloc[0])]
        return {EMBEDDING: stored_embeddings(url, work["uid"], COLUMN[self.config.modality])}

    def decide_set(self, work: ray.data.Dataset, ctx: StageContext) -> tuple[ray.data.Dataset, dict[str, float]]:
        return select(work, self, ctx.log)


def embed_queries(queries: list[Query], model: ModelRef) -> np.ndarray:
    """The queries' unit embeddings (float32, queries x dimensions) from `model` on the CPU; an image that cannot
    be read or decoded is an error naming its field and path."""
    import numpy as np

    from pipelines import models, storage
    from pipelines.embedding import embed_images, embed_texts, unit

    images: dict[int, bytes] = {}  # read before the model loads: a missing file fails at once
    for i, q in enumerate(queries):
        if q.image is not None:
            try:
                fs, path = storage.filesystem(q.image)
                with fs.open(path, "rb") as f:
                    images[i] = f.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"{NAME}.queries[{i}].image: {q.image}: no such file") from None
    net, preprocess, tokenizer = models.create(model, device="cpu")
    out: list[np.ndarray | None] = [None] * len(queries)
    texts = [(i, q.text) for i, q in enumerate(queries) if q.text is not None]
    if texts:
        emb = embed_texts(net, tokenizer, [t for _, t in texts], 64, "cpu")
        vectors, ok = unit(emb, [], len(texts))
        for (i, _), v, good in zip(texts, vectors, ok, strict=True):
            if not good:
                raise ValueError(f"{NAME}.queries[{i}].text: its embedding is not finite")
            out[i] = v
    for i, data in images.items():
        emb, bad = embed_images(net, preprocess, [data], 1, "cpu")
        vectors, ok = unit(emb, bad, 1)
        if not ok[0]:
            raise ValueError(f"{NAME}.queries[{i}].image: {queries[i].image}: not an image that can be decoded")
        out[i] = vectors[0]
    return np.stack([v for v in out if v is not None]).astype(np.float32)


# ---- the set decision, on Ray Data ---------------------------------------------------------------------------

def similarities(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """rows x queries cosine similarities (unit rows) as float32, each a row's own float64 sum of products: the same
    value whatever block or batch the row is in (a matrix product's blocking may round a row differently)."""
    import numpy as np

    out = np.empty((len(x), len(queries)), dtype=np.float32)
    x64 = x.astype(np.float64)
    for j, q in enumerate(queries.astype(np.float64)):
        out[:, j] = (x64 * q).sum(axis=1)
    return out


def ranked(sims: np.ndarray, uids: np.ndarray, k: int | None) -> np.ndarray:
    """Indices of the k best of `sims` (all when k is None), similarity descending, then uid ascending."""
    import numpy as np

    idx = np.arange(len(sims))
    if k is not None and len(sims) > k:
        kth = np.partition(sims, len(sims) - k)[len(sims) - k]  # the k-th highest value
        idx = np.flatnonzero(sims >= kth)  # k rows and those tied with the k-th
    order = np.lexsort((uids[idx], -sims[idx]))
    return idx[order][:k] if k is not None else idx[order]


def _rows(df: pd.DataFrame, pos: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The rule's rows with an embedding, and their embeddings."""
    from pipelines.stages.curate.rules.semantic_dedup import matrix
    from pipelines.stages.curate.select import candidates

    c = candidates(df, pos, EMBEDDING)
    return c, matrix(c[EMBEDDING])


def _block_top(df: pd.DataFrame, pos: int, queries: np.ndarray, k: int, floor: float | None) -> pa.Table:
    """A block's k best rows of each query (at least `floor` alike, when given): query, similarity, uid."""
    import numpy as np
    import pyarrow as pa

    c, x = _rows(df, pos)
    query, sim, uid = [np.zeros(0, np.int32)], [np.zeros(0, np.float32)], [np.zeros(0, dtype=object)]
    if len(c):
        sims, uids = similarities(x, queries), c["uid"].astype(str).to_numpy()
        for j in range(len(queries)):
            s = sims[:, j]
            ok = np.flatnonzero(s.astype(np.float64) >= floor) if floor is not None else np.arange(len(s))
            top = ok[ranked(s[ok], uids[ok], k)]
            query.append(np.full(len(top), j, np.int32))
            sim.append(s[top])
            uid.append(uids[top].astype(object))
    # an explicit schema: a block with no rows would otherwise have a null-typed uid column
    return pa.table({"query": pa.array(np.concatenate(query), pa.int32()),
                     "sim": pa.array(np.concatenate(sim), pa.float32()),
                     "uid": pa.array(np.concatenate(uid), pa.string())})


def cutoffs(tops: pd.DataFrame, n_queries: int, k: int) -> list[tuple[float, str] | None]:
    """Each query's k-th best (similarity, uid) over the blocks' own k best (the last of them when fewer than k: then
    every row that passes is in the lists); None for a query no row passes."""
    import numpy as np

    out: list[tuple[float, str] | None] = []
    for j in range(n_queries):
        t = tops[tops["query"].to_numpy() == j]
        if not len(t):
            out.append(None)
            continue
        sims, uids = t["sim"].to_numpy(dtype=np.float32), t["uid"].astype(str).to_numpy()
        last = ranked(sims, uids, k)[-1]
        out.append((float(sims[last]), str(uids[last])))
    return out


def selection(sims: np.ndarray, uids: np.ndarray, floor: float | None,
              cuts: list[tuple[float, str] | None] | None) -> np.ndarray:
    """rows x queries: which queries select each row (at least `floor` alike; at or above the query's cutoff)."""
    import numpy as np

    chosen = np.ones(sims.shape, dtype=bool)
    if floor is not None:
        chosen &= sims.astype(np.float64) >= floor
    if cuts is not None:
        for j, cut in enumerate(cuts):
            if cut is None:
                chosen[:, j] = False
                continue
            s = sims[:, j]
            sk = np.float32(cut[0])
            chosen[:, j] &= (s > sk) | ((s == sk) & (uids <= cut[1]))
    return chosen


def _decide(df: pd.DataFrame, work: Work, pos: int, queries: np.ndarray, labels: list[str], floor: float | None,
            cuts: list[tuple[float, str] | None] | None) -> pa.Table:
    """A block decided: the rule's rows no query selects dropped, every seen row's match and similarity filled in,
    the embeddings dropped."""
    import numpy as np

    from pipelines.stages.curate.select import candidates

    df = df.reset_index(drop=True)
    seen = candidates(df, pos).index.to_numpy()  # the rule's rows, with or without an embedding
    c, x = _rows(df, pos)
    keep = np.zeros(len(df), dtype=bool)
    match = np.full(len(df), None, dtype=object)
    similarity = df[SIMILARITY].to_numpy(dtype=np.float32, na_value=np.nan).copy()
    if len(c):
        sims = similarities(x, queries)
        chosen = selection(sims, c["uid"].astype(str).to_numpy(), floor, cuts)
        # the selecting query of highest similarity (argmax: the first of equals), else the nearest query
        best = np.argmax(np.where(chosen, sims, -np.inf), axis=1)
        nearest = np.argmax(sims, axis=1)
        selected = chosen.any(axis=1)
        which = np.where(selected, best, nearest)
        at = c.index.to_numpy()
        keep[at] = selected
        match[at] = [labels[j] for j in which]
        similarity[at] = sims[np.arange(len(c)), which]
    drop = np.zeros(len(df), dtype=bool)
    drop[seen] = ~keep[seen]
    df = df.assign(**{MATCH: match, SIMILARITY: similarity}).drop(columns=[EMBEDDING])
    return work.table(mark(df, drop, pos, REASON))


def _selected(df: pd.DataFrame, pos: int, labels: list[str]) -> pd.DataFrame:
    """A block's count of rows the rule saw and kept, per query label."""
    import pandas as pd

    kept = df[(df["drop_at"].to_numpy() > pos) & df[MATCH].notna().to_numpy()]
    counts = kept[MATCH].value_counts()
    return pd.DataFrame({"label": labels, "n": [int(counts.get(label, 0)) for label in labels]})


def select(ds: ray.data.Dataset, rule: QuerySubsetRule, log: logging.Logger) -> tuple[ray.data.Dataset,
                                                                                       dict[str, float]]:
    """The working table with the rows no query selects dropped, the rule's scores filled in and its embeddings
    removed; metrics: rows seen, rows kept, and each query's rows (`query_subset_rows_<i>`)."""
    from pipelines.stages.curate.select import count_candidates

    c, pos, work = rule.config, rule.position, rule.work
    assert work is not None and rule.vectors is not None
    queries, labels = rule.vectors, [q.label for q in c.queries]
    cuts = None
    if c.k_per_query is not None:
        # whole blocks (a crawled shard's rows each, from the featurize task): one list per block, not per batch
        tops = ds.map_batches(_block_top, batch_size=None, batch_format="pandas", fn_kwargs={
            "pos": pos, "queries": queries, "k": c.k_per_query, "floor": c.min_similarity}).to_pandas()
        cuts = cutoffs(tops, len(queries), c.k_per_query)
    seen = count_candidates(ds, pos)
    out = ds.map_batches(_decide, batch_format="pandas", fn_kwargs={
        "work": work, "pos": pos, "queries": queries, "labels": labels, "floor": c.min_similarity,
        "cuts": cuts}).materialize()
    per = out.map_batches(_selected, batch_format="pandas", fn_kwargs={"pos": pos, "labels": labels}).to_pandas()
    per_query = per.groupby("label", sort=False)["n"].sum().reindex(labels, fill_value=0)
    kept = int(per_query.sum())
    log.info("%s: %d of %d rows kept, nearest to %d queries (k_per_query %s, min_similarity %s): %s", NAME, kept, seen,
             len(labels), c.k_per_query, c.min_similarity,
             "; ".join(f"{label!r} {int(n)}" for label, n in per_query.items()))
    metrics = {"query_subset_seen": float(seen), "query_subset_kept": float(kept),
               **{f"query_subset_rows_{i}": float(n) for i, n in enumerate(per_query.to_numpy())}}
    return out, metrics

