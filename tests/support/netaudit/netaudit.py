"""Record each socket connect, send and name lookup aimed off this machine, one JSON line per event.

Installed by the sitecustomize.py beside this file in every Python process whose environment names a record
directory in CLIPLINE_NET_AUDIT_DIR. Only the standard library, imported lazily where possible: this runs at
the start of every interpreter of the watched run, before anything else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

ENV = "CLIPLINE_NET_AUDIT_DIR"
# connect: (socket, address); sendto and sendmsg: (socket, address or None); getaddrinfo: (host, port, ...);
# gethostbyname: (name,). A name lookup is traffic too: a resolver off the machine gets the name.
EVENTS = ("socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
          "socket.gethostbyname_ex")


def is_loopback_ip(host: str) -> bool | None:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped ::ffff:127.x; False for another address; None if not an IP."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone id (fe80::1%eth0) is no part of it
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def hosts_file_names(text: str) -> set[str]:
    """Every name in an /etc/hosts text: looking one up is answered from the file, nothing is sent."""
    names: set[str] = set()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        names.update(n.lower() for n in fields[1:])
    return names


def off_machine(event: str, args: tuple[Any, ...], local_names: set[str]) -> tuple[str, Any] | None:
    """The (host, port) an audited socket event aims at if that is off this machine, else None."""
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        address = args[1] if len(args) > 1 else None
        # AF_UNIX paths (str, bytes) and sendmsg on a connected socket (None) go nowhere new
        if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
            return None
        host, port = address[0], address[1] if len(address) > 1 else None
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0] if args else None
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not host:  # None or "": the wildcard address of a server that binds, no lookup
            return None
        port = args[1] if event == "socket.getaddrinfo" and len(args) > 1 else None
        if is_loopback_ip(host) is not None:
            return None  # a literal is not looked up; its connect, if any, is recorded on its own
    else:
        return None
    loopback = is_loopback_ip(host)
    if loopback or (loopback is None and host.lower().rstrip(".") in local_names):
        return None
    return host, port


def _cmdline() -> str:
    """This process's command line (sys.argv is not set yet when sitecustomize runs)."""
    try:
        raw = Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()[:300]


def install(record_dir: str) -> None:
    """Append each off-machine target of this process to {record_dir}/{pid}.jsonl."""
    try:
        local = hosts_file_names(Path("/etc/hosts").read_text())
    except OSError:
        local = set()
    local |= {"localhost"}  # answered on the machine (RFC 6761) even where /etc/hosts lacks it
    argv = _cmdline()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        # every audited call of the process passes here: leave all but the few socket events at once (the
        # file write below raises only "open", so it cannot loop back into this hook's recording)
        if event not in EVENTS:
            return
        try:
            target = off_machine(event, args, local)
            if target is not None:
                pid = os.getpid()  # a forked child writes its own file
                port = target[1] if isinstance(target[1], (int, str)) else repr(target[1])
                record = {"pid": pid, "event": event, "host": target[0], "port": port, "argv": argv}
                with open(os.path.join(record_dir, f"{pid}.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        except Exception:  # noqa: BLE001 - a hook that raises would break the socket call it watches
            pass

    sys.addaudithook(hook)
    # a record that this process ran with the hook, so the test can see which processes were covered
    with open(os.path.join(record_dir, f"{os.getpid()}.started"), "w", encoding="utf-8") as f:
        f.write(argv + "\n")
