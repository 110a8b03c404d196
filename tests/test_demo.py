"""`clipline demo` end to end, and the synthetic web it serves."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time

import mlflow
import pytest

from pipelines.demo import web
from pipelines.demo.run import DEMO_FAULTS, DEMO_SEED
from pipelines.demo.server import url_list
from tests.conftest import mlflow_runs, run_label
from tests.support.cli import run_cli
from tests.support.net import free_port
from tests.support.watched import assert_nothing_left_the_machine, explore_step, ui_step, user_env, watched


def test_generator_is_deterministic_and_covers_the_classes():
    assert web.encoded(3, 10) == web.encoded(3, 10)
    assert web.sample(3, 10) != web.sample(4, 10)
    labels = {web.sample(0, i).label for i in range(500)}
    assert len(labels) == len(web.COLORS) * len(web.SHAPES) == 18
    s = web.sample(0, 7)
    assert s.color in s.caption and s.shape in s.caption
    corner = web.render(s).getpixel((0, 0))  # the background, shaded by at most 12 per channel
    assert all(abs(c - b) <= 12 for c, b in zip(corner, web.BACKGROUNDS[s.background], strict=True))
    # continuous variation within a caption: no two of the first 500 images are alike
    assert len({web.encoded(0, i)[0] for i in range(500)}) == 500


@pytest.mark.slow
@pytest.mark.timeout(1000)  # the first run took 4 min on the 2-core machine beside another test process
def test_demo_runs_offline_then_is_a_cache_hit(tmp_path):
    """The first run, then `clipline ui` and `clipline explore` on its store, run as a user runs them (a user's environment, without the
    offline switches the suite sets) in a network namespace of their own, watched: nothing leaves the machine
    (tests/support/watched.py; tests/test_loopback.py checks the watch). The second run is a cache hit."""
    store, ui_port = tmp_path / "data", free_port()
    cmd = ["demo", "--storage", str(store), "--images", "300", "--port", str(free_port()), "--no-progress",
           # about 200 curated rows: 2 workers x 16, three epochs; evaluation on 60 held-out images
           "--set", "stages.train.with.batch_size=16", "--set", "stages.train.with.epochs=3",
           "--set", "stages.evaluate.with.datasets.0.limit=60"]
    logs = tmp_path / "logs"
    demo = shlex.join([sys.executable, "-m", "pipelines.cli", *cmd])
    # the UI on the demo's store, asked for its page, the runs and its telemetry config, as a browser does; its
    # output (the MLflow server's) is not the demo's console
    ui = f"{ui_step(store, ui_port, tmp_path / 'ui.json')} > {tmp_path / 'ui.log'} 2>&1"
    # and the explorer on the curated rows, asked for a query, a row and the clusters (faiss is watched here too)
    sets = [a for i, a in enumerate(cmd) if a == "--set" or (i and cmd[i - 1] == "--set")]
    explore = f"{explore_step(store, free_port(), tmp_path / 'explore.json', sets)} > {tmp_path / 'explore.log'} 2>&1"
    started = time.monotonic()
    rc, watcher, out = watched(f"sh -c {shlex.quote(f'{demo} && {ui} && {explore}')}", tmp_path, 900,
                               env=user_env(tmp_path, CLIPLINE_LOG_DIR=str(logs)))
    logs_of = "".join((tmp_path / f).read_text(errors="replace")[-2000:] for f in ("ui.log", "explore.log")
                      if (tmp_path / f).exists())
    assert rc == 0, out[-4000:] + logs_of
    assert_nothing_left_the_machine(tmp_path, watcher, time.monotonic() - started,
                                    ("pipelines.cli demo", "dashboard/dashboard.py", "default_worker.py", "mlflow",
                                     "pipelines.cli explore"))
    ui_seen = json.loads((tmp_path / "ui.json").read_text())
    assert ui_seen["page"] == 200 and ui_seen["experiments"] >= 1, ui_seen
    explored = json.loads((tmp_path / "explore.json").read_text())
    assert explored["rows"] == 5 and explored["runs"] == ["evaluate", "train"] and explored["clusters"] >= 2, explored
    # clipline wrote Ray's bootstrap config in the run's home: what keeps Ray's dashboard from asking
    assert "provider:\n  type: local" in (tmp_path / "home" / "ray_bootstrap_config.yaml").read_text()

    # the console: clipline's lines, a training line every tenth of the steps and the summary; Ray's, Ray Data's,
    # MLflow's and the workers' lines are in the log file. Measured: 41 lines (before issue 20: 1,760, with
    # tracebacks, hundreds of open_clip deprecation warnings and every clipline line twice)
    console = out.splitlines()
    assert len(console) < 60, out
    noise = re.compile(r"Traceback|Error|WARNING|Warning|warn\(|initialized randomly|Execution plan|all_gather|"
                       r"^INFO:|pid=")
    assert [line for line in console if noise.search(line)] == [], out
    assert len(set(console) - {""}) == len([line for line in console if line]), out  # no line twice
    assert re.search(r"^clipline: train: step \d+/\d+, loss \d+\.\d+, \d+ samples/s", out, re.M)
    (log,) = logs.glob("demo-*.log")
    assert f"log: {log}" in out and re.search(r"^ +\(\d+:\d\d in all\)$", out, re.M)
    text = log.read_text()
    assert "Started a local Ray instance" in text and "(RayTrainWorker pid=" in text
    assert "Ray's session logs" in text
    assert "PlacementGroupCleaner" not in text  # its stop timed out after every training run (12 s, a traceback)
    assert "crawl      ran      300 rows" in out
    assert "curate     ran" in out
    assert "train      ran" in out and "model: models:/demo-train@candidate" in out
    assert "evaluate   ran" in out
    files = {p: p.stat().st_mtime_ns for p in (store / "demo").rglob("*")}

    # the port is part of every URL: the same port gives the same list and so the same cache key
    second = run_cli(*cmd, timeout=300, env={**os.environ, "CLIPLINE_LOG_DIR": str(logs)})
    assert second.returncode == 0, second.stderr
    assert "crawl      cached   300 rows" in second.stdout
    assert "curate     cached" in second.stdout
    assert "train      cached" in second.stdout
    assert "evaluate   cached" in second.stdout
    assert "URL list unchanged" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in (store / "demo").rglob("*")} == files

    runs = mlflow_runs(store)
    assert [(run_label(r), r.data.tags.get("clipline.cache")) for r in runs] == [
        ("demo", None), ("crawl", "miss"), ("curate", "miss"), ("train", "miss"), ("evaluate", "miss"),
        ("demo", None), ("crawl", "hit"), ("curate", "hit"), ("train", "hit"), ("evaluate", "hit")]
    crawl = runs[1]
    assert crawl.data.metrics["crawl/input_rows"] == 300
    kinds = url_list("http://x", 300, DEMO_SEED, DEMO_FAULTS)["kind"].value_counts()
    assert crawl.data.metrics["crawl/failed_to_download"] == kinds["missing"] > 0
    assert crawl.data.metrics["crawl/opted_out"] == kinds["optout"] > 0
    assert crawl.data.metrics["crawl/failed_to_resize"] == kinds["html"] > 0
    assert crawl.data.metrics["crawl/success"] == kinds["img"]
    assert crawl.data.params["resize_mode"] == "border"
    artifacts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
                 .list_artifacts(crawl.info.run_id)}
    assert {"crawl_status.png", "manifest"} <= artifacts

    # the curate stage's funnel: rows in = rows crawled, every drop counted by reason, rows out = curated rows
    curate = runs[2].data.metrics
    assert curate["curate/rows_in"] == 300
    assert curate["curate/dropped_not_downloaded"] == 300 - kinds["img"]
    dropped = sum(v for k, v in curate.items() if k.startswith("curate/dropped_"))
    assert curate["curate/rows_out"] == curate["curate/rows"] == 300 - dropped > 0
    # and training on the curated rows: three epochs of 2 workers x 16, every step logged once
    steps = 3 * (int(curate["curate/rows_out"]) // 2 // 16)
    assert f"train      ran      {steps} steps" in out and steps > 0
    train = runs[3]
    assert train.data.metrics["train/steps"] == steps
    loss = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db").get_metric_history(train.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, steps + 1))
    artifacts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
                 .list_artifacts(runs[2].info.run_id)}
    assert {"curate_funnel.png", "curate_histograms.png", "manifest"} <= artifacts

    # the evaluate stage scored the trained model: every CLIP_benchmark metric of both sets, in [0, 1]
    evaluate = runs[4].data.metrics
    for name, keys in (("demo_heldout", ["acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall_at_1",
                                         "text_retrieval_recall_at_10"]), ("digits", ["acc1", "acc5"])):
        for k in keys:
            assert 0 <= evaluate[f"eval/{name}/{k}"] <= 1, (name, k)
    assert "eval/digits/image_retrieval_recall_at_1" not in evaluate  # the job asks digits for zero-shot only
    artifacts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
                 .list_artifacts(runs[4].info.run_id)}
    assert {"eval_demo_heldout_confusion.png", "eval_demo_heldout_retrieval.png", "eval_digits_confusion.png",
            "eval_summary.md"} <= artifacts
