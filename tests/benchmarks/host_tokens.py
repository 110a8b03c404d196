"""The host token service's throughput and latency: Ray tasks, each a worker process with many threads, take and
release slots of many hosts (no HTTP: the service alone), as shard tasks would, through one actor.

    .venv/bin/python -m tests.benchmarks.host_tokens [--tasks 2] [--threads 16] [--hosts 1000] [--seconds 5]

Prints slots granted a second, the actor calls that carried them, and the wait for a free host's slot (p50,
p99): the round trip a request pays before its first byte.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
from pipelines.offline import keep_local  # noqa: E402

keep_local(ray_head=True)


def hammer(cfg, out_url: str, threads: int, hosts: int, seconds: float) -> list[float]:
    """Take and release a random host's slot in a loop on each thread; the seconds each take waited."""
    from pipelines.stages.crawl.hosttokens import attach

    limiter = attach(cfg, out_url)
    assert limiter is not None
    waits: list[float] = []
    end = time.monotonic() + seconds

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            t0 = time.monotonic()
            with limiter.slot(f"host{rng.randrange(hosts)}:80", t0 + 30):
                waits.append(time.monotonic() - t0)

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return waits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    import ray

    from pipelines.runner import start_local_ray
    from pipelines.stages.crawl import hosttokens
    from pipelines.stages.crawl.config import CrawlConfig

    start_local_ray({"address": "local", "num_cpus": args.tasks, "include_dashboard": False, "log_to_driver": False})
    cfg = CrawlConfig(input="-", per_host_connections=4)
    out = tempfile.mkdtemp(prefix="host-tokens-")
    with hosttokens.running(cfg, out) as service:
        assert service is not None
        remote = ray.remote(hammer)
        t0 = time.perf_counter()
        waits = [w for ws in ray.get([remote.remote(cfg, f"{out}/part-{i:05d}.parquet", args.threads, args.hosts,
                                                    args.seconds) for i in range(args.tasks)]) for w in ws]
        wall = time.perf_counter() - t0
    stats = service.stats
    waits.sort()
    print(f"{args.tasks} tasks x {args.threads} threads, {args.hosts} hosts, {wall:.1f} s (task start included): "
          f"{stats['granted']} slots ({stats['granted'] / args.seconds:,.0f}/s over the {args.seconds:g} s of "
          f"work), {stats['calls']} actor calls ({stats['granted'] / max(stats['calls'], 1):.1f} slots a call); "
          f"wait for a slot p50 {1000 * statistics.median(waits):.2f} ms, "
          f"p99 {1000 * waits[int(0.99 * (len(waits) - 1))]:.2f} ms")
    ray.shutdown()


if __name__ == "__main__":
    main()
