"""Near dedup by multi-index hashing (`near.near_in_group`, `select.drop_near`) makes exactly the decisions of
the pairwise greedy it replaced, kept here as the reference: crafted clusters of hashes a few bits apart, in one
band group and across groups, for every allowed max_distance, through each of the three ways a group is decided.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.stages.curate import near, select
from pipelines.stages.curate.features import hamming
from pipelines.stages.curate.rules import KEPT

# reproducible in CI, nothing written into the tree (no example database), no per-example deadline
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
POS = 3


# ---- the reference: the pairwise greedy select.drop_near was before multi-index hashing ------------------------

def pairwise_group(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """In order, each row against every kept row of its group: a row within max_distance of one is dropped."""
    dup = np.zeros(len(hashes), dtype=bool)
    if len(hashes) < 2:
        return dup
    kept = [0]
    for i in range(1, len(hashes)):
        if hamming(hashes[kept], hashes[i]).min() <= max_distance:
            dup[i] = True
        else:
            kept.append(i)
    return dup


def pairwise_drop_near(df: pd.DataFrame, key: str, pos: int, reason: str, max_distance: int) -> pd.DataFrame:
    df = df.sort_values([key, *select.ORDER], kind="stable")
    keys = df[key].to_numpy()
    hashes = df["phash"].to_numpy(dtype=np.int64)
    dup = np.zeros(len(df), dtype=bool)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(df)]
    for s, e in zip(starts, ends, strict=True):
        dup[s:e] = pairwise_group(hashes[s:e], max_distance)
    return select.mark(df, dup, pos, reason)


# ---- crafted hash sets ---------------------------------------------------------------------------------------------

def flip(h: int, bits: list[int]) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def signed(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64).view(np.int64)


def rand64(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 1 << 62)) << 2 | int(rng.integers(0, 4))


def clusters(seed: int, max_distance: int, centres: int, rows: int, spread: int, band: tuple[int, int] | None
             ) -> np.ndarray:
    """`rows` hashes, each a random centre with 0..spread random bits flipped (outside `band`, whose bits are
    then the same in every hash: one band group); the flips reach past max_distance so near and far mix."""
    rng = np.random.default_rng(seed)
    free = list(range(64))
    fixed = 0
    if band is not None:
        shift, bits = band
        free = [b for b in free if not shift <= b < shift + bits]
        fixed = rand64(rng) & ((1 << bits) - 1) << shift
    mask = sum(1 << b for b in free)
    base = [rand64(rng) for _ in range(centres)]
    out = []
    for _ in range(rows):
        h = base[int(rng.integers(0, centres))]
        flips = min(len(free), int(rng.integers(0, spread + 1)))  # d=0 in one group: no bit is free
        h = flip(h, [int(b) for b in rng.choice(free, flips, replace=False)])
        out.append(h & mask | fixed)
    return signed(out)


def table(hashes: np.ndarray, seed: int) -> pd.DataFrame:
    """A block of candidates in shuffled input order, as `select.in_block` hands one to `drop_near`."""
    n = len(hashes)
    order = np.random.default_rng(seed).permutation(n)
    return pd.DataFrame({"shard": (order // 50).astype(np.int32), "row": (order % 50).astype(np.int32),
                         "phash": hashes, "phash_ok": np.ones(n, dtype=bool),
                         "drop_at": np.full(n, KEPT, dtype=np.int32), "reason": np.full(n, None, dtype=object)})


hash_sets = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "max_distance": st.sampled_from(range(17)),  # not every value in 100 examples: the sweep below has each
    "centres": st.integers(1, 120),
    "rows": st.one_of(st.integers(0, 60), st.integers(100, 260)),  # groups below and above near.SMALL_GROUP
    "extra": st.integers(0, 4),  # spread = max_distance + extra: some copies just too far
    "one_group": st.booleans(),
    "band": st.integers(0, 16),  # which of the max_distance+1 bands groups the rows (modulo)
})


def crafted(p: dict[str, int]) -> tuple[np.ndarray, tuple[int, int]]:
    bands = select.bands(p["max_distance"])
    # one_group=False: random band bits, so most clusters span several groups (pairs across groups are never near)
    band = bands[p["band"] % len(bands)]
    hashes = clusters(p["seed"], p["max_distance"], p["centres"], p["rows"], p["max_distance"] + p["extra"],
                      band if p["one_group"] else None)
    return hashes, band


# ---- the property: the same decisions ------------------------------------------------------------------------------

@PROPERTY
@given(hash_sets)
def test_drop_near_decides_as_the_pairwise_greedy(p):
    hashes, (shift, bits) = crafted(p)
    df = select.with_band(table(hashes, p["seed"]), shift, bits)
    got = select.drop_near(df, "_key", POS, "near_duplicate", p["max_distance"])
    want = pairwise_drop_near(df, "_key", POS, "near_duplicate", p["max_distance"])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))


WAYS = {"direct": {"small": 1 << 30}, "pairs": {"small": 0}, "index": {"small": 0, "pair_budget": -1}}


@PROPERTY
@given(hash_sets, st.sampled_from(sorted(WAYS)))
def test_each_way_of_deciding_a_group_decides_as_the_pairwise_greedy(p, way):
    """One group in decision order, forced down one path: plain Python, all near pairs at once, dict per sub-band."""
    hashes, _ = crafted({**p, "one_group": True})
    got = near.near_in_group(hashes, p["max_distance"], **WAYS[way])
    assert got.tolist() == pairwise_group(hashes, p["max_distance"]).tolist()


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("max_distance", range(17))
def test_every_max_distance_decides_as_the_pairwise_greedy(max_distance, way):
    """Each allowed distance on each path: 250 rows of 80 clusters in one group (spread past the distance, so
    many near pairs and some just too far); then the same rows across groups through drop_near."""
    p = {"seed": max_distance, "max_distance": max_distance, "centres": 80, "rows": 250, "extra": 2, "band": 1}
    hashes, _ = crafted({**p, "one_group": True})
    want = pairwise_group(hashes, max_distance)
    assert 0 < want.sum() < len(want) - 1 or max_distance == 0
    assert near.near_in_group(hashes, max_distance, **WAYS[way]).tolist() == want.tolist()
    hashes, (shift, bits) = crafted({**p, "one_group": False})
    df = select.with_band(table(hashes, max_distance), shift, bits)
    pd.testing.assert_frame_equal(select.drop_near(df, "_key", POS, "near_duplicate", max_distance),
                                  pairwise_drop_near(df, "_key", POS, "near_duplicate", max_distance))


@pytest.mark.parametrize("max_distance", range(17))
def test_sub_bands_split_the_varying_bits_for_the_pigeonhole(max_distance):
    """max_distance+1 disjoint masks covering exactly the varying bits, for every band of every allowed distance:
    so two rows d <= max_distance bits apart agree on one of them."""
    for shift, bits in select.bands(max_distance):
        varying = ((1 << 64) - 1) ^ (((1 << bits) - 1) << shift)
        masks = near.sub_bands(varying, max_distance + 1)
        assert len(masks) == max_distance + 1
        assert sum(masks) == varying and all(a & b == 0 for i, a in enumerate(masks) for b in masks[i + 1:])
        widths = [m.bit_count() for m in masks]
        assert max(widths) - min(widths) <= 1 and min(widths) >= (2 if max_distance else 0)  # d=0: all 64 in the band
    # fewer varying bits than sub-bands: some masks are empty (every row agrees on them), still a disjoint cover
    assert near.sub_bands(0b1011, 5) == (0, 0b1, 0, 0b10, 0b1000)



@pytest.mark.parametrize("max_distance", [0, 1, 4, 9, 16])
def test_candidate_pairs_checked_in_chunks_decide_the_same(monkeypatch, max_distance):
    """A group's candidate pairs are checked ~near._CHUNK at a time (a million): here a few, so chunks split runs."""
    monkeypatch.setattr(near, "_CHUNK", 7)
    p = {"seed": 11, "max_distance": max_distance, "centres": 30, "rows": 200, "extra": 2, "band": 0}
    hashes, _ = crafted({**p, "one_group": True})
    assert near.near_in_group(hashes, max_distance, small=0).tolist() == pairwise_group(hashes, max_distance).tolist()

# ---- exact counts --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("way", sorted(WAYS))
def test_crafted_clusters_keep_exactly_their_first_row(way):
    """200 rows in one group: 40 far-apart centres in order, then 4 copies each within 1..4 bits, shuffled in;
    and a chain a ~ b ~ c with a, c 6 bits apart: b is dropped (near a), c kept (near only the dropped b)."""
    rng = np.random.default_rng(7)
    centres = [int(rng.integers(0, 1 << 51)) << 13 | 0x0ABC for _ in range(40)]  # band bits 0..12 fixed
    c = signed(centres)
    assert hamming(c[:, None], c[None, :])[~np.eye(40, dtype=bool)].min() > 10  # premise: copies, c stay far
    copies = [flip(h, [13 + 3 * k for k in range(1 + i // 40)]) for i, h in enumerate(centres * 4)]
    copies = [copies[i] for i in rng.permutation(len(copies))]
    a = centres[0]
    chain = [flip(a, [20, 21, 22]), flip(a, [20, 21, 22, 23, 24, 25])]  # b: 3 from a; c: 3 from b, 6 from a
    hashes = signed(centres + copies + chain)
    dup = near.near_in_group(hashes, 4, **WAYS[way])
    assert dup.sum() == 160 + 1
    assert not dup[:40].any() and dup[40:200].all() and dup[200] and not dup[201]
    # at distance 0 only exact copies count: every copy above flips at least one bit
    assert near.near_in_group(hashes, 0, **WAYS[way]).sum() == 0
    exact = signed(centres + centres[:10] + centres[:3])
    assert near.near_in_group(exact, 0, **WAYS[way]).sum() == 13


def test_drop_near_marks_the_rows_of_each_group_in_input_order():
    """Two band groups (d=2, band 0 of 3: bits 0..21), input order by (shard, row), not by the table's order."""
    g1, g2 = 0x1234, 0x2345
    a, b = 1 << 40 | g1, 1 << 50 | g2
    rows = [  # (shard, row, phash)
        (1, 0, flip(a, [30])),      # group 1: last in input order, 1 bit from (0, 5) and 2 from (0, 9): dropped
        (0, 5, a),                  # group 1: first: kept
        (0, 9, flip(a, [30, 31, 32])),  # group 1: 3 bits from (0, 5): kept
        (0, 1, b),                  # group 2: kept
        (2, 0, flip(b, [60, 61])),  # group 2: dropped
        (0, 2, flip(a, [22]) ^ g1 ^ 0x1),  # its own group (band bits 0x1): kept
    ]
    df = pd.DataFrame({"shard": [r[0] for r in rows], "row": [r[1] for r in rows],
                       "phash": signed([r[2] for r in rows]),
                       "phash_ok": True, "drop_at": KEPT, "reason": None})
    shift, bits = select.bands(2)[0]
    out = select.drop_near(select.with_band(df, shift, bits), "_key", POS, "near_duplicate", 2)
    dropped = set(map(tuple, out.loc[out["drop_at"] == POS, ["shard", "row"]].to_numpy().tolist()))
    assert dropped == {(1, 0), (2, 0)}
    assert set(out.loc[out["drop_at"] == POS, "reason"]) == {"near_duplicate"} and "_key" not in out
