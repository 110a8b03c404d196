"""The export stage: crawled and curated shards as webdataset tars open_clip trains on, or re-sharded Parquet."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import configschema, spec, storage
from pipelines.contracts import CRAWLED, uid
from pipelines.demo import web
from pipelines.manifest import Manifest
from pipelines.runner import run_job
from pipelines.stage import StageContext, StageResult
from pipelines.stages.export.config import ExportConfig
from pipelines.stages.export.stage import ExportStage
from pipelines.tracking import Tracker
from tests.conftest import REPO, read_output, write_job


def encode(seed: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 40 % 256, 90, 200)).save(out, format=fmt)
    return out.getvalue()


def crawled_row(n: int, caption: str | None = "a red square on a blue field", status: str = "success",
                image: bytes | None = b"", fmt: str | None = "jpg", note: str | None = None) -> dict[str, Any]:
    if image == b"":
        image = encode(n, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(fmt or "jpg", "JPEG"))
    ok = status == "success"
    url = f"http://127.0.0.1/img/{n}.jpg"
    return {"uid": uid(url, caption), "url": url, "caption": caption, "status": status,
            "image": image if ok else None, "image_format": fmt if ok else None,
            "width": 24 if ok else None, "height": 16 if ok else None, "original_width": 48 if ok else None,
            "original_height": 32 if ok else None, "sha256": storage.sha256_bytes(image) if ok and image else None,
            "source": "input.parquet", "source_row": n, "note": note, "score": 0.28 + n / 100}


SCHEMA = pa.schema([*CRAWLED, pa.field("note", pa.string()), pa.field("score", pa.float32())])


def crafted(tmp: Path) -> tuple[Manifest, list[dict[str, Any]]]:
    """Two crawled shards (with a passthrough column and a score) holding every case export skips or keeps."""
    shards = [
        [crawled_row(0, note="kept"), crawled_row(1, status="failed_to_download"),
         crawled_row(2, caption=None),                                                   # no_caption
         crawled_row(3, caption="  "),                                                   # no_caption
         crawled_row(4, image=encode(4, "GIF"), fmt="gif"),                              # image_format (wds only)
         crawled_row(5, fmt="png", note="recaptioned: a red square")],
        [crawled_row(6, image=encode(6, "PNG"), fmt=None),                               # sniffed: png
         crawled_row(7, image=None),                                                     # no_image
         crawled_row(8, status="duplicate"), crawled_row(9, fmt="webp"), crawled_row(10), crawled_row(11)],
    ]
    out = tmp / "crawl"
    out.mkdir(parents=True)
    entries = []
    for i, rows in enumerate(shards):
        path = f"part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / path)
        entries.append({"path": path, "rows": len(rows), "bytes": (out / path).stat().st_size,
                        "sha256": storage.sha256_file(str(out / path))})
    manifest = Manifest(job="t", stage="crawl", uses="crawl", fingerprint="0" * 16, code_version="x", params={},
                        inputs={}, shards=entries, counts={}, metrics={}, started_at="", finished_at="",
                        location=str(out))
    return manifest, [r for rows in shards for r in rows]


def run_export(tmp: Path, upstream: Manifest, name: str = "export", **config: Any) -> tuple[StageContext, StageResult]:
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "t", str(tmp))
    tracker.start_job("t", {}, {})
    child = tracker.start_stage("t", name, "export", "0" * 16, {})
    ctx = StageContext(job="t", stage=name, output=str(tmp / name), tracker=child, log=logging.getLogger(name),
                       progress=False)
    return ctx, ExportStage(configschema.build(ExportConfig, config)).run(ctx, {"crawl": upstream})


def check_records(ctx: StageContext, result: StageResult) -> None:
    for shard in result.shards:
        path = Path(ctx.output) / shard["path"]
        assert path.stat().st_size == shard["bytes"] and storage.sha256_file(str(path)) == shard["sha256"]


def wds_samples(ctx: StageContext, result: StageResult) -> list[dict[str, Any]]:
    import webdataset as wds

    urls = [str(Path(ctx.output) / s["path"]) for s in result.shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


WDS_KEPT = [0, 5, 6, 9, 10, 11]


def test_webdataset_shards_hold_every_exportable_row_and_count_the_rest(tmp_path, ray_local):
    upstream, rows = crafted(tmp_path)
    ctx, result = run_export(tmp_path, upstream, shard_rows=4)

    assert result.counts == {"rows_in": 12, "rows_out": 6, "skipped_duplicate": 1, "skipped_failed_to_download": 1,
                             "skipped_image_format": 1, "skipped_no_caption": 2, "skipped_no_image": 1}
    assert [(s["path"], s["rows"]) for s in result.shards] == [("part-00000.tar", 4), ("part-00001.tar", 2)]
    check_records(ctx, result)
    sizes = json.loads((Path(ctx.output) / "sizes.json").read_text())
    assert sizes == {"part-00000.tar": 4, "part-00001.tar": 2}  # what open_clip_train's get_dataset_size reads
    assert result.extra["train_data"] == "part-{00000..00001}.tar"

    with tarfile.open(Path(ctx.output) / "part-00000.tar") as tf:
        members = tf.getmembers()
    exts = {0: "jpg", 5: "png", 6: "png", 9: "webp"}
    assert [m.name for m in members] == [f"{rows[n]['uid']}.{e}" for n in WDS_KEPT[:4]
                                         for e in sorted([exts[n], "json", "txt"])]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}

    samples = wds_samples(ctx, result)
    assert [s["__key__"] for s in samples] == [rows[n]["uid"] for n in WDS_KEPT]
    for s, n in zip(samples, WDS_KEPT, strict=True):
        assert s[exts.get(n, "jpg")] == rows[n]["image"]  # the stored bytes, not re-encoded
        assert s["txt"].decode() == rows[n]["caption"]
        meta = json.loads(s["json"])
        assert meta["uid"] == rows[n]["uid"] and meta["url"] == rows[n]["url"]
        assert (meta["width"], meta["height"], meta["original_width"]) == (24, 16, 48)
        assert meta["score"] == pytest.approx(0.28 + n / 100) and len(repr(meta["score"])) <= 6  # float32, as written
        assert meta.get("note") == rows[n]["note"]  # passthrough; a null one left out
        assert "image" not in meta and "status" not in meta

    again_ctx, again = run_export(tmp_path, upstream, name="again", shard_rows=4)
    assert again.shards == result.shards  # same rows, same bytes: sha256 and all


def test_parquet_reshards_and_a_caption_column_or_a_missing_one(tmp_path, ray_local):
    upstream, rows = crafted(tmp_path)
    ctx, result = run_export(tmp_path, upstream, format="parquet", shard_rows=3)

    kept = [0, 4, 5, 6, 9, 10, 11]  # the gif is kept: Parquet keeps the bytes as they are
    assert result.counts == {"rows_in": 12, "rows_out": 7, "skipped_duplicate": 1, "skipped_failed_to_download": 1,
                             "skipped_no_caption": 2, "skipped_no_image": 1}
    assert [(s["path"], s["rows"]) for s in result.shards] == [
        ("part-00000.parquet", 3), ("part-00001.parquet", 3), ("part-00002.parquet", 1)]
    check_records(ctx, result)
    out = pd.concat([pq.read_table(Path(ctx.output) / s["path"]).to_pandas() for s in result.shards], ignore_index=True)
    assert pq.read_schema(Path(ctx.output) / "part-00000.parquet").names == SCHEMA.names
    assert out["uid"].tolist() == [rows[n]["uid"] for n in kept]
    assert out["image"].tolist() == [rows[n]["image"] for n in kept]
    assert not (Path(ctx.output) / "sizes.json").exists()

    ctx, result = run_export(tmp_path, upstream, name="notes", caption_column="note", json_columns=False)
    assert result.counts["rows_out"] == 2 and result.counts["skipped_no_caption"] == 7  # 5 rows have no note
    samples = wds_samples(ctx, result)
    assert [s["txt"].decode() for s in samples] == ["kept", "recaptioned: a red square"]
    assert all("json" not in s for s in samples)

    with pytest.raises(ValueError, match="caption_column: 'crawl' has no column 'alt_text'"):
        run_export(tmp_path, upstream, name="bad", caption_column="alt_text")


def test_a_caption_column_the_upstream_does_not_write_fails_when_the_job_is_loaded(tmp_path):
    job = write_job(tmp_path, {
        "ingest": {"uses": "ingest", "with": {"builtin": "digits_train"}},
        "export": {"uses": "export", "needs": ["ingest"], "with": {"caption_column": "alt_text"}},
    })
    with pytest.raises(spec.SpecError, match="stages.export.with.caption_column: reads the column 'alt_text', which "
                                             "stage 'ingest' \\(ingest\\) does not write"):
        spec.load(job)


def demo_pairs(tmp: Path, n: int) -> Path:
    path = tmp / "pairs.parquet"
    pq.write_table(pa.table({"image": [web.encoded(0, i, 32)[0] for i in range(n)],
                             "caption": [web.sample(0, i).caption for i in range(n)]}), path)
    return path


def export_job(tmp: Path, n: int, **export: Any) -> dict[str, Manifest]:
    """ingest -> curate -> export, run by the runner."""
    job = write_job(tmp, {
        "ingest": {"uses": "ingest", "with": {"path": str(demo_pairs(tmp, n)), "shard_rows": 10}},
        "curate": {"uses": "curate", "needs": ["ingest"],
                   "with": {"rules": ["basic", "dedup_image"], "basic": {"min_words": 2, "min_side": 16}}},
        "export": {"uses": "export", "needs": ["curate"], "with": export},
    }, ray={"address": "local"})
    outcomes = run_job(spec.load(job), progress=False)
    return {o.stage: o.manifest for o in outcomes if o.manifest is not None}


def test_a_curated_dataset_exported_by_the_runner_carries_its_scores(tmp_path, ray_local):
    out = export_job(tmp_path, 25, shard_rows=10)
    curated = read_output(out["curate"])
    export = out["export"]
    assert export.counts == {"rows_in": len(curated), "rows_out": len(curated)}
    assert [s["rows"] for s in export.shards] == [10, 10, len(curated) - 20]
    assert export.extra["sizes"] == "sizes.json"

    import webdataset as wds

    samples = list(wds.WebDataset(export.shard_urls(), shardshuffle=False))
    assert [s["__key__"] for s in samples] == curated["uid"].tolist()
    for s, (_, row) in zip(samples, curated.iterrows(), strict=True):
        assert s[row["image_format"]] == row["image"] and s["txt"].decode() == row["caption"]
        meta = json.loads(s["json"])
        assert meta["caption_words"] == len(row["caption"].split()) and meta["phash"] == row["phash"]
        assert "language" not in meta  # a score no rule computed is null, and left out


@pytest.mark.slow
def test_open_clip_train_trains_on_the_export(tmp_path, ray_local):
    """open_clip's own training script, on CPU, reads the export's shards and sizes.json and takes its steps; run
    through clipline's launcher (tiny model configs registered, webdataset's EOF marker off), watched by netaudit."""
    export = export_job(tmp_path, 48, shard_rows=12)["export"]
    assert [s["rows"] for s in export.shards] == [12, 12, 12, 12]
    audit = tmp_path / "audit"
    audit.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "support" / "netaudit"), str(REPO)]),
           "CLIPLINE_NET_AUDIT_DIR": str(audit)}
    args = ["--dataset-type", "webdataset", "--train-data", storage.join(export.location, export.extra["train_data"]),
            "--train-num-samples", "48", "--model", "clip-rn-tiny", "--batch-size", "8", "--epochs", "1",
            "--workers", "1", "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1",
            "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--report-to", "", "--seed", "0",
            "--logs", str(tmp_path / "logs"), "--name", "tiny"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.stages.export.openclip", *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "tiny" / "out.log").read_text()
    steps = [line for line in log.splitlines() if "Train Epoch: 0 [" in line]
    assert len(steps) == 6 and "[48/48 (100%)]" in steps[-1], log[-2000:]  # 48 samples / batch 8, every step logged
    assert all("Contrastive_loss: " in line for line in steps)
    assert (tmp_path / "logs" / "tiny" / "checkpoints" / "epoch_1.pt").is_file()
    assert list(audit.glob("*.started")), "the audit hook did not run"
    assert not list(audit.glob("*.jsonl")), [p.read_text() for p in audit.glob("*.jsonl")]


@pytest.mark.slow
def test_an_export_to_s3_writes_its_tars_and_sizes_json_to_the_bucket(s3, ray_s3, tmp_path):
    bucket = s3.bucket("clipline-export")
    job = write_job(tmp_path, {
        "ingest": {"uses": "ingest", "with": {"path": str(demo_pairs(tmp_path, 10)), "shard_rows": 4}},
        "export": {"uses": "export", "needs": ["ingest"], "with": {"shard_rows": 6}},
    }, storage=f"{bucket}/store", tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"}, ray={"address": "local"})
    export = {o.stage: o.manifest for o in run_job(spec.load(job), progress=False)}["export"]
    assert export is not None and export.counts == {"rows_in": 10, "rows_out": 10}
    prefix = export.location.removeprefix(f"{bucket}/") + "/"
    assert sorted(s3.keys("clipline-export", prefix)) == [
        prefix + k for k in ("_manifest.json", "_mlflow_run.json", "part-00000.tar", "part-00001.tar", "sizes.json")]
    get = s3.client().get_object
    assert json.loads(get(Bucket="clipline-export", Key=prefix + "sizes.json")["Body"].read()) == {
        "part-00000.tar": 6, "part-00001.tar": 4}
    data = get(Bucket="clipline-export", Key=prefix + "part-00001.tar")["Body"].read()
    assert storage.sha256_bytes(data) == export.shards[1]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert len(tf.getnames()) == 3 * 4
