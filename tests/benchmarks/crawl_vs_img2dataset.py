"""Crawl throughput: clipline's crawl stage against img2dataset's own download(), side by side.

Both crawl the same URL list from the same loopback server (run in its own process), with the same
worker processes (2), threads per worker (16), target size, resize mode, encoding and shard size,
alternating runs so drift on the machine hits both. Printed: successful images/s of each and the ratio
(clipline / img2dataset), on small images (96 px, resized to 64) and on large JPEGs (1024 px, resized
to 224). Ray is started once before the timings; img2dataset's process pool starts inside its call. A
warm-up round of each (not counted) comes first, so clipline's figures are those of warm Ray workers,
as in any crawl longer than one round of shards. clipline's safety checks stay on; its per-host cap is
off, as img2dataset has none and one loopback host serves every URL.

    make bench            # or: .venv/bin/python -m tests.benchmarks.crawl_vs_img2dataset [--rows N]
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

import pandas as pd

PROCESSES, THREADS, SHARD = 2, 16, 1000


def _serve(size: int, port_queue, stop) -> None:
    from pipelines.demo.server import DemoServer

    with DemoServer(port=0, size=size) as server:
        port_queue.put(server.server_address[1])
        stop.wait()


def url_list(base: str, rows: int, large: bool) -> pd.DataFrame:
    from pipelines.demo import web

    # large: 100 distinct 1024 px JPEGs (indices divisible by 4 are JPEG), unique URLs through a query
    index = [(i % 100) * 4 for i in range(rows)] if large else list(range(rows))
    return pd.DataFrame({"url": [f"{base}/img/{k}?u={i}" for i, k in enumerate(index)],
                         "caption": [web.sample(0, k).caption for k in index]})


def run_img2dataset(list_path: str, out: str, image_size: int) -> tuple[int, float]:
    from img2dataset import download

    t0 = time.perf_counter()
    download(url_list=list_path, input_format="parquet", url_col="url", caption_col="caption",
             output_format="parquet", output_folder=out, processes_count=PROCESSES, thread_count=THREADS,
             image_size=image_size, resize_mode="border", encode_format="jpg", encode_quality=95,
             number_sample_per_shard=SHARD, timeout=10, retries=0, distributor="multiprocessing",
             enable_wandb=False, compute_hash="sha256")
    seconds = time.perf_counter() - t0
    ok = sum(json.load(open(f))["successes"] for f in glob.glob(f"{out}/*_stats.json"))
    return ok, seconds


def run_clipline(list_path: str, store: str, image_size: int) -> tuple[int, float]:
    from pipelines import spec
    from pipelines.runner import run_job

    raw = {"name": "bench", "storage": store, "stages": {"crawl": {"uses": "crawl", "with": {
        "input": list_path, "image_size": image_size, "resize_mode": "border", "encode_format": "jpg",
        "encode_quality": 95, "samples_per_shard": SHARD, "threads": THREADS, "timeout": 10,
        "allow_networks": ["127.0.0.0/8"],
        # one loopback host serves every URL, and img2dataset has no per-host cap: none here either
        "per_host_connections": 0}}}}
    t0 = time.perf_counter()
    (outcome,) = run_job(spec.resolve(raw, "bench"), progress=False)
    return outcome.manifest.counts["success"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (Ray workers' imports)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=PROCESSES, include_dashboard=False, log_to_driver=False)
    ctx = mp.get_context("spawn")
    results = {}
    for name, size, image_size, large in (("small 96px->64", 96, 64, False), ("large jpeg 1024px->224", 1024, 224, True)):
        ports, stop = ctx.Queue(), ctx.Event()
        server = ctx.Process(target=_serve, args=(size, ports, stop), daemon=True)
        server.start()
        base = f"http://127.0.0.1:{ports.get(timeout=60)}"
        work = tempfile.mkdtemp(prefix="clipline-bench-")
        list_path = os.path.join(work, "urls.parquet")
        url_list(base, args.rows, large).to_parquet(list_path, index=False)
        rates: dict[str, list[float]] = {"img2dataset": [], "clipline": []}
        for r in range(-args.warmup, args.rounds):  # negative rounds: warm-up, not counted
            for tool, fn in (("img2dataset", run_img2dataset), ("clipline", run_clipline)):
                out = os.path.join(work, f"{tool}-{r}")
                ok, seconds = fn(list_path, out, image_size)
                assert ok >= 0.99 * args.rows, f"{tool}: only {ok} of {args.rows} images succeeded"
                if r >= 0:
                    rates[tool].append(ok / seconds)
                print(f"{name:<24} {'round ' + str(r) if r >= 0 else 'warm-up':<8} {tool:<12} {ok} images in {seconds:6.1f}s = {ok / seconds:7.1f}/s",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
        stop.set()
        server.join(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
        med = {t: statistics.median(v) for t, v in rates.items()}
        results[name] = {"img2dataset_per_s": round(med["img2dataset"], 1), "clipline_per_s": round(med["clipline"], 1),
                         "ratio": round(med["clipline"] / med["img2dataset"], 2), "rows": args.rows,
                         "rounds": args.rounds, "warmup_rounds": args.warmup}
    ray.shutdown()
    print("\nmedian images/s (clipline / img2dataset):")
    for name, r in results.items():
        print(f"  {name:<24} img2dataset {r['img2dataset_per_s']:7.1f}/s  clipline {r['clipline_per_s']:7.1f}/s  "
              f"ratio {r['ratio']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "crawl_vs_img2dataset.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":  # img2dataset's multiprocessing uses spawn
    main()
