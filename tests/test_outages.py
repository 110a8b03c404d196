"""Outages: the MLflow server down at start or lost mid-stage, storage unwritable or full, Ray not answering.

The tracking server is a real `mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts; the job
runs as `python -m pipelines.cli run` in its own process, as a scheduler would start it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from pipelines import cli, spool, storage
from pipelines.demo.server import DemoServer
from tests.conftest import REPO, crawl_stage, write_job
from tests.support.cli import run_cli
from tests.support.net import free_port, http_ok, wait_until


@contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over root/mlflow.db and root/artifacts, until the block ends."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"mlflow-{port}.log").open("a") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", (root / "artifacts").as_uri()],
            cwd=root, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{uri}/health"), 120, f"mlflow server on {uri}", interval=0.3,
                   alive=lambda: proc.poll() is None,
                   detail=lambda: (root / f"mlflow-{port}.log").read_text()[-3000:])
        yield uri
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker, gone at once, as in a crash
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_a_tracking_server_down_at_start_fails_before_any_work_and_names_it(tmp_path, web, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": [web.url("img", 0)], "caption": ["a picture"]}).to_csv(urls, index=False)
    job = write_job(tmp_path, {"crawl": crawl_stage(str(urls))}, tracking={"uri": uri})
    t0 = time.monotonic()
    assert cli.main(["run", str(job)]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"MLflow tracking server {uri} does not answer" in err and "nothing was run" in err
    assert "tracking.required: false" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 30  # the health check answers at once, not MLflow's minutes of retries
    assert not (tmp_path / "store" / "t").exists()  # no stage started


@pytest.mark.slow
def test_tracking_not_required_spools_the_whole_run_and_replay_sends_it(tmp_path, web, ray_local, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": [web.url("img", i) for i in range(6)] + [web.url("missing", 0)],
                  "caption": [f"picture {i}" for i in range(7)]}).to_csv(urls, index=False)
    job = write_job(tmp_path, {"crawl": crawl_stage(str(urls))}, tracking={"uri": uri, "required": False})
    assert cli.main(["run", "--no-progress", str(job)]) == 0
    err = capsys.readouterr().err
    directory = spool.default_dir(str(tmp_path / "store"))
    assert f"MLflow at {uri} is not taking writes" in err and directory in err and "clipline replay" in err
    waiting = spool.pending(directory)
    assert len(waiting) == 1 and sum(waiting.values()) >= 8  # experiment-less runs, params, metrics, artifact, ends

    with mlflow_server(tmp_path / "server", int(uri.rsplit(":", 1)[1])):
        assert cli.main(["replay", str(job)]) == 0
        out = capsys.readouterr().out
        assert f"-> {uri}: sent {sum(waiting.values())} records from 1 files" in out
        assert cli.main(["replay", str(job)]) == 0  # sent once: a second replay has nothing to do
        assert "nothing to replay" in capsys.readouterr().out

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "t"]
        runs = {r.data.tags.get("clipline.stage") or r.data.tags["clipline.job"]: r for r in client.search_runs([exp.experiment_id])}
        assert set(runs) == {"t", "crawl"}
        parent, crawl = runs["t"], runs["crawl"]
        assert crawl.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert parent.info.status == crawl.info.status == "FINISHED"
        assert crawl.data.metrics["crawl/rows"] == 7 and crawl.data.metrics["crawl/success"] == 6
        assert crawl.data.params["input"].endswith("urls.csv\"]")
        assert [a.path for a in client.list_artifacts(crawl.info.run_id, "manifest")] == ["manifest/_manifest.json"]


@pytest.mark.slow
def test_a_tracking_server_lost_mid_stage_spools_the_rest_and_replay_completes_the_run(tmp_path):
    """The server is killed while the crawl waits on a held request; the crawl finishes, its writes go to the
    spool, and once the server is back the replay makes the run whole: params from before, metrics after."""
    server_root = tmp_path / "server"
    server_root.mkdir()
    port = free_port()
    with DemoServer(port=0, seed=0, slow_seconds=120) as web:
        urls = tmp_path / "urls.csv"
        rows = [web.url("img", i) for i in range(8)] + [web.url("slow", 0)]
        pd.DataFrame({"url": rows, "caption": [f"picture {i}" for i in range(9)]}).to_csv(urls, index=False)
        job = write_job(tmp_path, {"crawl": crawl_stage(str(urls), timeout=120)},
                        tracking={"uri": f"http://127.0.0.1:{port}"}, ray={"num_cpus": 2})
        with mlflow_server(server_root, port) as uri:
            proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "--no-progress", str(job)],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                with web.lock:  # the crawl is mid-stage: it is waiting on the held request
                    assert web.changed.wait_for(lambda: web.hits.get("/slow/0", 0) >= 1 or proc.poll() is not None,
                                                timeout=300), "the crawl never asked for /slow/0"
                assert proc.poll() is None, proc.communicate()
            except BaseException:
                proc.kill()
                raise
        # the server is gone (SIGKILL on leaving the block); now let the crawl finish
        web.release.set()
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()  # its local Ray ends with it (Ray's children get the parent-death signal)
    assert proc.returncode == 0, err[-3000:]
    assert f"MLflow at {uri} is not taking writes" in err and "clipline replay" in err, err[-3000:]
    directory = spool.default_dir(str(tmp_path / "store"))
    assert sum(spool.pending(directory).values()) > 0
    manifest_rows = out.split()
    assert "crawl" in manifest_rows and "ran" in manifest_rows

    with mlflow_server(server_root, port):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "t"]
        (before,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "crawl"]
        assert before.info.status == "RUNNING" and "crawl/rows" not in before.data.metrics  # the server missed these
        result = run_cli("replay", job, timeout=120)
        assert result.returncode == 0, result.stderr
        runs = {r.data.tags.get("clipline.stage") or r.data.tags["clipline.job"]: r for r in client.search_runs([exp.experiment_id])}
        assert set(runs) == {"t", "crawl"}  # the spooled writes landed in the runs created before the outage
        crawl = runs["crawl"]
        assert crawl.info.run_id == before.info.run_id and crawl.info.status == "FINISHED"
        assert runs["t"].info.status == "FINISHED"
        assert crawl.data.params["input"].endswith("urls.csv\"]")  # logged before the outage
        assert crawl.data.metrics["crawl/rows"] == 9 and crawl.data.metrics["crawl/success"] == 9
        assert [a.path for a in client.list_artifacts(crawl.info.run_id, "manifest")] == ["manifest/_manifest.json"]


def _offline_run(spool_dir: Path, tmp_path: Path) -> str:
    """A run written wholly to a spool (the client offline from the start): 3 steps, an artifact, 1 step, the end."""
    from mlflow.entities import Metric

    client = spool.SpoolingClient("http://127.0.0.1:9", str(spool_dir), offline=True, why="a test")  # never called
    run_id = client.create_run(spool.OFFLINE + "experiment:e", run_name="r", tags={"clipline.stage": "crawl"}).info.run_id
    client.log_batch(run_id, metrics=[Metric("m", float(i), 0, i) for i in (1, 2, 3)])
    (tmp_path / "a.txt").write_text("the artifact")
    client.log_artifact(run_id, str(tmp_path / "a.txt"))
    client.log_batch(run_id, metrics=[Metric("m", 4.0, 0, 4)])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_a_replay_cut_short_resumes_where_it_stopped_and_sends_each_record_once(tmp_path, capsys):
    from mlflow import MlflowClient

    spool_dir, uri = tmp_path / "spool", f"sqlite:///{tmp_path}/mlflow.db"
    _offline_run(spool_dir, tmp_path)
    copied = next((spool_dir / "files").rglob("a.txt"))
    copied.rename(copied.with_suffix(".gone"))  # the artifact's copy is missing: the replay stops at it
    assert cli.main(["replay", "--spool", str(spool_dir), "--uri", uri]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"replay of {spool_dir} stopped: FileNotFoundError" in err and "run it again" in err
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "e"]
    (run,) = client.search_runs([exp.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "m")] == [1, 2, 3]
    assert run.info.status == "RUNNING" and sum(spool.pending(str(spool_dir)).values()) == 3

    copied.with_suffix(".gone").rename(copied)
    assert cli.main(["replay", "--spool", str(spool_dir), "--uri", uri]) == 0
    assert "sent 3 records from 1 files (log_artifact=1, log_batch=1, set_terminated=1)" in capsys.readouterr().out
    (run,) = client.search_runs([exp.experiment_id])  # the run was not created twice
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "m")) == [1, 2, 3, 4]
    assert run.info.status == "FINISHED" and run.info.start_time <= run.info.end_time  # the offline start kept
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["a.txt"]
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()  # beside the database, not in the cwd
    assert spool.pending(str(spool_dir)) == {}


def test_a_job_that_finds_a_spool_and_a_server_that_answers_replays_it_first(tmp_path):
    """Before it writes anything, so a stage run it continues is not then overwritten by its older, spooled end;
    a stage directory's offline run id leads to the run the replay created."""
    from pipelines.tracking import Tracker

    spool_dir = tmp_path / "spool"
    offline_id = _offline_run(spool_dir, tmp_path)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "e", str(tmp_path / "store"), spool=str(spool_dir))
    assert spool.pending(str(spool_dir)) == {}
    real = spool.real_id(str(spool_dir), offline_id)
    assert real and tracker.client.get_run(real).info.status == "FINISHED"
    tracker.start_job("j", {}, {})
    marker = tmp_path / "_mlflow_run.json"
    marker.write_text(json.dumps({"mlflow_run_id": offline_id}))
    resumed = tracker.resume_stage(str(marker), "crawl")
    assert resumed is not None and resumed.run_id == real
    assert tracker.client.get_run(real).data.tags["clipline.attempts"] == "2"


def test_storage_that_cannot_be_created_is_an_error_naming_the_path(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/x.jpg,a\n")
    job = write_job(tmp_path, {"crawl": crawl_stage(str(urls))})
    assert cli.main(["run", "--storage", str(tmp_path / "file" / "store"), str(job)]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"storage '{tmp_path / 'file' / 'store'}'" in err and "Not a directory" in err and "Traceback" not in err


def test_a_write_that_fails_names_the_path_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out" / "shard.parquet"
    target.mkdir(parents=True)  # the final rename onto a directory fails after the temp file was written
    with pytest.raises(storage.StorageError, match=rf"cannot write {target} \(3 bytes\): Is a directory"):
        storage.atomic_write(str(target), b"abc")
    assert [p.name for p in target.parent.iterdir()] == ["shard.parquet"]  # the temp file is gone


@pytest.mark.slow
def test_full_storage_fails_the_stage_with_an_error_naming_the_path(tmp_path, web):
    """Storage on a 64 KiB tmpfs (mounted in a private mount namespace of the job's process): the crawl's
    shards do not fit."""
    store = tmp_path / "store"
    store.mkdir()
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": [web.url("img", i) for i in range(200)],
                  "caption": [f"picture {i}" for i in range(200)]}).to_csv(urls, index=False)
    job = write_job(tmp_path, {"crawl": crawl_stage(str(urls), image_size=64)},
                    tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"})
    mount = f"mount -t tmpfs -o size=64k tmpfs {store} && exec {sys.executable} -m pipelines.cli run --no-progress {job}"
    full = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == cli.EXIT_STAGE_FAILED, full.stderr[-3000:]
    assert "stage 'crawl' failed" in full.stderr and "No space left on device" in full.stderr, full.stderr[-3000:]
    assert f"cannot write {store}/t/crawl/" in full.stderr and "Traceback" not in full.stderr


# Every operation's record as clipline has written it to a spool since spooling began (ids, times and the copies'
# folder names aside): the spool format a replay must keep reading, whatever the code that writes it becomes.
SPOOLED = [
    {"op": "create_run", "run_id": "offline-p1", "experiment_id": "offline-experiment:e", "run_name": "job",
     "tags": {"a": "1"}, "start_time": 1796253842827},
    {"op": "create_run", "run_id": "offline-c1", "experiment_id": "offline-experiment:e", "run_name": "st",
     "tags": {"mlflow.parentRunId": "offline-p1"}, "start_time": 1796253842827},
    {"op": "log_batch", "run_id": "offline-c1", "metrics": [["m", 1.5, 7, 2]], "params": [["p", "v"]],
     "tags": [["t", "u"]]},
    {"op": "set_tag", "run_id": "offline-c1", "key": "mlflow.parentRunId", "value": "offline-p1"},
    {"op": "set_tag", "run_id": "offline-c1", "key": "k", "value": "3"},
    {"op": "delete_tag", "run_id": "offline-c1", "key": "clipline.error"},
    {"op": "update_run", "run_id": "offline-c1", "status": "RUNNING", "name": None},
    {"op": "log_inputs", "run_id": "offline-c1", "datasets": [
        {"name": "n", "digest": "d", "source_type": "clipline", "source": "{\"uri\": \"x\"}", "profile": "{}",
         "tags": [["mlflow.data.context", "train"]]}]},
    {"op": "log_artifact", "run_id": "offline-c1", "artifact_path": "sub", "file": "files/000000000001/a.md"},
    {"op": "log_artifact", "run_id": "offline-c1", "artifact_path": "dir", "file": "files/000000000002/f.txt"},
    {"op": "log_artifact", "run_id": "offline-c1", "artifact_path": None, "file": "files/000000000003/fig.png"},
    {"op": "set_terminated", "run_id": "offline-c1", "status": "FINISHED", "end_time": 123},
]


def test_every_spooled_operation_keeps_the_record_format_a_replay_reads(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    client = spool.SpoolingClient("http://127.0.0.1:9", str(tmp_path / "spool"), offline=True, why="a test")
    parent = client.create_run(spool.OFFLINE + "experiment:e", run_name="job", tags={"a": "1"}).info.run_id
    run = client.create_run(spool.OFFLINE + "experiment:e", run_name="st",
                            tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_batch(run, metrics=[Metric("m", 1.5, 7, 2)], params=[Param("p", "v")], tags=[RunTag("t", "u")])
    client.set_tag(run, "mlflow.parentRunId", parent)
    client.set_tag(run, "k", 3)
    client.delete_tag(run, "clipline.error")
    client.update_run(run, status="RUNNING")
    ds = Dataset(name="n", digest="d", source_type="clipline", source='{"uri": "x"}', profile="{}")
    client.log_inputs(run, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", "train")])])
    client.log_text(run, "hello", "sub/a.md")
    (tmp_path / "f.txt").write_text("file")
    client.log_artifact(run, str(tmp_path / "f.txt"), "dir")
    fig, _ = plt.subplots()
    client.log_figure(run, fig, "fig.png")
    plt.close(fig)
    client.set_terminated(run, status="FINISHED", end_time=123)

    names = {parent: "offline-p1", run: "offline-c1"}
    written = [json.loads(line) for line in Path(client.path).read_text().splitlines()]
    for i, rec in enumerate(written):
        assert isinstance(rec.pop("t"), float)
        text = json.dumps(rec)
        for real, name in names.items():
            text = text.replace(real, name)
        rec = json.loads(text)
        if "start_time" in rec:
            rec["start_time"] = SPOOLED[i]["start_time"]
        if "file" in rec:
            assert (tmp_path / "spool" / rec["file"]).is_file()
            rec["file"] = SPOOLED[i]["file"].rsplit("/", 1)[0] + "/" + rec["file"].rsplit("/", 1)[1]
        assert rec == SPOOLED[i]
    assert len(written) == len(SPOOLED)


def test_a_spool_in_the_format_of_earlier_versions_replays(tmp_path):
    from mlflow import MlflowClient

    spool_dir, uri = tmp_path / "spool", f"sqlite:///{tmp_path}/mlflow.db"
    for rec in SPOOLED:
        if "file" in rec:
            (spool_dir / rec["file"]).parent.mkdir(parents=True)
            (spool_dir / rec["file"]).write_text(rec["file"])
    lines = [json.dumps({"t": 1796253842.8 + i / 1000, **rec}) for i, rec in enumerate(SPOOLED)]
    (spool_dir / "20261202T232402-host-1-abcdef.jsonl").write_text("\n".join(lines) + "\n")
    counts = spool.replay(str(spool_dir), uri)
    assert counts == {"create_run": 2, "log_batch": 1, "set_tag": 2, "delete_tag": 1, "update_run": 1,
                      "log_inputs": 1, "log_artifact": 3, "set_terminated": 1}
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "e"]
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    job, st = runs["job"], runs["st"]
    assert st.data.tags["mlflow.parentRunId"] == job.info.run_id and st.data.tags["k"] == "3"
    assert st.data.tags["t"] == "u" and job.data.tags["a"] == "1" and st.data.params == {"p": "v"}
    assert [(m.value, m.timestamp, m.step) for m in client.get_metric_history(st.info.run_id, "m")] == [(1.5, 7, 2)]
    assert st.info.status == "FINISHED" and st.info.end_time == 123 and st.info.start_time == 1796253842827
    assert [(d.dataset.name, d.dataset.digest) for d in st.inputs.dataset_inputs] == [("n", "d")]
    assert sorted(a.path for a in client.list_artifacts(st.info.run_id)) == ["dir", "fig.png", "sub"]
    assert [a.path for a in client.list_artifacts(st.info.run_id, "sub")] == ["sub/a.md"]
    assert spool.pending(str(spool_dir)) == {} and spool.real_id(str(spool_dir), "offline-c1") == st.info.run_id
