"""What the set rules share: decisions that depend on other rows (dedup, near dedup, top fraction by CLIP score).

Each works on the working table as a Ray Dataset, never collecting it in one process: dedup hash-partitions
the candidate rows by their key (every group lands whole in one block, as in Ray's own `map_groups`) and
decides each block with vectorised pandas; the top fraction finds the exact k-th best score by a radix
select over histograms of the scores' bit patterns, four streaming passes that each return 256 counts.
A row's order is its input order, (crawled shard, row), so "the first of a group" is deterministic.

Near dedup is greedy within each pHash band group: in input order, a row within max_distance bits of a row
kept before it is dropped. `near.near_in_group` decides a group by multi-index hashing rather than comparing
each row with every kept row: the bits where the group's rows differ are split into max_distance+1 sub-bands,
near rows agree exactly on one of them (pigeonhole), so only rows sharing a sub-band value are compared; the
decisions are the pairwise greedy's (tests/test_near_dedup.py checks them against it). One band group at
max_distance 4 with 5% near copies, three runs on the shared 2-core machine (`.venv/bin/python -m
tests.benchmarks.near_dedup`): 24k rows (a group at 100M rows) in 0.04-0.09 s against 14-25 s pairwise
(285-570x), 16k 120-230x, 4k 100-140x, 1k 14-40x; a dense 16k group (a fifth within 2 bits of one hash) 20-33x;
a 200k-row block of 8,192 ~24-row groups 3-6x.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.stages.curate.near import near_in_group
from pipelines.stages.curate.rules import Rule, Work, mark

if TYPE_CHECKING:
    import ray.data

ORDER = ["shard", "row"]


def candidates(df: pd.DataFrame, pos: int, key: str | None = None, want: bool = True) -> pd.DataFrame:
    """Rows no rule before position `pos` dropped (and with a key), or, with want=False, all the others."""
    mask = df["drop_at"].to_numpy() > pos
    if key == "phash":
        mask &= df["phash_ok"].to_numpy(dtype=bool)
    elif key is not None:
        mask &= df[key].notna().to_numpy()
    return df[mask if want else ~mask]


def count_candidates(ds: ray.data.Dataset, pos: int, key: str | None = None) -> int:
    """How many rows of `ds` are `candidates` (with a key, when given), counted block by block."""
    counts = ds.map_batches(_count, batch_format="pandas", fn_kwargs={"pos": pos, "key": key}).to_pandas()
    return int(counts["n"].sum())


def _count(df: pd.DataFrame, pos: int, key: str | None) -> pd.DataFrame:
    return pd.DataFrame({"n": [len(candidates(df, pos, key))]})


def part(df: pd.DataFrame, work: Work, pos: int, key: str | None = None, want: bool = True) -> pa.Table:
    """`candidates` as a block of the working table, for Dataset.map_batches."""
    return work.table(candidates(df, pos, key, want))


def with_band(df: pd.DataFrame, shift: int, bits: int) -> pd.DataFrame:
    """Adds `_key`: bits [shift, shift+bits) of the pHash; near duplicates share at least one band (pigeonhole)."""
    h = df["phash"].to_numpy(dtype=np.int64).view(np.uint64)
    return df.assign(_key=((h >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64))


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, bits) of max_distance+1 bands covering 64 bits as evenly as possible."""
    n = max_distance + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def in_block(df: pd.DataFrame, work: Work, key: str, reason: str, pos: int, max_distance: int = 0) -> pa.Table:
    """Apply a dedup rule to one block that holds every candidate of each of its groups."""
    if key == "phash":
        # bands one after another: a row dropped in one band is no longer a candidate in the next
        for shift, bits in bands(max_distance):
            c = candidates(df, pos, "phash")
            rest = candidates(df, pos, "phash", want=False)
            df = _concat(rest, drop_near(with_band(c, shift, bits), "_key", pos, reason, max_distance))
        return work.table(df)
    c = candidates(df, pos, key)
    rest = candidates(df, pos, key, want=False)
    return work.table(_concat(rest, drop_all_but_first(c, key, pos, reason)))


def dedup(ds: ray.data.Dataset, rule: Rule, key: str, reason: str, max_distance: int = 0) -> ray.data.Dataset:
    """A dedup rule over the working table. Up to 200k rows (~300 bytes each) the whole table is one block;
    beyond, candidates are hash-partitioned by their key (each pHash band in turn), so every group lands whole
    in one block."""
    pos, work = rule.position, rule.work
    assert work is not None
    parts = max(1, min(256, math.ceil(ds.count() / 200_000)))
    if parts == 1:
        return ds.repartition(1).map_batches(in_block, batch_size=None, batch_format="pandas", fn_kwargs={
            "work": work, "key": key, "reason": reason, "pos": pos, "max_distance": max_distance}).materialize()
    for band in bands(max_distance) if key == "phash" else [None]:
        def pick(df: pd.DataFrame, band: tuple[int, int] | None = band) -> pa.Table:
            c = candidates(df, pos, key)
            return work.table(with_band(c, *band) if band else c.assign(_key=c[key]))

        cand = ds.map_batches(pick, batch_format="pandas")
        rest = ds.map_batches(part, batch_format="pandas", fn_kwargs={"work": work, "pos": pos, "key": key,
                                                                      "want": False})
        decided = cand.repartition(parts, keys=["_key"]).map_batches(
            in_partition, batch_size=None, batch_format="pandas",
            fn_kwargs={"work": work, "reason": reason, "pos": pos, "max_distance": max_distance, "near": key == "phash"})
        ds = rest.union(decided).materialize()
    return ds


def _concat(*frames: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)


def drop_all_but_first(df: pd.DataFrame, key: str, pos: int, reason: str) -> pd.DataFrame:
    """Exact dedup within one block holding whole groups: the first row of each key is kept."""
    df = df.sort_values(ORDER, kind="stable")
    dup = df.duplicated(subset=[key], keep="first").to_numpy()
    return mark(df, dup, pos, reason)


def drop_near(df: pd.DataFrame, key: str, pos: int, reason: str, max_distance: int) -> pd.DataFrame:
    """Greedy near dedup within one block: in input order, a row within max_distance of a kept row of its
    band group is dropped.  Groups of mutually near images therefore keep exactly their first row.  Each
    group is decided by `near.near_in_group` (multi-index hashing), not by comparing every pair."""
    df = df.sort_values([key, *ORDER], kind="stable")
    keys = df[key].to_numpy()
    hashes = df["phash"].to_numpy(dtype=np.int64)
    dup = np.zeros(len(df), dtype=bool)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(df)]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            dup[s:e] = near_in_group(hashes[s:e], max_distance)
    return mark(df, dup, pos, reason)


# ---- top fraction -------------------------------------------------------------------------------------------

def sortable(scores: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 scores are (NaN excluded by the caller)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)


def histogram(df: pd.DataFrame, pos: int, prefix: int, shift: int) -> pd.DataFrame:
    """256 counts of the next byte of the score keys of candidates whose higher bytes equal `prefix`."""
    scores = candidates(df, pos)["clip_score"].to_numpy(dtype=np.float32)
    keys = sortable(scores[~np.isnan(scores)])
    keys = keys[(keys >> np.uint64(shift + 8)) == np.uint64(prefix)]
    counts = np.bincount(((keys >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), minlength=256)
    return pd.DataFrame({"byte": np.arange(256), "count": counts})


def kth_key(count_pass: Any, k: int) -> tuple[int, int]:
    """Radix select: the key of the k-th largest score and how many scores are strictly larger.

    `count_pass(prefix, shift)` returns the summed 256-bucket histogram over all candidates."""
    prefix, above = 0, 0
    for shift in (24, 16, 8, 0):
        counts = count_pass(prefix, shift)
        for b in range(255, -1, -1):
            if above + counts[b] >= k:
                prefix = (prefix << 8) | b
                break
            above += int(counts[b])
    return prefix, above


def top_count(n: int, fraction: float) -> int:
    """Rows kept of n by a top fraction: ceil, so a non-empty input keeps at least one."""
    return min(n, math.ceil(n * fraction - 1e-9))


def drop_below(df: pd.DataFrame, work: Work, pos: int, key: int, keep_ties: set[tuple[int, int]],
               reason: str) -> pa.Table:
    """Drop candidates scoring below the k-th key, and ties at it beyond the first ones in input order."""
    cand = (df["drop_at"].to_numpy() > pos)
    scores = df["clip_score"].to_numpy(dtype=np.float32)
    nan = np.isnan(scores)
    keys = sortable(np.where(nan, 0, scores))
    tie = (keys == np.uint64(key)) & ~nan
    tie_kept = np.array([(s, r) in keep_ties for s, r in zip(df["shard"], df["row"], strict=True)], dtype=bool)
    drop = cand & (nan | (keys < np.uint64(key)) | (tie & ~tie_kept))
    return work.table(mark(df, drop, pos, reason))


def ties(df: pd.DataFrame, pos: int, key: int) -> pd.DataFrame:
    """Candidates whose score key equals `key`: their input positions."""
    c = candidates(df, pos)
    scores = c["clip_score"].to_numpy(dtype=np.float32)
    nan = np.isnan(scores)
    hit = (sortable(np.where(nan, 0, scores)) == np.uint64(key)) & ~nan
    return c.loc[hit, ORDER]


def in_partition(df: pd.DataFrame, work: Work, reason: str, pos: int, max_distance: int, near: bool) -> pa.Table:
    """A hash partition of candidates carrying `_key`: decide each group of the block."""
    if near:
        return work.table(drop_near(df, "_key", pos, reason, max_distance))
    return work.table(drop_all_but_first(df, "_key", pos, reason))


def top_fraction(ds: ray.data.Dataset, rule: Rule, fraction: float, reason: str
                 ) -> tuple[ray.data.Dataset, float | None]:
    """Keep the best `fraction` of the rule's candidates by `clip_score` (ties in input order): the exact k-th
    best score by radix select; returns the working table and that cutoff score (None if nothing is kept)."""
    pos, work = rule.position, rule.work
    n = count_candidates(ds, pos)
    k = top_count(n, fraction)
    if k == 0:
        return ds, None

    def count_pass(prefix: int, shift: int) -> np.ndarray:
        hist = ds.map_batches(histogram, batch_format="pandas",
                              fn_kwargs={"pos": pos, "prefix": prefix, "shift": shift}).to_pandas()
        return hist.groupby("byte")["count"].sum().reindex(range(256), fill_value=0).to_numpy()

    key, above = kth_key(count_pass, k)
    if above + int(count_pass(key >> 8, 0)[key & 255]) < k:
        key = 0  # fewer scorable rows than k: keep every scored candidate
        above = k
    tied = ds.map_batches(ties, batch_format="pandas", fn_kwargs={"pos": pos, "key": key}).to_pandas()
    keep = {(int(s), int(r)) for s, r in tied.sort_values(ORDER).head(k - above).itertuples(index=False)}
    out = ds.map_batches(drop_below, batch_format="pandas", fn_kwargs={
        "work": work, "pos": pos, "key": key, "keep_ties": keep, "reason": reason}).materialize()
    cutoff = np.array([key], dtype=np.uint32)
    cutoff = np.where(cutoff & np.uint32(0x80000000), cutoff & np.uint32(0x7FFFFFFF), ~cutoff).view(np.float32)
    return out, float(cutoff[0])
