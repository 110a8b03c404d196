"""The explorer's index of a version: unit image embeddings (an embed stage's read by uid, the rest computed), a
faiss index over them and a cluster per row, cached once per (version digest, model) under
`{storage}/{job}/_explore/` with `meta.json` written last."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipelines import storage
from pipelines.explore.version import ExploreError, Version, model_key
from pipelines.models import ModelRef

log = logging.getLogger("clipline.explore")

CACHE = "_explore"
EXACT_ROWS = 200_000  # exact search up to here; HNSW (32 links a node) beyond
UNCLUSTERED = -1  # semantic_dedup clustered only the rows earlier rules left: the others' cluster


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
