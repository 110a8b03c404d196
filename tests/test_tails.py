"""Tails: a speculative copy of a straggling shard task; the first copy to finish is the shard (tails.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import spec
from pipelines.runner import run_job
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.stages.crawl.stage import CrawlStage
from pipelines.stages.crawl.tails import Speculation, Tails, discard, stragglers
from tests.conftest import crawl_stage, read_output, write_job
from tests.support.stall import StallServer

POLICY = Speculation(after=0.75, factor=2.0, min_seconds=10.0, max_copies=2)


def pick(now: float, running: dict[int, float], durations: list[float], finished: int = 8, shards: int = 10,
         queued: int = 0, copies: int = 0, copied: frozenset[int] = frozenset(), policy=POLICY):
    due, wait = stragglers(policy, now, running, sorted(durations), finished, shards, queued, copies, copied)
    return [s.shard for s in due], wait


def test_a_shard_is_copied_once_it_runs_factor_times_the_median_and_the_floor():
    # median 6 s: the threshold is max(2 x 6, 10) = 12 s; shard 8 has run 13 s, shard 9 5 s
    assert pick(100.0, {8: 87.0, 9: 95.0}, [5, 6, 7]) == ([8], 7.0)  # shard 9 is due in 12 - 5 s
    assert pick(100.0, {8: 95.0}, [1, 2, 3]) == ([], 5.0)  # 2 x median 2 s is under the floor: 10 s
    # threshold 20 s: 9 and 8 (longest first) are over it, 7 is not, and no slot is left for it anyway
    assert pick(100.0, {8: 50.0, 9: 30.0, 7: 80.0}, [10, 10]) == ([9, 8], None)
    due, _ = stragglers(POLICY, 100.0, {8: 87.0}, [5.0, 6.0, 7.0], 8, 10, 0, 0, frozenset())
    assert due[0].why() == ("running 13.0s, over 12.0s (the median finished shard took 6.0s), with 8 of 10 shards "
                            "finished and none waiting")


def test_no_copy_before_the_tail_nor_beyond_the_limits():
    running = {8: 0.0, 9: 0.0}
    assert pick(100.0, running, [5.0], finished=7) == ([], None)  # 7 of 10 finished: under 0.75
    assert pick(100.0, running, [5.0], queued=1) == ([], None)  # a shard still waits to start
    assert pick(100.0, running, []) == ([], None)  # nothing finished well: no median
    assert pick(100.0, running, [5.0], copies=2) == ([], None)  # two copies run already
    assert pick(100.0, running, [5.0], copies=1) == ([8], None)
    assert pick(100.0, running, [5.0], copied=frozenset({8, 9})) == ([], None)  # a shard is copied once
    assert pick(100.0, running, [5.0], policy=None) == ([], None)  # speculate: false
    seventy = Speculation(after=0.7, factor=2.0, min_seconds=10.0, max_copies=2)
    assert pick(100.0, running, [5.0], finished=7, policy=seventy) == ([8, 9], None)  # 7 of 10 is 0.7, in floats too


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tails_with_a_straggler() -> tuple[Tails, Clock]:
    """Shards 0-3 started at 0; 0-2 finished at 1 s; shard 3 is due for a copy from 10 s (the floor)."""
    clock = Clock()
    t = Tails(POLICY, shards=4, clock=clock)
    for i in range(4):
        t.started(f"task{i}", i)
    clock.now = 1.0
    for i in range(3):
        assert t.done(f"task{i}", ok=True).final
    assert t.due(queued=0) == ([], 9.0)
    clock.now = 11.0
    (due,), wait = t.due(queued=0)
    assert (due.shard, wait) == (3, None)
    t.copy_started("copy3", 3)
    assert t.due(queued=0) == ([], None)
    return t, clock


def test_the_first_copy_to_finish_counts_and_the_other_is_the_loser():
    t, _ = tails_with_a_straggler()
    settled = t.done("copy3", ok=True)
    assert (settled.shard, settled.copy, settled.final, settled.loser) == (3, True, True, "task3")
    assert dict(t.counts) == {"started": 1, "won": 1}

    t, _ = tails_with_a_straggler()
    settled = t.done("task3", ok=True)
    assert (settled.copy, settled.final, settled.loser) == (False, True, "copy3")
    assert dict(t.counts) == {"started": 1, "cancelled": 1}


def test_a_shard_fails_only_when_both_copies_have():
    t, _ = tails_with_a_straggler()
    assert not t.done("copy3", ok=False).final  # the original goes on
    assert t.done("task3", ok=True).loser is None
    assert dict(t.counts) == {"started": 1, "failed": 1}

    t, _ = tails_with_a_straggler()
    assert not t.done("task3", ok=False).final  # the copy goes on
    settled = t.done("copy3", ok=True)
    assert (settled.final, settled.loser) == (True, None) and t.counts["won"] == 1

    t, _ = tails_with_a_straggler()
    assert not t.done("task3", ok=False).final
    assert t.done("copy3", ok=False).final


def test_discard_removes_a_losers_file_and_its_temporary_files(tmp_path):
    for name in ("part-00003.parquet", ".tmp-ab12-part-00003.parquet", "part-00003-copy.parquet",
                 ".tmp-cd34-part-00003-copy.parquet", "part-00004.parquet"):
        (tmp_path / name).write_bytes(b"x")
    discard(str(tmp_path / "part-00003.parquet"))
    assert sorted(os.listdir(tmp_path)) == [".tmp-cd34-part-00003-copy.parquet", "part-00003-copy.parquet",
                                            "part-00004.parquet"]
    discard(str(tmp_path / "part-00009.parquet"))  # nothing written: nothing to do


def test_discard_on_an_object_store_removes_the_losers_object_only():
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("part-00003.parquet", "part-00003-copy.parquet"):
        fs.pipe_file(f"/tails-test/{name}", b"x")
    discard("memory://tails-test/part-00003-copy.parquet")  # one PUT made it whole; no temporary to look for
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/tails-test", detail=False)) == ["part-00003.parquet"]
    fs.rm("/tails-test", recursive=True)


def test_resume_takes_a_shard_its_copy_wrote(tmp_path):
    done = pa.table({"status": ["success"] * 3, "error_class": pa.array([None] * 3, pa.string())})
    pq.write_table(done, tmp_path / "part-00000.parquet")
    pq.write_table(done, tmp_path / "part-00001-copy.parquet")
    ctx = SimpleNamespace(output=str(tmp_path), log=logging.getLogger("test"))
    staged = SimpleNamespace(shards=[{"id": i} for i in range(3)])
    records, todo = CrawlStage._resume(ctx, staged)  # type: ignore[arg-type]
    assert sorted(records) == [0, 1] and records[1]["path"] == "part-00001-copy.parquet"
    assert "path" not in records[0] and [s["id"] for s, _ in todo] == [2]


def test_speculate_false_copies_nothing():
    cfg = CrawlConfig(input="urls.parquet", speculate=False, speculate_min_seconds=0)
    clock = Clock()
    t = Tails(Speculation.of(cfg), shards=2, clock=clock)
    t.started("task0", 0)
    t.started("task1", 1)
    clock.now = 1.0
    t.done("task0", ok=True)
    clock.now = 1e6
    assert t.due(queued=0) == ([], None)
    assert Speculation.of(CrawlConfig(input="urls.parquet")) == Speculation(after=0.9, factor=3.0, min_seconds=60.0,
                                                                              max_copies=2)  # the defaults


# --- end to end: two shards of four rows on a local Ray; shard 1 holds /stall/7 ----------------------------------
# Shard 0 has a /gate/ row, answered once /stall/7 has been asked for: the copy, which waits for shard 0 to finish,
# always starts after the original's request.

SPECULATE = {"speculate_after": 0.5, "speculate_factor": 1.0, "speculate_min_seconds": 0}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    logger, handler = logging.getLogger("clipline.crawl"), Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def crawl(tmp_path, web: StallServer, **with_):
    urls = [web.url("stall" if i == 7 else "gate" if i == 0 else "img", i) for i in range(8)]
    pd.DataFrame({"url": urls, "caption": [f"picture {i}" for i in range(8)]}).to_parquet(tmp_path / "urls.parquet")
    job = spec.load(write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=4,
                                                               threads=4, **with_)}))
    (outcome,) = run_job(job, progress=False)
    m = outcome.manifest
    out = read_output(m)
    assert sorted(out["source_row"]) == list(range(8))  # every row exactly once
    files = sorted(p for p in os.listdir(m.location) if p.startswith(("part-", ".tmp-")))
    assert files == [s["path"] for s in m.shards]  # the manifest's shards and nothing else: no loser, no temp
    copies = {k.removeprefix("speculative_copies_"): v for k, v in m.metrics.items()
              if k.startswith("speculative_copies_")}
    return m, out, copies


def abandoned(web: StallServer, n: int) -> list[str]:
    """The held requests whose clients went away, once there are n (the killed task's socket closes with it)."""
    with web.changed:
        assert web.changed.wait_for(lambda: len(web.abandoned) >= n, timeout=30)
        return list(web.abandoned)


@pytest.mark.slow
def test_a_stalled_shard_is_copied_and_the_copy_wins(tmp_path, ray_local, log_lines):
    with StallServer(hold="until_closed") as web:
        m, out, copies = crawl(tmp_path, web, timeout=60, **SPECULATE)
        assert copies == {"started": 1, "won": 1, "cancelled": 0, "failed": 0}
        assert [s["path"] for s in m.shards] == ["part-00000.parquet", "part-00001-copy.parquet"]
        assert set(out["status"]) == {"success"}
        assert web.hits["/stall/7"] == 2  # the original's request, held; the copy's, answered
        assert abandoned(web, 1) == ["/stall/7"]  # the original was cancelled: its worker and socket are gone
    (start,) = [line for line in log_lines if "speculative copy:" in line]
    assert start.startswith("shard 1: starting a speculative copy: running ") and "1 of 2 shards finished" in start
    assert "shard 1: the speculative copy finished first; the original is cancelled" in log_lines


@pytest.mark.slow
def test_the_original_finishing_first_cancels_the_copy(tmp_path, ray_local, log_lines):
    with StallServer(hold="until_asked_again") as web:  # the copy's request lets the original's go, then is held
        m, out, copies = crawl(tmp_path, web, timeout=60, **SPECULATE)
        assert copies == {"started": 1, "won": 0, "cancelled": 1, "failed": 0}
        assert m.shards[1]["path"] == "part-00001.parquet" and set(out["status"]) == {"success"}
        assert web.hits["/stall/7"] == 2
        assert abandoned(web, 1) == ["/stall/7"]  # the copy's held request: its task was cancelled
    assert "shard 1: the original finished first; the copy is cancelled" in log_lines


@pytest.mark.slow
def test_a_copy_takes_its_hosts_slots_from_the_same_host_token_service(tmp_path, ray_local, log_lines):
    # per_host_scope: job, 2 connections: /gate/0 and /stall/7 hold both at first; the original keeps /stall/7's
    # slot until it is cancelled, so the copy crawls through the one left, and no more than 2 are ever out
    with StallServer(hold="until_closed") as web:
        m, out, copies = crawl(tmp_path, web, timeout=60, per_host_scope="job", per_host_connections=2, **SPECULATE)
        assert copies == {"started": 1, "won": 1, "cancelled": 0, "failed": 0}
        assert set(out["status"]) == {"success"} and web.hits["/stall/7"] == 2
    assert m.metrics["host_max_connections"] == 2  # the service's count, the copy's time included
    assert m.metrics["host_slots_granted"] >= 8  # shard 0's rows and the copy's: both leased their slots
    assert m.metrics["host_slots_timeouts"] == 0
