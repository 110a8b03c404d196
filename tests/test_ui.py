"""`clipline ui` serves the job's MLflow store: checked through MLflow's REST API and in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines import spec
from pipelines.runner import run_job
from tests.conftest import REPO, write_job
from tests.support.browser import artifacts_dir, chromium, open_runs_table
from tests.support.net import free_port, http_ok, wait_until

pytestmark = pytest.mark.slow

EXPERIMENT = "clipline-ui-test"  # not the job's name, so the page's links to the two are told apart


def _get(base: str, path: str, **query: Any) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    """A real job run: one evaluate stage scoring a randomly initialised clip-tiny on 30 digits."""
    tmp = tmp_path_factory.mktemp("ui")
    path = write_job(tmp, {"evaluate": {"uses": "evaluate", "with": {
        "model": {"arch": "clip-tiny", "seed": 0}, "examples": 0,
        "datasets": [{"name": "digits", "builtin": "digits", "limit": 30, "tasks": ["zeroshot"]}]}}},
        name="uijob", tracking={"experiment": EXPERIMENT}, ray={"address": "local"})
    (outcome,) = run_job(spec.load(path), progress=False)
    result = json.loads(Path(outcome.manifest.location, "digits_zeroshot_classification.json").read_text())
    return {"path": path, "manifest": outcome.manifest, "acc1": result["metrics"]["acc1"]}


@pytest.fixture(scope="module")
def ui(job: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`clipline ui JOB --port P` as a user starts it; yields its base URL once /health answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    # one server process: the default of 4 costs half a minute of start-up on a 2-core machine
    env = {**os.environ, "MLFLOW_WORKERS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", str(job["path"]), "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{base}/health"), 120, f"clipline ui on {base}/health", interval=0.5,
                   alive=lambda: proc.poll() is None, detail=log.read_text)
        assert f"MLflow UI for sqlite:///{job['path'].parent}/store/mlflow.db at {base}" in log.read_text()
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers: the group this test started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _runs(base: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    # a stage run is named by its stage, the job run by its job and start time (its clipline.job tag the job)
    by_name = {_tags(r).get("clipline.stage") or _tags(r)["clipline.job"]: r for r in runs}
    assert sorted(by_name) == ["evaluate", "uijob"]
    assert re.fullmatch(r"uijob-\d{8}-\d{6}", by_name["uijob"]["info"]["run_name"]), by_name["uijob"]["info"]
    return exp["experiment_id"], by_name["uijob"], by_name["evaluate"]


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_the_rest_api_serves_the_job_run_its_stage_run_and_eval_metrics(job, ui):
    exp_id, parent, child = _runs(ui)
    # the review surface: the experiment opens in the model-training view, the job run has the headline metrics
    # and the stage's output as a dataset
    exp = _get(ui, "/api/2.0/mlflow/experiments/get", experiment_id=exp_id)["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    headline = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert headline["eval/average"] == headline["eval/digits/acc1"] == job["acc1"], headline
    full = _get(ui, "/api/2.0/mlflow/runs/get", run_id=parent["info"]["run_id"])["run"]
    (dataset,) = [d["dataset"] for d in full["inputs"]["dataset_inputs"]]
    assert dataset["name"] == "uijob/evaluate" and job["manifest"].location in dataset["source"], dataset
    assert parent["info"]["status"] == child["info"]["status"] == "FINISHED"
    assert "mlflow.parentRunId" not in _tags(parent) and _tags(parent)["clipline.job"] == "uijob"
    tags = _tags(child)
    assert tags["mlflow.parentRunId"] == parent["info"]["run_id"]
    assert (tags["clipline.stage"], tags["clipline.cache"]) == ("evaluate", "miss")
    assert tags["clipline.fingerprint"] == job["manifest"].fingerprint
    assert child["info"]["run_id"] == job["manifest"].mlflow_run_id
    metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
    assert metrics["eval/digits/acc1"] == job["acc1"]
    artifacts = _get(ui, "/api/2.0/mlflow/artifacts/list", run_id=child["info"]["run_id"])["files"]
    assert "manifest" in {f["path"] for f in artifacts}


def test_the_browser_shows_stage_runs_nested_under_the_job_run_with_their_metrics_and_the_job_runs_headline(job, ui, request, tmp_path):
    exp_id, parent, child = _runs(ui)
    shots = artifacts_dir(request, tmp_path)
    with chromium() as browser:
        page, job_link = open_runs_table(browser, ui, exp_id, parent["info"]["run_name"])
        stage_link = page.get_by_role("link", name="evaluate", exact=True)
        assert stage_link.count() == 0  # stage runs are nested: hidden until the job run's row is expanded
        assert job_link.get_attribute("href").endswith(f"/runs/{parent['info']['run_id']}")
        row = page.locator(".ag-row").filter(has=job_link)
        row.locator("button[data-component-id*=runnamecellrenderer]").click()  # the expand (+) button
        stage_link.wait_for()
        assert stage_link.get_attribute("href").endswith(f"/runs/{child['info']['run_id']}")
        page.get_by_text("2 matching runs").wait_for()
        page.screenshot(path=shots / "runs.png")

        stage_link.click()
        metric = page.get_by_role("row").filter(has=page.get_by_text("eval/digits/acc1", exact=True))
        metric.wait_for()
        assert metric.inner_text().split() == ["eval/digits/acc1", repr(job["acc1"])]  # JS prints doubles as repr
        parent_field = page.get_by_text("Parent run", exact=True).locator("xpath=..")
        assert parent_field.get_by_role("link", name=parent["info"]["run_name"]).get_attribute("href").endswith(parent["info"]["run_id"])
        page.get_by_text("clipline.fingerprint", exact=True).wait_for()
        page.get_by_text(job["manifest"].fingerprint).first.wait_for()
        page.get_by_text("eval/digits/acc1", exact=True).scroll_into_view_if_needed()
        page.screenshot(path=shots / "stage_run.png")

        # up to the job run, as a reviewer goes: its headline metrics and the dataset its stage wrote
        parent_field.get_by_role("link", name=parent["info"]["run_name"]).click()
        for key in ("eval/average", "eval/digits/acc1"):
            metric = page.get_by_role("row").filter(has=page.get_by_text(key, exact=True))
            metric.wait_for()
            assert metric.inner_text().split() == [key, repr(job["acc1"])], key
        assert page.url.endswith(f"/runs/{parent['info']['run_id']}"), page.url
        page.get_by_text("uijob/evaluate").first.wait_for()  # the Datasets panel names the stage's output
        page.screenshot(path=shots / "job_run.png")
    for shot in ("runs.png", "stage_run.png", "job_run.png"):
        assert (shots / shot).stat().st_size > 10_000, shot
    print(f"screenshots: {shots}")
