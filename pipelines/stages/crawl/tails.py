"""Tails: a speculative copy of a shard task that runs far longer than the others, once most have finished.

A crawl's last shards can hold the whole job (and every stage after it) for hours: a worker that hangs, a
node with a bad disk or network, a resolver that stalls (img2dataset #289, #437).  Near the end, when a
fraction `speculate_after` of the shard tasks have finished and none waits to start, a shard that has run
`speculate_factor` times the median finished shard's time (and at least `speculate_min_seconds`) gets one
copy: the same task, writing its own file `part-NNNNN-copy.parquet`.  Whichever copy finishes first is the
shard: its record (and so the manifest) names its file, the other task is cancelled and its file, if it got
to write one, removed.  Each file is written whole under its own name (storage.atomic_write) by one copy, so
two copies never write one name, on a local disk or on an object store without rename, and the manifest
lists one file per shard: every input row once.

The decision (`stragglers`) and the bookkeeping (`Tails`) know nothing of Ray: the stage's dispatch loop
hands them opaque task keys and asks which shards to copy and how long it may wait for a task to finish.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from pipelines import storage
from pipelines.stages.crawl.config import CrawlConfig


@dataclass(frozen=True, kw_only=True)
class Speculation:
    """When a running shard gets a copy (CrawlConfig's speculate_* settings)."""

    after: float  # fraction of the shard tasks finished, none waiting to start
    factor: float  # running longer than this times the median finished shard's time ...
    min_seconds: float  # ... and than this
    max_copies: int  # copies running at once

    @classmethod
    def of(cls, cfg: CrawlConfig) -> Speculation | None:
        if not cfg.speculate:
            return None
        return cls(after=cfg.speculate_after, factor=cfg.speculate_factor, min_seconds=cfg.speculate_min_seconds,
                   max_copies=cfg.speculate_max_copies)


@dataclass(frozen=True)
class Straggler:
    """A running shard due for a copy, and why."""

    shard: int
    running_s: float
    median_s: float
    threshold_s: float
    finished: int
    shards: int

    def why(self) -> str:
        return (f"running {self.running_s:.1f}s, over {self.threshold_s:.1f}s (the median finished shard took "
                f"{self.median_s:.1f}s), with {self.finished} of {self.shards} shards finished and none waiting")


def stragglers(policy: Speculation | None, now: float, running: Mapping[int, float], durations: Sequence[float],
               finished: int, shards: int, queued: int, copies_running: int,
               copied: Collection[int]) -> tuple[list[Straggler], float | None]:
    """The running shards (shard -> when its task started) to copy now, longest running first, and the seconds
    until the next one could be due (at least 0.05, never a spin); None when only a finishing task can make one due.

    `durations` are the finished shards' times, sorted; `finished` counts the shard tasks done (failed ones
    too) of `shards`; `queued` the shards not yet started; `copied` the shards that have had a copy."""
    # (a hair under the product: 0.7 * 10 is 7.000000000000001, and 7 of 10 shards finished is 0.7 of them)
    if policy is None or queued or not durations or finished < policy.after * shards - 1e-9:
        return [], None
    free = policy.max_copies - copies_running
    if free <= 0:
        return [], None
    n = len(durations)
    median = durations[n // 2] if n % 2 else (durations[n // 2 - 1] + durations[n // 2]) / 2
    threshold = max(policy.factor * median, policy.min_seconds)
    ages = sorted(((now - t0, i) for i, t0 in running.items() if i not in copied), key=lambda a: (-a[0], a[1]))
    due = [Straggler(i, age, median, threshold, finished, shards) for age, i in ages if age > threshold][:free]
    later = [threshold - age for age, _ in ages if age <= threshold]
    return due, (max(min(later), 0.05) if later and len(due) < free else None)


@dataclass
class Settled:
    """What a finished task means for its shard (Tails.done)."""

    shard: int
    copy: bool  # the task was the speculative copy
    final: bool  # no other copy of the shard is running: it is done (or, if the task failed, failed)
    loser: Hashable | None = None  # the other copy's task, still running, to cancel: this one finished first


@dataclass
class Tails:
    """The shard tasks in flight, originals and copies, for one crawl: which to copy, which copy counts.

    `counts`: copies started, won (the copy finished first; the original is cancelled), cancelled (the
    original finished first) and failed (the copy raised or its worker died)."""

    policy: Speculation | None
    shards: int  # shard tasks this crawl runs
    clock: Callable[[], float] = time.monotonic
    counts: Counter[str] = field(default_factory=Counter)
    _started: dict[int, float] = field(default_factory=dict)  # shard -> when its original was dispatched
    _tasks: dict[Hashable, tuple[int, bool]] = field(default_factory=dict)  # running task -> (shard, is a copy)
    _durations: list[float] = field(default_factory=list)  # sorted
    _copied: set[int] = field(default_factory=set)
    _finished: int = 0

    def started(self, task: Hashable, shard: int) -> None:
        """The shard's original task was dispatched."""
        self._started[shard] = self.clock()
        self._tasks[task] = (shard, False)

    def due(self, queued: int) -> tuple[list[Straggler], float | None]:
        """The shards to copy now and the seconds until the next check (stragglers)."""
        copies = sum(c for _, c in self._tasks.values())
        running = {s: self._started[s] for s, c in self._tasks.values() if not c}
        return stragglers(self.policy, self.clock(), running, self._durations, self._finished, self.shards, queued,
                          copies, self._copied)

    def copy_started(self, task: Hashable, shard: int) -> None:
        self._tasks[task] = (shard, True)
        self._copied.add(shard)
        self.counts["started"] += 1

    def done(self, task: Hashable, ok: bool) -> Settled:
        """Task finished (ok) or failed after its retries."""
        shard, copy = self._tasks.pop(task)
        other = next((t for t, (s, _) in self._tasks.items() if s == shard), None)
        if not ok:
            if copy:
                self.counts["failed"] += 1
            if other is None:
                self._finished += 1
            return Settled(shard, copy, final=other is None)
        self._finished += 1
        if copy:
            self.counts["won"] += 1
        else:
            bisect.insort(self._durations, self.clock() - self._started[shard])
            if other is not None:
                self.counts["cancelled"] += 1
        if other is not None:
            del self._tasks[other]
        return Settled(shard, copy, final=True, loser=other)


def discard(url: str) -> None:
    """Remove the file a cancelled copy wrote under its final name, and on a local disk the temporary files it
    may have left (storage.atomic_write's `.tmp-<uuid>-<name>`; an object store has none)."""
    fs, path = storage.filesystem(url)
    parent, name = path.rsplit("/", 1)
    leftovers = [path] if fs.exists(path) else []
    if storage.is_local(url):
        leftovers += fs.glob(f"{parent}/{storage.TMP_MARK}*-{name}")
    for p in leftovers:
        fs.rm_file(p)
