"""`clipline submit / status / logs` against a real Ray head started with `ray start --head` on 127.0.0.1.

A submission that runs the demo to the end is checked once, on the README's 3-node cluster
(tests/test_readme_cluster.py: status, logs, runtime env, the runs on the tracking server); here, the ways a
submission fails and how the commands name what they could not reach.

The head runs with token authentication (a token of this test's own, not ~/.ray's) and every Ray server bound
to loopback (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray keep 127.0.0.1 as the node address instead of
swapping in the machine's own). The CLI runs as a subprocess, as a user would run it.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.demo.run import DEMO_JOB
from tests.conftest import REPO
from tests.support.cli import run_cli
from tests.support.net import free_port, free_ports, wait_until

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent


def _env(token: Path) -> dict[str, str]:
    return dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node Ray cluster on 127.0.0.1; yields its dashboard URL and the environment that reaches it."""
    tmp = tmp_path_factory.mktemp("head")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = _env(token)
    dashboard_port, gcs_port, client_port, agent_port, metrics_port = free_ports(5)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
           str(dashboard_port), "--ray-client-server-port", str(client_port), "--num-cpus", "2",
           # the job agent's HTTP port is fixed (52365) by default: the suite's other local Ray has it
           "--dashboard-agent-listen-port", str(agent_port), "--metrics-export-port", str(metrics_port),
           "--disable-usage-stats"]
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        # the client reads the token from the environment: check from a subprocess with it, not this process
        probe = ("import sys\nfrom ray.job_submission import JobSubmissionClient\n"
                 f"JobSubmissionClient({dashboard!r})\n")
        err = ""

        def answers() -> bool:
            nonlocal err
            r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
            err = r.stderr[-500:]
            return r.returncode == 0

        wait_until(answers, 180, f"the Ray head at {dashboard}", alive=lambda: proc.poll() is None,
                   detail=lambda: f"{err}\nray start log: {(tmp / 'ray-start.log').read_text()}")
        yield dashboard, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(1)  # a head given SIGTERM drains for up to 30 s; nothing here needs that
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the graceful stop left behind
        except ProcessLookupError:
            pass
        log.close()


def test_a_failing_job_is_the_drivers_exit_code_and_a_bad_spec_never_reaches_the_cluster(head, tmp_path):
    dashboard, env = head
    r = run_cli("submit", str(DEMO_JOB), "--address", dashboard, "--storage", str(tmp_path / "s"), "--wait", env=env)
    # no URL list under this storage: the driver's preflight on the cluster stops it (a bad spec, exit 2; the
    # client cannot see the cluster's files), and so does the submission
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "urls.parquet" in r.stdout and "FAILED" in r.stderr
    sid = r.stdout.splitlines()[0]  # without --submission-id: the job's name, the time and a random part
    assert re.fullmatch(r"clipline-demo-\d{8}-\d{6}-[0-9a-f]{6}", sid), sid
    assert f"submitted 'demo' to {dashboard} as {sid}" in r.stderr

    r = run_cli("submit", str(DEMO_JOB), "--address", dashboard, "--set", "stages.crawl.with.image_size=big", env=env)
    assert r.returncode == 2 and "stages.crawl.with.image_size: expected integer" in r.stderr
    r = run_cli("submit", str(DEMO_JOB), "--address", dashboard, env=env)  # storage ./clipline-data
    assert r.returncode == 2 and "relative to the job's working directory" in r.stderr

    r = run_cli("status", "clipline-no-such-job", "--address", dashboard, timeout=120, env=env)
    assert r.returncode == 1 and "clipline-no-such-job" in r.stderr


def test_an_address_that_does_not_answer_and_a_missing_token_are_named(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    r = run_cli("submit", str(DEMO_JOB), "--address", closed, "--storage", str(tmp_path), timeout=180, env=_env(token))
    assert r.returncode == 1 and f"no Ray Jobs API at {closed}" in r.stderr, r.stderr[-2000:]
    # an explicit --address wins over RAY_API_SERVER_ADDRESS (which Ray's client would otherwise prefer)
    exported = f"http://127.0.0.1:{free_port()}"
    r = run_cli("status", "x", "--address", closed, timeout=180, env=_env(token) | {"RAY_API_SERVER_ADDRESS": exported})
    assert r.returncode == 1 and f"no Ray Jobs API at {closed}" in r.stderr and exported not in r.stderr, r.stderr
    # without one, the error names the variable it used
    r = run_cli("logs", "x", timeout=180, env=_env(token) | {"RAY_API_SERVER_ADDRESS": exported})
    assert r.returncode == 1 and f"no Ray Jobs API at RAY_API_SERVER_ADDRESS={exported}" in r.stderr, r.stderr
    r = run_cli("logs", "x", "--address", closed, timeout=180, env=_env(tmp_path / "absent"))
    assert r.returncode == 1 and "wants its auth token: RAY_AUTH_TOKEN_PATH is set but file cannot be opened" \
        in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_deps_pip_ships_every_dependency_at_the_locked_version(tmp_path):
    from pipelines.submit import runtime_env, storage_extras

    env = runtime_env(DEMO_JOB, tmp_path, "pip", {"K": "v"})
    pins = env["pip"]["packages"]
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    assert "ray[data,train,default]==2.60.0" in pins and "torch==2.14.1" in pins
    assert f"s3fs=={lock['s3fs']}" in pins and not any(p.startswith("gcsfs") for p in pins)  # the s3 extra
    assert all("==" in p for p in pins) and all(lock[p.split("==")[0].split("[")[0]] == p.split("==")[1]
                                                for p in pins if p.split("==")[0].split("[")[0] in lock)
    assert (tmp_path / "job.yaml").read_text() == DEMO_JOB.read_text() and env["env_vars"] == {"K": "v"}
    with pytest.raises(ValueError, match="--deps: expected installed or pip"):
        runtime_env(DEMO_JOB, tmp_path, "conda", {})
    # gs:// storage ships gcsfs too; an extra pyproject does not have is named
    assert storage_extras("gs://bucket/x") == ("s3", "gcs") and storage_extras("/data") == ("s3",)
    pins = runtime_env(DEMO_JOB, tmp_path, "pip", {}, ("s3", "gcs"))["pip"]["packages"]
    assert f"gcsfs=={lock['gcsfs']}" in pins and f"s3fs=={lock['s3fs']}" in pins
    with pytest.raises(ValueError, match="pyproject.toml has no extra 'azure'"):
        runtime_env(DEMO_JOB, tmp_path, "pip", {}, ("azure",))
