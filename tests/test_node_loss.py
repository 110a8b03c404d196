"""Node loss: a three-node Ray cluster on loopback, one worker node removed while a stage has work on it.

The cluster is `ray.cluster_utils.Cluster` (what Ray's own fault-tolerance tests use): a head with no CPUs, as a
production head is, so that every task and training worker runs on one of the two worker nodes, each of
2 logical CPUs. The job runs as its own driver process (`clipline run`), as a scheduler would start it. A node is
removed - its raylet, object store and every worker on it killed at once - only once a process under that node's
raylet is running the stage's work (its title, `ray::<task>`, says which), so the fault lands mid-stage.

Afterwards: every input row present exactly once, training at its planned step count from the last checkpoint,
and MLflow holding one run per stage whose steps run 1..n without a gap or a repeat. The removed node is
replaced after each test, as an autoscaler would, so each test starts from three nodes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

import tests.support.sources  # noqa: F401  (registers demo_curated here too, for plan() and spec.load)
from pipelines import manifest, spec, storage
from pipelines.demo.server import DemoServer, url_list
from pipelines.runner import plan
from tests.conftest import REPO, crawl_stage, mlflow_runs, read_output, write_job
from tests.support.net import wait_until

pytestmark = pytest.mark.slow

CPUS = 2  # logical CPUs of each worker node
# the job's driver: the test-only stages registered, then the CLI, as `clipline run` would start it
DRIVER = ("import sys, tests.support.sources; from pipelines.cli import main; "
          "sys.exit(main(['run', '--no-progress', sys.argv[1]]))")


class ThreeNodes:
    """A head (0 CPUs) and two worker nodes on 127.0.0.1; `lose` removes a worker node, `replace` adds one."""

    def __init__(self, root: Path) -> None:
        from ray._private.services import wait_for_node
        from ray.cluster_utils import Cluster

        self._wait_for_node = wait_for_node
        self.temp_dir = str(root / "ray")
        self.cluster = Cluster(shutdown_at_exit=True)
        head = self.cluster.add_node(wait=False, node_ip_address="127.0.0.1", num_cpus=0, temp_dir=self.temp_dir,
                                     include_dashboard=False)
        wait_for_node(head.gcs_address, head.plasma_store_socket_name, 120)
        self.address = head.gcs_address
        for _ in range(2):
            self.replace()

    def replace(self) -> None:
        node = self.cluster.add_node(wait=False, node_ip_address="127.0.0.1", num_cpus=CPUS, temp_dir=self.temp_dir)
        self._wait_for_node(node.gcs_address, node.plasma_store_socket_name, 120)
        self.cluster.wait_for_nodes(timeout=120)

    def busy(self, title: str) -> Any | None:
        """A worker node one of whose processes is running a task or actor whose title contains `title`."""
        for node in self.cluster.worker_nodes:
            (raylet,) = node.all_processes["raylet"]
            try:
                for proc in psutil.Process(raylet.process.pid).children(recursive=True):
                    cmd = " ".join(proc.cmdline())
                    if cmd.startswith("ray::") and title in cmd:
                        return node
            except psutil.Error:
                continue  # a worker that exited while we looked
        return None

    def lose(self, node: Any) -> None:
        self.cluster.remove_node(node, allow_graceful=False)  # SIGKILL: the raylet, its store and its workers

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture
def nodes(cluster: ThreeNodes) -> Iterator[ThreeNodes]:
    """The cluster, with any node a test removed replaced afterwards (as an autoscaler would), pass or fail."""
    yield cluster
    while len(cluster.cluster.worker_nodes) < 2:
        cluster.replace()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThreeNodes]:
    # Ray's Unix socket paths under the session directory may not pass 107 bytes: a short root
    with tempfile.TemporaryDirectory(prefix="nl-", dir="/tmp") as root:
        cluster = ThreeNodes(Path(root))
        try:
            yield cluster
        finally:
            cluster.shutdown()


def start_driver(job: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-c", DRIVER, str(job)], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)


def lose_a_node_running(nodes: ThreeNodes, title: str, driver: subprocess.Popen, log: Path,
                        ready: Any = None, timeout: float = 300) -> None:
    """Once `ready()` holds (if given), wait for a worker node running `title`, then remove that node."""

    def lost() -> bool:
        node = nodes.busy(title) if ready is None or ready() else None
        if node is not None:
            nodes.lose(node)
        return node is not None

    try:  # polling the process table for a condition, with a deadline
        wait_until(lost, timeout, f"a worker node running {title!r} (before the job ended)", interval=0.05,
                   alive=lambda: driver.poll() is None, detail=lambda: log.read_text()[-4000:])
    except TimeoutError:
        driver.kill()
        raise


def finish(driver: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            driver.kill()
    out = log.read_text()
    assert driver.returncode == 0, out[-6000:]
    return out


def stage_runs(store: Path) -> dict[str, list]:
    runs: dict[str, list] = {}
    for r in mlflow_runs(store):
        if "clipline.stage" in r.data.tags:
            runs.setdefault(r.data.tags["clipline.stage"], []).append(r)
    return runs


def steps(store: Path, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def output_of(job: Path, stage: str) -> manifest.Manifest:
    (row,) = [r for r in plan(spec.load(job)) if r["stage"] == stage]
    m = manifest.read(row["path"])
    assert m is not None, f"{stage}: no complete output at {row['path']}"
    return m


def test_a_node_lost_mid_crawl_loses_and_duplicates_no_row(tmp_path, nodes):
    shards, per = 12, 10
    with DemoServer(port=0, seed=0, slow_seconds=120) as web:  # each shard waits on its slow row until released
        rows = url_list(web.base_url, shards * per)
        rows.loc[::per, "url"] = [web.url("slow", i) for i in range(0, shards * per, per)]
        rows.to_parquet(tmp_path / "urls.parquet")
        job = write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=per,
                                                        timeout=30)}, ray={"address": nodes.address})
        log = tmp_path / "driver.log"
        driver = start_driver(job, log)
        lose_a_node_running(nodes, "crawl_shard", driver, log)
        web.release.set()  # the held rows answer: the shards of the surviving node and the retried ones finish
        finish(driver, log)

    m = output_of(job, "crawl")
    out = read_output(m)
    assert sorted(out["source_row"]) == list(range(shards * per))  # every row, once
    assert (out["status"] == "success").all() and m.rows == shards * per
    assert out["uid"].is_unique
    (run,) = stage_runs(tmp_path / "store")["crawl"]
    assert run.info.status == "FINISHED"
    assert steps(tmp_path / "store", run.info.run_id, "crawl/rows_done") == list(range(1, shards + 1))


def test_a_node_lost_mid_curate_decides_every_row_once(tmp_path, nodes, web):
    n, per = 400, 20
    url_list(web.base_url, n).to_parquet(tmp_path / "urls.parquet")
    job = write_job(tmp_path, {
        "crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=per),
        "curate": {"uses": "curate", "needs": ["crawl"],
                   "with": {"rules": ["basic", "dedup_image", "dedup_text"], "basic": {"min_side": 32},
                            "shard_rows": 50}},
    }, ray={"address": nodes.address})
    (crawl_row,) = [r for r in plan(spec.load(job)) if r["stage"] == "crawl"]
    log = tmp_path / "driver.log"
    driver = start_driver(job, log)
    # mid-curate: the crawl is complete, and a worker node runs one of curate's Ray Data tasks
    lose_a_node_running(nodes, "MapBatches", driver, log, ready=lambda: manifest.read(crawl_row["path"]) is not None)
    finish(driver, log)

    crawl, curate = output_of(job, "crawl"), output_of(job, "curate")
    crawled = read_output(crawl)
    ledger = pd.concat([pd.read_parquet(storage.join(curate.location, s["path"])) for s in curate.extra["ledger"]],
                       ignore_index=True)
    assert len(ledger) == n and ledger["uid"].is_unique  # every crawled row decided, once
    assert set(ledger["uid"]) == set(crawled["uid"])
    kept = read_output(curate)
    assert kept["uid"].is_unique and set(kept["uid"]) == set(ledger.loc[ledger["kept"], "uid"])
    assert curate.counts["rows_in"] == n and curate.counts["rows_out"] == len(kept) > 0
    runs = stage_runs(tmp_path / "store")
    assert [r.info.status for r in runs["crawl"]] == ["FINISHED"]
    assert [r.info.status for r in runs["curate"]] == ["FINISHED"]


def test_a_node_lost_mid_training_resumes_from_the_last_checkpoint_in_the_same_run(tmp_path, nodes):
    total, every = 40, 5
    job = write_job(tmp_path, {
        "data": {"uses": "demo_curated", "with": {"rows": 512}},
        "train": {"uses": "train", "needs": ["data"],
                  "with": {"workers": 2, "cpus_per_worker": 0.5, "batch_size": 32, "warmup": 2, "lr": 2e-3,
                           "steps": total, "checkpoint_every": every, "max_failures": 2, "system_metrics": False}},
    }, ray={"address": nodes.address})
    store = tmp_path / "store"
    log = tmp_path / "driver.log"
    driver = start_driver(job, log)
    def registered(step: int) -> bool:
        """Ray Train's checkpoint manager has taken the checkpoint of `step`: its snapshot names it. (The file
        alone is not enough: on a loaded machine the controller registered it after the node was gone, and the
        restarted workers found no checkpoint to restore.)"""
        for snapshot in store.glob("t/train/*/ray/train/checkpoint_manager_snapshot.json"):
            try:
                if f"checkpoint-{step:08d}" in snapshot.read_text():
                    return True
            except OSError:
                continue  # being rewritten
        return False

    lose_a_node_running(nodes, "RayTrainWorker", driver, log, timeout=400, ready=lambda: registered(10))
    finish(driver, log)

    m = output_of(job, "train")
    assert m.counts["steps"] == total
    (run,) = stage_runs(store)["train"]
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/lr"):
        assert steps(store, run.info.run_id, key) == list(range(1, total + 1)), key
    restored = int(run.data.tags["clipline.train.restored_from_step"])
    assert every <= restored < total and restored % every == 0
