"""The `semantic_dedup` curate rule (SemDeDup's method): the greedy decision within a cluster, k-means, the set
decision on Ray over crafted unit vectors whose cosine similarities are known by construction, and a curate run
with a tiny open_clip model on images that are copies of one another.

The crafted vectors: a group is a hub (a unit vector along the group's axis) and spokes `a * axis + sqrt(1 - a^2) *
own`, each spoke with an axis of its own, so that a spoke's cosine similarity to the hub is `a` and to another
spoke of the group `a * a'`.  With eps 0.05 (threshold 0.95), spokes of 0.97 and 0.96 are duplicates of the hub
and not of each other (0.9312); the hub is the row nearest the group's centroid, and the 0.96 spoke the farthest.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipelines.stages.curate.rules import KEPT, Work, job_scores
from pipelines.stages.curate.rules import semantic_dedup as sd

DIM = 16
THRESHOLD = 0.95  # 1 - the default eps


def vec(axis: int, a: float = 1.0, own: int | None = None) -> np.ndarray:
    """A unit vector: `a` along the group's axis, the rest along an axis of its own."""
    v = np.zeros(DIM, dtype=np.float64)
    v[axis] = a
    if own is not None:
        v[own] = math.sqrt(1.0 - a * a)
    return v.astype(np.float32)


# ---- within one cluster (numpy only) -------------------------------------------------------------------------

def test_greedy_compares_with_kept_rows_only_and_keeps_the_first_visited():
    """A chain x ~ y ~ z whose ends are not alike (at 0.965): visiting y first keeps y alone; visiting x first keeps
    x and z, since y, the row that links them, was dropped.  Chunks of any size decide the same."""
    x, y, z = vec(0, 0.98, 1), vec(0), vec(0, 0.98, 2)  # x.y = z.y = 0.98, x.z = 0.9604
    for chunk in (1, 2, 1024):
        assert sd.greedy(np.stack([y, x, z]), 0.965, chunk).tolist() == [True, False, False]
        assert sd.greedy(np.stack([x, y, z]), 0.965, chunk).tolist() == [True, False, True]
        assert sd.greedy(np.stack([x, z, y]), 0.965, chunk).tolist() == [True, True, False]
        assert sd.greedy(np.stack([x, y, z]), THRESHOLD, chunk).tolist() == [True, False, False]
    # on both sides of the threshold: 0.951 is a duplicate, 0.949 is not; equal to the threshold is kept
    for a, dropped in ((0.951, True), (0.949, False), (0.5, False)):
        assert sd.greedy(np.stack([vec(0), vec(0, a, 1)]), THRESHOLD).tolist() == [True, not dropped]
    assert sd.greedy(np.stack([vec(0), vec(0, 0.75, 1)]), 0.75).tolist() == [True, True]


def group(axis: int, spokes: tuple[float, ...], first: int) -> tuple[np.ndarray, list[float]]:
    return np.stack([vec(axis, a, own) for own, a in enumerate(spokes, start=first)]), list(spokes)


@pytest.mark.parametrize(("keep", "eps", "kept", "similarity"), [
    # rows in input order: spoke 0.97, hub, spoke 0.96
    ("input_order", 0.05, [True, False, True], [0.97 * 0.96, 0.97, 0.97 * 0.96]),
    ("nearest_to_centroid", 0.05, [False, True, False], [0.97, math.nan, 0.96]),
    ("farthest_from_centroid", 0.05, [True, False, True], [0.97 * 0.96, 0.97, 0.97 * 0.96]),
    # 1 - eps = 0.965: the 0.96 spoke is no longer a duplicate of the hub
    ("nearest_to_centroid", 0.035, [False, True, True], [0.97, 0.96, 0.96]),
])
def test_a_cluster_keeps_rows_in_the_stated_order(keep, eps, kept, similarity):
    x = np.stack([vec(0, 0.97, 1), vec(0), vec(0, 0.96, 2)])
    centroid = x.mean(axis=0)
    got_kept, got_similarity = sd.decide_cluster(x, centroid, keep, 1 - eps)
    assert got_kept.tolist() == kept
    np.testing.assert_allclose(got_similarity, similarity, rtol=1e-5)
    assert got_similarity.dtype == np.float32
    # farthest first visits the 0.96 spoke, then the 0.97 spoke, then the hub (nearest the centroid)
    assert sd.visit_order(x, centroid, "farthest_from_centroid").tolist() == [2, 0, 1]
    assert sd.visit_order(x, centroid, "nearest_to_centroid").tolist() == [1, 0, 2]


def test_equal_rows_tie_and_the_first_in_input_order_is_kept():
    x = np.stack([vec(2, 0.9, 3), vec(2), vec(2), vec(2), vec(2, 0.9, 4)])
    centroid = x.mean(axis=0)
    for keep in sd.KEEP:
        kept, similarity = sd.decide_cluster(x, centroid, keep, THRESHOLD)
        assert kept.tolist() == [True, True, False, False, True], keep
        np.testing.assert_allclose(similarity, [0.9, 0.9, 1.0, 1.0, 0.9], rtol=1e-5)


def test_nearest_kept_is_nan_for_a_row_alone_and_ignores_itself():
    x = np.stack([vec(0), vec(0, 0.99, 1), vec(5)])
    got = sd.nearest_kept(x, np.array([True, False, True]), chunk=1)
    np.testing.assert_allclose(got, [0.0, 0.99, 0.0], atol=1e-6)
    assert np.isnan(sd.nearest_kept(x[:2], np.array([True, False]))[0])


# ---- k-means ---------------------------------------------------------------------------------------------------

def crafted() -> tuple[pd.DataFrame, dict[str, list[tuple[int, int]]]]:
    """Rows of two shards: groups g1 (hub first in input order), g2 (a spoke first), g3 (three equal rows), two
    single rows, a row an earlier rule dropped (equal to g1's hub) and a row without an embedding."""
    rows = [  # (shard, row, group, vector or None, dropped earlier)
        (0, 0, "g1", vec(0), False), (0, 1, "g1", vec(0, 0.97, 5), False), (0, 2, "g2", vec(1, 0.97, 6), False),
        (0, 3, "g3", vec(2), False), (0, 4, "s3", vec(3), False), (0, 5, "-", vec(0), True),
        (1, 0, "g2", vec(1), False), (1, 1, "g1", vec(0, 0.96, 7), False), (1, 2, "g3", vec(2), False),
        (1, 3, "g2", vec(1, 0.96, 8), False), (1, 4, "-", None, False), (1, 5, "g3", vec(2), False),
        (1, 6, "s4", vec(4), False),
    ]
    df = pd.DataFrame(rows, columns=["shard", "row", "group", "v", "earlier"])
    groups = {g: list(zip(d["shard"], d["row"], strict=True)) for g, d in df.groupby("group") if g != "-"}
    return df, groups


def test_kmeans_is_seeded_and_k_is_clamped_to_the_distinct_rows():
    df, groups = crafted()
    x = np.stack(df.loc[~df["earlier"] & df["v"].notna(), "v"].to_list())
    assert len(x) == 11
    a, b = sd.fit(x, 5, n_init=4, seed=3), sd.fit(x, 5, n_init=4, seed=3)
    assert a.shape == (5, DIM) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    labels = sd.assign_clusters(x, a)  # the clusters are the constructed groups
    seen = df[~df["earlier"] & df["v"].notna()]
    by_group = {g: set(labels[(seen["group"] == g).to_numpy()].tolist()) for g in groups}
    assert labels.dtype == np.int32 and all(len(c) == 1 for c in by_group.values())
    assert sorted(c.pop() for c in by_group.values()) == [0, 1, 2, 3, 4]
    assert len(sd.fit(x, 50, n_init=1, seed=0)) == 9  # g3's three equal rows are one point


def test_kmeans_on_more_rows_than_a_thread_chunk_gives_the_same_clusters_every_time():
    """600 rows: scikit-learn's Lloyd step splits them into chunks of 256 rows, whose partial centroids several
    OpenMP threads would add in the order they finish; on one thread a seed fixes centroids and labels exactly."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(8, DIM))
    x = centres[rng.integers(0, 8, 600)] + 0.3 * rng.normal(size=(600, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    a, b = sd.fit(x, 8, n_init=1, seed=1), sd.fit(x, 8, n_init=1, seed=1)
    np.testing.assert_array_equal(a, b)
    assert sd.assign_clusters(x, a).tolist() == sd.assign_clusters(x, b).tolist()
    assert len(np.unique(sd.assign_clusters(x, a))) == 8


def test_an_embedding_that_is_not_finite_is_no_embedding():
    """A NaN or inf embedding (a bf16 overflow on CUDA) is treated as an image that cannot be decoded: once kept, a
    NaN would make every similarity to it NaN (the rest of its cluster kept, or dropped), and k-means fails on one."""
    import torch

    emb = torch.tensor([[3.0, 4.0], [math.nan, 1.0], [math.inf, 1.0], [0.0, 0.0], [1.0, 0.0], [-math.inf, 2.0]])
    got = sd.unit_rows(emb, [3], 6)  # row 3: an image that could not be decoded (its row zeros)
    assert [v is None for v in got] == [False, True, True, True, False, True]
    np.testing.assert_allclose(got[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(got[4], [1.0, 0.0])
    assert got[0].dtype == np.float32
    assert sd.unit_rows(None, [0, 1], 2).tolist() == [None, None]  # no image decoded


def test_import_is_light():
    code = ("import sys, pipelines.stages.curate.rules.semantic_dedup; "
            "print(sorted(m for m in ('sklearn', 'torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- configuration ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0, 1, 1.5, -0.1])
def test_an_eps_outside_0_1_is_an_error_naming_the_field(tmp_path, eps):
    from pipelines.spec import SpecError, load

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: t\nstages:\n  c:\n    uses: curate\n    with:\n      rules: [semantic_dedup]\n"
                   f"      semantic_dedup: {{eps: {eps}}}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: stages\.c\.with\.semantic_dedup\.eps"):
        load(bad)
    with pytest.raises(ValueError, match=r"semantic_dedup\.eps: must be between 0 and 1"):
        sd.SemanticDedupConfig(eps=eps)


def test_bad_keep_and_clusters_are_errors_naming_the_field(tmp_path):
    from pipelines.spec import SpecError, load

    bad = tmp_path / "bad.yaml"
    for setting, field in (("{keep: first}", "keep"), ("{clusters: 0}", "clusters")):
        bad.write_text(f"name: t\nstages:\n  c:\n    uses: curate\n    with:\n      rules: [semantic_dedup]\n"
                       f"      semantic_dedup: {setting}\n")
        with pytest.raises(SpecError, match=rf"stages\.c\.with\.semantic_dedup\.{field}"):
            load(bad)


# ---- the set decision on Ray -----------------------------------------------------------------------------------

def rule(position: int = 2, **config):
    r = sd.SemanticDedupRule(sd.SemanticDedupConfig(**config), position)
    r.work = Work(job_scores([r]))
    return r


def working_table(r, embeddings: bool = True) -> list:
    """The crafted rows as blocks of the working table, one per shard: what the model pass leaves (with no
    embedding at all when `embeddings` is false, as when no image decodes)."""
    df, _ = crafted()
    n = len(df)
    emb = np.full(n, None, dtype=object)
    for i, v in enumerate(df["v"]):
        emb[i] = v if embeddings else None
    table = pd.DataFrame({
        "uid": [f"{i:032x}" for i in range(n)], "source": "crafted.parquet", "source_row": np.arange(n),
        "shard": df["shard"].astype("int32"), "row": df["row"].astype("int32"), "status": "success",
        "caption_words": np.int32(5), "caption_chars": np.int32(30), "min_side": np.int32(64),
        "max_side": np.int32(64), "aspect_ratio": np.float32(1), "sha256": None, "image_bytes": np.int64(100),
        "text_key": [f"k{i}" for i in range(n)], "phash_ok": False, "phash": np.int64(0),
        **r.work.empty_scores(n),
        "drop_at": np.where(df["earlier"], r.position - 1, KEPT).astype("int32"),
        "reason": np.where(df["earlier"], "duplicate_image", None), sd.EMBEDDING: emb,
    })
    return [r.work.table(table[df["shard"] == s]) for s in (0, 1)]


def decide(keep: str, parts: int, **config) -> tuple[pd.DataFrame, dict[str, float]]:
    import ray.data

    r = rule(keep=keep, clusters=5, n_init=4, seed=3, **config)
    out, metrics = sd.deduplicate(ray.data.from_arrow(working_table(r)), r, logging.getLogger("t"), parts=parts)
    df = out.to_pandas().sort_values(["shard", "row"]).reset_index(drop=True)
    scores = {c: df[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in (sd.CLUSTER, sd.SIMILARITY)}
    return df.assign(**scores), metrics


@pytest.mark.slow
def test_the_set_decision_on_crafted_embeddings(ray_local):
    """Exactly the rows each keep order keeps; the clusters are the constructed groups; the earlier rule's row and
    the row without an embedding are not seen; the result does not depend on the partitions or the run."""
    _, groups = crafted()
    pair, nan = 0.97 * 0.96, math.nan  # the two spokes of a group
    expected = {  # by (shard, row): kept, similarity
        "input_order": {(0, 0): (True, nan), (0, 1): (False, 0.97), (1, 1): (False, 0.96),       # g1: hub first
                        (0, 2): (True, pair), (1, 0): (False, 0.97), (1, 3): (True, pair),       # g2: spoke first
                        (0, 3): (True, nan), (1, 2): (False, 1.0), (1, 5): (False, 1.0)},        # g3
        "nearest_to_centroid": {(0, 0): (True, nan), (0, 1): (False, 0.97), (1, 1): (False, 0.96),
                                (1, 0): (True, nan), (0, 2): (False, 0.97), (1, 3): (False, 0.96),
                                (0, 3): (True, nan), (1, 2): (False, 1.0), (1, 5): (False, 1.0)},
        "farthest_from_centroid": {(0, 0): (False, 0.97), (0, 1): (True, pair), (1, 1): (True, pair),
                                   (1, 0): (False, 0.97), (0, 2): (True, pair), (1, 3): (True, pair),
                                   (0, 3): (True, nan), (1, 2): (False, 1.0), (1, 5): (False, 1.0)},
    }
    runs = {}
    for keep, parts in (("input_order", 1), ("nearest_to_centroid", 1), ("farthest_from_centroid", 3)):
        df, metrics = decide(keep, parts)
        runs[keep] = df
        at = {(s, r): i for i, (s, r) in enumerate(zip(df["shard"], df["row"], strict=True))}
        want = {**expected[keep], (0, 4): (True, nan), (1, 6): (True, nan)}  # the single rows
        for key, (kept, similarity) in want.items():
            i = at[key]
            assert (df.loc[i, "drop_at"] == KEPT) == kept, (keep, key)
            reason = df.loc[i, "reason"]
            assert (pd.isna(reason) if kept else reason == "semantic_duplicate"), (keep, key)
            np.testing.assert_allclose(df.loc[i, "semantic_similarity"], similarity, rtol=1e-5, err_msg=str(key))
        dropped = sum(not k for k, _ in want.values())
        assert metrics == {"semantic_clusters": 5.0, "semantic_sampled": 11.0, "semantic_dropped": float(dropped)}
        # the clusters are the groups; the two rows the rule did not see have none and are as they were
        clusters = {g: {df.loc[at[k], "semantic_cluster"] for k in keys} for g, keys in groups.items()}
        assert all(len(c) == 1 for c in clusters.values())
        assert sorted(int(c.pop()) for c in clusters.values()) == [0, 1, 2, 3, 4]
        unseen = df.loc[[at[(0, 5)], at[(1, 4)]]]
        assert unseen["semantic_cluster"].isna().all() and unseen["semantic_similarity"].isna().all()
        assert unseen["drop_at"].tolist() == [1, KEPT]
        assert unseen["reason"].fillna("kept").tolist() == ["duplicate_image", "kept"]
        assert sd.EMBEDDING not in df.columns and len(df) == 13
    assert {k: int((d["drop_at"] == 2).sum()) for k, d in runs.items()} == {
        "input_order": 5, "nearest_to_centroid": 6, "farthest_from_centroid": 4}
    again, _ = decide("farthest_from_centroid", 1)
    pd.testing.assert_frame_equal(again, runs["farthest_from_centroid"])


@pytest.mark.slow
def test_a_sample_fixed_by_uid_and_every_row_clustered(ray_local):
    """sample 6 of 11 rows (below the schema's minimum, set directly): k-means is fitted on the rows whose uid hashes
    below 6/11, the same ones in every run, and every row the rule sees, sampled or not, gets a cluster."""
    import ray.data

    r = rule(clusters=5, n_init=4, seed=3, sample=6)
    ds = ray.data.from_arrow(working_table(r))
    x = sd.sample(ds, r.position, 6 / 11)
    # the uids (f"{i:032x}", i the row's place in `crafted`) of rows 0, 2 and 4 hash below 6/11: (0, 0), (0, 2), (0, 4)
    df, groups = crafted()
    np.testing.assert_array_equal(x, np.stack(df["v"][[0, 2, 4]].to_list()))
    np.testing.assert_array_equal(sd.sample(ds, r.position, 6 / 11), x)  # drawn again: the same rows
    out, metrics = decide("farthest_from_centroid", 2, sample=6)
    assert metrics["semantic_sampled"] == 3 and metrics["semantic_clusters"] == 3
    seen = (out["drop_at"] > r.position - 1) & ~((out["shard"] == 1) & (out["row"] == 4))
    assert seen.sum() == 11 and out.loc[seen, "semantic_cluster"].notna().all()
    assert out.loc[~seen, "semantic_cluster"].isna().all()
    at = {(s, w): i for i, (s, w) in enumerate(zip(out["shard"], out["row"], strict=True))}
    clusters = {g: {out.loc[at[k], "semantic_cluster"] for k in groups[g]} for g in ("g1", "g2")}
    assert all(len(c) == 1 for c in clusters.values()) and clusters["g1"] != clusters["g2"]


@pytest.mark.slow
def test_no_row_with_an_embedding_passes_every_row_through(ray_local):
    """Every candidate's image undecodable (no embedding) and one row dropped earlier: nothing is clustered, the
    metrics are zero, and every row comes out as it went in, without the embedding column."""
    import ray.data

    r = rule()
    blocks = working_table(r, embeddings=False)
    out, metrics = sd.deduplicate(ray.data.from_arrow(blocks), r, logging.getLogger("t"))
    assert metrics == {"semantic_clusters": 0.0, "semantic_sampled": 0.0, "semantic_dropped": 0.0}
    assert out.schema().base_schema == r.work.schema()  # the working table's, without the embedding column
    got = out.to_pandas().sort_values(["shard", "row"]).reset_index(drop=True)
    want = ray.data.from_arrow([b.drop_columns([sd.EMBEDDING]) for b in blocks]).to_pandas()  # Ray's pandas dtypes
    pd.testing.assert_frame_equal(got, want)
    assert got[sd.CLUSTER].isna().all() and got[sd.SIMILARITY].isna().all()


# ---- a curate run with a tiny open_clip model ------------------------------------------------------------------

ARCH, SEED = "clip-tiny", 5
EPS = 5e-4  # a random model puts every image near one direction (similarities 0.97-0.999); copies are above 0.99998


def crawl_shards() -> tuple[list[list[dict]], list[str]]:
    """Two crawled shards: an image twice more as exact copies (dedup_image's), another one twice more with pixel
    noise (semantic_dedup's), other images, a row not downloaded and one whose image cannot be decoded; and the
    reason each row is expected to get (`kept`, or the dropping rule's)."""
    from tests.test_curate import GOOD, row, smooth_image

    a, b = smooth_image(301), smooth_image(302)
    other = [smooth_image(310 + i) for i in range(8)]
    rows = [
        (row(f"{GOOD} a", image=a), "kept"), (row(f"{GOOD} b", image=b), "kept"),
        (row(f"{GOOD} a copy", image=a), "duplicate_image"), *((row(f"{GOOD} {i}", image=other[i]), "kept")
                                                               for i in range(4)),
        (row(status="failed_to_download"), "not_downloaded"),
        (row(f"{GOOD} b noisy", image=smooth_image(302, jitter=1)), "semantic_duplicate"),
        (row(f"{GOOD} broken", image=b"not an image"), "kept"),
        *((row(f"{GOOD} {i}", image=other[i]), "kept") for i in range(4, 8)),
        (row(f"{GOOD} a copy again", image=a), "duplicate_image"),
        (row(f"{GOOD} b noisier", image=smooth_image(302, jitter=2)), "semantic_duplicate"),
    ]
    shards = [[r for r, _ in rows[:9]], [r for r, _ in rows[9:]]]
    return shards, [e for _, e in rows]


def test_near_copies_are_alike_and_other_images_not():
    """The premise of the curate run: under the tiny seeded model, the noisy copies of b are within EPS of it and
    every other pair of different images is not."""
    import io

    import torch
    from PIL import Image

    from pipelines import models

    shards, expected = crawl_shards()
    images = [r["image"] for s in shards for r in s]
    ok = [i for i, b in enumerate(images) if b is not None and b != b"not an image"]
    model, preprocess, _ = models.create(models.ModelRef(arch=ARCH, seed=SEED))
    with torch.inference_mode():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(images[i])).convert("RGB")) for i in ok])
        emb = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1).numpy()
    sims = emb @ emb.T
    b = [j for j, i in enumerate(ok) if images[i] in (images[1],) or expected[i] == "semantic_duplicate"]
    a = [j for j, i in enumerate(ok) if images[i] == images[0]]
    alike = np.eye(len(sims), dtype=bool)
    for g in (a, b):
        alike[np.ix_(g, g)] = True
    assert len(b) == 3 and len(a) == 3
    assert sims[alike].min() > 1 - EPS
    assert sims[~alike].max() < 1 - EPS


@pytest.mark.slow
def test_curate_drops_the_near_copies_and_leaves_exact_ones_to_the_rule_before(tmp_path, ray_local):
    """rules [dedup_image, semantic_dedup]: the exact copies are dedup_image's (semantic_dedup never sees them), the
    noisy copies semantic_dedup's; the first copy in input order is kept; every crawled row has a ledger row; the
    embeddings reach neither the ledger nor the curated shards."""
    from tests.test_curate import run_curate, write_crawl

    shards, expected = crawl_shards()
    crawl = write_crawl(tmp_path, shards)
    result, ledger, curated, _ = run_curate(
        tmp_path, crawl, rules=["dedup_image", "semantic_dedup"], shard_rows=100,
        semantic_dedup={"model": {"arch": ARCH, "seed": SEED}, "eps": EPS, "clusters": 3, "keep": "input_order",
                        "n_init": 2, "batch_size": 8})

    assert len(ledger) == crawl.rows == len(expected) and ledger["uid"].is_unique
    assert ledger["reason"].fillna("kept").tolist() == expected
    assert result.counts["dropped_semantic_duplicate"] == 2 and result.counts["dropped_duplicate_image"] == 2
    assert result.metrics["semantic_dropped"] == 2 and result.metrics["semantic_clusters"] == 3
    assert result.metrics["semantic_sampled"] == 12  # the decodable rows dedup_image left
    # who was seen: a cluster for the rows semantic_dedup decided, none for the others
    seen = ledger["semantic_cluster"].notna()
    assert seen.sum() == 12 and not seen[ledger["reason"].isin(["duplicate_image", "not_downloaded"])].any()
    broken = ledger.index[ledger["row"].eq(0) & ledger["shard"].eq(1)]
    assert not seen[broken].any() and ledger.loc[broken, "kept"].all()
    b_rows = ledger.index[[1, 8, 15]]
    assert ledger.loc[b_rows, "semantic_cluster"].nunique() == 1
    sim = ledger["semantic_similarity"]
    assert (sim[ledger["reason"].eq("semantic_duplicate")] > 1 - EPS).all()
    assert (sim[ledger["kept"] & seen].fillna(-1) <= 1 - EPS).all()
    assert curated["uid"].tolist() == ledger.loc[ledger["kept"], "uid"].tolist()
    assert {"semantic_cluster", "semantic_similarity"} <= set(curated.columns) & set(ledger.columns)
    assert not any("embedding" in c for c in [*curated.columns, *ledger.columns])
