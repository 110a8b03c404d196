"""Greedy near dedup of one pHash band group, without comparing every row with every kept row.

The decision is `select.drop_near`'s: in order, a row within `max_distance` bits of a row kept before it is
dropped, otherwise kept. Comparing each row with every kept row is quadratic (a 24k-row group: ~14 s); this
module finds the near rows by multi-index hashing (Norouzi et al., 2012) and makes the same decisions.

Pigeonhole: the rows of a group agree on every bit outside `varying` (the bits where any two of them differ,
which excludes at least the band's bits). Split those bits into max_distance+1 disjoint sub-bands (any split:
widths may be uneven, or zero when fewer bits vary). Two rows within distance d <= max_distance differ in at
most d of them, so at least one sub-band holds none of their differing bits: they agree exactly on it. Every
near pair is therefore found among the pairs that share a sub-band value, and the full distance decides.

Three ways to decide a group, all exact (the tests check each against the pairwise reference):
- fewer than `SMALL_GROUP` rows: each row against the kept rows in plain Python (no numpy call per row);
- otherwise, when the rows sharing a sub-band value make at most `PAIR_BUDGET` candidate pairs: every near
  pair at once with numpy (per sub-band, sort by value and pair the rows of each run), then the greedy pass
  over the rows that have an earlier near row only (a row with none is kept);
- otherwise (a dense cluster: many rows alike in a sub-band): row by row, looking up the kept rows that share
  a sub-band value in one dict per sub-band; when those are many (narrow sub-bands at a large max_distance,
  or a crowded value), all kept rows at once with numpy instead.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

SMALL_GROUP = 128  # plain Python vs the sorts' fixed cost (0.1-0.3 ms): they break even at 96-160 rows (d = 2-8)
PAIR_BUDGET = 1 << 22  # ~0.1 s of candidate pairs; more means a crowded group, quadratic in pairs, not row by row
_CHUNK = 1 << 20  # candidate pairs checked at once: ~60 MB of index arrays
_CROWDED = 8  # row by row: candidates above 1/_CROWDED of the kept rows are checked against all of them


def near_in_group(hashes: np.ndarray, max_distance: int, small: int = SMALL_GROUP,
                  pair_budget: int = PAIR_BUDGET) -> np.ndarray:
    """Which rows of one band group (int64 pHashes, in decision order) are dropped as near duplicates."""
    h = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    if len(h) < 2:
        return np.zeros(len(h), dtype=bool)
    if len(h) < small:
        return _direct(h.tolist(), max_distance)
    masks = sub_bands(int(np.bitwise_or.reduce(h) ^ np.bitwise_and.reduce(h)), max_distance + 1)
    dup = _by_pairs(h, masks, max_distance, pair_budget)
    return dup if dup is not None else _by_index(h, masks, max_distance)


@functools.lru_cache(maxsize=1024)
def sub_bands(varying: int, parts: int) -> tuple[int, ...]:
    """`parts` disjoint bit masks splitting the set bits of `varying` into runs as even as possible."""
    bits = [b for b in range(64) if varying >> b & 1]
    return tuple(sum(1 << b for b in bits[p * len(bits) // parts:(p + 1) * len(bits) // parts])
                 for p in range(parts))


def _direct(values: list[int], d: int) -> np.ndarray:
    kept = [values[0]]
    dup = np.zeros(len(values), dtype=bool)
    for i in range(1, len(values)):
        h = values[i]
        for g in kept:
            if (h ^ g).bit_count() <= d:
                dup[i] = True
                break
        else:
            kept.append(h)
    return dup


def _by_pairs(h: np.ndarray, masks: tuple[int, ...], d: int, budget: int) -> np.ndarray | None:
    """Every near pair at once, then the greedy pass over them; None if the candidate pairs exceed `budget`."""
    n = len(h)
    pos = np.arange(n)
    runs, total = [], 0
    for mask in masks:
        v = h & np.uint64(mask)
        order = np.argsort(v, kind="stable")  # stable: within a run, rows stay in decision order
        sv = v[order]
        starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
        ends = np.r_[starts[1:], n]
        sizes = ends - starts
        total += int((sizes * (sizes - 1) // 2).sum())
        if total > budget:
            return None
        runs.append((order, np.repeat(ends, sizes) - pos - 1))  # later rows of its run, per sorted position
    firsts, seconds = [], []
    for order, later in runs:
        # pair each sorted position with the later rows of its run, _CHUNK pairs or so at a time
        cum = np.cumsum(later)
        cuts = np.searchsorted(cum, np.arange(_CHUNK, int(cum[-1]), _CHUNK)).tolist()
        for lo, hi in itertools.pairwise([0, *cuts, n]):
            part = later[lo:hi]
            count = int(part.sum())
            if count == 0:
                continue
            p = np.repeat(pos[lo:hi], part)
            q = p + 1 + np.arange(count) - np.repeat(np.cumsum(part) - part, part)
            i, j = order[p], order[q]  # i < j: the run is in decision order
            near = np.bitwise_count(h[i] ^ h[j]) <= d
            firsts.append(i[near])
            seconds.append(j[near])
    dup = np.zeros(n, dtype=bool)
    if not firsts:
        return dup
    i, j = np.concatenate(firsts), np.concatenate(seconds)
    by_later = np.argsort(j, kind="stable")
    # in decision order, a row with earlier near rows is dropped iff one of them was kept; their own decisions
    # came first (i < j), and a row with no earlier near row is kept
    for row, earlier in zip(*_runs(j[by_later], i[by_later]), strict=True):
        dup[row] = not dup[earlier].all()
    return dup


def _runs(keys: np.ndarray, values: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """Sorted `keys` and, for each distinct key, its values."""
    if not len(keys):
        return [], []
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts].tolist(), np.split(values, starts[1:])


def _by_index(h: np.ndarray, masks: tuple[int, ...], d: int) -> np.ndarray:
    """Row by row: the kept rows sharing a sub-band value are the candidates, one dict per sub-band."""
    n = len(h)
    values = h.tolist()
    keys = (h[:, None] & np.array(masks, dtype=np.uint64)[None, :]).tolist()
    tables: list[dict[int, list[int]]] = [{} for _ in masks]
    kept = np.empty(n, dtype=np.uint64)
    n_kept = 0
    dup = np.zeros(n, dtype=bool)
    for r in range(n):
        x = values[r]
        buckets = [b for t, k in zip(tables, keys[r], strict=True) if (b := t.get(k))]
        if n_kept > 64 and sum(map(len, buckets)) * _CROWDED > n_kept:
            near = bool(np.bitwise_count(kept[:n_kept] ^ h[r]).min() <= d)
        else:
            near = any((x ^ g).bit_count() <= d for b in buckets for g in b)
        if near:
            dup[r] = True
            continue
        kept[n_kept] = x
        n_kept += 1
        for t, k in zip(tables, keys[r], strict=True):
            b = t.get(k)
            if b is None:
                t[k] = [x]
            else:
                b.append(x)
    return dup
