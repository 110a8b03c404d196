"""MLflow as the review surface, on a sqlite store: the experiment's view, the job run's name, metrics and
datasets, a cache hit's link to the run that computed its output (online and spooled), registry annotations.

The same against a real server, in the UI in Chromium and through the REST API: tests/test_shared_tracking.py.
"""

from __future__ import annotations

import re

from mlflow import MlflowClient

import tests.support.probe  # noqa: F401  (registers the test-only `probe` stage)
from pipelines import spec, spool
from pipelines.runner import headline, run_job
from pipelines.tracking import (
    COMPUTED_BY,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    StageTracker,
    Tracker,
    dataset_input,
)
from tests.conftest import write_job
from tests.support.net import free_port


def _client(store) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")


def test_new_and_existing_experiments_open_in_the_model_training_view(tmp_path):
    store = tmp_path / "store"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("old")  # made before clipline set the kind
    inferred = client.create_experiment("inferred", tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"})
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    new = Tracker(uri, "new", str(store)).experiment_id
    for name in ("old", "inferred", "chosen"):
        Tracker(uri, name, str(store))
    kinds = {e: client.get_experiment(e).tags.get(EXPERIMENT_KIND_TAG) for e in (new, old, inferred, chosen)}
    assert kinds == {new: EXPERIMENT_KIND, old: EXPERIMENT_KIND, inferred: EXPERIMENT_KIND,
                     chosen: "genai_development"}  # a kind someone chose stays
    assert EXPERIMENT_KIND == "custom_model_development"  # the value MLflow 3.17's UI maps to model training


def test_a_stage_output_is_a_dataset_with_its_name_digest_and_source(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "e", str(tmp_path / "store"))
    parent = tracker.start_job("j", {}, {})
    handle = StageTracker(tracker.client, parent, "job", uri, "j")
    handle.log_input("j/crawl", "a" * 64, "/data/j/crawl/0123", "crawl (ran)", {"rows": 7})
    handle.log_input("j/curate", "b" * 64, "s3://bucket/j/curate/4567", "curate (cached)", {"rows": 5})
    inputs = MlflowClient(tracking_uri=uri).get_run(parent).inputs.dataset_inputs
    got = {(d.dataset.name, d.dataset.digest, d.dataset.source_type, d.dataset.source, d.tags[0].value)
           for d in inputs}
    assert got == {("j/crawl", "a" * 36, "local", '{"uri": "/data/j/crawl/0123"}', "crawl (ran)"),
                   ("j/curate", "b" * 36, "s3", '{"uri": "s3://bucket/j/curate/4567"}', "curate (cached)")}
    # a scheme MLflow has no source for keeps its location as the source
    assert dataset_input("n", "c" * 64, "memory://x", "c", {}).dataset.source == '{"uri": "memory://x"}'


def test_a_model_version_gets_a_description_and_tags_online_only(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "e", str(tmp_path / "store"))
    run = tracker.start_job("j", {}, {})
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("m")
    version = client.create_model_version("m", source=f"runs:/{run}/model", run_id=run).version
    handle = StageTracker(tracker.client, run, "train", uri, "j")
    assert handle.annotate_model_version("m", version, {"eval/average": "0.5000"}, description="trained on x")
    got = client.get_model_version("m", version)
    assert got.description == "trained on x" and got.tags == {"eval/average": "0.5000"}
    handle.go_offline("test")  # the registry is not spooled: nothing written, and the caller is told
    assert not handle.annotate_model_version("m", version, {"eval/average": "0.7"})
    assert client.get_model_version("m", version).tags == {"eval/average": "0.5000"}


def _job_runs(client: MlflowClient, job: str) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`clipline.job` = '{job}'",
                              order_by=["attributes.start_time ASC"])


def test_job_runs_are_told_apart_and_a_cache_hit_links_the_run_that_computed_it(tmp_path, ray_local):
    path = write_job(tmp_path, {"p": {"uses": "probe"}}, name="rev")
    (first,) = run_job(spec.load(path), progress=False)
    (again,) = run_job(spec.load(path), progress=False)
    assert (first.state, again.state) == ("ran", "cached")
    client = _client(tmp_path / "store")
    runs = _job_runs(client, "rev")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(re.fullmatch(r"rev-\d{8}-\d{6}", r.info.run_name) for r in parents)
    # each job run: the stage's rows and manifest metrics, and the stage output in its Datasets panel
    for parent, state in zip(parents, ("ran", "cached"), strict=True):
        assert parent.data.metrics["p/rows"] == 0 and "p/seconds" in parent.data.metrics
        (ds,) = parent.inputs.dataset_inputs
        assert (ds.dataset.name, ds.dataset.digest, ds.dataset.source_type) == (
            "rev/p", first.manifest.digest[:36], "local")
        assert first.manifest.location in ds.dataset.source and ds.tags[0].value == f"p ({state})"
    assert headline([first]) == {"p/rows": 0, "p/seconds": first.manifest.metrics["seconds"]}

    computed, hit = [r for r in runs if r.data.tags.get("clipline.stage") == "p"]
    assert hit.data.tags["clipline.cache"] == "hit" and hit.data.tags[COMPUTED_BY] == computed.info.run_id
    assert f"[{computed.info.run_id}](#/runs/{computed.info.run_id})" in hit.data.tags[NOTE_TAG]
    assert "Its metrics and artifacts are repeated here." in hit.data.tags[NOTE_TAG]
    assert hit.data.metrics["p/rows_seen"] == computed.data.metrics["p/rows_seen"] == 0


def test_a_cache_hit_while_offline_is_linked_after_the_replay(tmp_path, ray_local):
    """MLflow down: the cache hit cannot read the computing run, so it repeats what the manifest keeps, and its
    link, description and metrics are spooled and land with the replay."""
    path = write_job(tmp_path, {"p": {"uses": "probe"}}, name="off")
    (first,) = run_job(spec.load(path), progress=False)
    down = spec.load(path, overrides=[f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.required=false"])
    (again,) = run_job(down, progress=False)
    assert again.state == "cached"
    store = tmp_path / "store"
    counts = spool.replay(spool.default_dir(str(store)), f"sqlite:///{store}/mlflow.db")
    assert counts["log_inputs"] == 2  # the stage run's input and the job run's dataset
    computed, hit = [r for r in _job_runs(_client(store), "off") if r.data.tags.get("clipline.stage") == "p"]
    assert hit.data.tags[COMPUTED_BY] == computed.info.run_id == first.manifest.mlflow_run_id
    assert "The metrics its manifest keeps are repeated here" in hit.data.tags[NOTE_TAG]
    assert hit.data.metrics["p/rows"] == 0


def test_the_job_run_name_is_the_job_and_its_utc_start():
    from pipelines.tracking import job_run_name

    assert job_run_name("demo", 0.0) == "demo-19700101-000000"
    assert job_run_name("demo", 1796253842.0) == "demo-20261202-232402"
