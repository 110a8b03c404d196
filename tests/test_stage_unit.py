"""Stages as units: `stage.run(ctx, inputs)` called directly, with a StageContext built by hand (no runner, no
cache, no MLflow server: the tracker is a real `Tracker` on a sqlite file in tmp_path), and the StageResult
checked against the files the stage wrote."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from pipelines import configschema, storage
from pipelines.contracts import CRAWLED, uid
from pipelines.demo.server import url_list
from pipelines.stage import Stage, StageContext, StageResult
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.stages.crawl.stage import CrawlStage
from pipelines.stages.ingest.config import IngestConfig
from pipelines.stages.ingest.stage import IngestStage
from pipelines.tracking import StageTracker, Tracker


def _context(tmp_path: Path, stage: str, uses: str) -> tuple[StageContext, Tracker, StageTracker]:
    """A stage run under a job run in tmp_path/mlflow.db, output in tmp_path/<stage>."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "unit", str(tmp_path))
    tracker.start_job("unit", {}, {})
    child = tracker.start_stage("unit", stage, uses, "0" * 16, {})
    ctx = StageContext(job="unit", stage=stage, output=str(tmp_path / stage), tracker=child,
                       log=logging.getLogger(f"clipline.test.{stage}"), progress=False)
    return ctx, tracker, child


def _shards(ctx: StageContext, result: StageResult) -> list[pd.DataFrame]:
    """Each shard the result lists, read back, after checking its record (rows, bytes, sha256) against the file."""
    frames = []
    for shard in result.shards:
        url = storage.join(ctx.output, shard["path"])
        assert pq.ParquetFile(url).metadata.num_rows == shard["rows"]
        assert Path(url).stat().st_size == shard["bytes"] and storage.sha256_file(url) == shard["sha256"]
        frames.append(pq.read_table(url).to_pandas())
    return frames


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def test_the_ingest_stage_run_alone_writes_crawled_shards_of_every_pair(tmp_path):
    sizes = [(40 + i, 30 + 2 * i) for i in range(7)]
    pairs = pd.DataFrame({"image": [_jpeg(i, s) for i, s in enumerate(sizes)],
                          "caption": [f"picture number {i}" for i in range(7)]})
    source = tmp_path / "pairs.parquet"
    pairs.to_parquet(source)
    stage: Stage = IngestStage(configschema.build(IngestConfig, {"path": str(source), "shard_rows": 3}))
    ctx, _, _ = _context(tmp_path, "ingest", "ingest")

    result = stage.run(ctx, {})

    assert [s["path"] for s in result.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [s["rows"] for s in result.shards] == [3, 3, 1]
    assert result.counts == {"input_rows": 7, "success": 7}
    frames = _shards(ctx, result)
    assert all(f.columns.tolist() == CRAWLED.names for f in frames)
    out = pd.concat(frames, ignore_index=True)
    assert out["caption"].tolist() == pairs["caption"].tolist()
    assert out["image"].tolist() == pairs["image"].tolist()  # the bytes as given, not re-encoded
    assert set(out["status"]) == {"success"} and set(out["image_format"]) == {"jpg"}
    assert list(zip(out["width"], out["height"], strict=True)) == sizes
    assert out["source_row"].tolist() == list(range(7))
    assert all(u == uid(url, cap) for u, url, cap in zip(out["uid"], out["url"], out["caption"], strict=True))
    assert out["uid"].is_unique
    assert out["sha256"].tolist() == [storage.sha256_bytes(b) for b in pairs["image"]]


def test_the_crawl_stage_run_alone_fetches_the_loopback_web_and_reports_to_its_tracker(tmp_path, web, ray_local):
    rows = url_list(web.base_url, 20, faults={"missing": 0.2, "html": 0.2})
    rows.to_parquet(tmp_path / "urls.parquet")
    expected = rows["kind"].map({"img": "success", "missing": "failed_to_download", "html": "failed_to_resize"})
    assert set(expected) == {"success", "failed_to_download", "failed_to_resize"}  # the faults are in the list
    stage: Stage = CrawlStage(configschema.build(CrawlConfig, {
        "input": str(tmp_path / "urls.parquet"), "allow_networks": ["127.0.0.0/8"], "image_size": 32,
        "samples_per_shard": 8, "threads": 4, "timeout": 2}))
    ctx, tracker, child = _context(tmp_path, "crawl", "crawl")

    result = stage.run(ctx, {})

    assert [s["rows"] for s in result.shards] == [8, 8, 4]
    out = pd.concat(_shards(ctx, result), ignore_index=True).sort_values("source_row", ignore_index=True)
    assert out["source_row"].tolist() == list(range(20))  # every input row once
    assert out["status"].tolist() == expected.tolist()
    assert out["url"].tolist() == rows["url"].tolist()
    ok = out[out["status"] == "success"]
    assert all(Image.open(io.BytesIO(b)).size == (32, 32) for b in ok["image"])
    assert out.loc[out["status"] != "success", "image"].isna().all()
    by_status = expected.value_counts().to_dict()
    assert {k: result.counts[k] for k in by_status} == by_status
    assert result.counts["input_rows"] == 20
    # what it reported went to the tracker it was handed: the stage run in the sqlite store
    run = tracker.client.get_run(child.run_id)
    assert run.data.metrics["crawl/success"] == by_status["success"]
    assert "crawl_status.png" in {a.path for a in tracker.client.list_artifacts(child.run_id)}
