"""Run a job's stages in dependency order on Ray, with fingerprints, cache hits and resume.

For each stage the runner computes a fingerprint from the stage kind, its code version, its resolved
params, the digests of its upstream manifests and (for source stages) the identity of the external
files it reads.  Output goes to `{storage}/{job}/{stage}/{fingerprint}/`; a `_manifest.json` there
means the stage is done and the next run is a cache hit.  A failed or killed stage leaves its completed
shards in that directory without a manifest, so the next run with the same fingerprint resumes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from pipelines import __version__, layout, manifest, storage
from pipelines.manifest import Manifest
from pipelines.redact import scrub
from pipelines.spec import JobSpec, StageSpec
from pipelines.stage import StageContext, StageResult
from pipelines.tracking import COMPUTED_BY, Tracker, git_sha, resolve_uri, run_link

log = logging.getLogger("clipline")


RUN_MARKER = "_mlflow_run.json"  # in an incomplete stage directory: the MLflow run a resumed attempt continues
SUPERSEDED = "_superseded.json"  # in a stage output that `clipline takedown` replaced: where its new version is


class StageFailed(RuntimeError):
    """A stage raised; completed stages and the stage's finished shards stay for the next run."""

    def __init__(self, stage: str, cause: BaseException | str) -> None:
        self.stage, self.cause = stage, cause
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"stage {stage!r} failed: {text}")


@dataclass
class Selection:
    """Which stages to run: `--from`, `--until`, `--only`, and `--force` to ignore cache hits."""

    from_: str | None = None
    until: str | None = None
    only: list[str] = field(default_factory=list)
    force: bool = False

    def stages(self, job: JobSpec) -> list[str]:
        names = list(job.stages)
        for flag, value in (("--from", self.from_), ("--until", self.until), *(("--only", o) for o in self.only)):
            if value is not None and value not in job.stages:
                raise ValueError(f"{flag} {value}: no such stage in {job.source}; stages: {', '.join(names)}")
        chosen = set(names)
        if self.from_:
            chosen &= job.downstream(self.from_)
        if self.until:
            chosen &= job.upstream(self.until)
        if self.only:
            chosen &= set(self.only)
        return [n for n in names if n in chosen]


@dataclass
class StageOutcome:
    stage: str
    state: str  # ran, cached, not selected
    fingerprint: str | None
    manifest: Manifest | None
    seconds: float = 0.0


def stage_dir(job: JobSpec, stage: str, fingerprint: str) -> str:
    """Where a stage of this job writes for a fingerprint (the rule: layout.stage_dir)."""
    return layout.stage_dir(job.storage, job.name, stage, fingerprint)


def fingerprint(st: StageSpec, upstream: dict[str, Manifest], external: dict[str, Any]) -> str:
    return storage.canonical_digest(
        {
            "uses": st.uses,
            "code_version": st.stage_class.code_version(),
            "params": st.params,
            "inputs": {name: m.digest for name, m in sorted(upstream.items())},
            "external": external,
        }
    )[:16]


def read_current(directory: str) -> Manifest | None:
    """The manifest of a stage output, or of the version that replaced it (`clipline takedown` writes a new
    version and leaves `_superseded.json` naming it in the old directory): what a later run reads."""
    m, seen = manifest.read(directory), {directory}
    while m is not None and storage.exists(marker := storage.join(m.location, SUPERSEDED)):
        newer = storage.read_json(marker)["location"]
        if newer in seen:
            raise ValueError(f"{marker}: names {newer}, a version that leads back to it")
        seen.add(newer)
        m = manifest.read(newer)
        if m is None:
            raise ValueError(f"{marker}: names {newer}, which holds no complete stage output")
    return m


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _external(st: StageSpec) -> dict[str, Any]:
    """The identity of a source stage's external inputs; a missing or unreadable input fails the stage."""
    try:
        return st.build().input_identity()
    except Exception as exc:  # noqa: BLE001 - reported with the stage's name
        raise StageFailed(st.name, exc) from exc


def _upstream(job: JobSpec, st: StageSpec, done: dict[str, Manifest | None]) -> dict[str, Manifest] | str:
    """The manifests this stage reads, or the name of the first upstream stage without output."""
    out = {}
    for dep in st.needs:
        m = done.get(dep)
        if m is None:
            return dep
        out[dep] = m
    return out


def plan(job: JobSpec) -> list[dict[str, Any]]:
    """Where each stage stands for the job's current spec, without running anything (`clipline status`)."""
    done: dict[str, Manifest | None] = {}
    rows: list[dict[str, Any]] = []
    for name, st in job.stages.items():
        ups = _upstream(job, st, done)
        if isinstance(ups, str):
            done[name] = None
            rows.append({"stage": name, "state": f"waiting for {ups}", "rows": None, "fingerprint": None, "path": None})
            continue
        fp = fingerprint(st, ups, _external(st))
        path = stage_dir(job, name, fp)
        m = read_current(path)
        done[name] = m
        if m is not None:
            state = "cached"
        elif storage.exists(path):
            state = "incomplete"
        else:
            state = "missing"
        rows.append({"stage": name, "state": state, "rows": m.rows if m else None, "fingerprint": fp,
                     "path": m.location if m else path,
                     "counts": m.counts if m else {}})
    return rows


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a cluster address that does not answer: ray.init itself retries for many minutes."""
    if address == "auto":
        return  # Ray finds the address itself and fails at once when there is none
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"ray.address {address!r}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RuntimeError(f"ray.address {address!r} does not answer: {exc}") from None


def init_ray(job: JobSpec) -> bool:
    """Start or join Ray as the job says; True if this call started it (and should shut it down)."""
    from pipelines.offline import keep_local

    keep_local(ray_head=job.ray_address == "local")  # Ray's processes inherit the switches (pipelines/offline.py)
    if job.ray_address == "local" and "ray" not in sys.modules:
        # Ray swaps a loopback node address for the machine's own and listens on every interface; a local
        # instance has no peers, so keep all of its servers on 127.0.0.1 (read once, when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    from pipelines.console import ray_init_kwargs

    kwargs: dict[str, Any] = {"runtime_env": job.runtime_env or None, **ray_init_kwargs()}
    if job.ray_address == "local":
        # "local" explicitly: with no address Ray would join any cluster it finds in /tmp/ray
        kwargs.update(address="local", num_cpus=job.ray_num_cpus, include_dashboard=False)
    else:
        kwargs["address"] = job.ray_address
        _probe(job.ray_address)
    try:
        start_local_ray(kwargs) if job.ray_address == "local" else ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RuntimeError(f"cannot start or reach Ray at ray.address={job.ray_address!r}: {exc}") from exc
    return True


RAY_START_TIMED_OUT = "timed out during startup"  # Ray's own 30 s limit on a new node's raylet (not settable)


def start_local_ray(kwargs: dict[str, Any], attempts: int = 3) -> None:
    """`ray.init` of a new local instance, tried again when its raylet missed Ray's fixed 30 s start-up limit
    (a busy machine: another job's processes starting at the same time); the half-started one is shut down."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this one
            if RAY_START_TIMED_OUT not in str(exc) or attempt == attempts:
                raise
            log.warning("Ray's local node did not start within Ray's 30 s (attempt %d of %d); trying again",
                        attempt, attempts)
            ray.shutdown()


def run_job(job: JobSpec, select: Selection | None = None, progress: bool = True) -> list[StageOutcome]:
    """Run the selected stages; raise StageFailed naming the stage if one fails."""
    select = select or Selection()
    chosen = select.stages(job)
    tracker = Tracker(resolve_uri(job.tracking_uri, job.storage), job.experiment, job.storage,
                      required=job.tracking_required)
    parent = tracker.start_job(job.name, job.raw, {"clipline.spec": job.source})
    started_ray = False

    def need_ray() -> None:  # only a stage that really runs needs Ray; a job of cache hits starts none
        nonlocal started_ray
        started_ray = init_ray(job) or started_ray  # init_ray does nothing once Ray is connected

    outcomes: list[StageOutcome] = []
    done: dict[str, Manifest | None] = {}
    ok = False
    try:
        for name, st in job.stages.items():
            ups = _upstream(job, st, done)
            if name not in chosen:
                m = None
                if not isinstance(ups, dict):
                    done[name] = None
                else:
                    fp = fingerprint(st, ups, _external(st))
                    m = done[name] = read_current(stage_dir(job, name, fp))
                outcomes.append(StageOutcome(name, "not selected", None, m))
                continue
            if isinstance(ups, str):
                raise StageFailed(
                    name,
                    f"it needs stage {ups!r}, which has no complete output for its current parameters; "
                    f"run {ups!r} first (drop --from/--only)",
                )
            try:
                outcome = _run_stage(job, st, ups, tracker, select.force, progress, need_ray)
            except storage.StorageError as exc:  # unwritable or full: the message names the path
                raise StageFailed(name, exc) from exc
            done[name] = outcome.manifest
            outcomes.append(outcome)
        ok = True
        return outcomes
    except StageFailed as exc:
        tracker.safely("the job's error", tracker.client.set_tag, parent, "clipline.error", scrub(str(exc))[:5000])
        raise
    finally:
        tracker.safely("the job run's headline", _log_job, tracker, parent, job, outcomes)
        tracker.safely("the job run's end", tracker.end, parent, ok)
        if tracker.offline:
            log.warning("MLflow at %s was offline: %d records of this job run wait in %s; send them with "
                        "`clipline replay %s` once the server answers", scrub(tracker.uri), tracker.client.records,
                        tracker.client.path, job.source)
        if started_ray:
            import ray

            if ray.is_initialized() and job.ray_address == "local":
                ray.shutdown()


def _run_stage(job: JobSpec, st: StageSpec, ups: dict[str, Manifest], tracker: Tracker, force: bool,
               progress: bool, need_ray: Any) -> StageOutcome:
    stage = st.build()
    external = _external(st)
    fp = fingerprint(st, ups, external)
    out = stage_dir(job, st.name, fp)
    existing = read_current(out)
    if existing is not None and not force:
        source = tracker.computing_run(existing.mlflow_run_id) if existing.mlflow_run_id else ""
        child = tracker.start_stage(job.name, st.name, st.uses, fp,
                                    {"clipline.cache": "hit", **({COMPUTED_BY: source} if source else {})})
        _log_stage(tracker, child, st, ups, existing)
        repeated = bool(source) and tracker.repeat(child, source)
        if not repeated:  # offline, or the run is gone: what the manifest keeps of the metrics the stage logged
            child.log_metrics(existing.extra.get("metrics", {}), prefix="")
        child.describe(_cache_note(st.name, existing, source, repeated))
        tracker.end(child.run_id, True)
        log.info("%s: cache hit (%s rows, %s)", st.name, existing.rows, out)
        return StageOutcome(st.name, "cached", fp, existing)
    if existing is not None:
        log.info("%s: --force: removing %s", st.name, out)
        storage.remove_tree(out)
    try:
        need_ray()
    except RuntimeError as exc:  # Ray unreachable: an infrastructure error naming ray.address
        raise StageFailed(st.name, exc) from exc
    resuming = storage.exists(out)
    resumed = tracker.resume_stage(storage.join(out, RUN_MARKER), st.name) if resuming else None
    child = resumed if resumed is not None else tracker.start_stage(
        job.name, st.name, st.uses, fp, {"clipline.cache": "miss", "clipline.resumed": str(resuming).lower()})

    def failed(exc: BaseException) -> None:  # the stage run ends FAILED with the error, whatever failed
        tracker.safely("the stage's error", tracker.client.set_tag, child.run_id, "clipline.error",
                       scrub(f"{type(exc).__name__}: {exc}")[:5000])
        tracker.safely("the stage run's end", tracker.end, child.run_id, False)

    if resumed is None:  # a new run: its parameters, and the marker a later attempt resumes it from
        child.log_params(st.params)
        try:
            storage.write_json(storage.join(out, RUN_MARKER), {"mlflow_run_id": child.run_id})
        except storage.StorageError as exc:
            failed(exc)
            raise
    log.info("%s: running (%s)%s", st.name, out, " - resuming from completed shards" if resuming else "")
    ctx = StageContext(job=job.name, stage=st.name, output=out, tracker=child, log=log.getChild(st.name),
                       resources=st.resources, progress=progress)
    started, t0 = _now(), time.perf_counter()
    result: StageResult | None = None
    for attempt in range(st.retries + 1):
        try:
            result = stage.run(ctx, ups)
            break
        except Exception as exc:
            if attempt < st.retries:
                # with -v the traceback too: an OSError such as os.getcwd()'s names no file in its message
                log.warning("%s: attempt %d/%d failed (%s); retrying, completed shards are kept", st.name,
                            attempt + 1, st.retries + 1, _cause(exc), exc_info=log.isEnabledFor(logging.DEBUG))
                continue
            failed(exc)
            raise StageFailed(st.name, exc) from exc
        except BaseException:
            tracker.safely("the stage run's end", tracker.client.set_terminated, child.run_id, status="KILLED")
            raise
    assert result is not None
    seconds = time.perf_counter() - t0
    m = Manifest(
        job=job.name, stage=st.name, uses=st.uses, fingerprint=fp, code_version=st.stage_class.code_version(),
        params=st.params,
        inputs={**{n: {"fingerprint": u.fingerprint, "digest": u.digest, "path": u.location} for n, u in ups.items()},
                **({"external": external} if external else {})},
        shards=result.shards, counts=result.counts, metrics={**result.metrics, "seconds": round(seconds, 3)},
        started_at=started, finished_at=_now(), clipline_version=__version__, git_sha=git_sha(),
        mlflow_run_id=child.run_id, extra=result.extra,
    )
    try:
        _clean_temp(out)
        manifest.write(out, m)
    except storage.StorageError as exc:
        failed(exc)
        raise
    _log_stage(tracker, child, st, ups, m, params=False)
    tracker.end(child.run_id, True)
    log.info("%s: done in %.1fs: %s in %d shards", st.name, seconds, m.size, len(m.shards))
    return StageOutcome(st.name, "ran", fp, m, seconds)


def _cause(exc: BaseException) -> str:
    """An attempt's error for the log; an OSError without a file name is given where it was raised."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.filename is None and exc.__traceback__ is not None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        text += f", raised at {frame.filename}:{frame.lineno} in {frame.name}()"
    return text


def _clean_temp(out: str) -> None:
    """Remove temp files that killed writers left behind; they were never visible under a final name."""
    fs, path = storage.filesystem(out)
    for p in fs.find(path):
        if p.rsplit("/", 1)[-1].startswith(storage.TMP_MARK):
            fs.rm(p)


def _cache_note(stage: str, m: Manifest, source: str, repeated: bool) -> str:
    """A cache hit's run description: which run computed the output, and what this run repeats of it."""
    lines = [f"**Cache hit**: stage `{stage}` was not run; its output `{m.location}` (fingerprint "
             f"`{m.fingerprint}`, {m.rows} rows) was computed {m.finished_at} by run "
             + (f"[{source}]({run_link(source)})." if source else "(unknown: the manifest names none).")]
    lines.append("Its metrics and artifacts are repeated here." if repeated else
                 "The metrics its manifest keeps are repeated here; its artifacts are on the computing run.")
    return "\n\n".join(lines)


def headline(outcomes: list[StageOutcome]) -> dict[str, float]:
    """What a job run shows in the runs table: each stage's rows and manifest metrics as `<stage>/<name>` (the
    curated rows kept, train's final loss, ...) and the headline metrics stages name (`eval/average`, each
    evaluation set's main metric)."""
    out: dict[str, float] = {}
    for o in outcomes:
        if o.manifest is None:
            continue
        m = o.manifest
        out[f"{o.stage}/rows"] = m.rows
        out.update({f"{o.stage}/{k}": v for k, v in m.metrics.items() if isinstance(v, (int, float))})
        out.update(m.extra.get("headline", {}))
    return out


def _log_job(tracker: Tracker, parent: str, job: JobSpec, outcomes: list[StageOutcome]) -> None:
    """The job run's metrics (`headline`) and its datasets: each stage output it ran, read from cache or read."""
    from pipelines.tracking import StageTracker

    handle = StageTracker(tracker.client, parent, "job", tracker.uri, job.name)
    handle.log_metrics(headline(outcomes), prefix="")
    for o in outcomes:
        if o.manifest is not None:
            m = o.manifest
            handle.log_input(f"{m.job}/{m.stage}", m.digest, m.location, f"{m.stage} ({o.state})",
                             {"rows": m.rows, "shards": len(m.shards), "fingerprint": m.fingerprint})


def _log_stage(tracker: Tracker, child: Any, st: StageSpec, ups: dict[str, Manifest], m: Manifest,
               params: bool = True) -> None:
    if params:
        child.log_params(st.params)
    child.log_metrics({"rows": m.rows, **m.counts, **m.metrics})
    for name, u in ups.items():
        child.log_input(f"{u.job}/{name}", u.digest, u.location, "input", {"rows": u.rows, "shards": len(u.shards)})
    child.log_input(f"{m.job}/{m.stage}", m.digest, m.location, "output", {"rows": m.rows, "shards": len(m.shards)})
    tracker.log_file_artifact(child.run_id, storage.join(m.location, manifest.MANIFEST), "manifest")
