"""The `query_subset` curate rule: keep the rows nearest to text or image queries, over an embed stage's embeddings.

The queries are embedded by the rule with a tiny seeded open_clip model (the one the crafted embed manifest names);
the rows' embeddings are crafted from those query vectors so that each row's cosine similarity to its query is known
by construction: a row built on query j at s is `s * q_j + sqrt(1 - s^2) * w`, with w a unit vector orthogonal to
every query (so its similarity to another query i is `s * q_i.q_j`, at most about 0.6 here, below every row's own
s).  Stored as float16, as the embed stage stores them, so each similarity is s to about 1e-3; the gaps between the
crafted values are wider than that, and rows meant to tie have the very same vector.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import configschema, spec
from pipelines.manifest import Manifest
from pipelines.models import ModelRef
from pipelines.stage import StageContext
from pipelines.stages.curate.config import CurateConfig
from pipelines.stages.curate.rules import query_subset as qs
from pipelines.stages.curate.stage import CurateStage
from tests.conftest import write_job

ARCH, SEED = "clip-tiny", 5
MODEL = {"arch": ARCH, "checkpoint": None, "model_uri": None, "seed": SEED}
TEXTS = ["a lighthouse on a cliff", "a bowl of ramen", "a red sports car"]

# (caption tag, what the row is): ("q", j, s) built on query j (3 is the image query) at similarity s; "far" orthogonal
# to every query; "none" a successful row the embed stage has no embedding for; "failed" not downloaded; "copy" the
# image bytes of the row tagged far0 (dedup_image drops it before query_subset sees it), its embedding at 0.99 to q0.
# The three r92 rows share one vector: they tie exactly.
SHARDS = [
    [("l95", ("q", 0, 0.95)), ("r92a", ("q", 1, 0.92)), ("far0", "far"), ("l85", ("q", 0, 0.85)),
     ("failed", "failed"), ("img97", ("q", 3, 0.97)), ("none", "none")],
    [("r92b", ("q", 1, 0.92)), ("l90", ("q", 0, 0.90)), ("r92c", ("q", 1, 0.92)), ("r80", ("q", 1, 0.80)),
     ("car70", ("q", 2, 0.70)), ("copy", ("q", 0, 0.99)), ("far1", "far")],
]


# ---- ranking and selection (numpy only) --------------------------------------------------------------------------

def test_ranked_orders_by_similarity_then_uid_and_keeps_exactly_k():
    s = np.array([0.5, 0.9, 0.9, 0.1, 0.9, 0.7], np.float32)
    u = np.array(["e", "d", "a", "b", "c", "f"])
    assert qs.ranked(s, u, None).tolist() == [2, 4, 1, 5, 0, 3]
    assert qs.ranked(s, u, 2).tolist() == [2, 4]  # three tie at 0.9: the two smallest uids
    assert qs.ranked(s, u, 4).tolist() == [2, 4, 1, 5]
    assert qs.ranked(s, u, 10).tolist() == [2, 4, 1, 5, 0, 3]
    assert qs.ranked(s[:0], u[:0], 3).tolist() == []


def test_cutoffs_merge_the_blocks_lists_and_selection_applies_them():
    """Two blocks' own top 2 of query 0 merged into its 2nd best (0.9, 'c'); query 1 has one row only (fewer than k:
    every row that passed), query 2 none."""
    tops = pd.DataFrame({"query": [0, 0, 0, 0, 1], "sim": np.array([0.9, 0.5, 0.9, 0.95, 0.2], np.float32),
                         "uid": ["c", "x", "d", "z", "q"]})
    cuts = qs.cutoffs(tops, 3, 2)
    assert cuts == [(pytest.approx(0.9), "c"), (pytest.approx(0.2), "q"), None]
    # query 0: (0.9, c) is the cutoff, so (0.9, d) is out; query 1: at least (0.2, q), (0.2, z) is out by its uid
    sims = np.array([[0.9, 0.1, 0.0], [0.9, 0.3, 0.0], [0.95, 0.25, 0.0], [0.5, 0.2, 0.0]], np.float32)
    uids = np.array(["c", "d", "z", "z"])
    got = qs.selection(sims, uids, None, cuts)
    assert got.tolist() == [[True, False, False], [False, True, False], [True, True, False], [False, False, False]]
    assert qs.selection(sims, uids, 0.25, None).tolist() == [[True, False, False], [True, True, False],
                                                             [True, True, False], [True, False, False]]


def test_a_rows_similarity_does_not_depend_on_its_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:3] + 0.1
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    whole = qs.similarities(x, q)
    assert whole.dtype == np.float32
    for s, e in ((0, 1), (5, 77), (100, 300)):
        np.testing.assert_array_equal(qs.similarities(x[s:e], q), whole[s:e])
    np.testing.assert_allclose(whole, x @ q.T, atol=1e-6)


def test_import_is_light():
    code = ("import sys, pipelines.stages.curate.rules.query_subset; "
            "print(sorted(m for m in ('sklearn', 'torch', 'ray', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- configuration ----------------------------------------------------------------------------------------------

def curate_job(tmp_path, qs_with: dict[str, Any], needs: tuple[str, ...] = ("source", "embed")):
    return write_job(tmp_path, {
        "source": {"uses": "tests.support.sources:CrawledFiles", "with": {"files": []}},
        "embed": {"uses": "embed", "needs": ["source"], "with": {"model": {"arch": ARCH, "seed": SEED}}},
        "curate": {"uses": "curate", "needs": list(needs),
                   "with": {"rules": ["query_subset"], "query_subset": qs_with}}})


@pytest.mark.parametrize(("setting", "message"), [
    ({"queries": [{"text": "a cat"}], "k_per_query": 3},
     r"stages\.curate\.with: query_subset\.embeddings: the rule reads an embed stage's embeddings"),
    ({"embeddings": "embed", "queries": [{"text": "a cat"}], "k_per_query": 0},
     r"stages\.curate\.with\.query_subset\.k_per_query"),
    ({"embeddings": "embed", "queries": [{"text": "a cat"}]},
     r"query_subset: give k_per_query, min_similarity or both"),
    ({"embeddings": "embed", "queries": [], "k_per_query": 1}, r"query_subset\.queries: the rule is listed but names"),
    ({"embeddings": "embed", "queries": [{"text": "a cat", "image": "/x.png"}], "k_per_query": 1},
     r"query_subset\.queries\[0\]: give text or image"),
    ({"embeddings": "embed", "queries": [{"text": "a"}, {"image": "https://example.com/a.jpg"}], "k_per_query": 1},
     r"query_subset\.queries\[1\]\.image: https://example\.com/a\.jpg: the rule does not fetch from the web"),
    ({"embeddings": "embed", "queries": [{"text": "a"}, {"image": "/a.png", "name": "a"}], "k_per_query": 1},
     r"query_subset\.queries: the labels 'a' name more than one query"),
    ({"embeddings": "embed", "queries": [{"text": "a"}], "min_similarity": 1.5},
     r"stages\.curate\.with\.query_subset\.min_similarity"),
    ({"embeddings": "embed", "queries": [{"text": "a"}], "k_per_query": 1, "modality": "audio"},
     r"stages\.curate\.with\.query_subset\.modality"),
])
def test_a_bad_setting_is_an_error_naming_the_field(tmp_path, setting, message):
    with pytest.raises(spec.SpecError, match=message):
        spec.load(curate_job(tmp_path, setting))


def test_the_embed_stage_must_be_in_needs_and_the_queries_are_in_the_params(tmp_path):
    setting = {"embeddings": "embed", "queries": [{"text": "a cat"}, {"image": str(tmp_path), "name": "dir"}],
               "k_per_query": 5}
    with pytest.raises(spec.SpecError, match=r"stages\.curate\.with\.query_subset\.embeddings: names stage 'embed', "
                                             r"which is not in stages\.curate\.needs \(source\)"):
        spec.load(curate_job(tmp_path, setting, needs=("source",)))
    job = spec.load(curate_job(tmp_path, setting))
    # the params are what the curate manifest records (and what its fingerprint covers): the queries, as written
    assert job.stages["curate"].params["query_subset"]["queries"] == [
        {"text": "a cat", "image": None, "name": None}, {"text": None, "image": str(tmp_path), "name": "dir"}]


def test_an_image_query_that_does_not_exist_is_named_before_the_run_and_by_the_rule(tmp_path):
    from pipelines import preflight

    missing = str(tmp_path / "nope.png")
    setting = {"embeddings": "embed", "queries": [{"text": "a cat"}, {"image": missing}], "k_per_query": 5}
    with pytest.raises(spec.SpecError, match=rf"stages\.curate\.with\.query_subset\.queries\[1\]\.image: "
                                             rf"{missing}: no such file"):
        preflight.check(spec.load(curate_job(tmp_path, setting)))
    rule = qs.QuerySubsetRule(qs.QuerySubsetConfig(**setting), 1)
    with pytest.raises(FileNotFoundError, match=rf"query_subset\.queries\[1\]\.image: {missing}: no such file"):
        rule.identity()  # the stage's fingerprint, when it is planned
    with pytest.raises(FileNotFoundError, match=rf"query_subset\.queries\[1\]\.image: {missing}"):
        qs.embed_queries(rule.config.queries, ModelRef(arch=ARCH, seed=SEED))  # when the stage runs
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"query_subset\.queries\[0\]\.image: {broken}: not an image that can be "):
        qs.embed_queries([qs.Query(image=str(broken))], ModelRef(arch=ARCH, seed=SEED))


def manifest(tmp_path, stage: str, uses: str, inputs: dict, columns: list[str], params: dict | None = None,
             shards: int = 1) -> Manifest:
    return Manifest(job="t", stage=stage, uses=uses, fingerprint="0" * 16, code_version="x", params=params or {},
                    inputs=inputs, shards=[{"path": f"part-{i:05d}.parquet", "rows": 1, "bytes": 1, "sha256": "0" * 64}
                                           for i in range(shards)],
                    counts={}, metrics={}, started_at="", finished_at="", extra={"columns": columns, "dim": 64},
                    location=str(tmp_path / stage))


def test_the_rule_checks_the_embed_stage_it_reads(tmp_path):
    crawl = manifest(tmp_path, "crawl", "crawl", {}, [])
    link = {"crawl": {"fingerprint": crawl.fingerprint, "digest": crawl.digest, "path": crawl.location}}
    rule = qs.QuerySubsetRule(qs.QuerySubsetConfig(embeddings="embed", queries=[qs.Query(text="a")], k_per_query=1,
                                                   modality="text"), 1)
    assert not rule.uses_images and rule.decides_sets() and rule.reads() == {"embed": "embeddings"}
    with pytest.raises(ValueError, match=r"query_subset\.embeddings: stage 'embed' \(uses: embed\) wrote no text "
                                         r"embeddings \(text_embedding\)"):
        rule.attach(crawl, {"embed": manifest(tmp_path, "embed", "embed", link, ["uid", "image_embedding"], {
            "model": MODEL})})
    with pytest.raises(ValueError, match=r"names no model in its params"):
        rule.attach(crawl, {"embed": manifest(tmp_path, "embed", "embed", link, ["uid", "text_embedding"])})
    with pytest.raises(ValueError, match=r"has 2 shards for the crawl's 1"):
        rule.attach(crawl, {"embed": manifest(tmp_path, "embed", "embed", link, ["uid", "text_embedding"],
                                              {"model": MODEL}, shards=2)})
    rule.attach(crawl, {"embed": manifest(tmp_path, "embed", "embed", link, ["uid", "text_embedding"],
                                          {"model": MODEL})})
    assert rule.model == ModelRef(**MODEL) and rule.embedding_shards == [str(tmp_path / "embed" / "part-00000.parquet")]


# ---- the queries' embeddings -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> tuple[list[qs.Query], np.ndarray]:
    """Three text queries and an image query (a file), and their unit embeddings as the rule makes them."""
    from tests.test_curate import smooth_image

    path = tmp_path_factory.mktemp("queries") / "query.jpg"
    path.write_bytes(smooth_image(7))
    qq = [*(qs.Query(text=t) for t in TEXTS), qs.Query(image=str(path), name="the photo")]
    return qq, qs.embed_queries(qq, ModelRef(arch=ARCH, seed=SEED))


def test_queries_are_embedded_as_open_clip_embeds_them(queries):
    """Text queries by the text tower, the image query by the image tower (a plain open_clip loop), unit norm."""
    import io

    import torch
    from PIL import Image

    from pipelines import models

    qq, got = queries
    model, preprocess, tokenizer = models.create(ModelRef(arch=ARCH, seed=SEED))
    with torch.inference_mode():
        txt = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
        with open(qq[3].image, "rb") as f:
            img = model.encode_image(preprocess(Image.open(io.BytesIO(f.read())).convert("RGB"))[None],
                                     normalize=True).numpy()
    assert got.shape == (4, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.concatenate([txt, img]), atol=1e-5)
    # the premise of the crafted rows: no two queries are more alike than 0.7
    sims = got @ got.T
    assert np.abs(sims[~np.eye(4, dtype=bool)]).max() < 0.7


# ---- the curate stage on crafted embeddings ---------------------------------------------------------------------

def crafted_vectors(q: np.ndarray) -> dict[str, np.ndarray | None]:
    """Each row tag's embedding (float64, unit; None: no embedding), as SHARDS describes."""
    rng = np.random.default_rng(3)
    # an orthonormal basis whose first 4 vectors span the queries: the others are orthogonal to every query
    basis, _ = np.linalg.qr(np.concatenate([q.T.astype(np.float64), rng.normal(size=(64, 60))], axis=1))
    free = iter(basis[:, 4:].T)
    out: dict[str, np.ndarray | None] = {}
    shared: dict[tuple, np.ndarray] = {}
    for tag, what in (r for shard in SHARDS for r in shard):
        if what == "far":
            out[tag] = next(free)
        elif what == "none":
            out[tag] = None
        elif isinstance(what, tuple):
            _, j, s = what
            if what not in shared:
                shared[what] = s * q[j].astype(np.float64) / np.linalg.norm(q[j]) + math.sqrt(1 - s * s) * next(free)
            out[tag] = shared[what]
    return out


def f16_column(vectors: list[np.ndarray | None]) -> pa.Array:
    return pa.array([None if v is None else v.astype(np.float16).tolist() for v in vectors], pa.list_(pa.float16()))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, queries):
    """The crawled shards and two embed outputs of them: `embed_image` (the crafted vectors as image embeddings, far
    ones as text embeddings) and `embed_text` (the other way round)."""
    from tests.test_curate import row, smooth_image, write_crawl

    tmp = tmp_path_factory.mktemp("query_subset")
    _, q = queries
    images = {tag: smooth_image(600 + i) for i, (tag, _) in enumerate(r for s in SHARDS for r in s)}
    images["copy"] = images["far0"]
    shards = [[row(f"a photo of a small red house near the sea {tag}", image=images[tag],
                   status="failed_to_download" if what == "failed" else "success")
               for tag, what in shard] for shard in SHARDS]
    crawl = write_crawl(tmp, shards)
    tables = [pq.read_table(u) for u in crawl.shard_urls()]
    uids = {tag: u for shard, t in zip(SHARDS, tables, strict=True)
            for (tag, _), u in zip(shard, t["uid"].to_pylist(), strict=True)}
    vectors = crafted_vectors(q)
    far = iter(np.linalg.qr(np.random.default_rng(4).normal(size=(64, 64)))[0].T)
    others = {tag: (None if v is None else next(far)) for tag, v in vectors.items()}
    link = {"crawl": {"fingerprint": crawl.fingerprint, "digest": crawl.digest, "path": crawl.location}}
    embeds = {}
    for name, (image, text) in {"embed_image": (vectors, others), "embed_text": (others, vectors)}.items():
        out = tmp / name
        out.mkdir()
        for i, shard in enumerate(SHARDS):
            tags = [tag for tag, what in shard if what != "failed"]  # the embed stage writes successful rows only
            pq.write_table(pa.table({"uid": [uids[t] for t in tags], "image_embedding": f16_column([image[t] for t in tags]),
                                     "text_embedding": f16_column([text[t] for t in tags])}),
                           out / f"part-{i:05d}.parquet")
        embeds[name] = Manifest(
            job="t", stage=name, uses="embed", fingerprint="1" * 16, code_version="x", params={"model": MODEL},
            inputs=link, shards=[{"path": f"part-{i:05d}.parquet", "rows": 1, "bytes": 1, "sha256": "0" * 64}
                                 for i in range(len(SHARDS))], counts={}, metrics={}, started_at="",
            finished_at="", extra={"columns": ["uid", "image_embedding", "text_embedding"], "dim": 64},
            location=str(out))
    return tmp, crawl, embeds, uids, vectors, queries[0]


def run(crafted, embed: str, rules: tuple[str, ...] = ("dedup_image", "query_subset"), other: dict | None = None,
        **setting: Any) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
    """`rules` on the crafted crawl, query_subset reading `embed` (`other`: other rules' settings): (result, ledger by
    row tag, curated)."""
    from pipelines.tracking import Tracker

    tmp, crawl, embeds, uids, _, qq = crafted
    name = f"curate{len(list(tmp.glob('curate*')))}"
    cfg = configschema.build(CurateConfig, {
        "rules": list(rules), "shard_rows": 100, **(other or {}),
        "query_subset": {"embeddings": embed, "queries": [dataclasses.asdict(q) for q in qq], **setting}})
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "t", str(tmp))
    tracker.start_job("t", {}, {})
    child = tracker.start_stage("t", name, "curate", "0" * 16, {})
    ctx = StageContext(job="t", stage=name, output=str(tmp / name), tracker=child, log=logging.getLogger(name),
                       progress=False)
    result = CurateStage(cfg).run(ctx, {"crawl": crawl, embed: embeds[embed]})
    ledger = pd.concat([pd.read_parquet(tmp / name / s["path"]) for s in result.extra["ledger"]], ignore_index=True)
    tags = {u: t for t, u in uids.items()}
    ledger.index = [tags[u] for u in ledger["uid"]]
    curated = pd.concat([pd.read_parquet(tmp / name / s["path"]) for s in result.shards], ignore_index=True)
    return result, ledger, curated


def reference(crafted, queries, k: int | None, floor: float | None) -> dict[str, tuple[bool, str | None, float]]:
    """A plain full-matrix reference over the rows query_subset sees (successful, not dropped by dedup_image, with
    an embedding): tag -> (kept, matched query's label, similarity)."""
    _, _, _, uids, vectors, _ = crafted
    qq, q = queries
    labels = [x.label for x in qq]
    seen = [t for t, v in vectors.items() if v is not None and t != "copy"]
    x = np.stack([vectors[t].astype(np.float16).astype(np.float32) for t in seen])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = (x.astype(np.float64) @ q.T.astype(np.float64)).astype(np.float32)
    chosen = np.zeros(sims.shape, dtype=bool)
    for j in range(len(q)):
        order = sorted(range(len(seen)), key=lambda i: (-sims[i, j], uids[seen[i]]))
        order = [i for i in order if floor is None or sims[i, j] >= floor]
        chosen[order[:k] if k is not None else order, j] = True
    out = {}
    for i, t in enumerate(seen):
        pick = [j for j in range(len(q)) if chosen[i, j]]
        j = max(pick, key=lambda j: (sims[i, j], -j)) if pick else int(np.argmax(sims[i]))
        out[t] = (bool(pick), labels[j], float(sims[i, j]))
    return out


def check_ledger(ledger: pd.DataFrame, expected: dict[str, tuple[bool, str | None, float]]) -> None:
    for tag, (kept, label, sim) in expected.items():
        assert ledger.loc[tag, "kept"] == kept, tag
        assert (pd.isna(ledger.loc[tag, "reason"]) if kept else ledger.loc[tag, "reason"] == "query_subset"), tag
        assert ledger.loc[tag, "query_match"] == label, tag
        assert ledger.loc[tag, "query_similarity"] == pytest.approx(sim, abs=1e-6), tag
    # not seen: not downloaded, dropped by the rule before; seen without an embedding: dropped, nothing matched
    assert ledger.loc["failed", "reason"] == "not_downloaded" and ledger.loc["copy", "reason"] == "duplicate_image"
    assert ledger.loc["none", "reason"] == "query_subset"
    assert ledger.loc[["failed", "copy", "none"], "query_match"].isna().all()
    assert ledger.loc[["failed", "copy", "none"], "query_similarity"].isna().all()


@pytest.mark.slow
def test_k_nearest_of_each_query_at_least_min_similarity(crafted, queries, ray_local):
    """k 2 and min_similarity 0.75 over image embeddings: the lighthouse keeps its 0.95 and 0.90 rows (not 0.85, nor the
    0.99 copy dedup_image dropped first), the ramen two of its three tied 0.92 rows (the smaller uids), the car none
    (its 0.70 row is below 0.75: a query nobody matches), the image query its 0.97 row."""
    result, ledger, curated = run(crafted, "embed_image", k_per_query=2, min_similarity=0.75)
    _, _, _, uids, _, _ = crafted
    ramen = sorted(["r92a", "r92b", "r92c"], key=lambda t: uids[t])
    assert sorted(ledger.index[ledger["kept"]]) == sorted(["l95", "l90", *ramen[:2], "img97"])
    labels = ledger.loc[["l95", "l90", *ramen[:2], "img97"], "query_match"].tolist()
    assert labels == [TEXTS[0], TEXTS[0], TEXTS[1], TEXTS[1], "the photo"]
    np.testing.assert_allclose(ledger.loc[["l95", "l90", ramen[0], "img97"], "query_similarity"],
                               [0.95, 0.90, 0.92, 0.97], atol=2e-3)
    assert ledger.loc[ramen[2], "query_similarity"] == ledger.loc[ramen[0], "query_similarity"]  # an exact tie
    assert ledger.loc["car70", "query_match"] == TEXTS[2] and not ledger.loc["car70", "kept"]
    check_ledger(ledger, reference(crafted, queries, 2, 0.75))
    assert result.counts["dropped_query_subset"] == 7 and result.counts["rows_out"] == 5
    assert result.metrics["query_subset_seen"] == 12 and result.metrics["query_subset_kept"] == 5
    assert [result.metrics[f"query_subset_rows_{i}"] for i in range(4)] == [2, 2, 0, 1]
    assert curated["uid"].tolist() == ledger.loc[ledger["kept"], "uid"].tolist()
    assert {"query_match", "query_similarity"} <= set(curated.columns)
    assert not any("embedding" in c for c in [*curated.columns, *ledger.columns])


@pytest.mark.slow
def test_a_threshold_alone_and_k_alone_over_text_embeddings(crafted, queries, ray_local):
    """min_similarity 0.88 alone keeps every row that alike to some query (all three tied ramen rows); k 1 alone, over
    the text embeddings (the crafted vectors are the embed_text stage's captions), keeps each query's nearest, the
    car's 0.70 row among them, and the smallest uid of the tie, with semantic_dedup reading image embeddings before
    it."""
    _, _, _, uids, _, _ = crafted
    _, ledger, _ = run(crafted, "embed_image", min_similarity=0.88)
    assert sorted(ledger.index[ledger["kept"]]) == sorted(["l95", "l90", "r92a", "r92b", "r92c", "img97"])
    check_ledger(ledger, reference(crafted, queries, None, 0.88))

    # semantic_dedup before it reads the same stage's image embeddings (orthogonal: no duplicates) into a column of
    # its own, which it drops with its decision: query_subset still compares the text embeddings
    result, ledger, _ = run(crafted, "embed_text", rules=("dedup_image", "semantic_dedup", "query_subset"),
                            other={"semantic_dedup": {"embeddings": "embed_text", "clusters": 2}},
                            modality="text", k_per_query=1)
    assert result.metrics["semantic_dropped"] == 0 and ledger["semantic_cluster"].notna().sum() == 11
    first = min(["r92a", "r92b", "r92c"], key=lambda t: uids[t])
    assert sorted(ledger.index[ledger["kept"]]) == sorted(["l95", first, "car70", "img97"])
    assert ledger.loc["car70", "query_match"] == TEXTS[2]
    check_ledger(ledger, reference(crafted, queries, 1, None))
    assert [result.metrics[f"query_subset_rows_{i}"] for i in range(4)] == [1, 1, 1, 1]
