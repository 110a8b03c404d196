"""Watch this machine's sockets for connections off it: /proc/net polled in a thread, and the audit hook's files.

The poller sees every socket of every process in this network namespace, C++ ones too (Ray's GCS and
raylet), in any TCP state, SYN_SENT included; it can miss a connection shorter than its interval, which
the audit hook (tests/support/netaudit, installed in each Python process of a watched run) cannot.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.netaudit.netaudit import ENV as AUDIT_ENV
from tests.support.netaudit.netaudit import is_loopback_ip

NETAUDIT_DIR = Path(__file__).resolve().parent / "netaudit"  # on PYTHONPATH: its sitecustomize installs the hook
PROC_NET = ("tcp", "tcp6", "udp", "udp6")
# the private network of a watched run: loopback, plus this TEST-NET-1 address on lo with the default route
# through lo, so that a connect to any address leaves a socket to watch (SYN_SENT) and nothing leaves the
# namespace, hence the machine, whatever the run tries
NS_ADDRESS = "192.0.2.50"
# include/net/tcp_states.h; a UDP socket shows 01 once connected, 07 while not
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
              "0B": "CLOSING", "0C": "NEW_SYN_RECV"}


@dataclass(frozen=True)
class Entry:
    """One line of /proc/net/{tcp,tcp6,udp,udp6}."""

    proto: str
    local: str
    local_port: int
    remote: str
    remote_port: int
    state: str
    inode: int

    @property
    def off_machine(self) -> bool:
        """A connection (or connect attempt) to an address outside 127.0.0.0/8 and ::1.

        A remote of 0.0.0.0 or :: is no connection: a listener, or a UDP socket that is not connected."""
        if ipaddress.ip_address(self.remote).is_unspecified:
            return False
        return not is_loopback_ip(self.remote)

    def __str__(self) -> str:
        return f"{self.proto} {self.local}:{self.local_port} -> {self.remote}:{self.remote_port} {self.state}"


@functools.lru_cache(maxsize=65536)
def decode_address(field_: str) -> tuple[str, int]:
    """'0100007F:1F90' -> ('127.0.0.1', 8080). The kernel prints each 32-bit word of the address in host order
    (little-endian here) and the port in network order."""
    hex_ip, hex_port = field_.split(":")
    raw = bytes.fromhex(hex_ip)
    if len(raw) not in (4, 16):
        raise ValueError(f"not an address field of /proc/net: {field_!r}")
    ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    mapped = getattr(ip, "ipv4_mapped", None)  # written ::ffff:127.0.0.1, as Python 3.13 does, not ::ffff:7f00:1
    return (f"::ffff:{mapped}" if mapped else str(ip)), int(hex_port, 16)


def parse_proc_net(text: str, proto: str) -> list[Entry]:
    """The entries of one /proc/net/<proto> text (its header line skipped)."""
    entries = []
    for n, line in enumerate(text.splitlines()[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 10:
            raise ValueError(f"/proc/net/{proto} line {n}: expected at least 10 fields, got {line!r}")
        local, lport = decode_address(fields[1])
        remote, rport = decode_address(fields[2])
        state = TCP_STATES.get(fields[3].upper(), fields[3])
        entries.append(Entry(proto, local, lport, remote, rport, state, int(fields[9])))
    return entries


@dataclass
class Sighting:
    """A connection off the machine, with the process that held it when it was first seen (if one still did)."""

    entry: Entry
    pid: int | None
    cmdline: str
    ours: bool | None  # None: no process held it any more (closed, TIME_WAIT) when its owner was looked up
    first_seen: float

    def __str__(self) -> str:
        who = f"pid {self.pid} ({self.cmdline})" if self.pid is not None else "owner gone"
        return f"{self.entry} [{who}]"


def socket_owners(inodes: set[int]) -> dict[int, int]:
    """inode -> pid for the given socket inodes, read from /proc/*/fd."""
    wanted = {f"socket:[{i}]": i for i in inodes if i}
    found: dict[int, int] = {}
    if not wanted:
        return found
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in os.scandir(pid_dir / "fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target in wanted:
                    found[wanted[target]] = int(pid_dir.name)
        except OSError:  # the process ended, or is not ours to read
            continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:200]
    except OSError:
        return "?"


def has_env(pid: int, name: str, value: str) -> bool:
    """Whether process `pid` was started with name=value in its environment."""
    try:
        return f"{name}={value}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


@dataclass
class SocketWatcher:
    """Polls /proc/net every `interval` s in a thread and keeps every connection off the machine it sees.

    `ours(pid)` says whether a process belongs to the watched run; connections already open when the watch
    starts are left out (they are not the run's)."""

    ours: Callable[[int], bool]
    proc_net: str = "/proc/net"  # /proc/PID/net: the sockets of PID's network namespace
    baseline: bool = True  # leave out what is open at the start (not the run's); off for a private namespace
    interval: float = 0.02
    sightings: dict[tuple[str, int, str, int, str], Sighting] = field(default_factory=dict)
    polls: int = 0
    _baseline: set[tuple[str, int, str, int, str]] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def snapshot(self) -> list[Entry]:
        entries: list[Entry] = []
        for proto in PROC_NET:
            try:
                text = Path(self.proc_net, proto).read_text()
            except FileNotFoundError:  # no IPv6 (or UDP) table on this kernel
                continue
            except ProcessLookupError:  # the process whose namespace this is has ended
                return entries
            entries.extend(e for e in parse_proc_net(text, proto) if e.off_machine)
        return entries

    @staticmethod
    def _key(e: Entry) -> tuple[str, int, str, int, str]:
        return (e.proto, e.local_port, e.remote, e.remote_port, e.local)

    def poll(self) -> None:
        new = [e for e in self.snapshot() if self._key(e) not in self._baseline and self._key(e) not in self.sightings]
        self.polls += 1
        if not new:
            return
        owners = socket_owners({e.inode for e in new})
        for e in new:
            pid = owners.get(e.inode)
            self.sightings[self._key(e)] = Sighting(e, pid, _cmdline(pid) if pid else "",
                                                    self.ours(pid) if pid else None, time.monotonic())

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.poll()
        except BaseException as exc:  # noqa: BLE001 - raised again in stop(), where the test sees it
            self._error = exc

    def __enter__(self) -> SocketWatcher:
        self._baseline = {self._key(e) for e in self.snapshot()} if self.baseline else set()
        self._thread = threading.Thread(target=self._run, name="socket-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.poll()  # whatever is still open at the end
        except OSError:
            pass  # the namespace is gone with its processes
        if self._error is not None:
            raise RuntimeError(f"the socket watcher failed: {self._error!r}") from self._error

    def violations(self) -> list[Sighting]:
        """The run's connections off the machine, and those whose owner was gone before it could be named."""
        return [s for s in self.sightings.values() if s.ours is not False]


@dataclass(frozen=True)
class AuditRecord:
    """One line a netaudit hook wrote: a connect, send or name lookup aimed off the machine."""

    pid: int
    event: str
    host: str
    port: int | str | None
    argv: str

    def __str__(self) -> str:
        return f"{self.event} {self.host} port {self.port} [pid {self.pid} ({self.argv[:160]})]"


def read_audit_records(directory: Path) -> list[AuditRecord]:
    """Every off-machine record in the hook's files under `directory`, in file and line order."""
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                record = AuditRecord(int(d["pid"]), str(d["event"]), str(d["host"]), d.get("port"),
                                     str(d.get("argv", "")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path} line {n}: not an audit record ({exc}): {line[:200]!r}") from None
            # the hook writes no loopback target; should one appear, it is still no traffic off the machine
            if not (is_loopback_ip(record.host) or record.host.lower() == "localhost"):
                records.append(record)
    return records


def audited_processes(directory: Path) -> list[str]:
    """The command lines of the processes that started with the hook installed."""
    return [p.read_text(encoding="utf-8").strip() for p in sorted(directory.glob("*.started"))]


def private_network(command: str) -> list[str]:
    """argv that runs the shell `command` in a network namespace of its own (see NS_ADDRESS); it stays the
    process Popen started, so /proc/PID/net shows that namespace's sockets."""
    setup = (f"ip link set lo up && ip addr add {NS_ADDRESS}/32 dev lo && ip route add default dev lo")
    return ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", f"{setup} && exec {command}"]


def in_other_network_namespace(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def audit_env(directory: Path, env: dict[str, str]) -> dict[str, str]:
    """`env` for a run whose every Python process records its off-machine targets under `directory`."""
    out = dict(env)
    out[AUDIT_ENV] = str(directory)
    out["PYTHONPATH"] = os.pathsep.join([str(NETAUDIT_DIR), *filter(None, [env.get("PYTHONPATH")])])
    return out
