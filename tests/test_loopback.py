"""Nothing leaves loopback: a demo run, and the MLflow UI on its store, open no connection off the machine.

The run is watched twice: /proc/net of its network namespace polled in a thread (every socket of every
process, C++ ones too), and an audit hook in each of its Python processes that records every connect,
send and name lookup aimed off the machine, however short. The run has a network namespace of its own
(tests/support/sockets.py: private_network) whose default route goes nowhere, so even a regression sends
nothing out; the watch sees the attempt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from tests.support.net import free_port, wait_until
from tests.support.netaudit.netaudit import hosts_file_names, off_machine
from tests.support.sockets import (
    NS_ADDRESS,
    SocketWatcher,
    audit_env,
    audited_processes,
    in_other_network_namespace,
    parse_proc_net,
    private_network,
    read_audit_records,
)

REPO = Path(__file__).resolve().parents[1]  # not from conftest: `python -m tests.test_loopback ui` runs no conftest
# the switches pipelines/offline.py sets; conftest set them for this process, the watched run starts without
SWITCHES = ("RAY_USAGE_STATS_ENABLED", "RAY_USAGE_STATS_REPORT_URL", "MLFLOW_DISABLE_TELEMETRY",
            "NO_ALBUMENTATIONS_UPDATE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE")

# /proc/net/tcp as a machine shows it while Ray starts unswitched: listeners on 0.0.0.0 and 127.0.0.1,
# loopback connections, a TIME_WAIT to the metadata address and a SYN_SENT to it
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1598 1 0000 100 0 0 10 0
   1: 0100007F:9725 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 33899 1 0000 100 0 0 10 0
   2: 0100007F:9725 0100007F:995E 01 00000000:00000000 02:000ACAB2 00000000     0        0 35543 2 0000 20 4 31 18 -1
   3: 0200007F:84F1 0100007F:A8D6 06 00000000:00000000 03:00000524 00000000     0        0 0 3 0000
   4: 020200C0:C738 FEA9FEA9:0050 06 00000000:00000000 03:00000A3C 00000000     0        0 0 3 0000
   5: 320200C0:8D80 FEA9FEA9:0050 02 00000001:00000000 01:00000044 00000000     0        0 62903 2 0000 100 0 0 10 -1
"""
# /proc/net/tcp6: a listener on ::, loopback ::1, IPv4-mapped loopback, and an IPv4-mapped 169.254.169.254
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7001 1 0000 100 0 0 10 0
   1: 00000000000000000000000001000000:A000 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000     0        0 7002 1 0000 20 4 30 10 -1
   2: 0000000000000000FFFF00000100007F:A001 0000000000000000FFFF00000100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 7003 1 0000 20 4 30 10 -1
   3: 0000000000000000FFFF0000020200C0:A002 0000000000000000FFFF0000FEA9FEA9:0050 02 00000001:00000000 01:00000044 00000000     0        0 7004 2 0000 100 0 0 10 -1
"""
# /proc/net/udp: an unbound-peer socket and a resolver query off the machine
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 8001 2 0000 0
  101: 320200C0:D431 35FFFF0A:0035 01 00000000:00000000 00:00000000 00000000     0        0 8002 2 0000 0
"""


def test_proc_net_parser_finds_only_the_connections_off_loopback():
    tcp = parse_proc_net(TCP, "tcp")
    assert [(e.local, e.local_port, e.remote, e.remote_port, e.state, e.inode) for e in tcp] == [
        ("0.0.0.0", 2024, "0.0.0.0", 0, "LISTEN", 1598),
        ("127.0.0.1", 38693, "0.0.0.0", 0, "LISTEN", 33899),
        ("127.0.0.1", 38693, "127.0.0.1", 39262, "ESTABLISHED", 35543),
        ("127.0.0.2", 34033, "127.0.0.1", 43222, "TIME_WAIT", 0),
        ("192.0.2.2", 51000, "169.254.169.254", 80, "TIME_WAIT", 0),
        ("192.0.2.50", 36224, "169.254.169.254", 80, "SYN_SENT", 62903)]
    assert [str(e) for e in tcp if e.off_machine] == [
        "tcp 192.0.2.2:51000 -> 169.254.169.254:80 TIME_WAIT", "tcp 192.0.2.50:36224 -> 169.254.169.254:80 SYN_SENT"]

    tcp6 = parse_proc_net(TCP6, "tcp6")
    assert [(e.remote, e.remote_port, e.state) for e in tcp6] == [
        ("::", 0, "LISTEN"), ("::1", 8080, "ESTABLISHED"), ("::ffff:127.0.0.1", 8080, "ESTABLISHED"),
        ("::ffff:169.254.169.254", 80, "SYN_SENT")]
    assert [e.inode for e in tcp6 if e.off_machine] == [7004]  # mapped 127.x is loopback, mapped 169.254 not

    udp = parse_proc_net(UDP, "udp")
    assert [(e.remote, e.remote_port, e.off_machine) for e in udp] == [("0.0.0.0", 0, False),
                                                                        ("10.255.255.53", 53, True)]
    with pytest.raises(ValueError, match="/proc/net/tcp line 2: expected at least 10 fields"):
        parse_proc_net("header\n 0: 0100007F:0050\n", "tcp")


def test_audit_hook_records_only_targets_off_the_machine():
    local = hosts_file_names("127.0.0.1 localhost\n127.0.1.1 vm  # this machine\n10.0.0.5 db.internal\n")
    assert local == {"localhost", "vm", "db.internal"}
    sock = object()
    assert off_machine("socket.connect", (sock, ("169.254.169.254", 80)), local) == ("169.254.169.254", 80)
    assert off_machine("socket.connect", (sock, ("::ffff:169.254.169.254", 80, 0, 0)), local) == (
        "::ffff:169.254.169.254", 80)
    assert off_machine("socket.sendto", (sock, ("10.255.255.53", 53)), local) == ("10.255.255.53", 53)
    assert off_machine("socket.getaddrinfo", ("metadata.google.internal", 80, 0, 1, 6), local) == (
        "metadata.google.internal", 80)
    assert off_machine("socket.gethostbyname", ("usage-stats.ray.io",), local) == ("usage-stats.ray.io", None)
    for event, args in [("socket.connect", (sock, ("127.0.0.1", 8080))), ("socket.connect", (sock, ("::1", 1, 0, 0))),
                        ("socket.connect", (sock, ("::ffff:127.0.0.5", 1, 0, 0))),
                        ("socket.connect", (sock, "/tmp/ray/session/sockets/raylet")),  # AF_UNIX
                        ("socket.connect", (sock, b"\0abstract")), ("socket.sendmsg", (sock, None)),
                        ("socket.getaddrinfo", ("localhost", 80, 0, 1, 6)),
                        ("socket.getaddrinfo", ("vm", None, 0, 1, 6)),  # answered from /etc/hosts
                        ("socket.getaddrinfo", ("169.254.169.254", 80, 0, 1, 6)),  # a literal: no lookup
                        ("socket.getaddrinfo", (None, 0, 0, 1, 6)), ("socket.bind", (sock, ("0.0.0.0", 80))),
                        ("open", ("/etc/hosts", "r", 0))]:
        assert off_machine(event, args, local) is None, (event, args)


def test_audit_files_are_read_per_process_with_loopback_lines_left_out(tmp_path):
    (tmp_path / "101.started").write_text("python -m pipelines.cli demo\n")
    (tmp_path / "202.started").write_text("python ray/dashboard/dashboard.py --host=127.0.0.1\n")
    (tmp_path / "202.jsonl").write_text(
        '{"pid": 202, "event": "socket.connect", "host": "169.254.169.254", "port": 80, "argv": "dashboard.py"}\n'
        '{"pid": 202, "event": "socket.connect", "host": "127.0.0.1", "port": 8265, "argv": "dashboard.py"}\n'
        "\n"
        '{"pid": 202, "event": "socket.getaddrinfo", "host": "metadata.google.internal", "port": 80, '
        '"argv": "dashboard.py"}\n')
    (tmp_path / "303.jsonl").write_text('{"pid": 303, "event": "socket.connect", "host": "::1", "port": 1}\n')
    records = read_audit_records(tmp_path)
    assert [str(r) for r in records] == [
        "socket.connect 169.254.169.254 port 80 [pid 202 (dashboard.py)]",
        "socket.getaddrinfo metadata.google.internal port 80 [pid 202 (dashboard.py)]"]
    assert audited_processes(tmp_path) == ["python -m pipelines.cli demo",
                                           "python ray/dashboard/dashboard.py --host=127.0.0.1"]
    (tmp_path / "404.jsonl").write_text('{"pid": 404, "event": "socket.connect"}\n')
    with pytest.raises(ValueError, match=r"404\.jsonl line 1: not an audit record"):
        read_audit_records(tmp_path)


def _watched(command: str, tmp_path: Path, timeout: float, during=None):
    """Run the shell `command` in a private network namespace, in a user's environment, watched.

    `during(watcher)`, if given, runs while the command does. Returns (returncode, watcher, its output)."""
    audit_dir, log = tmp_path / "audit", tmp_path / "run.log"
    audit_dir.mkdir()
    with log.open("w") as out:
        proc = subprocess.Popen(private_network(command), cwd=REPO, env=audit_env(audit_dir, _user_env(tmp_path)),
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


def _user_env(tmp_path: Path) -> dict[str, str]:
    """This environment as a user's shell has it: without the switches (conftest set them here), without
    the test run's or a CI's markers (MLflow sends no telemetry where it finds PYTEST_CURRENT_TEST or CI,
    which would hide its default), and with a home of its own, where clipline may write Ray's bootstrap
    config (the user's home is not touched)."""
    hidden = {*SWITCHES, "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "CI", "GITHUB_ACTIONS", "GITLAB_CI",
              "BUILDKITE", "JENKINS_URL", "TRAVIS", "CIRCLECI", "TF_BUILD"}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    return env


def test_the_watch_sees_a_connection_off_loopback(tmp_path):
    """The detector on a real connection: a process in the private namespace connects to the namespace's
    non-loopback address (on lo there: the connection goes nowhere) and holds it until the poller has seen
    it; both watches report it, with its process."""
    flag, script = tmp_path / "seen", tmp_path / "connect.py"
    script.write_text(f"""import os, socket, time
server = socket.create_server(({NS_ADDRESS!r}, 0))
client = socket.create_connection(({NS_ADDRESS!r}, server.getsockname()[1]))
conn, _ = server.accept()
deadline = time.monotonic() + 30
while not os.path.exists({str(flag)!r}) and time.monotonic() < deadline:
    time.sleep(0.01)
""")

    def until_seen(watcher: SocketWatcher) -> None:
        wait_until(lambda: any(s.entry.remote == NS_ADDRESS for s in watcher.violations()), 20, "the poller's sighting",
                   interval=0.02)
        flag.touch()

    rc, watcher, log = _watched(f"{sys.executable} {script}", tmp_path, 60, until_seen)
    assert rc == 0, log
    held = [s for s in watcher.violations() if s.entry.remote == NS_ADDRESS and s.entry.state == "ESTABLISHED"]
    assert held and all(s.pid is not None and str(script) in s.cmdline for s in held), [str(s) for s in held]
    assert [(r.event, r.host) for r in read_audit_records(tmp_path / "audit")] == [("socket.connect", NS_ADDRESS)]


@pytest.mark.slow
@pytest.mark.timeout(960)  # the run's own bound is 900 s: a loaded 2-core machine took 8 min
def test_demo_and_ui_send_nothing_off_the_machine(tmp_path):
    store, port, ui_port = tmp_path / "data", free_port(), free_port()
    demo = (f"{sys.executable} -m pipelines.cli demo --storage {store} --images 120 --port {port} --no-progress "
            "--set stages.train.with.batch_size=16 --set stages.train.with.epochs=1 --set stages.train.with.workers=1 "
            "--set stages.evaluate.with.datasets.0.limit=40")
    # then the UI on the demo's store, asked for its page, the runs and its telemetry config, as a browser does
    ui = f"{sys.executable} -m tests.test_loopback ui {store} {ui_port} {tmp_path / 'ui.json'}"
    started = time.monotonic()
    rc, watcher, log = _watched(f"sh -c '{demo} && {ui}'", tmp_path, 900)
    seconds = time.monotonic() - started
    assert rc == 0, log[-4000:]
    assert "evaluate   ran" in log and "model: models:/demo-train@candidate" in log, log[-4000:]
    ui_seen = json.loads((tmp_path / "ui.json").read_text())
    assert ui_seen["page"] == 200 and ui_seen["experiments"] >= 1, ui_seen

    processes = audited_processes(tmp_path / "audit")
    # the hook ran in the driver, Ray's dashboard and its workers, the MLflow server: the watch covered them
    for kind in ("pipelines.cli demo", "dashboard/dashboard.py", "default_worker.py", "mlflow"):
        assert any(kind in p for p in processes), (kind, processes)
    sent = [str(r) for r in read_audit_records(tmp_path / "audit")]
    ptr, seen = _torch_store_lookups(watcher.violations())
    assert watcher.polls > 50, watcher.polls
    assert (sent, seen) == ([], []), f"off the machine in {seconds:.0f} s: audit {sent}; sockets {seen}"
    # the one known leak, not ours to switch off: seen, and only from a training worker's process-group set-up
    if ptr:
        warnings.warn(f"torch's c10d asked the DNS resolver for 127.0.0.1's name: {[str(s) for s in ptr]}",
                      stacklevel=1)
    # clipline wrote Ray's bootstrap config in the run's home: what keeps Ray's dashboard from asking
    assert "provider:\n  type: local" in (tmp_path / "home" / "ray_bootstrap_config.yaml").read_text()


def _resolvers() -> set[str]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1}


def _torch_store_lookups(sightings: list) -> tuple[list, list[str]]:
    """Split off the reverse lookups torch 2.14 makes when a training worker connects to its TCPStore.

    c10d formats the store's socket address for its log lines with getnameinfo() without NI_NUMERICHOST
    (`c10d::detail::formatSockAddr`, seen with strace -k); for the IPv4-mapped ::ffff:127.0.0.1 glibc finds no
    /etc/hosts entry and sends a PTR query for 1.0.0.127.in-addr.arpa to the configured resolver. torch has no
    switch for it. Only a UDP datagram to port 53 of a resolver in /etc/resolv.conf, from the process Ray
    Train titles `_setup_torch_process_group`, is split off; anything else stays a failure."""
    resolvers = _resolvers()
    ptr = [s for s in sightings if s.entry.proto.startswith("udp") and s.entry.remote_port == 53
           and s.entry.remote in resolvers and "_setup_torch_process_group" in s.cmdline]
    return ptr, [str(s) for s in sightings if s not in ptr]


def _ui(store: str, port: str, out: str) -> int:
    """Inside the watched run: `clipline ui` on the store, asked what a browser asks, then stopped."""
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


if __name__ == "__main__" and sys.argv[1:2] == ["ui"]:
    raise SystemExit(_ui(*sys.argv[2:5]))
