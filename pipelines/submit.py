"""Run a job on a running Ray cluster through the Ray Jobs API: `clipline submit / status / logs`.

The submitted entrypoint is `python -m pipelines.cli run job.yaml ...` on the head node. What travels in the
runtime env: a working directory holding the job spec as given (the overrides go on the command line, so the
cluster validates the same spec the client did), clipline's own code as a `py_modules` package (so the
cluster runs the submitter's version, not whatever its image installed), and with `--deps pip` the pinned
third-party dependencies, which Ray installs in a virtualenv per job on each node. With the default
`--deps installed` the cluster's Python must already have them: `cluster/*.yaml` and the KubeRay
manifests install them in their setup commands and images.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import __version__, storage
from pipelines.spec import JobSpec

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120  # how long a submission waits for a just-started head's job agent
log = logging.getLogger("clipline")


class SubmitError(RuntimeError):
    """The cluster cannot be reached or refused the request; the message names the address."""


def client(address: str | None):
    """A Jobs API client; an address that does not answer is an error that names it."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise SubmitError(f"{address}: the cluster wants its auth token: {str(exc).split('. ')[0]} (set "
                          "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it)") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "the address in RAY_API_SERVER_ADDRESS or RAY_ADDRESS"
        raise SubmitError(f"no Ray Jobs API at {where}: {exc} (the address is the dashboard's, "
                          f"e.g. http://HEAD:8265)") from None


def pinned_dependencies() -> list[str]:
    """clipline's runtime dependencies at the versions requirements.lock pins (what `--deps pip` ships)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            lock[_normal(name.split("[", 1)[0])] = version.strip()
    out = []
    for dep in project["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]
        extras = dep[len(name):].split("]", 1)[0] + "]" if dep[len(name):].startswith("[") else ""
        version = lock.get(_normal(name))
        out.append(f"{name}{extras}=={version}" if version else dep)
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_env(job_file: Path, workdir: Path, deps: str, env: dict[str, str]) -> dict[str, Any]:
    """The runtime env of a submission; copies the job spec into `workdir`, which becomes the working dir."""
    shutil.copyfile(job_file, workdir / "job.yaml")
    out: dict[str, Any] = {
        "working_dir": str(workdir),
        "py_modules": [str(PACKAGE)],
        "excludes": ["__pycache__", "*.pyc"],
    }
    if deps == "pip":
        out["pip"] = {"packages": pinned_dependencies(), "pip_check": False}
    elif deps != "installed":
        raise ValueError(f"--deps: expected installed or pip, got {deps!r}")
    if env:
        out["env_vars"] = dict(env)
    return out


def entrypoint(overrides: list[str], storage_url: str | None, run_args: list[str]) -> str:
    """The command the cluster runs; Ray is joined (`ray.address=auto`) whatever the spec says for local runs."""
    import shlex

    words = ["python", "-m", "pipelines.cli", "run", "job.yaml", "--no-progress", "--set", "ray.address=auto"]
    for o in overrides:
        words += ["--set", o]
    if storage_url:
        words += ["--storage", storage_url]
    return shlex.join(words + run_args)


def check_storage(job: JobSpec, storage_url: str | None) -> None:
    """A relative local storage path would mean the cluster's temporary working dir: refuse it."""
    given = storage_url or job.raw["storage"]  # as written: spec.load made it absolute on this machine
    if storage.is_local(given) and not Path(given).is_absolute():
        raise ValueError(f"storage {given!r} is a path relative to the job's working directory on the "
                         "cluster, which Ray deletes; give --storage an absolute path on a disk every node "
                         "shares, or an object store URL (s3://..., gs://...)")


def submit(job: JobSpec, job_file: Path, address: str | None, *, overrides: list[str], storage_url: str | None,
           run_args: list[str], deps: str = "installed", env: dict[str, str] | None = None,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None) -> str:
    """Submit the job; returns its submission id."""
    check_storage(job, storage_url)
    jobs = client(address)
    sid = submission_id or f"clipline-{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="clipline-submit-") as tmp:
        renv = runtime_env(job_file, Path(tmp), deps, env or {})
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return jobs.submit_job(
                    entrypoint=entrypoint(overrides, storage_url, run_args), runtime_env=renv, submission_id=sid,
                    metadata={"clipline.job": job.name, "clipline.version": __version__,
                              "clipline.spec": str(job_file)},
                    entrypoint_num_cpus=entrypoint_num_cpus)
            except RuntimeError as exc:
                # a head that has just started answers before its node's job agent has registered
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    log.info("the cluster's job agent is not up yet; retrying the submission")
                    time.sleep(2)
                    continue
                raise SubmitError(f"{address}: the cluster refused the submission: {exc}") from None


def describe(jobs, sid: str) -> dict[str, Any]:
    """Status, message, times and the driver's exit code of one submission."""
    try:
        info = jobs.get_job_info(sid)
    except RuntimeError as exc:
        raise SubmitError(f"submission {sid!r}: {exc}") from None
    fmt = (lambda ms: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-")
    return {"submission_id": sid, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message or "", "start": fmt(info.start_time), "end": fmt(info.end_time),
            "driver_exit_code": info.driver_exit_code, "entrypoint": info.entrypoint}


def follow(jobs, sid: str, write: Callable[[str], Any] = sys.stdout.write) -> dict[str, Any]:
    """Stream a submission's logs until it ends; returns its final description."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(sid):
            write(lines)

    asyncio.run(tail())
    # the log stream closes when the driver exits; the status turns terminal a moment later
    deadline = time.monotonic() + 60
    while (d := describe(jobs, sid))["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return d


def exit_code(d: dict[str, Any]) -> int:
    """clipline's exit code for a finished submission: the driver's own, else 0 for SUCCEEDED and 1 otherwise."""
    if d["driver_exit_code"] is not None:
        return int(d["driver_exit_code"])
    return 0 if d["status"] == "SUCCEEDED" else 1
