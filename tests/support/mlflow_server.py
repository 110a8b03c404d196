"""A shared MLflow tracking server as a cluster runs one: `mlflow server` with a database backend (the tests'
PostgreSQL) and artifacts proxied to an object store (the tests' moto S3), on 127.0.0.1.

Clients log over HTTP and never touch the artifact store themselves: the experiments' artifact root is
`mlflow-artifacts:/`, which the server maps onto `--artifacts-destination` with its own S3 credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Self

from tests.support.net import die_with_parent, free_port, wait_until

# MLflow 3 reports usage to mlflow-telemetry.io unless told not to; its check reads MLFLOW_DISABLE_TELEMETRY
# (true/1) or DO_NOT_TRACK == "true" (it does not take the usual DO_NOT_TRACK=1)
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# the variables by which MLflow 3.17 decides it runs under a test or CI and turns telemetry off on its own
# (mlflow/telemetry/utils.py): left out of the server's environment, so that the switch above is what keeps it
# quiet, as on a user's machine
# MLflow 3's server starts a job runner and eight huey consumers for its GenAI jobs (prompt optimisation,
# scorers) when the backend is a database; clipline runs none, and on 2 cores they slow everything else down
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
_CI_MARKERS = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
               "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
               "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID")


def command(artifacts_destination: str, port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    """The `mlflow server` command line (as the README gives it, with the interpreter's own mlflow). The
    backend store URI is not on it: it carries the database password, and any user can read a command line
    (`ps`), so it goes in MLFLOW_BACKEND_STORE_URI, which only the server's own user can read."""
    return [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", artifacts_destination,
            "--host", host, "--port", str(port), "--workers", str(workers)]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port> in its own process group; `uri` is what a job's
    `tracking.uri` (or MLFLOW_TRACKING_URI) takes. `s3_env` is the object store's endpoint and credentials,
    which only the server needs."""

    def __init__(self, backend_uri: str, artifacts_destination: str, log_dir: Path,
                 s3_env: dict[str, str] | None = None, workers: int = 1) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_uri, self.artifacts_destination = backend_uri, artifacts_destination
        self.log = Path(log_dir) / "mlflow_server.log"
        env = {k: v for k, v in os.environ.items() if k not in _CI_MARKERS}
        s3_env = dict(s3_env or {})
        if "AWS_ENDPOINT_URL" in s3_env:  # MLflow's S3 artifact repository reads its own variable first
            s3_env.setdefault("MLFLOW_S3_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
        self.env = {**env, **s3_env, **NO_TELEMETRY, **NO_JOB_RUNNER, "MLFLOW_BACKEND_STORE_URI": backend_uri}
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    @property
    def cmd(self) -> list[str]:
        return command(self.artifacts_destination, self.port, workers=self.workers)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 180) -> Self:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            # its own session: the server forks workers, and stop() ends exactly that group
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True,
                                         preexec_fn=die_with_parent)
        try:
            # the first start against an empty database runs MLflow's schema migrations: tens of seconds on 2 cores
            wait_until(self.healthy, timeout, f"mlflow server on {self.uri} (log {self.log})", interval=0.5,
                       alive=lambda: self.proc.poll() is None)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{exc}; last lines of the log:\n{tail}") from None
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
