"""Shared fixtures: the synthetic web on loopback, a local Ray instance, job files on disk."""

from __future__ import annotations

import os

# Before anything imports ray: keep every Ray server these tests start on 127.0.0.1 (Ray otherwise replaces a
# loopback node address with the machine's own and listens on all interfaces); Ray reads this once, at import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# and nothing off the machine from any Ray or MLflow a test starts: no usage reports, no cloud metadata probe
from pipelines.offline import keep_local  # noqa: E402

keep_local(ray_head=True)

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.demo.server import DemoServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def web() -> Iterator[DemoServer]:
    """The synthetic web on 127.0.0.1; slow routes hold for 30 s unless released."""
    with DemoServer(port=0, seed=0, slow_seconds=30) as server:
        yield server


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from pipelines.runner import start_local_ray

    start_local_ray({"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def report_job(tmp_path_factory: pytest.TempPathFactory, web: DemoServer, ray_local: None) -> dict[str, Any]:
    """The job run tests/test_report.py and tests/test_explore.py read (tests/support/report_job.py): once per
    test process, as the two files are one unit of work."""
    from tests.support import report_job as job

    return job.run(tmp_path_factory.mktemp("report"), web.base_url)


def crawl_stage(input_path: str | list[str], **with_: Any) -> dict[str, Any]:
    # per_host_scope: task - the loopback web is one host standing for the whole web, so a job-wide cap of 4 would
    # run these crawls four requests at a time (and start a host token service each); the tests that are about
    # the job-wide limits (test_hosttokens, test_polite_cluster) say so themselves
    return {"uses": "crawl", "with": {"input": input_path, "allow_networks": ["127.0.0.0/8"], "image_size": 32,
                                      "samples_per_shard": 50, "threads": 8, "timeout": 2, "per_host_scope": "task",
                                      **with_}}


def write_job(tmp_path: Path, stages: dict[str, Any], name: str = "t", **top: Any) -> Path:
    spec = {"name": name, "storage": str(tmp_path / "store"), "stages": stages, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_output(manifest) -> pd.DataFrame:
    return pd.concat([pq.read_table(u).to_pandas() for u in manifest.shard_urls()], ignore_index=True)


def mlflow_runs(store: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time ASC"])


def run_label(run: Any) -> str:
    """A stage run's stage, a job run's job (its run name also carries its start time)."""
    tags = run.data.tags
    return tags.get("clipline.stage") or tags.get("clipline.job") or run.info.run_name


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the whole session, its endpoint and credentials in os.environ.

    Request it before `ray_local` (or any fixture that starts Ray): Ray's workers inherit the environment of
    the process that started Ray, and this is how they find the store.
    """
    from tests.support.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def ray_s3(s3, ray_local):
    """Ray whose workers see the S3 endpoint: a session Ray started before `s3` set the environment is
    restarted (its workers would look for the bucket on AWS)."""
    import ray

    @ray.remote
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != s3.endpoint:
        from pipelines.runner import start_local_ray

        ray.shutdown()
        start_local_ray({"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False})
    yield


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """PostgreSQL on 127.0.0.1 for the whole session: database `mlflow`, owned by a password role `mlflow`."""
    from tests.support.postgres import PostgresServer

    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(s3, postgres, tmp_path_factory):
    """A shared tracking server as on a cluster: `mlflow server` on 127.0.0.1 with the session's PostgreSQL as
    its backend and artifacts proxied to s3://clipline-mlflow/mlartifacts on the moto server. Tests that share
    it use experiments of their own."""
    from tests.support.mlflow_server import MlflowServer

    bucket = s3.bucket("clipline-mlflow")
    with MlflowServer(postgres.url, f"{bucket}/mlartifacts", tmp_path_factory.mktemp("mlflow-server"),
                      s3.env) as server:
        yield server


# `make test` runs the suite on two pytest-xdist processes (`-n 2 --dist loadfile`): each test file is one unit
# of work, so its module fixtures (a job run that several tests read) run once; the files that start
# cluster/local.sh on its fixed ports are one unit between them; and the longest units are handed out first,
# so that the two processes finish near together. test_report and test_explore read one job run (a session
# fixture, `report_job`), so they are one unit too. The order is from the fresh-clone run's durations
# (2026-12-07, two processes: per file, the seconds of its tests, setup and teardown included).
# The units are made here (pytest_xdist_make_scheduler), not with xdist_group marks: pytest 9.2 keeps a node's id
# in `_id`, and xdist 3.8 still writes the group into `_nodeid`, so `--dist loadgroup` silently handed out single
# tests, each process set the shared job runs up again, and the cluster files ran side by side.
SAME_UNIT = {"test_readme_cluster": "cluster", "test_cluster": "cluster", "test_report": "report", "test_explore": "report"}
LONGEST_FIRST = ["test_train", "cluster", "test_node_loss", "test_demo", "test_s3", "test_runner", "test_outages",
                 "test_shared_tracking", "test_prometheus", "report", "test_polite_cluster", "test_curate", "test_gpu_bench", "test_ui",
                 "test_head_rule", "test_takedown", "test_semantic_dedup", "test_plugins", "test_export",
                 "test_codedigest", "test_submit", "test_embed", "test_train_data", "test_polite_cluster", "test_tails",
                 "test_availability", "test_crawl_refresh", "test_tracking", "test_evaluate", "test_query_subset",
                 "test_optouts"]


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the unit SAME_UNIT names for the file."""
    stem = Path(nodeid.split("::", 1)[0]).stem
    return SAME_UNIT.get(stem, stem)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))  # stable: a file keeps its order


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With `--dist loadfile` (the Makefile's): whole units to a process, in collection order (longest first;
    xdist would otherwise hand out the units with the most tests first, and the demo, one long test, came last)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)
