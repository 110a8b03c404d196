"""Memory of this process's tree, read from /proc (Linux): its descendants, the Ray workers among them, peaks.

VmHWM in /proc/PID/status is a process's peak resident set since it started (or since its peak was reset
through /proc/PID/clear_refs), so a peak is read after the fact, however briefly it lasted. Every reader
returns nothing (an empty set or dict, None, False) where /proc is missing or a process is gone meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_WORKER = b"default_worker.py"  # the script a Ray worker process starts as


def descendants(pid: int | None = None) -> set[int]:
    """The processes under `pid` (default: this one), children's children included; `pid` itself not."""
    parents = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return set()
    for entry in entries:
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    mine, todo = set(), [os.getpid() if pid is None else pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent and p not in mine]
        mine.update(kids)
        todo += kids
    return mine


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_ray_worker(pid: int) -> bool:
    """A Ray worker: started as default_worker.py, which soon retitles itself (setproctitle overwrites the
    command line) `ray::IDLE` or `ray::<task or actor>`. Ray's agents (`ray::DashboardAgent`,
    `ray::RuntimeEnvAgent`) take the same prefix and are not workers."""
    args = cmdline(pid).split(b"\0")
    # an argument of its own: the raylet's --python_worker_command=... names the script inside a longer one
    if any(a.endswith(RAY_WORKER) for a in args):
        return True
    title = args[0].strip()
    return title.startswith(b"ray::") and not title.endswith(b"Agent")


def vm_hwm(pid: int | None = None) -> int | None:
    """Peak resident set of `pid` (default: this process) in bytes; None if it is gone or /proc has none."""
    try:
        status = Path(f"/proc/{'self' if pid is None else pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else None


def reset_peak(pid: int | None = None) -> bool:
    """Reset the VmHWM of `pid` (default: this process) to its current resident set; True if it could."""
    try:
        Path(f"/proc/{'self' if pid is None else pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ray_workers_peak_rss() -> dict[int, int]:
    """VmHWM (peak resident set, bytes) of the Ray worker processes under this one, from /proc (see is_ray_worker)."""
    peaks = {}
    for pid in descendants():
        if is_ray_worker(pid) and (peak := vm_hwm(pid)) is not None:
            peaks[pid] = peak
    return peaks
