"""`clipline demo`: write the synthetic web's URL list, serve the web on 127.0.0.1, run jobs/demo.yaml.

`clipline demo --serve-only` writes the URL list and serves the web until SIGTERM or Ctrl-C, running nothing:
for a job run elsewhere, e.g. `clipline submit jobs/demo.yaml` to a cluster on this machine.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.demo.server import DemoServer, url_list
from pipelines.storage import StorageError

DEMO_JOB = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"
DEMO_SEED = 0
# a few of the faults a real crawl meets, so the demo's status counts show them
DEMO_FAULTS = {"missing": 0.02, "html": 0.01, "optout": 0.01}


def write_url_list(path: str, base_url: str, images: int) -> bool:
    """Write the URL list unless an identical one is there (keeps the crawl's cache key); True if written."""
    frame = url_list(base_url, images, DEMO_SEED, DEMO_FAULTS)[["url", "caption"]]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    data = buf.getvalue()
    if storage.exists(path):
        fs, p = storage.filesystem(path)
        if fs.cat_file(p) == data:
            return False
    storage.atomic_write(path, data)
    return True


def url_list_path(store: str) -> str:
    """Where the demo job's crawl reads its URL list (jobs/demo.yaml: ${storage}/demo-web/urls.parquet)."""
    return storage.join(store, "demo-web", "urls.parquet")


def _serve(port: int) -> DemoServer | None:
    try:
        return DemoServer(port=port)
    except OSError as exc:
        print(f"clipline: cannot serve the demo web on 127.0.0.1:{port}: {exc.strerror}; pick another --port",
              file=sys.stderr)
        return None


def _store(url: str) -> str:
    # a local path is made absolute: a job submitted to a cluster must be given the same directory
    return os.path.abspath(url) if storage.is_local(url) else url.rstrip("/")


def _publish(server: DemoServer, store: str, images: int) -> str:
    """Write the URL list for `server` under `store` and say where; returns the list's path."""
    urls = url_list_path(store)
    try:
        written = write_url_list(urls, server.base_url, images)
    except StorageError as exc:
        print(f"clipline: {exc}", file=sys.stderr)
        raise
    print(f"clipline: synthetic web of {images} images at {server.base_url} "
          f"({'new URL list' if written else 'URL list unchanged'}: {urls})", file=sys.stderr)
    return urls


def serve_web(storage_url: str, port: int, images: int, stop: threading.Event | None = None) -> int:
    """Write the URL list and serve the web until SIGTERM, Ctrl-C or `stop`; run nothing."""
    store = _store(storage_url)
    server = _serve(port)
    if server is None:
        return 2
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C too, set here rather than left to Python's KeyboardInterrupt: a process started in the
        # background of a non-interactive shell (a CI runner, `cmd &`) inherits SIGINT ignored, and Python then
        # installs no handler, so Ctrl-C would not stop the server
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    with server:
        try:
            _publish(server, store, images)
        except StorageError:
            return 3
        print(f"base_url {server.base_url}\nurl_list {url_list_path(store)}\nstorage {store}", flush=True)
        print(f"clipline: serving until SIGTERM or Ctrl-C; run the demo job against it with e.g.\n"
              f"  clipline submit jobs/demo.yaml --storage {store} --wait", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    print("clipline: demo web stopped", file=sys.stderr)
    return 0


def run_demo(storage: str, port: int, images: int, overrides: list[str], progress: bool = True) -> int:
    import time

    from pipelines import console, spec
    from pipelines.runner import StageFailed, run_job

    store = _store(storage)
    server = _serve(port)
    if server is None:
        return 2
    t0 = time.perf_counter()
    with server:
        try:
            _publish(server, store, images)
        except StorageError:
            return 3
        job = spec.load(DEMO_JOB, overrides, store)
        console.open_log(job.name)
        try:
            with console.session(progress):
                outcomes = run_job(job, progress=progress)
        except StageFailed as exc:
            where = f" (details: {console.log_path()})" if console.log_path() else ""
            print(f"clipline: {exc}{where}", file=sys.stderr)
            return 1
    assert all(o.manifest is not None for o in outcomes), outcomes  # the demo selects every stage
    print("\n".join(console.summary_lines(outcomes, time.perf_counter() - t0)))
    server_uri = job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if server_uri.split("://", 1)[0].lower() in ("http", "https"):  # a tracking server: its own UI has the runs
        from pipelines.redact import scrub

        print(f"\nOutputs under {store}/{job.name}/. Browse the runs at {scrub(server_uri)} "
              f"(experiment {job.experiment})")
        return 0
    print(f"\nOutputs under {store}/{job.name}/. Browse the runs with:  clipline ui --storage {store}\n"
          f"(or: mlflow ui --backend-store-uri sqlite:///{store}/mlflow.db)")
    return 0
