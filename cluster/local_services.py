"""The services a cluster deployment uses, on this machine, every one on 127.0.0.1: an S3-speaking object store
(moto's server), PostgreSQL, and an MLflow tracking server on that database with its artifacts in the store.

    .venv/bin/python cluster/local_services.py start [--state-dir DIR] [--bucket NAME]
    .venv/bin/python cluster/local_services.py stop [--state-dir DIR]

`start` runs a holder process in a session of its own, returns once every server answers, and prints the
environment a job needs (`eval "$(... start)"`): the store's endpoint and credentials (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...; s3fs, pyarrow and botocore all read them), MLFLOW_TRACKING_URI, and CLIPLINE_STORAGE,
an `s3://` prefix in the new bucket. A Ray cluster started after that (`cluster/local.sh start`) hands the
same environment to every node, so drivers and workers reach the store and the tracking server. `stop`
ends exactly that holder's process group (the servers stop in order: MLflow, PostgreSQL, the store).

The servers are the ones the test suite starts (`tests/support/`), so what this prints is what the tests
prove. On a real deployment each is yours: a bucket, a PostgreSQL, `mlflow server --backend-store-uri
postgresql+psycopg2://... --artifacts-destination s3://...` (cluster/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the servers live in tests/support, beside the tests that use them

DEFAULT_STATE = Path(os.environ.get("CLIPLINE_LOCAL_SERVICES", "/tmp/clipline-local-services"))
STATE_FILE = "state.json"


def _hold(state_dir: Path, bucket: str) -> int:
    """Start the three servers, write the state file, hold them until SIGTERM/SIGINT, stop them in order."""
    from pipelines.offline import keep_local

    keep_local()
    from tests.support.mlflow_server import MlflowServer
    from tests.support.postgres import PostgresServer
    from tests.support.s3 import S3Server

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started: list = []
    try:
        s3 = S3Server(state_dir).start()
        started.append(s3)
        prefix = f"{s3.bucket(bucket)}/clipline"
        pg = PostgresServer(state_dir).start()
        started.append(pg)
        os.environ.update(s3.env)
        mlflow = MlflowServer(pg.url, f"s3://{bucket}/mlartifacts", state_dir, s3.env).start()
        started.append(mlflow)
        env = {**s3.env, "MLFLOW_TRACKING_URI": mlflow.uri, "CLIPLINE_STORAGE": prefix}
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "env": env, "postgres_port": pg.port}, indent=2) + "\n")
        tmp.replace(state_dir / STATE_FILE)  # whole or absent: `start` polls for it
        print(f"local_services: S3 {s3.endpoint}, PostgreSQL 127.0.0.1:{pg.port}, MLflow {mlflow.uri}", flush=True)
        while not stop.wait(1.0):
            for server in started:
                proc = getattr(server, "proc", None)
                if proc is not None and proc.poll() is not None:
                    print(f"local_services: {type(server).__name__} exited ({proc.returncode}); stopping",
                          file=sys.stderr, flush=True)
                    return 1
        return 0
    finally:
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        for server in reversed(started):
            server.stop()
        print("local_services: stopped", flush=True)


def start(state_dir: Path, bucket: str, timeout: float) -> int:
    state = state_dir / STATE_FILE
    if state.exists():
        pid = json.loads(state.read_text())["pid"]
        if _alive(pid):
            print(f"local_services: already running (pid {pid}); `{sys.argv[0]} stop` first", file=sys.stderr)
            return 1
        state.unlink()
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "local_services.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, "hold", "--state-dir", str(state_dir), "--bucket", bucket],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while not state.exists():
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            print(f"local_services: the services did not start (exit {proc.returncode}); {log}:\n{tail}",
                  file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            print(f"local_services: not up after {timeout:.0f}s; see {log}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    env = json.loads(state.read_text())["env"]
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    print(f"local_services: S3 {env['AWS_ENDPOINT_URL']}, MLflow {env['MLFLOW_TRACKING_URI']}, storage "
          f"{env['CLIPLINE_STORAGE']}; logs in {state_dir}; stop with: {sys.argv[0]} stop", file=sys.stderr)
    return 0


def stop(state_dir: Path, timeout: float = 60) -> int:
    state = state_dir / STATE_FILE
    if not state.exists():
        print(f"local_services: nothing to stop (no {state})", file=sys.stderr)
        return 0
    pid = json.loads(state.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)  # the holder stops its servers in order, then removes the state file
    except ProcessLookupError:
        state.unlink(missing_ok=True)
        return 0
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    state.unlink(missing_ok=True)
    print(f"local_services: stopped (holder {pid}); logs in {state_dir}", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster/local_services.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("command", choices=["start", "stop", "hold"])
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help=f"state and logs ({DEFAULT_STATE})")
    p.add_argument("--bucket", default="clipline", help="the bucket made for storage and MLflow's artifacts")
    p.add_argument("--timeout", type=float, default=300, help="seconds the servers may take to start")
    args = p.parse_args(argv)
    state_dir = args.state_dir.absolute()
    if args.command == "hold":
        return _hold(state_dir, args.bucket)
    if args.command == "start":
        return start(state_dir, args.bucket, args.timeout)
    return stop(state_dir)


if __name__ == "__main__":
    sys.exit(main())
