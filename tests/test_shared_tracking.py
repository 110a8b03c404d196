"""A shared tracking server on a real database: the demo job logs over HTTP to `mlflow server` backed by
PostgreSQL, with its artifacts proxied to the moto S3 server, as a cluster's jobs do.

Checked where each piece lands: runs through MLflow's REST API, rows in PostgreSQL's tables, artifact objects in
the bucket, the registered model loaded back through its alias, the run in the server's UI in Chromium.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO
from tests.support.browser import artifacts_dir, chromium, open_runs_table
from tests.support.cli import run_cli
from tests.support.net import free_port

pytestmark = pytest.mark.slow

JOB = "shared"  # the demo job under another name: its registered model is `shared-train`
EXPERIMENT = "clipline-shared-tracking"
MODEL = f"{JOB}-train"
STAGES = ["crawl", "curate", "train", "evaluate"]


def _demo_overrides(server_uri: str) -> list[str]:
    sets = [f"name={JOB}", f"tracking.uri={server_uri}", f"tracking.experiment={EXPERIMENT}",
            # a small demo: 100 images, 1 epoch on one training worker, 30 held-out images to evaluate
            "stages.train.with.workers=1", "stages.train.with.batch_size=16", "stages.train.with.epochs=1",
            "stages.evaluate.with.datasets=[{name: demo_heldout, builtin: demo_heldout, limit: 30}]"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def job(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`clipline demo` with tracking.uri on the server: every stage, the model registration and the
    artifacts go over HTTP; storage stays on local disk."""
    store = tmp_path_factory.mktemp("shared") / "data"
    done = run_cli("demo", "--storage", store, "--images", "100", "--port", str(free_port()), "--no-progress",
                   *_demo_overrides(mlflow_server.uri), timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    locations = dict(re.findall(r"^(\w+)\s+ran\s+.*?\s(/\S+)$", done.stdout, re.MULTILINE))
    assert sorted(locations) == sorted(STAGES), done.stdout
    manifests = {s: json.loads(Path(loc, "_manifest.json").read_text()) for s, loc in locations.items()}
    return {"store": store, "stdout": done.stdout, "stderr": done.stderr, "locations": locations,
            "manifests": manifests}


@pytest.fixture(scope="module")
def runs(mlflow_server, job) -> dict[str, Any]:
    """The experiment and its runs by name, read back from the server over HTTP."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no experiment {EXPERIMENT} on {mlflow_server.uri}"
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    by_name = {r.data.tags.get("clipline.stage") or r.data.tags["clipline.job"]: r for r in found}
    assert len(by_name) == len(found) == 5, [r.info.run_name for r in found]
    return {"client": client, "experiment": exp, "by_name": by_name}


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def test_postgres_and_the_mlflow_server_listen_only_on_loopback(postgres, mlflow_server):
    postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
    pg_listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(postmaster).net_connections("inet")
                    if c.status == psutil.CONN_LISTEN}
    assert pg_listening == {("127.0.0.1", postgres.port)}
    assert Path(postgres.root, f".s.PGSQL.{postgres.port}").is_socket()  # the socket in its own directory
    assert postgres.psql_admin("SHOW listen_addresses;").strip() == "127.0.0.1"

    ml_listening = {(c.laddr.ip, c.laddr.port) for p in _tree(mlflow_server.proc)
                    for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert ml_listening == {("127.0.0.1", mlflow_server.port)}
    # the database password reaches the server in its environment, never on a command line `ps` shows
    assert not [p.cmdline() for p in _tree(mlflow_server.proc) if postgres.password in " ".join(p.cmdline())]


def test_the_server_has_telemetry_off(mlflow_server):
    """MLflow 3 reports usage unless told not to: the server says its telemetry is off (the test and CI markers
    that would also turn it off are kept out of its environment, so this is the switch we set), and every
    connection its processes hold is on loopback."""
    import urllib.request

    with urllib.request.urlopen(f"{mlflow_server.uri}/ajax-api/3.0/mlflow/ui-telemetry", timeout=10) as resp:
        assert json.loads(resp.read())["disable_ui_telemetry"] is True
    req = urllib.request.Request(f"{mlflow_server.uri}/ajax-api/3.0/mlflow/ui-telemetry", method="POST",
                                 data=json.dumps({"records": [{"event_name": "x"}]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "disabled"}
    assert "PYTEST_CURRENT_TEST" not in mlflow_server.env and mlflow_server.env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    remote = {c.raddr.ip for p in _tree(mlflow_server.proc) for c in p.net_connections("inet") if c.raddr}
    assert remote <= {"127.0.0.1", "::ffff:127.0.0.1"}, remote


def test_the_job_run_and_its_stage_runs_are_on_the_server(job, runs):
    by_name = runs["by_name"]
    assert sorted(by_name) == sorted([JOB, *STAGES])
    parent = by_name[JOB]
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["clipline.job"] == JOB
    for stage in STAGES:
        run = by_name[stage]
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (run.data.tags["clipline.stage"], run.data.tags["clipline.cache"]) == (stage, "miss")
        assert run.info.run_id == job["manifests"][stage]["mlflow_run_id"]  # the manifest names the server's run
    assert by_name["crawl"].data.metrics["crawl/input_rows"] == 100
    assert "train/loss" in by_name["train"].data.metrics  # logged from the training worker, over HTTP
    assert "eval/demo_heldout/acc1" in by_name["evaluate"].data.metrics
    # the job wrote nothing of MLflow's next to its data: no sqlite fallback, no local artifacts
    assert not (job["store"] / "mlflow.db").exists() and not (job["store"] / "mlartifacts").exists()
    assert runs["experiment"].artifact_location == f"mlflow-artifacts:/{runs['experiment'].experiment_id}"


def test_the_registered_model_resolves_by_its_alias_and_loads(mlflow_server, job, runs):
    import torch
    from safetensors.torch import load_file

    from pipelines.models import ModelRef, create

    version = runs["client"].get_model_version_by_alias(MODEL, "candidate")
    assert version.run_id == runs["by_name"]["train"].info.run_id
    assert f"model: models:/{MODEL}@candidate" in job["stdout"]
    assert f"Browse the runs at {mlflow_server.uri} (experiment {EXPERIMENT})" in job["stdout"]
    assert "View run" not in job["stdout"]  # MLflow's own per-run links stay out of clipline's summary
    model, _, _ = create(ModelRef(model_uri=f"models:/{MODEL}@candidate"), tracking_uri=mlflow_server.uri)
    trained = load_file(str(Path(job["locations"]["train"], "model.safetensors")))
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def _get(s3, bucket: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_the_artifacts_are_objects_in_the_bucket(s3, mlflow_server, job, runs):
    bucket, prefix = mlflow_server.artifacts_destination.removeprefix("s3://").split("/", 1)
    exp_id = runs["experiment"].experiment_id
    keys = s3.keys(bucket, f"{prefix}/{exp_id}/")  # listed by the S3 server itself
    for stage in STAGES:
        run_id = runs["by_name"][stage].info.run_id
        assert f"{prefix}/{exp_id}/{run_id}/artifacts/manifest/_manifest.json" in keys, stage
    assert f"{prefix}/{exp_id}/{runs['by_name']['crawl'].info.run_id}/artifacts/crawl_status.png" in keys
    weights = [k for k in keys if k.endswith("/artifacts/extra_files/model.safetensors")]
    assert len(weights) == 1 and weights[0].startswith(f"{prefix}/{exp_id}/models/m-"), weights
    assert {weights[0].replace("model.safetensors", "open_clip_config.json"),
            weights[0].replace("extra_files/model.safetensors", "MLmodel")} <= set(keys)
    # byte for byte what the train stage wrote beside its manifest, and the crawl manifest as written
    assert _get(s3, bucket, weights[0]) == Path(job["locations"]["train"], "model.safetensors").read_bytes()
    crawl_id = runs["by_name"]["crawl"].info.run_id
    assert (_get(s3, bucket, f"{prefix}/{exp_id}/{crawl_id}/artifacts/manifest/_manifest.json")
            == Path(job["locations"]["crawl"], "_manifest.json").read_bytes())


def test_the_rows_are_in_postgresql(postgres, job, runs):
    import psycopg2

    exp_id = runs["experiment"].experiment_id
    with psycopg2.connect(**postgres.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, status FROM runs WHERE experiment_id = %s", (int(exp_id),))
        job_run_name = runs["by_name"][JOB].info.run_name  # the job and its UTC start time
        assert job_run_name.startswith(f"{JOB}-")
        assert sorted(cur.fetchall()) == sorted((n, "FINISHED") for n in [job_run_name, *STAGES])
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'crawl/input_rows'",
                    (runs["by_name"]["crawl"].info.run_id,))
        assert cur.fetchone() == (1,)
        cur.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'candidate'", (MODEL,))
        assert cur.fetchone() == (int(runs["client"].get_model_version_by_alias(MODEL, "candidate").version),)
    conn.close()


def test_clipline_ui_points_at_the_server_instead_of_serving_one(mlflow_server, job):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    done = run_cli("ui", REPO / "jobs" / "demo.yaml", "--storage", job["store"], env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{mlflow_server.uri}/\n"
    assert f"logs to the tracking server {mlflow_server.uri}, which serves the MLflow UI" in done.stderr


def test_clipline_report_logs_the_page_on_the_server(s3, mlflow_server, job, runs):
    done = run_cli("report", REPO / "jobs" / "demo.yaml", "--storage", job["store"],
                   *_demo_overrides(mlflow_server.uri), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    page = Path(done.stdout.strip())
    assert page.read_bytes().startswith(b"<!doctype html>")
    bucket, prefix = mlflow_server.artifacts_destination.removeprefix("s3://").split("/", 1)
    parent_id = runs["by_name"][JOB].info.run_id
    key = f"{prefix}/{runs['experiment'].experiment_id}/{parent_id}/artifacts/report.html"
    assert _get(s3, bucket, key) == page.read_bytes()


def test_the_servers_ui_shows_the_job_run_and_its_stages(mlflow_server, runs, request, tmp_path):
    exp_id = runs["experiment"].experiment_id
    parent, train = runs["by_name"][JOB], runs["by_name"]["train"]
    shots = artifacts_dir(request, tmp_path)
    with chromium() as browser:
        page, job_link = open_runs_table(browser, mlflow_server.uri, exp_id, runs["by_name"][JOB].info.run_name)
        assert job_link.get_attribute("href").endswith(f"/runs/{parent.info.run_id}")
        page.get_by_text(EXPERIMENT).first.wait_for()
        row = page.locator(".ag-row").filter(has=job_link)
        row.locator("button[data-component-id*=runnamecellrenderer]").click()  # expand the nested stage runs
        for stage in STAGES:
            page.get_by_role("link", name=stage, exact=True).wait_for()
        page.get_by_text("5 matching runs").wait_for()
        page.screenshot(path=shots / "runs.png")

        page.get_by_role("link", name="train", exact=True).click()
        page.get_by_text(MODEL).first.wait_for()  # the run page names the model version it registered
        page.get_by_text(train.info.run_id).first.wait_for()
        page.screenshot(path=shots / "train_run.png")

        # the registered version's page: its description names the job and the dataset version, and its tags
        # carry the train run, the dataset and the evaluate stage's scores, as the registry holds them
        version = runs["client"].get_model_version_by_alias(MODEL, "candidate")
        page.goto(f"{mlflow_server.uri}/#/models/{MODEL}/versions/{version.version}")
        description = page.get_by_text("trained by clipline job", exact=False).first  # rendered from markdown
        description.wait_for()
        assert f"job {JOB} " in description.inner_text() and version.tags["clipline.dataset"] in \
            description.inner_text(), description.inner_text()
        for key in ("clipline.train_run", "eval/average"):
            row = page.get_by_role("row").filter(has=page.get_by_text(key, exact=True))
            row.first.wait_for()
            assert version.tags[key] in row.first.inner_text(), (key, row.first.inner_text())
            row.first.scroll_into_view_if_needed()  # the tags table scrolls: the screenshot shows the score
        assert version.tags["clipline.train_run"] == train.info.run_id
        page.screenshot(path=shots / "model_version.png", full_page=True)
    for shot in ("runs.png", "train_run.png", "model_version.png"):
        assert (shots / shot).stat().st_size > 10_000, shot
    print(f"screenshots: {shots}")
