"""MLflow writes that outlive the tracking server: a local spool, and its replay.

`SpoolingClient` wraps `MlflowClient`. A write the server cannot take (it does not answer, or answers 5xx,
after MLflow's own retries) turns the client offline for the rest of the process: that write and every
later one is appended, in order, to a JSON-lines file in the spool directory, with the files a figure, text
or artifact needs copied beside it, and the stage goes on. Runs created while offline get ids of the form
`offline-<hex>`. `replay` sends a spool directory to a tracking server in the order it was written (all
processes' files merged by time), maps offline ids to the runs it creates, and remembers what it has sent,
so a replay that fails half way continues where it stopped.

Staying offline once offline keeps the order of a run's writes (a status set while offline is never
overtaken by a later write that reached the server). Model logging and registration are not spooled: the
train stage skips them offline and says so; the model's weights are in the stage output.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from pipelines.redact import scrub

log = logging.getLogger("clipline.tracking")

OFFLINE = "offline-"
PROGRESS = "_replayed.json"  # in the spool directory: offline id -> real id, lines sent per file
# Short retries before a write is spooled (MLflow's defaults retry for minutes); the user's settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_DOWN = re.compile(r"failed with exception|failed with error code 5\d\d|Max retries exceeded|Connection refused"
                   r"|Connection aborted|Read timed out|RemoteDisconnected|Name or service not known")


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer and the job requires it."""


def unreachable(exc: BaseException) -> bool:
    """Whether an MLflow call failed because the server is down or failing (not because of what was sent)."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, urllib.error.URLError)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    return type(exc).__name__ in ("MlflowException", "RestException") and bool(_DOWN.search(str(exc)))


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable unless the tracking server at `uri` answers its health check.

    Asked through MLflow's own HTTP client, so the request carries what every later call will: user info in
    the URI, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, MLFLOW_TRACKING_INSECURE_TLS, a server certificate."""
    if not is_remote(uri):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        r = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=timeout,
                         raise_on_status=False)
        if r.status_code == 200:
            return
        why = f"HTTP {r.status_code}"
    except Exception as exc:  # noqa: BLE001 - whatever the reason, the server cannot be used
        why = f"{type(exc).__name__}: {scrub(str(exc))[:300]}"
    raise TrackingUnavailable(f"MLflow tracking server {scrub(uri)} does not answer (GET /health: {why})")


def default_dir(store: str) -> str:
    """Where a job's spool goes: beside its outputs when storage is local, else under the user's cache
    ($XDG_CACHE_HOME, default ~/.cache): the spool is an append-only log, which an object store cannot hold
    (no appends), and `clipline replay` on the same machine finds it there by the storage URL."""
    from pipelines import storage

    if storage.is_local(store):
        return os.path.join(storage.resolve(store), "_mlflow_spool")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", store)[-120:]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "clipline", "mlflow-spool", safe)


# -- the operations: how SpoolingClient writes each one to the spool, and how `replay` sends it ---------------
# One class per operation, its record and its replay side by side. A record is one JSON object per line:
# {"t": <time written>, "op": <name>, "run_id": ..., ...}; the format is what earlier versions wrote too, so
# a spool left by any of them replays.


def _entity(x: Any) -> list[Any]:
    """A metric as [key, value, timestamp, step]; a param, tag or input tag as [key, value]."""
    return [x.key, x.value, x.timestamp, x.step] if hasattr(x, "step") else [x.key, x.value]


class _Replay:
    """What a replay knows while it sends records: the client, the offline run ids it has mapped to real ones,
    the experiments it has found or made."""

    def __init__(self, client: Any, spool: str, uri: str, ids: dict[str, str]) -> None:
        self.client, self.spool, self.uri, self.ids = client, spool, uri, ids
        self.experiments: dict[str, str] = {}

    def real(self, run_id: str) -> str:
        if not run_id.startswith(OFFLINE):
            return run_id
        if run_id not in self.ids:
            raise ValueError(f"{self.spool}: run {run_id} is used before the record that creates it")
        return self.ids[run_id]

    def parent(self, key: str, value: str) -> str:
        """A tag's value, the parent run's real id when the tag names one."""
        return self.real(value) if key == "mlflow.parentRunId" and value else value

    def experiment(self, eid: str) -> str:
        if not eid.startswith(OFFLINE):
            return eid
        if eid not in self.experiments:
            name = eid[len(OFFLINE + "experiment:"):]
            exp = self.client.get_experiment_by_name(name)
            from pipelines.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, sqlite_artifact_root  # imports us

            # a sqlite store keeps its artifacts beside the database, as Tracker lays a job's store out; the
            # experiment opens in MLflow's model-training view, as one Tracker makes does
            self.experiments[eid] = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=sqlite_artifact_root(self.uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        return self.experiments[eid]


class _Op:
    """A spooled operation: `record(...)` is the spool's record of a call, `replay(r, rec)` sends it."""

    name: ClassVar[str]

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        raise NotImplementedError


class CreateRun(_Op):
    name = "create_run"

    @staticmethod
    def record(run_id: str, experiment_id: str, run_name: str | None, tags: dict[str, str] | None) -> dict[str, Any]:
        return {"op": CreateRun.name, "run_id": run_id, "experiment_id": experiment_id, "run_name": run_name,
                "tags": tags or {}, "start_time": int(time.time() * 1000)}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        run = r.client.create_run(r.experiment(rec["experiment_id"]), run_name=rec["run_name"],
                                  start_time=rec.get("start_time", int(rec["t"] * 1000)),
                                  tags={k: r.parent(k, v) for k, v in rec["tags"].items()})
        r.ids[rec["run_id"]] = run.info.run_id


class LogBatch(_Op):
    name = "log_batch"

    @staticmethod
    def record(run_id: str, metrics: Sequence[Any], params: Sequence[Any], tags: Sequence[Any]) -> dict[str, Any]:
        return {"op": LogBatch.name, "run_id": run_id, "metrics": [_entity(m) for m in metrics],
                "params": [_entity(p) for p in params], "tags": [_entity(t) for t in tags]}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        r.client.log_batch(r.real(rec["run_id"]), metrics=[Metric(*m) for m in rec["metrics"]],
                           params=[Param(*p) for p in rec["params"]], tags=[RunTag(*t) for t in rec["tags"]])


class SetTag(_Op):
    name = "set_tag"

    @staticmethod
    def record(run_id: str, key: str, value: Any) -> dict[str, Any]:
        return {"op": SetTag.name, "run_id": run_id, "key": key, "value": str(value)}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        r.client.set_tag(r.real(rec["run_id"]), rec["key"], r.parent(rec["key"], rec["value"]))


class DeleteTag(_Op):
    name = "delete_tag"

    @staticmethod
    def record(run_id: str, key: str) -> dict[str, Any]:
        return {"op": DeleteTag.name, "run_id": run_id, "key": key}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            r.client.delete_tag(r.real(rec["run_id"]), rec["key"])
        except MlflowException as exc:  # deleted offline, not knowing whether the run had it
            if "No tag with name" not in str(exc):
                raise


class UpdateRun(_Op):
    name = "update_run"

    @staticmethod
    def record(run_id: str, status: str | None, name: str | None) -> dict[str, Any]:
        return {"op": UpdateRun.name, "run_id": run_id, "status": status, "name": name}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        r.client.update_run(r.real(rec["run_id"]), status=rec["status"], name=rec["name"])


class SetTerminated(_Op):
    name = "set_terminated"

    @staticmethod
    def record(run_id: str, status: str | None, end_time: int) -> dict[str, Any]:
        return {"op": SetTerminated.name, "run_id": run_id, "status": status, "end_time": end_time}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        r.client.set_terminated(r.real(rec["run_id"]), status=rec["status"], end_time=rec["end_time"])


class LogInputs(_Op):
    name = "log_inputs"

    @staticmethod
    def record(run_id: str, datasets: Sequence[Any]) -> dict[str, Any]:
        return {"op": LogInputs.name, "run_id": run_id, "datasets": [
            {"name": d.dataset.name, "digest": d.dataset.digest, "source_type": d.dataset.source_type,
             "source": d.dataset.source, "profile": d.dataset.profile, "tags": [_entity(t) for t in d.tags]}
            for d in datasets]}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        r.client.log_inputs(r.real(rec["run_id"]), datasets=[
            DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"]),
                         [InputTag(*t) for t in d["tags"]]) for d in rec["datasets"]])


class LogArtifact(_Op):
    """A file (an artifact, a figure, a text) kept in the spool directory under `file`, relative to it."""

    name = "log_artifact"

    @staticmethod
    def record(run_id: str, artifact_path: str | None, file: str) -> dict[str, Any]:
        return {"op": LogArtifact.name, "run_id": run_id, "artifact_path": artifact_path, "file": file}

    @staticmethod
    def replay(r: _Replay, rec: dict[str, Any]) -> None:
        r.client.log_artifact(r.real(rec["run_id"]), os.path.join(r.spool, rec["file"]), rec["artifact_path"])


OPERATIONS: dict[str, type[_Op]] = {op.name: op for op in (CreateRun, LogBatch, SetTag, DeleteTag, UpdateRun,
                                                             SetTerminated, LogInputs, LogArtifact)}


# -- the client ------------------------------------------------------------------------------------------------
class SpoolingClient:
    """An MlflowClient whose writes fall back to a local spool when the server is down; reads pass through."""

    def __init__(self, uri: str, spool: str, offline: bool = False, why: str = "") -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.uri, self.spool_dir, self.offline = uri, spool, False
        self._client = MlflowClient(tracking_uri=uri)
        self.path = os.path.join(spool, f"{time.strftime('%Y%m%dT%H%M%S')}-{socket.gethostname()}-{os.getpid()}"
                                        f"-{uuid.uuid4().hex[:6]}.jsonl")
        self.records = 0
        if offline:
            self.go_offline(why)

    def __getattr__(self, name: str) -> Any:  # reads and calls clipline does not spool go straight to MLflow
        if name.startswith("__") or name == "_client":  # copy and pickle probe for these before __init__ ran
            raise AttributeError(name)
        return getattr(self._client, name)

    # -- the writes ------------------------------------------------------------------------------------------
    def create_run(self, experiment_id: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> Any:
        if not self.offline and not str(experiment_id).startswith(OFFLINE):
            try:
                return self._client.create_run(experiment_id, run_name=run_name, tags=tags)
            except Exception as exc:  # noqa: BLE001 - _fail raises it again unless the server is unreachable
                self._fail(exc)
        run_id = OFFLINE + uuid.uuid4().hex
        self._append(CreateRun.record(run_id, experiment_id, run_name, tags))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=experiment_id))

    def log_batch(self, run_id: str, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags: Sequence[Any] = ()
                  ) -> None:
        self._write(run_id, lambda: self._client.log_batch(run_id, metrics=list(metrics), params=list(params),
                                                           tags=list(tags)),
                    lambda: LogBatch.record(run_id, metrics, params, tags))

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self._write(run_id, lambda: self._client.set_tag(run_id, key, value), lambda: SetTag.record(run_id, key, value))

    def delete_tag(self, run_id: str, key: str) -> None:
        self._write(run_id, lambda: self._client.delete_tag(run_id, key), lambda: DeleteTag.record(run_id, key))

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self._write(run_id, lambda: self._client.update_run(run_id, status=status, name=name),
                    lambda: UpdateRun.record(run_id, status, name))

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        end = end_time or int(time.time() * 1000)
        self._write(run_id, lambda: self._client.set_terminated(run_id, status=status, end_time=end),
                    lambda: SetTerminated.record(run_id, status, end))

    def log_inputs(self, run_id: str, datasets: list[Any]) -> None:
        self._write(run_id, lambda: self._client.log_inputs(run_id, datasets=datasets),
                    lambda: LogInputs.record(run_id, datasets))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._write(run_id, lambda: self._client.log_artifact(run_id, local_path, artifact_path),
                    lambda: LogArtifact.record(run_id, artifact_path, self._keep(
                        Path(local_path).name, lambda dst: shutil.copyfile(local_path, dst))))

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self._write(run_id, lambda: self._client.log_figure(run_id, figure, artifact_file),
                    lambda: LogArtifact.record(run_id, _parent(artifact_file),
                                               self._keep(Path(artifact_file).name, figure.savefig)))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write(run_id, lambda: self._client.log_text(run_id, text, artifact_file),
                    lambda: LogArtifact.record(run_id, _parent(artifact_file), self._keep(
                        Path(artifact_file).name, lambda dst: Path(dst).write_text(text, encoding="utf-8"))))

    # -- the machinery ---------------------------------------------------------------------------------------
    def _write(self, run_id: str, call: Callable[[], Any], record: Callable[[], dict[str, Any]]) -> None:
        """Make the call, or append its record (made only then: an artifact's record copies its file) to the spool."""
        if not self.offline and not run_id.startswith(OFFLINE):
            try:
                call()
                return
            except Exception as exc:  # noqa: BLE001 - _fail raises it again unless the server is unreachable
                self._fail(exc)
        self._append(record())

    def _fail(self, exc: Exception) -> None:
        if not unreachable(exc):
            raise exc
        self.go_offline(f"{type(exc).__name__}: {str(exc)[:300]}")

    def go_offline(self, why: str) -> None:
        if self.offline:
            return
        self.offline = True
        os.makedirs(self.spool_dir, exist_ok=True)
        uri = scrub(self.uri)
        log.warning("MLflow at %s is not taking writes (%s): this process writes its runs, metrics and artifacts to "
                    "%s from now on; send them with `clipline replay JOB` (or `clipline replay --spool %s --uri %s`) "
                    "once the server is back", uri, scrub(why), self.path, self.spool_dir, uri)

    def _keep(self, name: str, save: Any) -> str:
        """A copy of an artifact's file in the spool directory, named relative to it."""
        rel = os.path.join("files", uuid.uuid4().hex[:12], name)
        dst = os.path.join(self.spool_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        save(dst)
        return rel

    def _append(self, record: dict[str, Any]) -> None:
        os.makedirs(self.spool_dir, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"t": time.time(), **record}, default=str) + "\n")
        self.records += 1


def _parent(artifact_file: str) -> str | None:
    parent = os.path.dirname(artifact_file)
    return parent or None


# -- reading a spool ----------------------------------------------------------------------------------------------
def _records(path: Path, start: int) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a spool file from line `start` on, up to a line cut short by a killed process."""
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start or not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError:  # a process killed mid-line: nothing after it in that file
                log.warning("%s line %d: cut short, not replayed", path, i + 1)
                break
    return out


def pending(spool: str) -> dict[str, int]:
    """Spool files with records not yet replayed, and how many."""
    sent = _progress(spool)["lines"]
    out = {}
    for f in sorted(Path(spool).glob("*.jsonl")) if os.path.isdir(spool) else []:
        if n := len(_records(f, sent.get(f.name, 0))):
            out[f.name] = n
    return out


def last_step(spool: str, run_id: str, key: str) -> int:
    """The highest step of metric `key` for `run_id` in the spool's records not yet replayed (0 if none)."""
    sent, top = _progress(spool)["lines"], 0
    for f in sorted(Path(spool).glob("*.jsonl")) if os.path.isdir(spool) else []:
        for _, rec in _records(f, sent.get(f.name, 0)):
            if rec["op"] == "log_batch" and rec["run_id"] == run_id:
                top = max([top, *(m[3] for m in rec["metrics"] if m[0] == key)])
    return top


def real_id(spool: str, run_id: str) -> str | None:
    """The server's id of a run created offline, once a replay has sent it; else None."""
    return _progress(spool)["ids"].get(run_id)


def _progress(spool: str) -> dict[str, Any]:
    path = os.path.join(spool, PROGRESS)
    if os.path.exists(path):
        return json.loads(Path(path).read_text())
    return {"ids": {}, "lines": {}}


def replay(spool: str, uri: str) -> dict[str, int]:
    """Send a spool directory's records to the tracking server at `uri`, in the order they were written.

    Returns counts by operation. Safe to run again: what was sent is recorded in `_replayed.json`."""
    from mlflow import MlflowClient

    if not os.path.isdir(spool):
        raise FileNotFoundError(f"no MLflow spool at {spool}")
    probe(uri)
    state = _progress(spool)
    ids, lines = state["ids"], state["lines"]
    r = _Replay(MlflowClient(tracking_uri=uri), spool, uri, ids)
    # one process's records in the order it wrote them (a clock that stepped back cannot reorder them),
    # the processes' files interleaved by time
    files = [[(rec["t"], f.name, i, rec) for i, rec in _records(f, lines.get(f.name, 0))]
             for f in sorted(Path(spool).glob("*.jsonl"))]
    records = list(heapq.merge(*files, key=lambda r: r[0]))
    counts: dict[str, int] = {}
    save = os.path.join(spool, PROGRESS)

    def remember() -> None:  # after every record: a replay killed at any point resumes after the last one sent
        tmp = save + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"ids": ids, "lines": lines}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, save)

    try:
        for _, fname, i, rec in records:
            op = rec["op"]
            if op not in OPERATIONS:
                raise ValueError(f"{spool}/{fname} line {i + 1}: unknown operation {op!r}")
            OPERATIONS[op].replay(r, rec)
            lines[fname] = i + 1
            counts[op] = counts.get(op, 0) + 1
            remember()
    finally:
        remember()
    return counts
