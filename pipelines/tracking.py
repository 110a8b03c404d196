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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines import __version__, prometheus, sqlite_store, storage
from pipelines import spool as spooling
from pipelines.redact import REDACTED, scrub

log = logging.getLogger("clipline.tracking")

_SECRET = re.compile(r"(pass(word)?|secret|token|access[_-]?key|api[_-]?key|credential|auth|private[_-]?key)", re.I)
_SECRET_PARENTS = ("env_vars",)  # runtime_env.env_vars: values are credentials more often than not
_MAX_PARAM = 6000  # MLflow's limit on a param value
# the tag MLflow 3's UI reads to choose an experiment's view; without it 3.17 infers one and opens the GenAI view
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's or experiment's description, as the UI shows and edits it
COMPUTED_BY = "clipline.computed_by"  # on a cache hit's run: the run that computed the stage output


def job_run_name(job: str, when: float | None = None) -> str:
    """The job run's name: the job and its start time (UTC), so the runs table tells runs apart; the plain job name
    is the `clipline.job` tag, which lookups by job use."""
    return f"{job}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(when))}"


def run_link(run_id: str) -> str:
    """A link to a run that works in the MLflow UI whatever its address (the UI's `#/runs/<id>` route)."""
    return f"#/runs/{run_id}"


def dataset_input(name: str, digest: str, source: str, context: str, profile: dict[str, Any]) -> Any:
    """A `DatasetInput` for a stage output, made with mlflow.data: a `MetaDataset` (no data read) whose source is
    the output's location as MLflow resolves it (local, s3, gs, ...), so the Datasets panel shows name, digest and
    source; a location no MLflow source resolves keeps the location as a plain source."""
    import warnings

    from mlflow.entities import Dataset, DatasetInput, InputTag

    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # a local path matches two equal local sources; MLflow warns which it took
            warnings.simplefilter("ignore", UserWarning)
            entity = MetaDataset(resolve_dataset_source(source), name=name, digest=digest[:36])._to_mlflow_entity()
        source_type, source_json = entity.source_type, entity.source
    except Exception:  # noqa: BLE001 - MLflow knows no source for this URL scheme
        source_type, source_json = "clipline", json.dumps({"uri": source})
    ds = Dataset(name=name, digest=digest[:36], source_type=source_type, source=source_json,
                 profile=json.dumps(profile))
    return DatasetInput(ds, [InputTag("mlflow.data.context", context)])


def resolve_uri(job_uri: str | None, store: str) -> str:
    """The job's tracking URI, else MLFLOW_TRACKING_URI, else a sqlite file under local storage."""
    if job_uri:
        return job_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if not storage.is_local(store):
        raise ValueError(
            f"storage {store!r} is not local, so there is no default sqlite tracking store (sqlite needs a local "
            "file; an object store has no locks nor appends): set tracking.uri in the job (a tracking server, "
            "or sqlite:///<a local path>) or MLFLOW_TRACKING_URI"
        )
    try:
        os.makedirs(store, exist_ok=True)
    except OSError as exc:
        raise storage.StorageError(f"storage {store!r}: cannot create the directory for the tracking store: "
                                   f"{exc.strerror or exc}") from None
    return f"sqlite:///{store}/mlflow.db"


_METRIC_KEY_BAD = re.compile(r"[^\w./ :-]")


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, `_-./: `): a curate reason naming a predicate, such as
    `metadata: punsafe < 0.1`, has other characters, each written as `_`."""
    return _METRIC_KEY_BAD.sub("_", name)


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
        out[prefix] = scrub(text)[:_MAX_PARAM]
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
    """The one tracking handle a stage sees: its run's metrics, params, tags, artifacts, figures, inputs, and
    whether MLflow is taking writes. Writes go through the job's `SpoolingClient`, so they are spooled while
    the server is down; `for_worker` is the same run's handle for code that runs in Ray workers."""

    def __init__(self, client: Any, run_id: str, stage: str, uri: str = "", job: str = "") -> None:
        self._client, self.run_id, self.stage, self.uri, self.job = client, run_id, stage, uri, job

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str | None = None) -> None:
        """Metrics as `<stage>/<name>` (or `<prefix>/<name>`; prefix "" logs the names as given); NaN is left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        prefix = self.stage if prefix is None else prefix
        items = [
            Metric(metric_key(f"{prefix}/{k}" if prefix else k), float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tag(self, key: str, value: Any) -> None:
        self._client.set_tag(self.run_id, key, value)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_input(self, name: str, digest: str, source: str, context: str, profile: dict[str, Any]) -> None:
        """A dataset this run read or wrote (`dataset_input`): the Datasets panel's name, digest and source."""
        self._client.log_inputs(self.run_id, datasets=[dataset_input(name, digest, source, context, profile)])

    def describe(self, text: str) -> None:
        """The run's description (markdown), as the run page shows it."""
        self._client.set_tag(self.run_id, NOTE_TAG, text)

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        """Point registered model `name`'s `alias` at `version` (the registry is not spooled: online only)."""
        self._client.set_registered_model_alias(name, alias, version)

    def annotate_model_version(self, name: str, version: str, tags: dict[str, Any],
                               description: str | None = None) -> bool:
        """Tags (and a description) on a registered model version. The registry is not spooled: while MLflow is
        offline, or once it stops answering, nothing is written and False is returned."""
        if self.offline:
            return False
        try:
            if description is not None:
                self._client.update_model_version(name, version, description=description)
            for key, value in tags.items():
                self._client.set_model_version_tag(name, version, key, str(value))
        except Exception as exc:  # noqa: BLE001 - a server that is down spools the rest; anything else is raised
            if not spooling.unreachable(exc):
                raise
            self.go_offline(f"tagging model version {name}/{version}: {str(exc)[:300]}")
            return False
        return True

    @property
    def offline(self) -> bool:
        """Whether MLflow stopped taking writes: what is written now goes to the spool."""
        return bool(self._client.offline)

    def go_offline(self, why: str) -> None:
        """Spool every later write of this process (a call outside the handle found the server down)."""
        self._client.go_offline(why)

    @property
    def spool(self) -> str:
        """The spool directory this process writes to while offline."""
        return str(self._client.spool_dir)

    def for_worker(self) -> WorkerTracker:
        """This run's handle for Ray workers: small and picklable, offline if this one is."""
        return WorkerTracker(self.uri, self.run_id, self.job, self.stage, self.spool, started_offline=self.offline)


@dataclass
class WorkerTracker:
    """A stage run's tracking as the stage's Ray workers carry it (from `StageTracker.for_worker`): MLflow writes
    through a `SpoolingClient` it makes in the worker the first time rank 0 writes (a client does not pickle),
    and the stage's Prometheus metrics (`pipelines.prometheus.StageMetrics`).

    Every rank carries it (`on_rank` says which rank it is on), and on any rank but 0 every call does nothing
    (torchtitan's logger shape): code that runs on all ranks logs without asking which one it is. Metrics are
    kept until `flush`, which sends them in batches."""

    uri: str
    run_id: str
    job: str
    stage: str
    spool: str  # where rank 0 writes its MLflow records if the server is down (pipelines.spool)
    started_offline: bool = False  # the driver's tracking was already offline when the workers started
    rank: int = 0
    _client: Any = field(default=None, init=False, repr=False, compare=False)
    _pending: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # the client stays in its process; each worker makes its own
        return {**self.__dict__, "_client": None, "_pending": []}

    def on_rank(self, rank: int) -> WorkerTracker:
        return replace(self, rank=rank)

    @property
    def active(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    def _spooling(self) -> Any:
        if self._client is None:
            self._client = spooling.SpoolingClient(self.uri, self.spool, offline=self.started_offline,
                                                   why="offline when training started")
        return self._client

    @property
    def offline(self) -> bool:
        """Whether rank 0's writes go to the spool (off rank 0: whether the driver's did when the workers started)."""
        return self._spooling().offline if self.active else self.started_offline

    def set_tag(self, key: str, value: Any) -> None:
        if self.active:
            self._spooling().set_tag(self.run_id, key, value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Keep step `step`'s metrics (names as given; None, NaN and infinities left out) for the next `flush`."""
        from mlflow.entities import Metric

        if not self.active:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
                          if v is not None and math.isfinite(v)]

    def flush(self) -> None:
        """Send the metrics kept so far."""
        if not self.active:
            return
        for i in range(0, len(self._pending), 1000):
            self._spooling().log_batch(self.run_id, metrics=self._pending[i : i + 1000])
        self._pending = []

    def last_step(self, key: str) -> int:
        """The highest step of metric `key` the run has: in MLflow, or spooled by an earlier attempt while offline
        (a restart recomputes those steps, and the replay would otherwise give the run a second value for each).
        0 off rank 0."""
        if not self.active:
            return 0
        client, history = self._spooling(), []
        if not client.offline:
            try:
                history = client.get_metric_history(self.run_id, key)
            except Exception as exc:  # noqa: BLE001 - a server that is down spools; anything else is raised
                if not spooling.unreachable(exc):
                    raise
                client.go_offline(f"reading the run's {key} history: {str(exc)[:300]}")
        return max(max((m.step for m in history), default=0), spooling.last_step(self.spool, self.run_id, key))

    @contextmanager
    def system_metrics(self, enabled: bool = True) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, GPU) logged from rank 0 while the block runs; not while offline
        (MLflow's monitor has no spool)."""
        monitor = None
        if enabled and self.active and not self.offline:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, resume_logging=True,
                                           tracking_uri=self.uri)
            monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()

    def inc(self, m: prometheus.Metric, value: float = 1, **labels: Any) -> None:
        """Prometheus counter `m` increased, labelled with the job and stage (`StageMetrics.inc`)."""
        if self.active:
            prometheus.StageMetrics(self.job, self.stage).inc(m, value, **labels)

    def set(self, m: prometheus.Metric, value: float | None, **labels: Any) -> None:
        """Prometheus gauge `m` set (`StageMetrics.set`)."""
        if self.active:
            prometheus.StageMetrics(self.job, self.stage).set(m, value, **labels)


def log_bar_chart(tracker: StageTracker, items: Sequence[tuple[str, float]], title: str, xlabel: str, artifact: str,
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



def sqlite_artifact_root(uri: str) -> str | None:
    """Where a sqlite store's artifacts go: `mlartifacts/` beside the database (for the default store that is
    `{storage}/mlartifacts`); None for a server, which has its own. MLflow's default would be ./mlruns under
    whatever directory the process runs in."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").resolve().as_uri()

class Tracker:
    """The job-run level: creates the experiment, the parent run and the child runs.

    Writes go through a `SpoolingClient`: if the server stops answering mid-run, the rest of the run is written
    to a local spool (and said so) for `clipline replay`. A server that does not answer at start is an error
    before any work, unless `required` is False: then the whole run goes to the spool."""

    def __init__(self, uri: str, experiment: str, store: str, required: bool = True, spool: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        # against a server, MLflow writes two "View run ... at" lines to stdout for every run it ends (and reads
        # the run again to do so): stdout is clipline's summary, and the job prints the server's address once
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = uri
        self.spool = spool or spooling.default_dir(store)
        why = ""
        try:
            spooling.probe(uri)
        except spooling.TrackingUnavailable as exc:
            if required:
                raise spooling.TrackingUnavailable(
                    f"{exc}: nothing was run. Start it, or set tracking.required: false in the job to record this "
                    f"run under {self.spool} and send it later with `clipline replay JOB`") from None
            why = str(exc)
        if not why and (waiting := spooling.pending(self.spool)):
            # before this run writes anything: a stage run that an earlier process finished offline must not
            # be continued here and then overwritten by its older, spooled end
            log.warning("MLflow at %s answers again: sending the %d records spooled in %s first",
                        scrub(uri), sum(waiting.values()), self.spool)
            counts = spooling.replay(self.spool, uri)
            log.info("replayed %s", ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        if not why:
            sqlite_store.seed(uri)  # a new sqlite store without MLflow's 2 s of schema migrations
        self.client = spooling.SpoolingClient(uri, self.spool, offline=bool(why), why=why)
        self.experiment_id = self._experiment(experiment, store) if not why else (
            spooling.OFFLINE + "experiment:" + experiment)
        self.parent_id: str | None = None
        self.job = ""  # the job run's name, once start_job has made its run

    def _experiment(self, name: str, store: str) -> str:
        """The experiment's id, made if new; it opens in MLflow's model-training view (`EXPERIMENT_KIND`), an existing
        one too unless someone chose its kind (a kind MLflow's UI only inferred is replaced)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return str(self.client.create_experiment(name, artifact_location=sqlite_artifact_root(self.uri),
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
        kind = exp.tags.get(EXPERIMENT_KIND_TAG, "")
        if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(exp.experiment_id)

    @property
    def offline(self) -> bool:
        return self.client.offline

    def safely(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        """A tracking write on a failure path: its own failure is logged, never hides the error being reported."""
        try:
            call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the stage's own error is the one to raise
            log.warning("could not record %s in MLflow (%s: %s)", what, type(exc).__name__, str(exc)[:300])

    def start_job(self, job: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=job_run_name(job),
            tags={"clipline.job": job, "clipline.version": __version__, "clipline.git_sha": git_sha() or "unknown",
                  **tags},
        )
        self.parent_id, self.job = run.info.run_id, job
        StageTracker(self.client, self.parent_id, "job", self.uri, job).log_params(params)
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
        return StageTracker(self.client, run.info.run_id, stage, self.uri, job)

    def resume_stage(self, marker: str, stage: str = "") -> StageTracker | None:
        """Continue the stage run an interrupted attempt started (its id is in `marker`), under this job run.

        One MLflow run per stage output, however many attempts it took; None when there is nothing to continue."""
        from mlflow.exceptions import MlflowException

        if not storage.exists(marker):
            return None
        run_id = storage.read_json(marker)["mlflow_run_id"]
        if run_id.startswith(spooling.OFFLINE):  # created offline: a replay may have sent it since
            run_id = spooling.real_id(self.spool, run_id) or run_id
        if run_id.startswith(spooling.OFFLINE) and not self.offline:
            log.warning("stage run %s (from %s) was created offline and has not been replayed: starting a new "
                        "run", run_id, marker)
            return None
        if self.offline:
            return self._resume_offline(run_id, marker, stage)
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if spooling.unreachable(exc):
                self.client.go_offline(f"reading run {run_id}: {str(exc)[:300]}")
                return self._resume_offline(run_id, marker, stage)
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
        return StageTracker(self.client, run_id, run.data.tags.get("clipline.stage", ""), self.uri, self.job)

    def _resume_offline(self, run_id: str, marker: str, stage: str) -> StageTracker:
        """Continue the stage run with its writes spooled; its earlier tags cannot be read, so the attempt count is
        not raised (the replay sends the rest)."""
        log.warning("%s: continuing MLflow run %s (from %s) while MLflow is offline: its writes are spooled",
                    stage, run_id, marker)
        self.client.delete_tag(run_id, "clipline.error")
        self.client.update_run(run_id, status="RUNNING")
        for key, value in {"mlflow.parentRunId": self.parent_id or "", "clipline.resumed": "true"}.items():
            self.client.set_tag(run_id, key, value)
        return StageTracker(self.client, run_id, stage, self.uri, self.job)

    def computing_run(self, run_id: str) -> str:
        """The id a manifest's run has in MLflow: a run created offline has a real id once a replay sent it."""
        if run_id.startswith(spooling.OFFLINE):
            return spooling.real_id(self.spool, run_id) or run_id
        return run_id

    def repeat(self, child: StageTracker, source_id: str, skip: Sequence[str] = ("manifest",)) -> bool:
        """Copy run `source_id`'s metrics (latest values; system metrics left out) and artifacts (but `skip`) into
        `child`, a cache hit's run, so it shows what the run that computed the output showed. Reading needs the
        server: False (nothing copied) while offline, or when the run is not in this store."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        if self.offline or source_id.startswith(spooling.OFFLINE):
            return False
        try:
            source = self.client.get_run(source_id)
            metrics = [Metric(k, v, int(time.time() * 1000), 0) for k, v in sorted(source.data.metrics.items())
                       if not k.startswith("system/")]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(child.run_id, metrics=metrics[i : i + 1000])
            with tempfile.TemporaryDirectory() as tmp:
                for entry in self.client.list_artifacts(source_id):
                    if entry.path in skip:
                        continue
                    local = self.client.download_artifacts(source_id, entry.path, tmp)
                    if entry.is_dir:
                        for f in sorted(Path(local).rglob("*")):
                            if f.is_file():
                                parent = f.parent.relative_to(tmp).as_posix()
                                self.client.log_artifact(child.run_id, str(f), parent)
                    else:
                        self.client.log_artifact(child.run_id, local, None)
        except Exception as exc:  # noqa: BLE001 - a server that is down spools the rest; anything else is raised
            if spooling.unreachable(exc):
                self.client.go_offline(f"reading run {source_id}: {str(exc)[:300]}")
                return False
            if not (isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"):
                raise
            log.warning("run %s, which computed a cached output, is not in this tracking store", source_id)
            return False
        return True

    def log_file_artifact(self, run_id: str, url: str, artifact_path: str | None = None) -> None:
        """Copy a file from storage (any fsspec URL) into the run's artifacts."""
        fs, path = storage.filesystem(url)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, path.rsplit("/", 1)[-1])
            fs.get(path, local)
            self.client.log_artifact(run_id, local, artifact_path)

    def end(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
