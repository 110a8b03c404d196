"""A run watched for traffic off the machine, in a user's environment (tests/test_demo.py's demo run,
tests/test_loopback.py's detector check).

The run has a network namespace of its own (tests/support/sockets.py: private_network) whose default route goes
nowhere, so even a regression sends nothing out; it is watched twice: /proc/net of that namespace polled in a
thread (every socket of every process, C++ ones too), and an audit hook in each of its Python processes that
records every connect, send and name lookup aimed off the machine, however short.

`python -m tests.support.watched ui STORE PORT OUT` is the MLflow UI step a watched run ends with, and
`python -m tests.support.watched explore STORE PORT OUT` the explorer step (faiss and the explorer's server are
dependencies no other step runs).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from pipelines.offline import SWITCHES
from tests.support.net import wait_until
from tests.support.sockets import (
    SocketWatcher,
    audit_env,
    audited_processes,
    in_other_network_namespace,
    private_network,
    read_audit_records,
)

REPO = Path(__file__).resolve().parents[2]  # not from conftest: the `ui` step below runs no conftest
# what marks a test run or a CI (MLflow sends no telemetry where it finds PYTEST_CURRENT_TEST or CI, which would
# hide its default): a user's shell has none of them
MARKERS = ("PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE",
           "JENKINS_URL", "TRAVIS", "CIRCLECI", "TF_BUILD")


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment as a user's shell has it: without the offline switches (conftest set them here; clipline
    must set them itself), without the test run's or a CI's markers, and with a home of its own, where clipline
    may write Ray's bootstrap config (the user's home is not touched); plus `extra`."""
    hidden = {*SWITCHES, *MARKERS}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    return env | extra


def watched(command: str, tmp_path: Path, timeout: float, during: Callable[[SocketWatcher], None] | None = None,
            env: Mapping[str, str] | None = None) -> tuple[int, SocketWatcher, str]:
    """Run the shell `command` in a private network namespace, in `env` (default: `user_env`), watched; its
    audit records go to tmp_path/audit, its output to tmp_path/run.log.

    `during(watcher)`, if given, runs while the command does. Returns (returncode, watcher, its output)."""
    audit_dir, log = tmp_path / "audit", tmp_path / "run.log"
    audit_dir.mkdir()
    with log.open("w") as out:
        proc = subprocess.Popen(private_network(command), cwd=REPO,
                                env=audit_env(audit_dir, dict(env) if env is not None else user_env(tmp_path)),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: in_other_network_namespace(proc.pid), 10, "the run's network namespace",
                   interval=0.01, alive=lambda: proc.poll() is None)
        # every socket of that namespace is the run's: no baseline, every process ours
        with SocketWatcher(ours=lambda pid: True, proc_net=f"/proc/{proc.pid}/net", baseline=False) as watcher:
            if during is not None:
                during(watcher)
            rc = proc.wait(timeout=timeout)
    finally:
        try:  # the run's whole process group: a killed shell would leave the demo and its Ray running
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return rc, watcher, log.read_text()


def assert_nothing_left_the_machine(tmp_path: Path, watcher: SocketWatcher, seconds: float,
                                    kinds: tuple[str, ...]) -> None:
    """Neither watch saw a target off the machine; the audit hook ran in a process of each of `kinds` (so the
    watch covered them). The one known leak, not ours to switch off (torch's reverse lookup of its store's
    address), is split off and reported as a warning."""
    processes = audited_processes(tmp_path / "audit")
    for kind in kinds:
        assert any(kind in p for p in processes), (kind, processes)
    sent = [str(r) for r in read_audit_records(tmp_path / "audit")]
    ptr, seen = torch_store_lookups(watcher.violations())
    assert watcher.polls > 50, watcher.polls
    assert (sent, seen) == ([], []), f"off the machine in {seconds:.0f} s: audit {sent}; sockets {seen}"
    if ptr:
        warnings.warn(f"torch's c10d asked the DNS resolver for 127.0.0.1's name: {[str(s) for s in ptr]}",
                      stacklevel=2)


def resolvers() -> set[str]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1}


def torch_store_lookups(sightings: list) -> tuple[list, list[str]]:
    """Split off the reverse lookups torch 2.14 makes when a training worker connects to its TCPStore.

    c10d formats the store's socket address for its log lines with getnameinfo() without NI_NUMERICHOST
    (`c10d::detail::formatSockAddr`, seen with strace -k); for the IPv4-mapped ::ffff:127.0.0.1 glibc finds no
    /etc/hosts entry and sends a PTR query for 1.0.0.127.in-addr.arpa to the configured resolver. torch has no
    switch for it. Only a UDP datagram to port 53 of a resolver in /etc/resolv.conf, from the process Ray
    Train titles `_setup_torch_process_group`, is split off; anything else stays a failure."""
    known = resolvers()
    ptr = [s for s in sightings if s.entry.proto.startswith("udp") and s.entry.remote_port == 53
           and s.entry.remote in known and "_setup_torch_process_group" in s.cmdline]
    return ptr, [str(s) for s in sightings if s not in ptr]


def ui_step(store: Path, port: int, out: Path) -> str:
    """The shell command of the `ui` step: `clipline ui` on `store`, asked what a browser asks (what it saw
    goes to `out` as JSON), then stopped."""
    return f"{sys.executable} -m tests.support.watched ui {store} {port} {out}"


def _ui(store: str, port: str, out: str) -> int:
    # a session of its own: the MLflow server's workers are stopped with it
    ui = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--storage", store, "--port", port],
                          start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def get(path: str) -> tuple[int, bytes]:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status, r.read()

        def up() -> bool:
            try:
                return get("/health")[0] == 200
            except OSError:
                return False

        wait_until(up, 120, "clipline ui", alive=lambda: ui.poll() is None)
        page = get("/")[0]
        get("/ajax-api/3.0/mlflow/ui-telemetry")  # where the UI asks whether to send telemetry
        _, body = get("/ajax-api/2.0/mlflow/experiments/search?max_results=50")
        Path(out).write_text(json.dumps({"page": page, "experiments": len(json.loads(body)["experiments"])}))
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    return 0


def explore_step(store: Path, port: int, out: Path, overrides: list[str]) -> str:
    """The shell command of the `explore` step: `clipline explore` on the demo job in `store` (with the demo run's
    `--set` overrides, so its train stage's output is the current one), asked for a query, a row page and the
    clusters (what it answered goes to `out` as JSON), then stopped."""
    return shlex.join([sys.executable, "-m", "tests.support.watched", "explore", str(store), str(port), str(out),
                       *overrides])


def _explore(store: str, port: str, out: str, *overrides: str) -> int:
    cmd = [sys.executable, "-m", "pipelines.cli", "explore", str(REPO / "jobs" / "demo.yaml"), "--storage", store,
           "--port", port, "--no-progress", *overrides]
    explorer = subprocess.Popen(cmd, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def get(path: str) -> bytes:
            with urllib.request.urlopen(base + path, timeout=30) as r:
                return bytes(r.read())

        def up() -> bool:
            try:
                return get("/health") == b"ok"
            except OSError:
                return False

        wait_until(up, 180, "clipline explore", alive=lambda: explorer.poll() is None)
        found = json.loads(get("/api/search?q=a+red+circle&k=5"))
        row = json.loads(get(f"/api/row/{found['rows'][0]['uid']}"))
        Path(out).write_text(json.dumps({"rows": len(found["rows"]), "runs": [r["stage"] for r in row["runs"]],
                                         "clusters": len(json.loads(get("/api/clusters")))}))
    finally:
        os.killpg(explorer.pid, signal.SIGTERM)
        code = explorer.wait(timeout=30)
    return code  # SIGTERM is the explorer's clean stop: 0


if __name__ == "__main__" and sys.argv[1:2] == ["ui"]:
    raise SystemExit(_ui(*sys.argv[2:5]))
if __name__ == "__main__" and sys.argv[1:2] == ["explore"]:
    raise SystemExit(_explore(*sys.argv[2:]))
