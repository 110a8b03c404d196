"""Run a job on a running Ray cluster through the Ray Jobs API: `clipline submit / status / logs`.

The submitted entrypoint is `python -m pipelines.cli run job.yaml ...` on the head node. What travels in the
runtime env: a working directory holding the job spec as given (the overrides go on the command line, so the
cluster validates the same spec the client did), clipline's own code as a `py_modules` package (so the
cluster runs the submitter's version, not whatever its image installed), and with `--deps pip` the pinned
third-party dependencies (with the s3 extra, and the gcs one for gs:// storage), which Ray installs in a
virtualenv per job on each node. With the default `--deps installed` the cluster's Python must already have
them: `cluster/*.yaml` and the KubeRay manifests install them in their setup commands and images.

Which Python runs the driver: the entrypoint's `python` is the first on the PATH of the head node's Ray
processes (the cluster's Python, never the submitter's): Ray's image puts its own first, and
`cluster/local.sh` puts the interpreter it runs in first. The driver logs the interpreter it found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what JobSubmissionClient reads, in its order
SUBMISSION_VAR = "CLIPLINE_SUBMISSION_ID"  # set in a submitted job's environment: the driver names its Python
log = logging.getLogger("clipline")


class SubmitError(RuntimeError):
    """The cluster cannot be reached or refused the request; the message names the address."""


@contextlib.contextmanager
def _without(names: tuple[str, ...]):
    """os.environ without `names` inside the block, restored after it."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str | None):
    """A Jobs API client for `address`, else the environment's; one that does not answer is an error naming it."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        # Ray 2.60's client prefers RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, to the address it is given
        # (ray.dashboard.utils.get_address_for_submission_client): hide them when an address is explicit
        with _without(ADDRESS_VARS) if address else contextlib.nullcontext():
            return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise SubmitError(f"{address}: the cluster wants its auth token: {str(exc).split('. ')[0]} (set "
                          "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it)") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        named = next((f"{n}={os.environ[n]}" for n in ADDRESS_VARS if os.environ.get(n)), None)
        where = address or named or "no address (neither --address nor RAY_API_SERVER_ADDRESS/RAY_ADDRESS given)"
        raise SubmitError(f"no Ray Jobs API at {where}: {exc} (the address is the dashboard's, "
                          f"e.g. http://HEAD:8265)") from None


def pinned_dependencies(extras: tuple[str, ...] = ()) -> list[str]:
    """clipline's runtime dependencies, and those of its optional `extras`, at the versions requirements.lock
    pins (what `--deps pip` ships)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            lock[_normal(name.split("[", 1)[0])] = version.strip()
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"pyproject.toml has no extra {unknown[0]!r} (it has: {', '.join(sorted(optional))})")
    out = []
    for dep in project["dependencies"] + [d for e in extras for d in optional[e]]:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]
        dep_extras = dep[len(name):].split("]", 1)[0] + "]" if dep[len(name):].startswith("[") else ""
        pin = lock.get(_normal(name))
        out.append(f"{name}{dep_extras}=={pin}" if pin else dep)
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def storage_extras(storage_url: str) -> tuple[str, ...]:
    """The extras `--deps pip` ships: s3 always (s3:// URL lists and storage are the common case on a
    cluster), gcs as well for gs:// storage."""
    return ("s3", "gcs") if storage_url.startswith(("gs://", "gcs://")) else ("s3",)


def runtime_env(job_file: Path, workdir: Path, deps: str, env: dict[str, str],
                extras: tuple[str, ...] = ("s3",)) -> dict[str, Any]:
    """The runtime env of a submission; copies the job spec into `workdir`, which becomes the working dir."""
    shutil.copyfile(job_file, workdir / "job.yaml")
    out: dict[str, Any] = {
        "working_dir": str(workdir),
        "py_modules": [str(PACKAGE)],
        "excludes": ["__pycache__", "*.pyc"],
    }
    if deps == "pip":
        out["pip"] = {"packages": pinned_dependencies(extras), "pip_check": False}
    elif deps != "installed":
        raise ValueError(f"--deps: expected installed or pip, got {deps!r}")
    if env:
        out["env_vars"] = dict(env)
    return out


def entrypoint(overrides: list[str], storage_url: str | None, run_args: list[str], verbose: bool = False) -> str:
    """The command the cluster runs; Ray is joined (`ray.address=auto`) whatever the spec says for local runs.

    `python` is the cluster's (see the module's docstring); with `verbose` the driver logs at debug level,
    so a failed attempt's traceback reaches the job's logs."""
    import shlex

    words = ["python", "-m", "pipelines.cli"] + (["-v"] if verbose else [])
    words += ["run", "job.yaml", "--no-progress", "--set", "ray.address=auto"]
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
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           verbose: bool = False) -> str:
    """Submit the job; returns its submission id."""
    check_storage(job, storage_url)
    jobs = client(address)
    sid = submission_id or f"clipline-{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="clipline-submit-") as tmp:
        renv = runtime_env(job_file, Path(tmp), deps, {**(env or {}), SUBMISSION_VAR: sid},
                           storage_extras(storage_url or job.storage))
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return jobs.submit_job(
                    entrypoint=entrypoint(overrides, storage_url, run_args, verbose), runtime_env=renv,
                    submission_id=sid,
                    metadata={"clipline.job": job.name, "clipline.version": __version__,
                              "clipline.spec": str(job_file)},
                    entrypoint_num_cpus=entrypoint_num_cpus)
            except RuntimeError as exc:
                # a head that has just started answers before its node's job agent has registered
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    log.info("the cluster's job agent is not up yet; retrying the submission")
                    time.sleep(2)
                    continue
                raise SubmitError(f"{address or jobs.get_address()}: the cluster refused the submission: {exc}") \
                    from None


def driver_python() -> str:
    """What a submitted driver logs first: the interpreter it runs in, and for which submission."""
    import platform

    return (f"driver of submission {os.environ.get(SUBMISSION_VAR)}: Python {platform.python_version()} at "
            f"{sys.executable} (the cluster's `python`, first on the head's PATH)")


def describe(jobs, sid: str) -> dict[str, Any]:
    """Status, message, times and the driver's exit code of one submission."""
    try:
        info = jobs.get_job_info(sid)
    except RuntimeError as exc:
        raise SubmitError(f"submission {sid!r}: {exc}") from None

    def fmt(ms: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

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
