"""The README's "From the demo to a cluster" steps, run as written: the object store, PostgreSQL and MLflow
(cluster/local_services.py), a 3-node local Ray cluster, the demo web, submit, status, logs, report."""

from __future__ import annotations

import os
import re
import signal
import subprocess

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


def _user_env() -> dict[str, str]:
    """A user's shell: no venv on PATH, none of the switches or test settings this process has."""
    drop = ("VIRTUAL_ENV", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    return env


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
    script = tmp_path / "steps.sh"
    script.write_text("set -euo pipefail\nset -x\n" + steps)
    out = tmp_path / "steps.out"
    with out.open("wb") as f:
        proc = subprocess.Popen(["bash", str(script)], cwd=REPO, env=_user_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
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
