"""Crawl throughput on photos, whole process: `clipline run` against a script calling img2dataset.download().

What a user feels: each tool is spawned as its own process (subprocess.run) and timed by the wall clock
from spawn to exit, so clipline's figure includes its imports, a new MLflow store (sqlite under a fresh
storage directory), starting a local Ray instance (2 CPUs) and stopping it; img2dataset's includes its
imports and its process pool. Printed per run: successful images / whole-process seconds, and for clipline
also the crawl stage's own seconds (its manifest's `metrics.seconds`), so the share outside the stage is
visible; then the median per tool and the ratio clipline / img2dataset per (set, resize mode).

The images are photos: made at run time from the photos that ship inside installed packages (matplotlib's
grace_hopper.jpg; scikit-learn's china.jpg and flower.jpg), by seeded random crops, rescales, flips, small
colour and brightness changes, 2x2 or 1x2 mosaics of crops and a light grain, encoded as JPEG quality 90.
The sources are at most 640 px, so the large images are upscaled: their fine detail is the grain's, not a
camera's. A LARGE set (default 2,000; long side 800-1600 px, resized to 256) and a SMALL set (default
500; long side 200-400 px, resized to 128), each with resize_mode border and center_crop. They are served
by a stdlib ThreadingHTTPServer on 127.0.0.1 in its own process; nothing goes beyond loopback.

Same knobs for both: 2 worker processes (clipline: Ray num_cpus 2, one task per shard), 16 threads each,
4 shards per set, encode jpg quality 95, timeout 10 s. img2dataset: distributor multiprocessing,
retries 0. clipline: safety checks on, loopback allowed, per-host cap off (img2dataset has none and one
host serves every URL). The tools alternate within each round (img2dataset, clipline, ...). Every run
must succeed on >= 99% of its rows.

    make bench    # or: .venv/bin/python -m tests.benchmarks.crawl_photos [--large N --small N --rounds R]
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pandas as pd
from PIL import Image

PROCESSES, THREADS, SHARDS = 2, 16, 4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASPECTS = (4 / 3, 3 / 2, 1.0, 16 / 9, 3 / 4, 2 / 3)  # width / height

I2D_SCRIPT = '''\
import glob, json, sys

if __name__ == "__main__":  # img2dataset's multiprocessing distributor spawns workers that import this file
    from img2dataset import download

    a = json.loads(sys.argv[1])
    download(url_list=a["list"], input_format="parquet", url_col="url", caption_col="caption",
             output_format="parquet", output_folder=a["out"], processes_count=a["processes"],
             thread_count=a["threads"], image_size=a["image_size"], resize_mode=a["resize_mode"],
             encode_format="jpg", encode_quality=95, number_sample_per_shard=a["shard"], timeout=10, retries=0,
             distributor="multiprocessing", enable_wandb=False, compute_hash="sha256")
'''


@functools.cache
def sources() -> list[np.ndarray]:
    """The photos shipped inside installed packages, as RGB arrays (the gift-box PNG is an icon: left out)."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    hopper = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return [np.asarray(Image.open(hopper).convert("RGB")), *load_sample_images().images]


def _crop(rng: np.random.Generator, photos: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """A random crop of a random source photo, flipped maybe, rescaled to width x height, colour-shifted."""
    src = photos[int(rng.integers(len(photos)))]
    sh, sw = src.shape[:2]
    aspect = width / height
    # the largest box of the target aspect that fits, then 40-100% of it, at a random place
    bw, bh = (sw, sw / aspect) if sw / aspect <= sh else (sh * aspect, sh)
    scale = rng.uniform(0.4, 1.0)
    cw, ch = max(8, int(bw * scale)), max(8, int(bh * scale))
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    tile = src[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    arr = cv2.resize(np.ascontiguousarray(tile), (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    gain = (rng.uniform(0.9, 1.1, 3) * rng.uniform(0.88, 1.12)).astype(np.float32)  # per-channel tint, brightness
    return arr * gain + np.float32(rng.uniform(-10, 10))


def photo(index: int, long_lo: int, long_hi: int) -> bytes:
    """One distinct photo-like JPEG (quality 90), long side in [long_lo, long_hi]; seeded by index."""
    photos = sources()
    rng = np.random.default_rng(index)
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    long_side = int(rng.integers(long_lo, long_hi + 1))
    width, height = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    layout = rng.random()
    if layout < 0.5:  # one crop
        img = _crop(rng, photos, width, height)
    elif layout < 0.75:  # two crops side by side
        left = width // 2
        img = np.concatenate([_crop(rng, photos, left, height), _crop(rng, photos, width - left, height)], axis=1)
    else:  # 2x2 mosaic
        left, top = width // 2, height // 2
        rows = [np.concatenate([_crop(rng, photos, left, h), _crop(rng, photos, width - left, h)], axis=1)
                for h in (top, height - top)]
        img = np.concatenate(rows, axis=0)
    # grain, so upscaled crops are not too smooth: a window at a random place of one seeded noise field
    noise = _grain()
    oy, ox = int(rng.integers(0, noise.shape[0] - height + 1)), int(rng.integers(0, noise.shape[1] - width + 1))
    img += noise[oy:oy + height, ox:ox + width]
    ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


@functools.cache
def _grain() -> np.ndarray:
    return np.random.default_rng(12345).normal(0.0, 2.5, (2048, 2048, 3)).astype(np.float32)


def write_set(root: str, name: str, count: int, long_lo: int, long_hi: int, seed: int, ctx) -> tuple[str, float]:
    """Write count JPEGs under root/name/ (made by PROCESSES workers); returns the folder and the mean KB."""
    folder = os.path.join(root, name)
    os.makedirs(folder)
    total = 0
    with ctx.Pool(PROCESSES) as pool:
        make = functools.partial(photo, long_lo=long_lo, long_hi=long_hi)
        for i, data in enumerate(pool.imap(make, range(seed, seed + count), chunksize=16)):
            total += len(data)
            with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                f.write(data)
    return folder, total / max(count, 1) / 1024


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's parameter name
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 32 connections open at once: the default backlog of 5 would drop SYNs (1 s stalls)


def _serve(root: str, port_queue, stop) -> None:
    with _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root)) as server:
        port_queue.put(server.server_address[1])
        import threading

        threading.Thread(target=server.serve_forever, daemon=True).start()
        stop.wait()
        server.shutdown()


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in {"http_proxy", "https_proxy", "all_proxy"} and k != "MLFLOW_TRACKING_URI"}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0", no_proxy="127.0.0.1,localhost",
               NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    return env


def _spawn(cmd: list[str], what: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def run_img2dataset(work: str, list_path: str, out: str, image_size: int, mode: str, shard: int) -> dict:
    script = os.path.join(work, "i2d_download.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(I2D_SCRIPT)
    arg = json.dumps({"list": list_path, "out": out, "processes": PROCESSES, "threads": THREADS,
                      "image_size": image_size, "resize_mode": mode, "shard": shard})
    seconds = _spawn([sys.executable, script, arg], "img2dataset")
    ok = sum(json.load(open(f))["successes"] for f in glob.glob(f"{out}/*_stats.json"))
    return {"ok": ok, "seconds": seconds}


def run_clipline(work: str, list_path: str, store: str, image_size: int, mode: str, shard: int) -> dict:
    import yaml

    job = {"name": "bench", "storage": store, "ray": {"address": "local", "num_cpus": PROCESSES},
           "stages": {"crawl": {"uses": "crawl", "with": {
               "input": list_path, "image_size": image_size, "resize_mode": mode, "encode_format": "jpg",
               "encode_quality": 95, "samples_per_shard": shard, "threads": THREADS, "timeout": 10,
               "allow_networks": ["127.0.0.0/8"],
               # one loopback host serves every URL, and img2dataset has no per-host cap: none here either
               "per_host_connections": 0}}}}
    job_path = os.path.join(work, "job.yaml")
    with open(job_path, "w") as f:
        yaml.safe_dump(job, f)
    clipline = os.path.join(os.path.dirname(sys.executable), "clipline")
    seconds = _spawn([clipline, "run", job_path, "--storage", store, "--no-progress"], "clipline")
    (manifest,) = glob.glob(f"{store}/bench/crawl/*/_manifest.json")
    with open(manifest) as f:
        m = json.load(f)
    return {"ok": m["counts"]["success"], "seconds": seconds, "stage_seconds": m["metrics"]["seconds"]}


def bench_set(name: str, folder: str, rows: int, image_size: int, rounds: int, work: str, ctx) -> dict:
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(folder, ports, stop), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{ports.get(timeout=60)}"
    list_path = os.path.join(work, f"{name}-urls.parquet")
    pd.DataFrame({"url": [f"{base}/{i}.jpg" for i in range(rows)],
                  "caption": [f"a photo, number {i}" for i in range(rows)]}).to_parquet(list_path, index=False)
    shard = math.ceil(rows / SHARDS)
    out: dict = {}
    try:
        for mode in ("border", "center_crop"):
            runs: dict[str, list[dict]] = {"img2dataset": [], "clipline": []}
            for r in range(rounds):
                for tool, fn in (("img2dataset", run_img2dataset), ("clipline", run_clipline)):
                    dest = os.path.join(work, f"{name}-{mode}-{tool}-{r}")
                    res = fn(work, list_path, dest, image_size, mode, shard)
                    shutil.rmtree(dest, ignore_errors=True)
                    assert res["ok"] >= 0.99 * rows, f"{tool} ({name}, {mode}): only {res['ok']} of {rows} images succeeded"
                    res["per_s"] = res["ok"] / res["seconds"]
                    runs[tool].append(res)
                    stage = (f"  stage {res['stage_seconds']:6.1f}s ({res['ok'] / res['stage_seconds']:6.1f}/s), "
                             f"outside it {res['seconds'] - res['stage_seconds']:5.1f}s" if "stage_seconds" in res else "")
                    print(f"{name:<6} {mode:<12} round {r} {tool:<12} {res['ok']} images in {res['seconds']:6.1f}s "
                          f"= {res['per_s']:6.1f}/s{stage}", flush=True)
            i2d = statistics.median(x["per_s"] for x in runs["img2dataset"])
            cl = statistics.median(x["per_s"] for x in runs["clipline"])
            out[mode] = {"img2dataset_per_s": round(i2d, 1), "clipline_per_s": round(cl, 1), "ratio": round(cl / i2d, 2),
                         "img2dataset_seconds": round(statistics.median(x["seconds"] for x in runs["img2dataset"]), 1),
                         "clipline_seconds": round(statistics.median(x["seconds"] for x in runs["clipline"]), 1),
                         "clipline_stage_seconds": round(statistics.median(x["stage_seconds"] for x in runs["clipline"]), 1),
                         "runs": {t: [{k: round(v, 2) for k, v in x.items()} for x in v] for t, v in runs.items()}}
    finally:
        stop.set()
        server.join(timeout=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=2000, help="images in the large set (long side 800-1600 px)")
    parser.add_argument("--small", type=int, default=500, help="images in the small set (long side 200-400 px)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    t_all = time.perf_counter()
    ctx = mp.get_context("spawn")
    work = tempfile.mkdtemp(prefix="clipline-bench-photos-")
    results: dict = {}
    try:
        sets = (("large", args.large, 800, 1600, 256, 0), ("small", args.small, 200, 400, 128, 1_000_000))
        for name, count, lo, hi, image_size, seed in sets:
            if count <= 0:
                continue
            t0 = time.perf_counter()
            folder, kb = write_set(work, name, count, lo, hi, seed, ctx)
            print(f"{name}: {count} JPEGs, long side {lo}-{hi} px, mean {kb:.0f} KB, made in "
                  f"{time.perf_counter() - t0:.1f}s; resized to {image_size}", flush=True)
            for mode, r in bench_set(name, folder, count, image_size, args.rounds, work, ctx).items():
                results[f"{name} {lo}-{hi}px->{image_size} {mode}"] = {**r, "rows": count, "rounds": args.rounds,
                                                                        "mean_input_kb": round(kb)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nmedian images/s, whole process (clipline / img2dataset); clipline's crawl stage alone beside it:")
    print(f"  {'set, mode':<34} {'img2dataset':>12} {'clipline':>10} {'ratio':>6}   clipline wall / stage s")
    for name, r in results.items():
        print(f"  {name:<34} {r['img2dataset_per_s']:10.1f}/s {r['clipline_per_s']:8.1f}/s {r['ratio']:5.2f}x   "
              f"{r['clipline_seconds']:6.1f} / {r['clipline_stage_seconds']:.1f}")
    print(f"total wall {time.perf_counter() - t_all:.0f}s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "crawl_photos.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":  # the server process is spawned
    main()
