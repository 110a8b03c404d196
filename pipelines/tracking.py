"""MLflow lineage: one parent run per job run, one nested child run per stage (cache hits included).

We talk to MLflow through `MlflowClient` with explicit run ids rather than the fluent API's global
active-run stack, so nested runs stay correct when stages run in threads or Ray callbacks report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines import __version__, storage

log = logging.getLogger("clipline.tracking")

_SECRET = re.compile(r"(pass(word)?|secret|token|access[_-]?key|api[_-]?key|credential|auth|private[_-]?key)", re.I)
_SECRET_PARENTS = ("env_vars",)  # runtime_env.env_vars: values are credentials more often than not
REDACTED = "***"
_MAX_PARAM = 6000  # MLflow's limit on a param value


def resolve_uri(job_uri: str | None, store: str) -> str:
    """The job's tracking URI, else MLFLOW_TRACKING_URI, else a sqlite file under local storage."""
    if job_uri:
        return job_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if not storage.is_local(store):
        raise ValueError(
            f"storage {store!r} is not local, so there is no default sqlite tracking store: set tracking.uri "
            "in the job or MLFLOW_TRACKING_URI"
        )
    os.makedirs(store, exist_ok=True)
    return f"sqlite:///{store}/mlflow.db"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys; values that look like secrets are redacted, never logged."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            secret_parent = prefix.rsplit(".", 1)[-1] in _SECRET_PARENTS
            if (_SECRET.search(str(k)) or secret_parent) and not isinstance(v, dict):
                out[key] = REDACTED
            else:
                out.update(flatten(v, key))
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        text = obj if isinstance(obj, str) else json.dumps(obj)
        out[prefix] = text[:_MAX_PARAM]
    return out


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class StageTracker:
    """The small logging interface a stage sees: metrics, params, artifacts, figures, inputs."""

    def __init__(self, client: Any, run_id: str, stage: str, uri: str = "") -> None:
        self.client, self.run_id, self.stage, self.uri = client, run_id, stage, uri

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str | None = None) -> None:
        """Metrics as `<stage>/<name>` (or `<prefix>/<name>`; prefix "" logs the names as given); NaN is left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        prefix = self.stage if prefix is None else prefix
        items = [
            Metric(f"{prefix}/{k}" if prefix else k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_input(self, name: str, digest: str, source: str, context: str, profile: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest[:36], source_type="clipline", source=json.dumps({"uri": source}),
                     profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", context)])])


def log_bar_chart(tracker: StageTracker, items: list[tuple[str, float]], title: str, xlabel: str, artifact: str,
                  color: str = "#4c72b0") -> None:
    """A horizontal bar chart, first item on top, each bar labelled with its value, as a run artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.38 * len(items) + 1.3))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color=color)
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v, i, f" {v}", va="center")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    tracker.log_figure(fig, artifact)
    plt.close(fig)


class Tracker:
    """The job-run level: creates the experiment, the parent run and the child runs."""

    def __init__(self, uri: str, experiment: str, store: str) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = None
            if uri.startswith("sqlite:") and storage.is_local(store):
                artifacts = Path(store, "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None

    def start_job(self, job: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=job,
            tags={"clipline.job": job, "clipline.version": __version__, "clipline.git_sha": git_sha() or "unknown",
                  **tags},
        )
        self.parent_id = run.info.run_id
        StageTracker(self.client, self.parent_id, "job").log_params(params)
        return self.parent_id

    def start_stage(self, job: str, stage: str, uses: str, fingerprint: str, tags: dict[str, str]) -> StageTracker:
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage,
            tags={
                "mlflow.parentRunId": self.parent_id or "",
                "clipline.job": job,
                "clipline.stage": stage,
                "clipline.uses": uses,
                "clipline.fingerprint": fingerprint,
                "clipline.version": __version__,
                "clipline.git_sha": git_sha() or "unknown",
                **tags,
            },
        )
        return StageTracker(self.client, run.info.run_id, stage, self.uri)

    def resume_stage(self, marker: str) -> StageTracker | None:
        """Continue the stage run an interrupted attempt started (its id is in `marker`), under this job run.

        One MLflow run per stage output, however many attempts it took; None when there is nothing to continue."""
        from mlflow.exceptions import MlflowException

        if not storage.exists(marker):
            return None
        run_id = storage.read_json(marker)["mlflow_run_id"]
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # the store is there but failing: do not fork the stage's history into a new run
            log.warning("stage run %s (from %s) is not in this tracking store: starting a new run", run_id, marker)
            return None
        if run.info.lifecycle_stage == "deleted" or run.info.experiment_id != self.experiment_id:
            log.warning("stage run %s is deleted or in another experiment: starting a new run", run_id)
            return None
        if "clipline.error" in run.data.tags:  # the earlier attempt's failure; this attempt has its own fate
            self.client.delete_tag(run_id, "clipline.error")
        attempts = int(run.data.tags.get("clipline.attempts", "1")) + 1
        self.client.update_run(run_id, status="RUNNING")
        for key, value in {"mlflow.parentRunId": self.parent_id or "", "clipline.resumed": "true",
                           "clipline.attempts": str(attempts)}.items():
            self.client.set_tag(run_id, key, value)
        log.info("%s: continuing MLflow run %s (attempt %d)", run.data.tags.get("clipline.stage"), run_id, attempts)
        return StageTracker(self.client, run_id, run.data.tags.get("clipline.stage", ""), self.uri)

    def log_file_artifact(self, run_id: str, url: str, artifact_path: str | None = None) -> None:
        """Copy a file from storage (any fsspec URL) into the run's artifacts."""
        fs, path = storage.filesystem(url)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, path.rsplit("/", 1)[-1])
            fs.get(path, local)
            self.client.log_artifact(run_id, local, artifact_path)

    def end(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
