"""One tracking handle: a stage's `StageTracker`, and the `WorkerTracker` its Ray workers carry.

Against a real sqlite tracking store (and a spool for the offline cases); no server, no Ray.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

from pipelines import spool
from pipelines.stages.train.loop import METRIC, StepLog
from pipelines.tracking import StageTracker, Tracker, WorkerTracker

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _stage(tmp_path: Path, required: bool = True, uri: str | None = None) -> tuple[Tracker, StageTracker]:
    tracker = Tracker(uri or f"sqlite:///{tmp_path}/mlflow.db", "e", str(tmp_path / "store"), required=required,
                      spool=str(tmp_path / "spool"))
    tracker.start_job("j", {}, {})
    return tracker, tracker.start_stage("j", "train", "train", "fp", {})


def _steps(tracker: Tracker, run_id: str, key: str = METRIC) -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(run_id, key))


def test_no_stage_reaches_past_its_tracker_to_the_mlflow_client():
    """Stages use the handle's methods; the client behind it is not part of the handle."""
    reach = []
    for path in sorted((PIPELINES / "stages").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("client", "_client")
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "tracker"):
                reach.append(f"{path.relative_to(PIPELINES)}:{node.lineno}")
    assert reach == []
    assert not hasattr(StageTracker(object(), "r", "s"), "client")


def test_the_stage_handle_logs_text_tags_and_says_where_it_spools(tmp_path):
    tracker, st = _stage(tmp_path)
    st.set_tag("k", 3)
    st.log_text("# hello\n", "notes/summary.md")
    run = tracker.client.get_run(st.run_id)
    assert run.data.tags["k"] == "3" and st.job == "j" and st.stage == "train"
    assert [a.path for a in tracker.client.list_artifacts(st.run_id, "notes")] == ["notes/summary.md"]
    assert st.spool == str(tmp_path / "spool") and not st.offline
    st.go_offline("a test")
    assert st.offline and tracker.offline  # one client behind the job's handles: the job is offline too
    st.set_tag("later", "x")
    assert "later" not in tracker.client.get_run(st.run_id).data.tags and spool.pending(st.spool)


def test_the_worker_handle_pickles_without_a_client_and_makes_its_own(tmp_path):
    tracker, st = _stage(tmp_path)
    worker = st.for_worker()
    assert (worker.uri, worker.run_id, worker.job, worker.stage, worker.spool, worker.started_offline) == (
        st.uri, st.run_id, "j", "train", st.spool, False)
    worker.set_tag("before", "1")  # rank 0 (the default) makes its client on the first write
    assert worker._client is not None
    copy = pickle.loads(pickle.dumps(worker))
    assert copy == worker and copy._client is None
    copy.on_rank(0).set_tag("after", "2")
    assert {"before", "after"} <= set(tracker.client.get_run(st.run_id).data.tags)


def test_off_rank_0_every_call_does_nothing(tmp_path):
    """Not even a client: the address answers nothing, and no spool appears."""
    from pipelines.prometheus import TRAIN_LOSS, TRAIN_STEPS

    worker = WorkerTracker("http://127.0.0.1:9", "r", "j", "train", str(tmp_path / "spool")).on_rank(1)
    assert not worker.active
    worker.set_tag("k", "v")
    worker.log_metrics({"train/loss": 1.0}, 1)
    worker.flush()
    worker.inc(TRAIN_STEPS)
    worker.set(TRAIN_LOSS, 1.0)
    assert worker.last_step(METRIC) == 0
    with worker.system_metrics():
        pass
    log = StepLog(worker, 1)
    log.step(1, {"train/loss": 1.0, "train/data_wait_fraction": 0.0}, 64)
    log.flush()
    assert worker._client is None and not (tmp_path / "spool").exists()


def _train(log: StepLog, steps: range) -> None:
    for step in steps:
        log.step(step, {"train/loss": 1.0 / step, "train/lr": 0.1, "train/data_wait_fraction": 0.0}, 64)
    log.flush()


def test_steps_recomputed_after_a_restart_are_logged_once(tmp_path):
    tracker, st = _stage(tmp_path)
    first = st.for_worker()
    _train(StepLog(pickle.loads(pickle.dumps(first)).on_rank(0), every=2), range(1, 6))
    # the worker group restarts from the checkpoint at step 3 and recomputes steps 4 and 5
    _train(StepLog(pickle.loads(pickle.dumps(first)).on_rank(0), every=2), range(4, 9))
    assert _steps(tracker, st.run_id) == list(range(1, 9)) == _steps(tracker, st.run_id, "train/lr")


def test_a_worker_that_starts_offline_spools_and_its_restart_skips_the_spooled_steps(tmp_path):
    """The steps an earlier attempt spooled count as logged, so the replay gives each step one value."""
    tracker, st = _stage(tmp_path, required=False, uri="http://127.0.0.1:9")
    assert st.offline and st.run_id.startswith(spool.OFFLINE)
    worker = st.for_worker()
    assert worker.started_offline
    _train(StepLog(pickle.loads(pickle.dumps(worker)).on_rank(0), every=3), range(1, 5))
    restarted = StepLog(pickle.loads(pickle.dumps(worker)).on_rank(0), every=3)
    assert restarted.logged == 4
    _train(restarted, range(3, 7))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spool.replay(st.spool, uri)
    from mlflow import MlflowClient

    real = spool.real_id(st.spool, st.run_id)
    assert real and sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(real, METRIC)) == [
        1, 2, 3, 4, 5, 6]

