"""The console (pipelines/console.py): clipline's lines once, everything else in the run's log file, -v shows all,
training progress from rank 0 through the progress actor, and `clipline ui` refusing a busy port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from pipelines import console
from tests.support.cli import REPO, run_cli
from tests.support.net import free_port

# a fresh interpreter per case: logging's set-up is process-wide
SCRIPT = """
import logging, sys, warnings
from pipelines import console
console.setup(verbose={verbose})
import mlflow.pytorch  # installs a root StreamHandler with logging.basicConfig at import (mlflow 3.x)
logging.basicConfig(level=logging.INFO)
path = console.open_log("t")
logging.getLogger("clipline.evaluate").info("scored demo_heldout")
warnings.warn("a library's deprecation nobody here can act on", DeprecationWarning)
ray_data = logging.getLogger("ray.data")  # as Ray Data configures it: its own console handler, no propagation
ray_data.addHandler(logging.StreamHandler(sys.stderr)); ray_data.propagate = False
console._route_ray_loggers()
ray_data.info("Execution plan of Dataset dataset_0: InputDataBuffer[Input] -> MapBatches(f)")
console._to_log_file({{"lines": ["No pretrained weights loaded for model 'x'"], "pid": 7, "ip": "127.0.0.1",
                      "actor_name": "EvalWorker"}})
print(path)
"""


def _run(tmp_path, verbose: bool) -> tuple[str, str, str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(verbose=verbose)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, console.LOG_DIR_ENV: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path)) and path.endswith(".log")
    return done.stderr, path, open(path).read()


def test_each_clipline_line_once_on_the_console_and_the_rest_in_the_log_file(tmp_path):
    err, path, logfile = _run(tmp_path, verbose=False)
    lines = err.splitlines()
    # once, in clipline's form, although a library installed a root handler (the `INFO:clipline...` copy)
    assert [line for line in lines if "scored demo_heldout" in line] == ["clipline: scored demo_heldout"], err
    assert not any(line.startswith("INFO:") for line in lines), err
    assert lines[0] == f"clipline: log: {path} (Ray and library logs; -v shows them here)"
    assert len(lines) == 2, err  # the log line and the clipline line: no warning, no Ray Data plan, no worker line
    for text in ("scored demo_heldout", "a library's deprecation", "Execution plan of Dataset",
                 "(EvalWorker pid=7, ip=127.0.0.1) No pretrained weights loaded"):
        assert text in logfile, text


def test_verbose_shows_everything_on_the_console(tmp_path):
    err, _, logfile = _run(tmp_path, verbose=True)
    assert "a library's deprecation" in err and "Execution plan of Dataset" in err
    assert sum("scored demo_heldout" in line for line in err.splitlines()) == 1  # once, with -v too
    assert "a library's deprecation" in logfile  # in full form


def test_the_log_file_is_named_by_job_time_and_process(tmp_path, monkeypatch):
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path / "logs"))
    assert console.log_dir() == tmp_path / "logs"
    monkeypatch.delenv(console.LOG_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert console.log_dir() == tmp_path / "cache" / "clipline" / "logs"


def _records(planned: int, evals: dict[int, float], seconds: float = 0.0) -> list[dict]:
    return [{"kind": "train", "step": s, "planned": planned, "loss": 3.0 - s / planned, "samples_per_s": 64.0,
             "eval": {"eval/demo/acc1": evals[s]} if s in evals else {}} for s in range(1, planned + 1)]


def test_training_progress_without_bars_is_a_line_every_tenth_and_each_evaluation(capsys):
    import logging

    console.setup()
    view = console._TrainView(progress=False)
    for record in _records(100, {50: 0.25, 100: 0.5}):
        view.show(record)
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("clipline: train: step ") and "eval" not in line]
    assert len(steps) == 11 and steps[0].startswith("clipline: train: step 1/100, loss 2.9900, 64 samples/s")
    assert steps[-1] == "clipline: train: step 100/100, loss 2.0000, 64 samples/s"
    assert [line for line in err if "eval:" in line] == ["clipline: train: step 50 eval: demo/acc1 0.250",
                                                         "clipline: train: step 100 eval: demo/acc1 0.500"]
    logging.getLogger("clipline").handlers.clear()


def test_rank_zero_reports_through_the_progress_actor_at_little_cost(ray_local):
    import ray

    sink = ray.remote(num_cpus=0)(console._Sink).options(name=console.PROGRESS_ACTOR).remote()
    try:
        assert console.train_reporter(1, 10).handle is None  # other ranks send nothing
        reporter = console.train_reporter(0, 1000)
        assert reporter.handle is not None
        t0 = time.perf_counter()
        for step, record in enumerate(_records(1000, {500: 0.5}), start=1):
            reporter.step(step, {"train/loss": record["loss"], "train/samples_per_s": 64.0, **record["eval"]})
        per_step = (time.perf_counter() - t0) / 1000
        got = ray.get(sink.take.remote())
        # the first step, the evaluation, the last; more only if the loop took over TRAIN_EVERY_S
        assert [r["step"] for r in got][:1] == [1] and got[-1]["step"] == 1000
        assert [r["eval"] for r in got if r["eval"]] == [{"eval/demo/acc1": 0.5}]
        assert len(got) <= 3 + (time.perf_counter() - t0) / console.TRAIN_EVERY_S
        # measured here: ~2 us a step (one clock read) between records, ~100 us for a record sent
        assert per_step < 1e-3, per_step
    finally:
        ray.kill(sink)


def test_ui_on_a_busy_port_fails_naming_it(tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        done = run_cli("ui", "--storage", str(tmp_path), "--port", str(port), timeout=120)
    assert done.returncode == 3, done.stderr
    assert f"cannot serve the MLflow UI on 127.0.0.1:{port}: the port is in use; pick another --port" in done.stderr
