"""Near dedup of one pHash band group: the pairwise greedy (the anchor: each row against every kept row, what
`select.drop_near` did before) against multi-index hashing (`near.near_in_group`), on the same group, checking
that both drop the same rows. A group: random 64-bit hashes whose band bits (band 0 of max_distance+1) are all
the same, and ~5% near copies (1..max_distance bits flipped) of earlier rows; then a dense group, a fifth of
its rows within 2 bits of one hash (a placeholder image), which exceeds the pair budget and goes row by row;
then `select.drop_near` on a whole block of random hashes (every band group small: the plain Python way).

    .venv/bin/python -m tests.benchmarks.near_dedup [--sizes 1000 4000 16000 24000] [--max-distance 4]
        [--anchor-max 24000] [--dense 16000] [--block 200000] [--rounds 3]

The anchor is quadratic (~30 s at 24k rows on 2 cores): sizes above --anchor-max run the new way only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from pipelines.stages.curate import near, select
from tests.test_near_dedup import pairwise_drop_near, table
from tests.test_near_dedup import pairwise_group as anchor  # the pairwise greedy, kept as the tests' reference


def group(n: int, max_distance: int, near_share: float, dense_share: float, one_group: bool = True) -> np.ndarray:
    """Random hashes with near copies flipping bits outside band 0 (so in its group); one_group: band 0 fixed."""
    rng = np.random.default_rng(0)
    shift, bits = select.bands(max_distance)[0]
    band = np.uint64(((1 << bits) - 1) << shift)
    h = rng.integers(0, 1 << 63, n, dtype=np.uint64) | rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(63)
    free = np.array([b for b in range(64) if not int(band) >> b & 1])

    def nudge(rows: np.ndarray, sources: np.ndarray, most: int) -> None:
        for r, s in zip(rows, sources, strict=True):
            flips = rng.choice(free, int(rng.integers(1, most + 1)), replace=False)
            h[r] = h[s] ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64))

    copies = rng.choice(np.arange(1, n), int(n * near_share), replace=False)
    nudge(copies, rng.integers(0, copies), max(max_distance, 1))  # a copy of an earlier row
    if dense_share:
        crowd = rng.choice(n, int(n * dense_share), replace=False)
        nudge(crowd, np.full(len(crowd), crowd.min()), 2)
    if one_group:
        h = (h & ~band) | (np.uint64(0x5A5A5A5A5A5A5A5A) & band)
    return h.view(np.int64)


def timed(fn: Callable[[], np.ndarray], rounds: int) -> tuple[float, np.ndarray]:
    times, out = [], np.zeros(0, dtype=bool)
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 24000])
    ap.add_argument("--max-distance", type=int, default=4)
    ap.add_argument("--near", type=float, default=0.05, help="share of near copies of earlier rows")
    ap.add_argument("--dense", type=int, default=16000, help="rows of the dense group (0: none)")
    ap.add_argument("--block", type=int, default=200_000, help="rows of the drop_near block (0: none)")
    ap.add_argument("--anchor-max", type=int, default=24000, help="largest group the quadratic anchor runs on")
    ap.add_argument("--rounds", type=int, default=3, help="median of; the anchor runs once above 4k rows")
    args = ap.parse_args()
    d = args.max_distance
    cases = [(n, "random", group(n, d, args.near, 0.0)) for n in args.sizes]
    if args.dense:
        cases.append((args.dense, "dense", group(args.dense, d, args.near, 0.2)))
    print(f"one band group, max_distance {d}, band bits {select.bands(d)[0][1]}; median of {args.rounds} rounds")
    print(f"{'rows':>7} {'group':>7} {'dropped':>8} {'pairwise (anchor)':>20} {'multi-index':>20} {'speed-up':>9}")
    for n, kind, hashes in cases:
        new_s, dup = timed(lambda h=hashes: near.near_in_group(h, d), args.rounds)
        line = f"{n:>7,} {kind:>7} {int(dup.sum()):>8,} "
        if n <= args.anchor_max:
            old_s, want = timed(lambda h=hashes: anchor(h, d), args.rounds if n <= 4000 else 1)
            if not np.array_equal(want, dup):
                raise SystemExit(f"{n} rows ({kind}): multi-index hashing decided differently from the anchor")
            line += (f"{old_s:>8.3f} s {n / old_s:>7,.0f} r/s {new_s:>8.3f} s {n / new_s:>7,.0f} r/s "
                     f"{old_s / new_s:>8.1f}x")
        else:
            line += f"{'(not run)':>20} {new_s:>8.3f} s {n / new_s:>7,.0f} r/s"
        print(line, flush=True)
    if args.block:
        shift, bits = select.bands(d)[0]
        hashes = group(args.block, d, args.near, 0.0, one_group=False)
        df = select.with_band(table(hashes, 0), shift, bits)
        new_s, got = timed(lambda: select.drop_near(df, "_key", 1, "near", d), args.rounds)
        old_s, want = timed(lambda: pairwise_drop_near(df, "_key", 1, "near", d), 1)
        if not got.equals(want):
            raise SystemExit("drop_near on a block decided differently from the anchor")
        n = args.block
        print(f"{n:>7,} {'block':>7} {int((got['drop_at'] == 1).sum()):>8,} {old_s:>8.3f} s {n / old_s:>7,.0f} r/s "
              f"{new_s:>8.3f} s {n / new_s:>7,.0f} r/s {old_s / new_s:>8.1f}x  ({df['_key'].nunique():,} groups)")


if __name__ == "__main__":
    main()
