"""Nothing leaves loopback: the watch that tests/test_demo.py puts on a demo run and the MLflow UI on its store
(tests/support/watched.py), checked here: its /proc/net parser, its audit hook, and a real connection off
loopback in the private network namespace, seen by both.
"""

from __future__ import annotations

import sys

import pytest

from tests.support.net import wait_until
from tests.support.netaudit.netaudit import hosts_file_names, off_machine
from tests.support.sockets import (
    NS_ADDRESS,
    SocketWatcher,
    audited_processes,
    parse_proc_net,
    read_audit_records,
)
from tests.support.watched import watched

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

    rc, watcher, log = watched(f"{sys.executable} {script}", tmp_path, 60, until_seen)
    assert rc == 0, log
    held = [s for s in watcher.violations() if s.entry.remote == NS_ADDRESS and s.entry.state == "ESTABLISHED"]
    assert held and all(s.pid is not None and str(script) in s.cmdline for s in held), [str(s) for s in held]
    assert [(r.event, r.host) for r in read_audit_records(tmp_path / "audit")] == [("socket.connect", NS_ADDRESS)]
