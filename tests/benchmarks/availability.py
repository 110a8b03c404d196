"""The crawl stage's availability pass: reading url, status and error_class back from the shards and tallying
them (what the stage does) against tallying the same columns already in memory (what a shard task could do),
and link rot between two versions. Synthetic crawled shards: 70% success, 4 KB of image bytes each, 5,000 hosts.

    .venv/bin/python -m tests.benchmarks.availability [--shards 10] [--rows 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import availability
from pipelines.contracts import CRAWLED, uid


def _shard(rng: random.Random, s: int, rows: int) -> pa.Table:
    out = []
    for i in range(rows):
        url = f"https://host{rng.randrange(5000)}.example.com/images/{s}/{i}/some/long/path/photo.jpg?w=800"
        ok = rng.random() < 0.7
        out.append({"uid": uid(url, "c"), "url": url, "caption": "a caption of some length here",
                    "status": "success" if ok else "failed_to_download",
                    "error_class": None if ok else rng.choice(["http_4xx", "timeout", "dns"]),
                    "image": os.urandom(4096) if ok else None,
                    "fetched_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "source": "x", "source_row": i})
    return pa.Table.from_pylist(out, schema=CRAWLED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(0)
    tmp = tempfile.mkdtemp(prefix="bench-availability-")
    tables, urls = [], []
    for s in range(args.shards):
        t = _shard(rng, s, args.rows)
        tables.append(t.select(["url", "status", "error_class"]))
        urls.append(os.path.join(tmp, f"part-{s:05d}.parquet"))
        pq.write_table(t, urls[-1], compression="zstd")
    n = args.shards * args.rows
    print(f"{n:,} rows in {args.shards} shards, {sum(map(os.path.getsize, urls)) / 1e6:.0f} MB")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        availability.tally(urls)
        t1 = time.perf_counter()
        mem = availability.Tally()
        for t in tables:
            mem.add(t)
        t2 = time.perf_counter()
        availability.link_rot(urls, urls)
        t3 = time.perf_counter()
        print(f"read back and tally {t1 - t0:.2f} s ({(t1 - t0) / n * 1e6:.2f} us/row); in memory {t2 - t1:.2f} s "
              f"({(t2 - t1) / n * 1e6:.2f} us/row); link rot {t3 - t2:.2f} s")


if __name__ == "__main__":
    main()
