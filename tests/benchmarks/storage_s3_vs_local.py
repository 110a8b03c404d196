"""Storage throughput: crawl and curate with `storage:` on local disk against an S3 server, side by side.

The same job (crawl, then curate) runs on the same synthetic web (served on loopback from a process of its
own) twice per round: once with storage and the URL list on local disk, once with both on moto's S3 server
on 127.0.0.1 (tests/support/s3.py), found through AWS_ENDPOINT_URL as a real deployment finds its store.
Two image sets: flat demo images (96 px, resized to 64) and photo-like 1024 px JPEGs resized to 224 (as in
crawl_vs_img2dataset). Printed: each stage's wall time and rows/s, the whole run_job call's wall time, and
the S3/local ratio of each. Ray is started once, with the endpoint in its environment, and a warm-up round
of each (not counted) comes first. moto keeps objects in memory, so the ratio measures clipline's S3 path
(requests, no rename, listings) rather than a network; on a real store, latency adds to every request.

    make bench            # or: .venv/bin/python -m tests.benchmarks.storage_s3_vs_local [--rows N]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from tests.benchmarks.crawl_vs_img2dataset import _serve, url_list

PROCESSES, THREADS, SHARD = 2, 16, 500
BUCKET = "clipline-bench"


def run(list_url: str, store: str, image_size: int) -> dict[str, float]:
    """One crawl + curate job; each stage's seconds and rows, and the whole call's wall time."""
    from pipelines import spec
    from pipelines.runner import run_job

    raw = {"name": "bench", "storage": store, "tracking": {"uri": f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"},
           "stages": {
               "crawl": {"uses": "crawl", "with": {
                   "input": list_url, "image_size": image_size, "resize_mode": "border", "encode_format": "jpg",
                   "samples_per_shard": SHARD, "threads": THREADS, "timeout": 10, "allow_networks": ["127.0.0.0/8"],
                   "per_host_connections": 0}},
               "curate": {"uses": "curate", "needs": ["crawl"],
                          "with": {"rules": ["basic", "dedup_image"], "basic": {"min_side": 32},
                                   "shard_rows": SHARD}}}}
    t0 = time.perf_counter()
    outcomes = run_job(spec.resolve(raw, "bench"), progress=False)
    wall = time.perf_counter() - t0
    assert all(o.state == "ran" for o in outcomes), [(o.stage, o.state) for o in outcomes]
    crawl, curate = outcomes
    return {"job_s": wall, "crawl_s": crawl.seconds, "crawl_rows": crawl.manifest.rows,
            "crawl_ok": crawl.manifest.counts["success"], "curate_s": curate.seconds,
            "curate_rows_in": curate.manifest.counts["rows_in"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (Ray workers' imports)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    from tests.support.s3 import S3Server

    work = Path(tempfile.mkdtemp(prefix="clipline-bench-s3-"))
    s3 = S3Server(work).start()
    os.environ.update(s3.env)  # before Ray starts: its workers find the store the same way
    s3.bucket(BUCKET)
    import ray

    ray.init(address="local", num_cpus=PROCESSES, include_dashboard=False, log_to_driver=False)
    ctx = mp.get_context("spawn")
    results = {}
    try:
        for name, size, image_size, large in (("flat 96px->64", 96, 64, False),
                                              ("photo-like jpeg 1024px->224", 1024, 224, True)):
            ports, stop = ctx.Queue(), ctx.Event()
            server = ctx.Process(target=_serve, args=(size, ports, stop), daemon=True)
            server.start()
            base = f"http://127.0.0.1:{ports.get(timeout=60)}"
            frame = url_list(base, args.rows, large)
            local_list = str(work / f"urls-{size}.parquet")
            frame.to_parquet(local_list, index=False)
            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            key = f"inputs/urls-{size}.parquet"
            s3.client().put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())
            times: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
            for r in range(-args.warmup, args.rounds):
                for where in ("local", "s3"):
                    tag = uuid.uuid4().hex[:8]  # a fresh store each time: every stage really runs
                    store = str(work / f"store-{tag}") if where == "local" else f"s3://{BUCKET}/store-{tag}"
                    got = run(local_list if where == "local" else f"s3://{BUCKET}/{key}", store, image_size)
                    assert got["crawl_ok"] >= 0.99 * args.rows, f"{where}: only {got['crawl_ok']} images succeeded"
                    if r >= 0:
                        times[where].append(got)
                    print(f"{name:<28} {'round ' + str(r) if r >= 0 else 'warm-up':<8} {where:<6} "
                          f"crawl {got['crawl_rows']} rows {got['crawl_s']:6.1f}s = {got['crawl_rows'] / got['crawl_s']:7.1f}/s  "
                          f"curate {got['curate_s']:6.1f}s = {got['curate_rows_in'] / got['curate_s']:7.1f}/s  "
                          f"job {got['job_s']:6.1f}s", flush=True)
                    if where == "local":
                        shutil.rmtree(store, ignore_errors=True)
            stop.set()
            server.join(timeout=30)
            med = {w: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for w, ts in times.items()}
            results[name] = {
                w: {"crawl_rows_per_s": round(m["crawl_rows"] / m["crawl_s"], 1),
                    "curate_rows_per_s": round(m["curate_rows_in"] / m["curate_s"], 1), "job_s": round(m["job_s"], 1)}
                for w, m in med.items()}
            results[name]["ratio_s3_over_local"] = {
                "crawl_rows_per_s": round(results[name]["s3"]["crawl_rows_per_s"] / results[name]["local"]["crawl_rows_per_s"], 2),
                "curate_rows_per_s": round(results[name]["s3"]["curate_rows_per_s"] / results[name]["local"]["curate_rows_per_s"], 2),
                "job_s": round(results[name]["s3"]["job_s"] / results[name]["local"]["job_s"], 2)}
            results[name].update(rows=args.rows, rounds=args.rounds, warmup_rounds=args.warmup)
    finally:
        ray.shutdown()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\nmedian rows/s, S3 (moto on 127.0.0.1) against local disk; ratio = S3 / local (job: wall time):")
    for name, r in results.items():
        q = r["ratio_s3_over_local"]
        print(f"  {name:<28} crawl local {r['local']['crawl_rows_per_s']:7.1f}/s  s3 {r['s3']['crawl_rows_per_s']:7.1f}/s "
              f"ratio {q['crawl_rows_per_s']:.2f}x | curate local {r['local']['curate_rows_per_s']:7.1f}/s  "
              f"s3 {r['s3']['curate_rows_per_s']:7.1f}/s ratio {q['curate_rows_per_s']:.2f}x | job "
              f"{r['local']['job_s']:.1f}s vs {r['s3']['job_s']:.1f}s ({q['job_s']:.2f}x)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "storage_s3_vs_local.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":  # the web server process is started with spawn
    main()
