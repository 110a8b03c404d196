"""What a `clipline` command shows on the console, and where everything else goes.

The console gets clipline's own lines (`clipline: ...`), one progress bar or line per stage and the closing
summary. Everything else (Ray's driver and worker logs, Ray Data's execution plans, library warnings such as
open_clip's) goes to a log file per `clipline run` / `clipline demo` (`log_path`), named at the start and in
the summary. `-v` (`setup(verbose=True)`) shows everything on the console as well, as Ray prints it.

Worker output reaches the driver through Ray's log stream (`log_to_driver`), which this module sends to the
log file instead of the console (`_to_log_file`). Training progress therefore comes another way: rank 0 puts
one small record at most every `TRAIN_EVERY_S` seconds (and at each evaluation and the last step) on a named
actor (`train_reporter`), and a driver thread (`session`) takes them and draws the training bar.

The seam with the runner: `ray_init_kwargs` is what `runner.init_ray` passes to `ray.init`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

LOG_DIR_ENV = "CLIPLINE_LOG_DIR"  # where the log files go (default: $XDG_CACHE_HOME or ~/.cache, /clipline/logs)
PROGRESS_ACTOR = "clipline-progress"  # the named actor training progress records go through
TRAIN_EVERY_S = 0.5  # rank 0 sends a record at most this often (plus each evaluation and the last step)
PLAIN_EVERY = 10  # without bars (--no-progress): a training line at every tenth of the planned steps
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("clipline")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced after start-up)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


@dataclass
class _State:
    verbose: bool = False
    log_path: Path | None = None
    file_handler: logging.Handler | None = None
    file: TextIO | None = None  # the log file's stream, for Ray's worker lines
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()


def setup(verbose: bool = False) -> None:
    """The console's logging: clipline's logger to stderr, its own lines once (it does not propagate: a
    library's `logging.basicConfig` on the root logger, e.g. mlflow.pytorch's at import, would print each line
    again as `INFO:clipline...`); the root logger gets a handler here first, so such a basicConfig does
    nothing. Python warnings become log records (the log file's, and with `verbose` the console's)."""
    _state.verbose = verbose
    logger = logging.getLogger("clipline")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("clipline: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    root = logging.getLogger()
    if verbose:
        if not any(isinstance(h, _StderrHandler) for h in root.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(handler)
    elif not root.handlers:
        root.addHandler(logging.NullHandler())  # until a log file is open: a later basicConfig adds nothing
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def log_dir() -> Path:
    """Where log files go: $CLIPLINE_LOG_DIR, else $XDG_CACHE_HOME/clipline/logs, else ~/.cache/clipline/logs."""
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "clipline" / "logs"


def log_path() -> Path | None:
    """The log file of this command, once `open_log` made it."""
    return _state.log_path


def open_log(job: str) -> Path | None:
    """Start this run's log file, `<log_dir>/<job>-<UTC time>-<pid>.log`, and say where it is; every log record
    (the root logger's, clipline's included) goes there. None, with a warning, where it cannot be written."""
    if _state.log_path is not None:
        return _state.log_path
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = log_dir() / f"{job}-{stamp}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life
    except OSError as exc:
        log.warning("no log file: cannot write %s (%s); set %s to a writable directory", path, exc.strerror,
                    LOG_DIR_ENV)
        return None
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG if _state.verbose else logging.INFO)  # Ray Data logs DEBUG at length
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.NullHandler)]:
        root.removeHandler(h)
    root.addHandler(handler)
    logging.getLogger("clipline").addHandler(handler)  # clipline's lines too (its logger does not propagate)
    _state.log_path, _state.file_handler, _state.file = path, handler, stream
    if not _state.verbose:
        _route_mlflow()
    stream.write(f"# clipline {' '.join(sys.argv[1:])} (pid {os.getpid()}, {stamp}); Ray's own logs stay in its "
                 f"session directory (named below once Ray starts; /tmp/ray/session_latest/logs by default)\n")
    log.info("log: %s%s", path, "" if _state.verbose else " (Ray and library logs; -v shows them here)")
    return path


def _write_log(text: str) -> int:
    stream = _state.file
    if stream is not None:
        with _state.lock:
            stream.write(text)
    return len(text)


def _route_mlflow() -> None:
    """MLflow's event lines (its logger's and `eprint`'s: "Successfully registered model", the pickle warning)
    go through one stream object that writes to sys.stderr: to the log file instead; its artifact download
    bars off."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.utils import logging_utils

    logging_utils.MLFLOW_LOGGING_STREAM.write = _write_log  # type: ignore[method-assign]
    logging_utils.MLFLOW_LOGGING_STREAM.flush = lambda: None  # type: ignore[method-assign]


def _route_ray_loggers() -> None:
    """Ray's and Ray Data's loggers write to stderr themselves and do not propagate: send them to the root
    logger (the log file) instead. Called once Ray is imported (ray.data configures its logger at import)."""
    if _state.verbose:
        return
    for name in [n for n in logging.Logger.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler) and \
                    getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                logger.removeHandler(h)
        logger.propagate = True


def _to_log_file(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    """Ray's handler of the worker lines it streams to the driver (replaces `print_to_stdstream`): into the
    log file, each line prefixed as Ray prefixes it on the console."""
    stream = _state.file
    if stream is None:
        return
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')}) " if data.get("pid") not in ("raylet",
                                                                                                 "autoscaler") else ""
    _write_log("".join(f"{prefix}{line}\n" for line in data.get("lines", [])))


def ray_init_kwargs() -> dict[str, Any]:
    """Keyword arguments for `ray.init` that decide where Ray's and the workers' logs go: the workers' lines
    still stream to the driver, which writes them to the log file (with -v, or without a log file, to the
    console as Ray does). Ray's loggers go to the log file too."""
    import ray._private.worker as ray_worker

    if not _state.verbose and _state.file is not None:
        ray_worker.print_to_stdstream = _to_log_file  # read by ray.init's connect() for its log thread
        with contextlib.suppress(ImportError):
            import ray.data  # noqa: F401 - it configures its logger at import: route it now
        _route_ray_loggers()
    return {"log_to_driver": True, "logging_level": logging.INFO}


# ---------------------------------------------------------------------------------------------- training


class _Sink:
    """The named actor between rank 0 and the driver: records in, taken out in order."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def put(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def take(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out


class TrainReporter:
    """Rank 0's end: `step(...)` after each optimizer step. Sends a record (one actor call, not waited for) at
    most every TRAIN_EVERY_S seconds, and at each evaluation and the last step; nothing without a driver
    listening (a stage run outside `clipline run`)."""

    def __init__(self, handle: Any, planned: int) -> None:
        self.handle, self.planned, self.last = handle, planned, 0.0

    def step(self, step: int, metrics: dict[str, float]) -> None:
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        now = time.monotonic()
        if self.handle is None or (now - self.last < TRAIN_EVERY_S and not evals and step < self.planned):
            return
        self.last = now
        record = {"kind": "train", "step": step, "planned": self.planned, "loss": metrics.get("train/loss"),
                  "samples_per_s": metrics.get("train/samples_per_s"), "eval": evals}
        self._put(record)

    def evaluation(self, step: int, scores: dict[str, float]) -> None:
        """An asynchronous evaluation of `step` ended: its scores to the console, whatever step the bar is at."""
        self._put({"kind": "train_eval", "step": step, "eval": scores})

    def _put(self, record: dict[str, Any]) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(Exception):  # the driver gone: training goes on
            self.handle.put.remote(record)


def train_reporter(rank: int, planned: int) -> TrainReporter:
    """For the train loop and its evaluations: rank 0's reporter to the driver's progress actor (a no-op on other
    ranks, and where no driver draws progress or no Ray is connected)."""
    import ray

    handle = None
    # not connected: no lookup (ray.get_actor would start connecting to whatever cluster it can find)
    if rank == 0 and ray.is_initialized():
        with contextlib.suppress(ValueError):  # no such actor
            handle = ray.get_actor(PROGRESS_ACTOR)
    return TrainReporter(handle, planned)


class _TrainView:
    """The driver's training bar (or, without bars, a plain line every tenth of the planned steps)."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.bar: Any = None
        self.t0 = self.t_step0 = 0.0
        self.step0 = 0
        self.next_plain = 0

    def show(self, r: dict[str, Any]) -> None:
        if r.get("kind") == "train_eval":  # an asynchronous evaluation ended (its step is behind the bar's)
            self._eval(r["step"], r["eval"])
            return
        step, planned = r["step"], r["planned"]
        now = time.monotonic()
        if self.bar is None and self.t0 == 0.0:
            self.t0, self.t_step0, self.step0 = now, now, step
            self.next_plain = step
        if self.progress:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=planned, initial=step, unit="step", desc="train", smoothing=0.1)
            self.bar.set_postfix_str(f"loss={r['loss']:.3f}, {r['samples_per_s']:.0f} samples/s", refresh=False)
            self.bar.update(step - self.bar.n)  # draws the bar once, with the new postfix
        elif step >= self.next_plain or step == planned:
            self.next_plain = step + max(1, planned // PLAIN_EVERY)
            rate = (step - self.step0) / (now - self.t_step0) if now > self.t_step0 and step > self.step0 else 0.0
            eta = f", {_duration((planned - step) / rate)} left" if rate and step < planned else ""
            log.info("train: step %d/%d, loss %.4f, %.0f samples/s%s", step, planned, r["loss"],
                     r["samples_per_s"], eta)
        if r["eval"]:
            self._eval(step, r["eval"])
        if step == planned:
            self.close()

    def _eval(self, step: int, scores: dict[str, float]) -> None:
        text = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in sorted(scores.items()))
        self.write(f"clipline: train: step {step} eval: {text}")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.t0 = 0.0


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Listener(threading.Thread):
    """The driver's side: once Ray is up, own the progress actor and draw what it receives."""

    def __init__(self, progress: bool, every: float = 0.25) -> None:
        super().__init__(name="clipline-progress", daemon=True)
        self.stop, self.every, self.view = threading.Event(), every, _TrainView(progress)
        self.handle: Any = None

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - Ray shut down under it, or the actor died: start again
                self.handle = None
                self.view.close()

    def _poll(self) -> None:
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            self.handle = None
            return
        if self.handle is None:
            with contextlib.suppress(Exception):  # where Ray keeps its own logs, for the log file's reader
                node = ray._private.worker._global_node
                _write_log(f"# Ray's session logs (every process's): {node.get_logs_dir_path()}\n")
            self.handle = ray.remote(num_cpus=0)(_Sink).options(name=PROGRESS_ACTOR, get_if_exists=True).remote()
        for record in ray.get(self.handle.take.remote(), timeout=10):
            self.view.show(record)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=15)
        self.view.close()


@contextlib.contextmanager
def session(progress: bool) -> Iterator[None]:
    """Around a job run on the driver: training progress from rank 0 drawn on the console."""
    listener = _Listener(progress)
    listener.start()
    try:
        yield
    finally:
        listener.finish()


# ---------------------------------------------------------------------------------------------- summary


def summary_lines(outcomes: list[Any], seconds: float | None = None) -> list[str]:
    """The closing summary: a row per stage (state, rows or steps, where), the model, the evaluation scores,
    and where the log file is."""
    lines = []
    for o in outcomes:
        m = o.manifest
        if m is None:
            lines.append(f"{o.stage:<10} {o.state}")
            continue
        lines.append(f"{o.stage:<10} {o.state:<8} {m.size}  {m.location}")
        model = m.extra.get("model", {}) if isinstance(m.extra, dict) else {}
        if "weights" in model:  # a trained model
            where = model.get("registry_uri") or model.get("model_uri") or "not logged (MLflow was offline)"
            lines.append(f"{'':<19} model: {where}")
        for row in m.extra.get("summary", []) if isinstance(m.extra, dict) else []:  # evaluation results
            lines.append(f"{'':<19} {row['dataset']} {row['task']}: {row['main_metric']} {row['value']:.3f}")
    if seconds is not None:
        lines.append(f"{'':<19} ({_duration(seconds)} in all)")
    if _state.log_path is not None:
        lines.append(f"log: {_state.log_path}")
    return lines
