"""The curate stage on crafted crawled shards: every rule's effect, counted exactly as constructed."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import configschema
from pipelines.contracts import CRAWLED, uid
from pipelines.manifest import Manifest
from pipelines.stage import StageContext
from pipelines.stages.curate.config import CurateConfig
from pipelines.stages.curate.features import hamming, phash
from pipelines.stages.curate.stage import CurateStage
from pipelines.tracking import Tracker


def smooth_image(seed: int, jitter: int = 0, size: tuple[int, int] = (64, 64)) -> bytes:
    """A low-frequency random image (its pHash is stable); jitter adds pixel noise for a near duplicate."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(small).astype(np.int16)
    if jitter:
        arr = arr + np.random.default_rng(seed * 1000 + jitter).integers(-3, 4, arr.shape)
    out = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


GOOD = "a photo of a small red house near the sea"


def row(caption: str = GOOD, image: bytes | None = None, seed: int = 0, status: str = "success",
        size: tuple[int, int] = (400, 300), url: str | None = None) -> dict[str, Any]:
    if image is None and status == "success":
        image = smooth_image(seed)
    return {"caption": caption, "image": image, "status": status, "original_width": size[0],
            "original_height": size[1], "url": url}


def write_crawl(tmp: Path, shards: list[list[dict[str, Any]]]) -> Manifest:
    """Crafted crawled shards with a manifest, as the crawl stage would leave them."""
    out = tmp / "crawl"
    out.mkdir(parents=True)
    entries, n = [], 0
    for i, rows in enumerate(shards):
        recs = []
        for r in rows:
            url = r["url"] or f"http://127.0.0.1/img/{n}.jpg"
            ok = r["status"] == "success"
            recs.append({"uid": uid(url, r["caption"]), "url": url, "caption": r["caption"], "status": r["status"],
                         "image": r["image"], "image_format": "jpg" if ok else None,
                         "width": 64 if ok else None, "height": 64 if ok else None,
                         "original_width": r["original_width"] if ok else None,
                         "original_height": r["original_height"] if ok else None,
                         "sha256": None, "source": "input.parquet", "source_row": n})
            n += 1
        table = pa.Table.from_pylist(recs, schema=CRAWLED)
        path = f"part-{i:05d}.parquet"
        pq.write_table(table, out / path)
        entries.append({"path": path, "rows": len(rows), "bytes": (out / path).stat().st_size, "sha256": "0" * 64})
    return Manifest(job="t", stage="crawl", uses="crawl", fingerprint="0" * 16, code_version="x", params={},
                    inputs={}, shards=entries, counts={}, metrics={}, started_at="", finished_at="",
                    location=str(out))


def run_curate(tmp: Path, crawl: Manifest, name: str = "curate", **config: Any) -> tuple[Any, pd.DataFrame, pd.DataFrame, Any]:
    cfg = configschema.build(CurateConfig, config)
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "t", str(tmp))
    tracker.start_job("t", {}, {})
    child = tracker.start_stage("t", name, "curate", "0" * 16, {})
    out = tmp / name
    ctx = StageContext(job="t", stage=name, output=str(out), tracker=child, log=logging.getLogger(name), progress=False)
    result = CurateStage(cfg).run(ctx, {"crawl": crawl})
    ledger = pd.concat([pd.read_parquet(out / s["path"]) for s in result.extra["ledger"]], ignore_index=True)
    curated = (pd.concat([pd.read_parquet(out / s["path"]) for s in result.shards], ignore_index=True)
               if result.shards else pd.DataFrame())
    return result, ledger, curated, (tracker, child)


def crafted() -> tuple[list[list[dict[str, Any]]], dict[str, int]]:
    dup = smooth_image(100)
    near = [smooth_image(200), smooth_image(200, jitter=1), smooth_image(200, jitter=2)]
    shard0 = [
        row(status="failed_to_download"), row(status="failed_to_download"),           # not_downloaded 2
        row("two words", seed=1), row("two words", seed=2), row("two words", seed=3),  # caption_words 3
        row("a b c", seed=4), row("a b c", seed=5),                                    # caption_chars 2
        row(seed=6, size=(100, 300)), row(seed=7, size=(300, 100)),                    # min_side 2
        row(seed=8, size=(900, 250)),                                                  # aspect_ratio 1
        row("dup first", image=dup),            # fails basic (2 words): the next copy is the one kept
        row(GOOD + " one", image=dup),           # kept
        row(GOOD + " two", image=dup),           # duplicate_image
    ]
    shard1 = [
        row(GOOD + " three", image=dup),                                               # duplicate_image
        row("same caption, Same URL", seed=9, url="http://127.0.0.1/x.jpg"),          # kept
        row("Same  caption same url!", seed=10, url="http://127.0.0.1/x.jpg"),        # duplicate_text
        row(image=near[0]), row(image=near[1]), row(image=near[2]),                    # 1 kept, near_duplicate 2
        *[row(seed=20 + i) for i in range(5)],                                         # 5 kept
    ]
    expected = {"not_downloaded": 2, "caption_words": 4, "caption_chars": 2, "min_side": 2, "aspect_ratio": 1,
                "duplicate_image": 2, "duplicate_text": 1, "near_duplicate": 2, "kept": 8}
    return [shard0, shard1], expected


RULES = ["basic", "dedup_image", "dedup_text", "near_duplicate"]


def test_near_duplicates_are_near_and_others_far():
    """The premise of the crafted data: jittered copies are within 4 bits, unrelated images far apart."""
    a, b, c = (phash(smooth_image(200, jitter=j)) for j in (0, 1, 2))
    others = np.array([phash(smooth_image(s)) for s in range(20, 25)], dtype=np.int64)
    assert hamming(np.array([a, a]), np.array([b, c])).max() <= 4
    assert hamming(others[:, None], others[None, :])[~np.eye(5, dtype=bool)].min() > 12


def test_each_rule_drops_exactly_what_was_constructed(tmp_path, ray_local):
    shards, expected = crafted()
    crawl = write_crawl(tmp_path, shards)
    result, ledger, curated, _ = run_curate(tmp_path, crawl, rules=RULES, shard_rows=3)

    assert len(ledger) == crawl.rows == 24
    assert ledger["reason"].fillna("kept").value_counts().to_dict() == expected
    assert result.counts["rows_in"] == 24 and result.counts["rows_out"] == 8
    for reason, n in expected.items():
        if reason != "kept":
            assert result.counts[f"dropped_{reason}"] == n
    assert ledger["kept"].sum() == 8 and (ledger["kept"] == ledger["reason"].isna()).all()
    # the first copy failed basic, so dedup keeps the second one in input order, across shards
    dup_rows = ledger[ledger["sha256"] == ledger.loc[(ledger["shard"] == 0) & (ledger["row"] == 10), "sha256"].item()]
    assert dup_rows["reason"].fillna("kept").tolist() == ["caption_words", "kept", "duplicate_image", "duplicate_image"]
    near = ledger[(ledger["shard"] == 1) & ledger["row"].isin([3, 4, 5])]
    assert near["reason"].fillna("kept").tolist() == ["kept", "near_duplicate", "near_duplicate"]
    # curated: the kept rows in input order, repacked 3 + 3 + 2, with the crawled columns and the scores
    assert [s["rows"] for s in result.shards] == [3, 3, 2]
    assert curated["uid"].tolist() == ledger.loc[ledger["kept"], "uid"].tolist()
    assert {"image", "caption", "url", "phash", "caption_words", "min_side"} <= set(curated.columns)
    assert curated["image"].map(len).min() > 0
    assert (curated["phash"].str.len() == 16).all()


def test_rule_order_decides_the_reason(tmp_path, ray_local):
    """With dedup first, the 2-word first copy of the duplicate group is kept by dedup and dropped by basic,
    and the other copies are duplicates."""
    shards, _ = crafted()
    crawl = write_crawl(tmp_path, shards)
    _, ledger, _, _ = run_curate(tmp_path, crawl, rules=["dedup_image", "basic"], shard_rows=100)
    first = ledger[(ledger["shard"] == 0) & (ledger["row"].isin([10, 11, 12]))]
    assert first["reason"].tolist() == ["caption_words", "duplicate_image", "duplicate_image"]


def test_shards_by_bytes_stay_within_bounds(tmp_path, ray_local):
    rows = [row(seed=1000 + i) for i in range(40)]
    crawl = write_crawl(tmp_path, [rows[:15], rows[15:22], rows[22:]])
    sizes = [len(r["image"]) for r in rows]
    target = 4 * int(np.mean(sizes))
    result, ledger, curated, _ = run_curate(tmp_path, crawl, rules=["basic"], shard_bytes=target)
    assert ledger["kept"].all() and len(curated) == 40
    per_shard = [pd.read_parquet(tmp_path / "curate" / s["path"])["image"].map(len).sum() for s in result.shards]
    assert len(per_shard) >= 8
    assert all(abs(b - target) <= max(sizes) for b in per_shard[:-1]), (per_shard, target)
    assert per_shard[-1] <= target + max(sizes)
    assert curated["uid"].tolist() == [r for r in ledger["uid"]]


def test_clip_score_threshold_and_top_fraction_match_pandas(tmp_path, ray_local):
    rows = [row(f"{GOOD} number {i}", seed=300 + i) for i in range(30)]
    rows += [row(f"{GOOD} number 0", image=rows[0]["image"], url=f"http://127.0.0.1/tie{i}.jpg") for i in range(3)]
    crawl = write_crawl(tmp_path, [rows[:12], rows[12:]])
    model = {"arch": "clip-tiny", "seed": 3}
    _, scored, _, _ = run_curate(tmp_path, crawl, "scores", rules=["clip_score"], clip_score={"model": model},
                                 shard_rows=100)
    assert scored["kept"].all() and scored["clip_score"].notna().all()
    assert scored["clip_score"].nunique() == 30  # the three copies of row 0 tie with it

    t = float(scored["clip_score"].median())
    _, by_t, _, _ = run_curate(tmp_path, crawl, "threshold", rules=["clip_score"],
                               clip_score={"model": model, "threshold": t}, shard_rows=100)
    assert by_t["kept"].tolist() == (scored["clip_score"] >= t).tolist()
    assert set(by_t.loc[~by_t["kept"], "reason"]) == {"clip_score"}

    # the cutoff falls inside the tie: ties are taken in input order
    order = scored.sort_values(["clip_score", "shard", "row"], ascending=[False, True, True]).reset_index()
    rank_of_tie = order.index[order["clip_score"] == scored.loc[0, "clip_score"]].min()
    for k in (rank_of_tie + 2, 5, 33):
        fraction = k / len(scored)
        expected = set(order.head(math.ceil(len(scored) * fraction - 1e-9))["index"])
        result, top, _, _ = run_curate(tmp_path, crawl, f"top{k}", rules=["clip_score"],
                                       clip_score={"model": model, "top_fraction": fraction}, shard_rows=100)
        assert set(top.index[top["kept"]]) == expected, k
        assert result.metrics["clip_score_cutoff"] == pytest.approx(order.loc[len(expected) - 1, "clip_score"])


def test_decontamination_and_language(tmp_path, ray_local):
    eval_imgs = [smooth_image(500), smooth_image(501)]
    pq.write_table(pa.table({"img": eval_imgs, "label": [0, 1]}), tmp_path / "eval.parquet")
    rows = [row(image=smooth_image(500, jitter=1)), row(image=eval_imgs[1]), row(seed=502), row(seed=503),
            row("une photo d'une petite maison rouge au bord de la mer", seed=504),
            row("ein Foto von einem kleinen roten Haus am Meer", seed=505)]
    crawl = write_crawl(tmp_path, [rows])
    _, ledger, _, _ = run_curate(
        tmp_path, crawl, rules=["decontaminate", "language"], shard_rows=10,
        decontaminate={"sets": [{"name": "heldout", "path": str(tmp_path / "eval.parquet"), "image_column": "img"}],
                       "max_distance": 4})
    assert ledger["reason"].fillna("kept").tolist() == ["contaminated", "contaminated", "kept", "kept",
                                                        "language", "language"]
    assert ledger["contaminated_by"].tolist()[:2] == ["heldout", "heldout"]
    assert ledger["eval_distance"].iloc[1] == 0
    assert ledger["language"].tolist()[2:] == ["en", "en", "fr", "de"]


def test_funnel_and_charts_in_mlflow(tmp_path, ray_local):
    shards, expected = crafted()
    crawl = write_crawl(tmp_path, shards)
    _, _, _, (tracker, child) = run_curate(tmp_path, crawl, rules=RULES, shard_rows=3)
    artifacts = {a.path for a in tracker.client.list_artifacts(child.run_id)}
    assert {"curate_funnel.png", "curate_histograms.png"} <= artifacts


def test_config_errors_are_clear(tmp_path):
    from pipelines.spec import SpecError, load

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nstages:\n  c:\n    uses: curate\n    with:\n      rules: [basic, typo]\n")
    with pytest.raises(SpecError, match=r"bad.yaml: stages.c.with.rules\[1\]: expected one of"):
        load(bad)
    bad.write_text("name: t\nstages:\n  c:\n    uses: curate\n    with:\n      clip_score: {threshold: 0.2, top_fraction: 0.5}\n")
    with pytest.raises(SpecError, match="give threshold or top_fraction, not both"):
        load(bad)
    bad.write_text("name: t\nstages:\n  c:\n    uses: curate\n    with:\n      rules: [decontaminate]\n")
    with pytest.raises(SpecError, match="decontaminate.sets names no evaluation set"):
        load(bad)


def test_an_undecodable_image_scores_nan_instead_of_failing_the_pool():
    from pipelines.models import ModelRef
    from pipelines.stages.curate.scorer import ClipScorer

    scorer = ClipScorer(ModelRef(arch="clip-tiny"), batch_size=2, threads=1)
    scores = scorer.scores([smooth_image(1), b"\xff\xd8 not a jpeg", smooth_image(2)], [GOOD, GOOD, GOOD])
    assert np.isnan(scores[1]) and np.isfinite(scores[[0, 2]]).all()
