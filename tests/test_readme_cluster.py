"""The README's "From the demo to a cluster" steps, run as written: the object store, PostgreSQL and MLflow
(cluster/local_services.py), a 3-node local Ray cluster, the demo web, submit, status, logs, report.

It is also the suite's one fresh multi-node cluster with a submitted demo: before the block's teardown the test
adds one line of its own (tests/support/readme_facts.py) that collects what the live cluster and services show,
and checks here what test_multinode and test_submit once checked on clusters of their own: a fresh cluster's
first submission, every crawled row once, the driver in the cluster's Python and not the shell's first `python`,
the uploaded package and working dir, the runs on the tracking server, and an explicit --address winning over
the exported one. The shell is a user's: no venv on PATH, and a `python` first on it that lacks clipline's
dependencies."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

MARK = "<!-- readme-cluster-steps -->"


def readme_steps() -> str:
    """The bash block between the README's markers, exactly as a reader copies it."""
    text = (REPO / "README.md").read_text()
    block = text.split(MARK, 1)[1].split("<!-- /readme-cluster-steps -->", 1)[0]
    match = re.search(r"```bash\n(.*?)```", block, re.S)
    assert match, "README.md: no ```bash block between the cluster-steps markers"
    return match.group(1)


def _user_env(tmp: Path) -> dict[str, str]:
    """A user's shell: no venv on PATH, none of the switches or test settings this process has, and first on
    PATH a `python` without clipline's dependencies (a cluster's driver that took the shell's `python` failed)."""
    drop = ("VIRTUAL_ENV", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PYTEST_CURRENT_TEST", "RAY_AUTH_MODE",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    system = shutil.which("python3", path="/usr/bin:/bin")
    assert system and subprocess.run([system, "-c", "import fsspec"], capture_output=True).returncode != 0, \
        "the test needs a system python3 without fsspec"
    (tmp / "bin").mkdir()
    (tmp / "bin" / "python").symlink_to(system)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = ":".join([str(tmp / "bin")] + [p for p in env.get("PATH", "").split(":") if ".venv" not in p])
    return env


def _with_facts(steps: str, out: Path) -> str:
    """The block with the test's own line before its teardown (`kill %1`, the demo web, comes first)."""
    head, teardown = steps.split("kill %1", 1)
    return f"{head}{sys.executable} -m tests.support.readme_facts {out}\nkill %1{teardown}"


def test_the_readme_block_is_the_one_this_test_runs():
    steps = readme_steps()
    for needed in ("cluster/local_services.py start", "cluster/local.sh start", "demo --serve-only",
                   "clipline submit", "clipline status", "clipline logs", "clipline report", "cluster/local.sh stop",
                   "cluster/local_services.py stop"):
        assert needed in steps, f"README cluster steps lack {needed!r}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_readme_cluster_steps_run_as_written(tmp_path):
    steps = readme_steps()
    script, facts_file = tmp_path / "steps.sh", tmp_path / "facts.json"
    script.write_text("set -euo pipefail\nset -x\n" + _with_facts(steps, facts_file))
    out = tmp_path / "steps.out"
    with out.open("wb") as f:
        proc = subprocess.Popen(["bash", str(script)], cwd=REPO, env=_user_env(tmp_path), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=1380)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None or rc != 0:
            # what the block would have stopped itself: the web (its own job), the cluster, the services
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            subprocess.run(["cluster/local.sh", "stop"], cwd=REPO, timeout=120, check=False)
            subprocess.run([str(REPO / ".venv/bin/python"), "cluster/local_services.py", "stop"], cwd=REPO,
                           timeout=120, check=False)
    log = out.read_text(errors="replace")
    assert rc == 0, f"the README's cluster steps exited {rc}; output:\n{log[-6000:]}"

    # the submission, its status by id and its logs
    assert re.search(r"clipline-readme-demo SUCCEEDED", log), log[-4000:]
    assert re.search(r"^status\s+SUCCEEDED$", log, re.M) and re.search(r"^driver_exit_code\s+0$", log, re.M)
    # the job's own status, read from the bucket afterwards: every stage cached, in s3://
    stages = {m.group(1): m.group(2) for m in re.finditer(r"^(crawl|curate|train|evaluate)\s+(\w+)", log, re.M)}
    assert stages == {"crawl": "cached", "curate": "cached", "train": "cached", "evaluate": "cached"}, log[-4000:]
    assert re.search(r"s3://clipline/clipline/demo/crawl/[0-9a-f]+", log)
    # the report went to the bucket and to the tracking server
    assert re.search(r"^s3://clipline/clipline/demo/_reports/\S+\.html$", log, re.M), log[-3000:]
    assert "local_services: stopped" in log and "stopped the cluster" in log

    # a fresh cluster's first submission ran clean: no driver attempt failed, no traceback anywhere
    assert "attempt 1/2 failed" not in log and "Traceback" not in log, log[-5000:]
    facts = json.loads(facts_file.read_text())
    assert facts["states"] == {"crawl": "cached", "curate": "cached", "train": "cached", "evaluate": "cached"}

    # every row of the URL list is in the crawl's output exactly once, and the statuses are the manifest's counts
    crawl, urls = facts["crawl"], facts["url_list"]
    assert len(urls) == 200 and crawl["rows"] == 200 and crawl["urls"] == urls
    statuses = crawl["statuses"]
    assert crawl["counts"]["input_rows"] == 200 and statuses.count("success") >= 200 * 0.9
    assert {k: statuses.count(k) for k in set(statuses)} == {k: crawl["counts"][k] for k in set(statuses)}

    # one finished job run on the tracking server, its four stage runs under it, the evaluation scored
    runs = facts["runs"]
    parents = [r for r in runs if r["parent"] is None]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED", runs
    children = [r for r in runs if r["parent"] is not None]
    assert sorted(r["stage"] for r in children) == ["crawl", "curate", "evaluate", "train"]
    assert {r["parent"] for r in children} == {parents[0]["id"]}
    (evaluate,) = [r for r in children if r["stage"] == "evaluate"]
    assert 0.0 <= evaluate["metrics"]["eval/demo_heldout/acc1"] <= 1.0

    # the code ran from the uploaded package and the spec from the uploaded working dir, in the cluster's Python
    env = facts["runtime_env"]
    assert env["working_dir"].startswith("gcs://") and [m[:6] for m in env["py_modules"]] == ["gcs://"], env
    logs = facts["logs"]
    assert logs["rc"] == 0 and "crawl: done" in logs["stdout"] and "evaluate: done" in logs["stdout"], logs
    assert "driver of submission clipline-readme-demo: Python 3.11" in logs["stdout"], logs["stdout"][-3000:]
    assert f"at {REPO / '.venv' / 'bin' / 'python'} " in logs["stdout"], logs["stdout"][-3000:]

    # an explicit --address wins over RAY_API_SERVER_ADDRESS, whichever of the two answers
    st = facts["status_exported_wrong"]
    assert st["rc"] == 0 and "SUCCEEDED" in st["stdout"] and "driver_exit_code  0" in st["stdout"], st
    st = facts["status_explicit_wrong"]
    assert st["rc"] == 1 and f"no Ray Jobs API at {st['address']}" in st["stderr"], st
