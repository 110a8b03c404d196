"""Storage on an object store: a whole job on the moto S3 server on 127.0.0.1, and what a killed or failing
writer leaves there.

The store is found through the environment only (AWS_ENDPOINT_URL and credentials, put there by the `s3`
fixture); the job spec names nothing but `storage: s3://bucket/prefix`.  Every check of what is in the bucket
lists keys through the server itself (S3Server.keys), not through the code under test.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import cli, manifest, spec, storage
from pipelines.demo.server import DemoServer, url_list
from pipelines.runner import Selection, _clean_temp, plan, run_job
from pipelines.stage import Stage
from tests.conftest import REPO, crawl_stage
from tests.support.cli import run_cli
from tests.support.net import wait_until

BUCKET = "clipline-jobs"


def _put(s3, key: str, frame_or_table) -> str:
    buf = io.BytesIO()
    if isinstance(frame_or_table, pd.DataFrame):
        frame_or_table.to_parquet(buf)
    else:
        pq.write_table(frame_or_table, buf)
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())
    return f"s3://{BUCKET}/{key}"


def _job(tmp_path: Path, name: str, prefix: str, stages: dict, **top) -> Path:
    spec_ = {"name": name, "storage": f"s3://{BUCKET}/{prefix}", "ray": {"num_cpus": 2},
             "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "stages": stages, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_, sort_keys=False))
    return path


def _prefix(url: str) -> str:
    return url.removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"


_FRESH = Stage.__dict__["code_version"]  # reads the stage's files on every call


@pytest.fixture(scope="module")
def frozen_code():
    """Each stage's code version computed once for the module: it digests the source files, and other work in
    a shared checkout edits them while the job runs, which would rightly make the second run a cache miss."""
    seen: dict[type, str] = {}

    def frozen(cls) -> str:
        if cls not in seen:
            seen[cls] = _FRESH.__func__(cls)
        return seen[cls]

    Stage.code_version = classmethod(frozen)
    yield
    Stage.code_version = _FRESH


@pytest.fixture
def fresh_code(monkeypatch):
    """Code versions read from the files again: for a test whose job also runs in a `clipline` subprocess."""
    monkeypatch.setattr(Stage, "code_version", _FRESH)


@pytest.fixture(scope="module")
def s3_job(s3, web, ray_s3, frozen_code, tmp_path_factory):
    """crawl -> curate -> train -> evaluate, and an ingest, all on s3://clipline-jobs/store, run twice."""
    from pipelines.evaluation import datasets

    tmp = tmp_path_factory.mktemp("s3job")
    s3.bucket(BUCKET)
    urls = _put(s3, "inputs/urls.parquet", url_list(web.base_url, 80))
    data = datasets.builtin("demo_heldout", limit=24)
    evalset = _put(s3, "inputs/eval.parquet", pa.table({"jpg": data.images, "cls": data.labels, "txt": data.captions}))
    pairs = _put(s3, "inputs/pairs.parquet", pa.table({"jpg": data.images[:10], "txt": [c[0] for c in data.captions[:10]]}))
    path = _job(tmp, "s3job", "store", {
        "crawl": crawl_stage(urls, samples_per_shard=40),
        "curate": {"uses": "curate", "needs": ["crawl"],
                   "with": {"rules": ["basic", "dedup_image"], "basic": {"min_side": 32}, "shard_rows": 40}},
        "train": {"uses": "train", "needs": ["curate"],
                  "with": {"model": {"arch": "clip-tiny"}, "workers": 2, "cpus_per_worker": 0.5, "batch_size": 8,
                           "steps": 4, "checkpoint_every": 2, "warmup": 1}},
        "evaluate": {"uses": "evaluate", "needs": ["train"],
                     "with": {"datasets": [{"name": "shapes", "path": evalset, "image_column": "jpg",
                                            "label_column": "cls", "caption_column": "txt",
                                            "classnames": data.classnames}]}},
        "pairs": {"uses": "ingest", "with": {"path": pairs, "image_column": "jpg", "caption_column": "txt",
                                             "image_size": 16}},
    })
    first = run_job(spec.load(path), progress=False)
    keys_after_first = {k: s3.client().head_object(Bucket=BUCKET, Key=k)["ETag"] for k in s3.keys(BUCKET, "store/")}
    second = run_job(spec.load(path), progress=False)
    return {"path": path, "tmp": tmp, "first": {o.stage: o for o in first}, "second": {o.stage: o for o in second},
            "keys_after_first": keys_after_first}


@pytest.mark.slow
def test_every_stage_writes_its_output_and_manifest_to_the_bucket(s3, s3_job):
    first = s3_job["first"]
    assert {n: o.state for n, o in first.items()} == dict.fromkeys(["crawl", "curate", "train", "evaluate", "pairs"],
                                                                   "ran")
    keys = s3.keys(BUCKET, "store/")
    for name, o in first.items():
        m = o.manifest
        assert m.location == f"s3://{BUCKET}/store/s3job/{name}/{o.fingerprint}"
        here = [k.removeprefix(_prefix(m.location)) for k in keys if k.startswith(_prefix(m.location))]
        assert manifest.MANIFEST in here
        assert {s["path"] for s in m.shards} <= set(here), name
    assert first["crawl"].manifest.rows == 80 and first["crawl"].manifest.counts["success"] == 80
    assert first["curate"].manifest.counts["rows_in"] == 80
    assert first["pairs"].manifest.rows == 10
    assert first["train"].manifest.counts["steps"] == 4
    # Ray Train's checkpoints are in the same bucket, under the train stage's output
    ckpts = {k.rsplit("/", 2)[-2] for k in keys if "/train/" in k and k.endswith("/state.json")}
    assert ckpts == {"checkpoint-00000002", "checkpoint-00000004"}
    assert first["evaluate"].manifest.metrics  # scored the model read back from s3://.../model.safetensors
    assert not [k for k in keys if k.rsplit("/", 1)[-1].startswith(storage.TMP_MARK)]


@pytest.mark.slow
def test_a_second_run_is_all_cache_hits_and_status_shows_every_stage_cached(s3, s3_job, capsys):
    assert {n: o.state for n, o in s3_job["second"].items()} == dict.fromkeys(s3_job["first"], "cached")
    now = {k: s3.client().head_object(Bucket=BUCKET, Key=k)["ETag"] for k in s3.keys(BUCKET, "store/")}
    assert now == s3_job["keys_after_first"]  # nothing rewritten, nothing added
    assert cli.main(["status", str(s3_job["path"])]) == 0  # in this process: the code versions are frozen_code's
    out = capsys.readouterr()
    lines = [ln.split() for ln in out.out.splitlines() if ln and not ln.startswith(" ")]
    rows = {o.stage: o.manifest.rows for o in s3_job["first"].values()}
    assert {ln[0]: (ln[1], ln[2]) for ln in lines} == {n: ("cached", str(r)) for n, r in rows.items()}
    assert "success=80" in out.out
    assert f"s3://{BUCKET}/store/s3job/crawl/" in out.out


@pytest.mark.slow
def test_credentials_stay_in_the_environment(s3, s3_job):
    from mlflow import MlflowClient

    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    client = MlflowClient(tracking_uri=f"sqlite:///{s3_job['tmp']}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for r in runs:
        assert secret not in json.dumps({**r.data.params, **r.data.tags})
    for k in s3.keys(BUCKET, "store/"):
        if k.endswith((".json", ".yaml")):
            assert secret not in s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read().decode()


@pytest.mark.slow
def test_the_report_is_written_to_the_bucket_with_thumbnails_read_from_it(s3, s3_job):
    from mlflow import MlflowClient

    from pipelines.report import build_report

    job = spec.load(s3_job["path"])
    child = s3_job["first"]["crawl"].manifest.mlflow_run_id  # the first job run: every stage ran in it
    parent = MlflowClient(tracking_uri=f"sqlite:///{s3_job['tmp']}/mlflow.db").get_run(child).data.tags["mlflow.parentRunId"]
    out, run_id = build_report(job, parent, images=8)
    assert run_id == parent
    assert out == f"s3://{BUCKET}/store/s3job/_reports/report-{run_id}.html"
    page = s3.client().get_object(Bucket=BUCKET, Key=_prefix(out).rstrip("/"))["Body"].read().decode()
    assert page.count("data:image/") >= 8  # thumbnails of crawled rows, read from the shards in the bucket
    _, _ = build_report(job, parent, images=0, out_dir=f"s3://{BUCKET}/elsewhere")
    assert s3.keys(BUCKET, "elsewhere/") == [f"elsewhere/report-{run_id}.html"]


@pytest.mark.slow
def test_a_train_stage_without_its_manifest_restores_from_the_checkpoints_in_the_bucket(s3, s3_job):
    """A train stage killed after its last checkpoint but before its manifest: the re-run takes the
    checkpoint from the bucket instead of training again, and writes the same weights."""
    from mlflow import MlflowClient

    train = s3_job["second"]["train"].manifest
    s3.client().delete_object(Bucket=BUCKET, Key=_prefix(train.location) + manifest.MANIFEST)
    outcomes = {o.stage: o for o in run_job(spec.load(s3_job["path"]), Selection(only=["train", "evaluate"]),
                                            progress=False)}
    assert outcomes["train"].state == "ran" and outcomes["evaluate"].state == "cached"
    again = outcomes["train"].manifest
    assert again.shards == train.shards and again.digest == train.digest
    run = MlflowClient(tracking_uri=f"sqlite:///{s3_job['tmp']}/mlflow.db").get_run(again.mlflow_run_id)
    assert run.data.tags["clipline.train.restored_from_step"] == "4"


@pytest.mark.slow
def test_a_refresh_of_a_grown_url_list_on_s3_crawls_only_the_new_rows(s3, web, ray_s3, tmp_path):
    s3.bucket(BUCKET)
    rows = url_list(web.base_url, 45)
    urls = _put(s3, "refresh-in/urls.parquet", rows.iloc[:30])
    path = _job(tmp_path, "refresh", "refresh", {"crawl": crawl_stage(urls, samples_per_shard=10)})
    (o1,) = run_job(spec.load(path), progress=False)
    _put(s3, "refresh-in/urls.parquet", rows)  # the list grows: a new ETag, so a new fingerprint
    (o2,) = run_job(spec.load(path), progress=False)
    assert o2.state == "ran" and o2.fingerprint != o1.fingerprint
    assert (o2.manifest.counts["rows_new"], o2.manifest.counts["rows_reused"]) == (15, 30)
    assert o2.manifest.extra["refreshed_from"]["location"] == o1.manifest.location
    assert o2.manifest.rows == 45 and o2.manifest.counts["success"] == 45


_WRITER = textwrap.dedent("""
    import os, pathlib, sys
    import pyarrow as pa
    from pipelines import storage
    directory, flag = sys.argv[1], sys.argv[2]
    storage.write_parquet(storage.join(directory, "part-00000.parquet"), pa.table({"x": [1, 2, 3]}))
    fs, _ = storage.filesystem(directory)

    def hold(request, **_):  # the second part of the big shard's upload: say so, then wait to be killed
        if "partNumber=2" in request.url:
            pathlib.Path(flag).write_text("part 2")
            sys.stdin.read()

    fs.s3.meta.events.register("before-send.s3.UploadPart", hold)
    big = pa.table({"image": [os.urandom(1 << 20) for _ in range(110)]})  # ~110 MB: a multipart upload
    storage.write_parquet(storage.join(directory, "part-00001.parquet"), big, compression="none")
    storage.write_json(storage.join(directory, "_manifest.json"), {"never": "reached"})
""")


def test_a_writer_killed_mid_shard_leaves_no_object_under_a_final_name(s3, tmp_path):
    s3.bucket(BUCKET)
    directory = f"s3://{BUCKET}/killed-writer/crawl/0123456789abcdef"
    script, flag = tmp_path / "writer.py", tmp_path / "flag"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), directory, str(flag)], cwd=REPO, stdin=subprocess.PIPE,
                            stderr=(tmp_path / "writer.log").open("w"))
    try:
        # the writer's own signal
        wait_until(flag.exists, 120, "the writer reaching part 2 of its upload", interval=0.05,
                   alive=lambda: proc.poll() is None, detail=(tmp_path / "writer.log").read_text)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    prefix = _prefix(directory)
    assert s3.keys(BUCKET, prefix) == [prefix + "part-00000.parquet"]
    # the big shard was mid-upload: its first part is on the server, in an upload no listing or read returns
    pending = s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    assert [u["Key"] for u in pending] == [prefix + "part-00001.parquet"]
    # what readers see: no manifest (the runner's cache hit), no part-00001 (the crawl's resume check)
    assert manifest.read(directory) is None
    assert not storage.is_file(f"{directory}/part-00001.parquet")
    assert pq.read_table(io.BytesIO(s3.client().get_object(Bucket=BUCKET, Key=prefix + "part-00000.parquet")["Body"]
                                    .read())).num_rows == 3


@pytest.mark.parametrize("size,event", [(1000, "PutObject"), (110 << 20, "UploadPart")])
def test_a_write_that_fails_half_way_leaves_no_object(s3, size, event):
    s3.bucket(BUCKET)
    url = f"s3://{BUCKET}/failing/part-00000.parquet"
    fs, _ = storage.filesystem(url)

    def fail(request, **_):
        if event == "PutObject" or "partNumber=2" in request.url:
            raise OSError(errno.EIO, "injected: the connection broke")

    fs.s3.meta.events.register(f"before-send.s3.{event}", fail)
    try:
        with pytest.raises(storage.StorageError, match=f"cannot write {url} \\({size} bytes\\)"):
            storage.atomic_write(url, os.urandom(size))
    finally:
        fs.s3.meta.events.unregister(f"before-send.s3.{event}", fail)
    assert s3.keys(BUCKET, "failing/") == []
    assert s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix="failing/").get("Uploads", []) == []


def test_clean_temp_removes_leftover_temp_keys_on_s3(s3):
    """Temp keys from a local-style writer (or an older clipline) are removed before the manifest is written;
    the shards beside them stay."""
    s3.bucket(BUCKET)
    c = s3.client()
    keep = ["clean/st/part-00000.parquet", "clean/st/ledger/part-00000.parquet"]
    junk = [f"clean/st/{storage.TMP_MARK}ab12-part-00001.parquet", f"clean/st/ledger/{storage.TMP_MARK}cd34-x.json"]
    for k in keep + junk:
        c.put_object(Bucket=BUCKET, Key=k, Body=b"x")
    _clean_temp(f"s3://{BUCKET}/clean/st")
    assert s3.keys(BUCKET, "clean/") == sorted(keep)


def test_remote_storage_without_a_tracking_uri_fails_before_anything_runs(s3, tmp_path):
    s3.bucket(BUCKET)
    path = tmp_path / "j.yaml"
    # a URL list that exists (preflight checks it first): the tracking store is then what is wrong
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a red circle"]}).to_parquet(tmp_path / "u.parquet")
    path.write_text(yaml.safe_dump({"name": "j", "storage": f"s3://{BUCKET}/notrack",
                                    "stages": {"crawl": crawl_stage(str(tmp_path / "u.parquet"))}}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = run_cli("run", path, env=env, timeout=120)
    assert out.returncode != 0
    assert f"storage 's3://{BUCKET}/notrack' is not local" in out.stderr and "set tracking.uri in the job" in out.stderr
    assert s3.keys(BUCKET, "notrack/") == []


@pytest.mark.slow
def test_a_crawl_killed_on_s3_resumes_and_equals_an_uninterrupted_crawl(s3, ray_s3, fresh_code, tmp_path):
    from tests.test_runner import _run_killed_when

    s3.bucket(BUCKET)
    with DemoServer(port=0, slow_seconds=120) as web:
        rows = url_list(web.base_url, 40)
        rows.loc[20:, "url"] = [web.url("slow", i) for i in range(20, 40)]  # shard 1 hangs until released
        urls = _put(s3, "killed-in/urls.parquet", rows)
        stages = {"crawl": crawl_stage(urls, samples_per_shard=20, timeout=60)}
        path = _job(tmp_path, "killed", "killed", stages)
        (row,) = plan(spec.load(path))
        prefix = _prefix(row["path"])
        _run_killed_when(path, lambda: prefix + "part-00000.parquet" in s3.keys(BUCKET, prefix), "shard on S3")
        assert manifest.MANIFEST not in {k.removeprefix(prefix) for k in s3.keys(BUCKET, prefix)}
        assert plan(spec.load(path))[0]["state"] == "incomplete"

        web.release.set()
        (resumed,) = run_job(spec.load(path), progress=False)
        local = tmp_path / "local"
        local.mkdir()
        clean = _job(local, "killed", "unused", stages, storage=str(local / "store"))
        (fresh,) = run_job(spec.load(clean), progress=False)
    assert resumed.state == "ran" and resumed.manifest.metrics["shards_resumed"] >= 1

    def rows_of(m) -> pd.DataFrame:
        frames = []
        for u in m.shard_urls():
            fs, p = storage.filesystem(u)
            with fs.open(p, "rb") as f:
                frames.append(pq.read_table(f).to_pandas())
        cols = ["uid", "url", "caption", "status", "error_class", "sha256", "width", "height", "source_row"]
        return pd.concat(frames)[cols].sort_values("source_row").reset_index(drop=True)

    pd.testing.assert_frame_equal(rows_of(resumed.manifest), rows_of(fresh.manifest))
    assert (rows_of(resumed.manifest)["status"] == "success").all()
    assert not [k for k in s3.keys(BUCKET, prefix) if storage.TMP_MARK in k]
