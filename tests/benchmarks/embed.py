"""Embedding a dataset version: the embed stage (a Ray Data actor pool) against a plain open_clip loop.

Both read the same crawled-schema Parquet shards from disk (64 px JPEGs and captions from the demo web), embed
every image and caption with the same model, seed, batch size and one torch thread per model, L2-normalise, keep
float16 and write Parquet: the loop one file in one process, the stage (`EmbedStage.run`, the runner's MLflow and
manifest left out) one file per shard from its actors.  Ray is started once before the timings; each stage run
includes starting its actors (a new process, torch and open_clip imported, the model created), the loop includes
creating its model (torch already imported in this process).  The same loop is also timed as a script of its
own, from spawn to exit (`plain_process`: Python's start and the torch and open_clip imports that the stage's
actors pay too, in a new process with one torch thread).  "Once
running" is, for the loop, after its model exists, and for the stage, from the first shard an actor began to the
last one it finished (the stage's `running_seconds` metric).  Round 0 is a warm-up, reported apart.  The stage's
embeddings must equal the loop's (float16, max abs difference < 2e-3), or the benchmark fails.

    .venv/bin/python -m tests.benchmarks.embed [--rows N] [--shards S] [--batch-size B] [--arch A] [--rounds R]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOLERANCE, SIZE = 2e-3, 64


def make_shards(n: int, shards: int, directory: str) -> list[str]:
    """n demo-web rows (JPEG, as the crawl re-encodes) in the crawled schema, written as `shards` Parquet files."""
    from pipelines.contracts import CRAWLED, uid
    from pipelines.demo import web

    rows = []
    for i in range(n):
        s = web.sample(0, i)
        buf = io.BytesIO()
        web.render(s, SIZE).save(buf, format="JPEG", quality=90)
        url = f"http://bench/img/{i}.jpg"
        rows.append({"uid": uid(url, s.caption), "url": url, "caption": s.caption, "status": "success",
                     "image": buf.getvalue(), "image_format": "jpg", "width": SIZE, "height": SIZE,
                     "source": "bench", "source_row": i})
    step = -(-n // shards)
    paths = []
    for j, start in enumerate(range(0, n, step)):
        path = os.path.join(directory, f"part-{j:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[start:start + step], schema=CRAWLED), path)
        paths.append(path)
    return paths


def run_plain(paths: list[str], ref, batch_size: int, out: str) -> tuple[float, float]:
    """The loop anyone would write: (seconds in all, seconds after the model was created)."""
    import torch
    from PIL import Image

    from pipelines import models

    t0 = time.perf_counter()
    model, preprocess, tokenizer = models.create(ref)
    t1 = time.perf_counter()
    table = pa.concat_tables([pq.read_table(p, columns=["uid", "image", "caption"]) for p in paths])
    images, captions = table.column("image").to_pylist(), table.column("caption").to_pylist()
    img, txt = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                                  for b in images[start:start + batch_size]])
            img.append(model.encode_image(pixels, normalize=True).numpy().astype(np.float16))
            txt.append(model.encode_text(tokenizer(captions[start:start + batch_size]), normalize=True)
                       .numpy().astype(np.float16))
    pq.write_table(pa.table({"uid": table.column("uid"), "image_embedding": list(np.concatenate(img)),
                             "text_embedding": list(np.concatenate(txt))}), out)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def run_plain_process(paths: list[str], arch: str, batch_size: int, out: str) -> tuple[float, float]:
    """The loop as a script of its own: (seconds from spawn to exit, seconds after its model was created)."""
    import subprocess

    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.embed", "--plain-only", out, "--arch", arch,
                           "--batch-size", str(batch_size), *paths], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return seconds, float(done.stdout.strip().splitlines()[-1])


def plain_only(argv: list[str]) -> None:
    """`--plain-only OUT --arch A --batch-size B SHARD...`: the loop alone, one torch thread; prints its running
    seconds."""
    import torch

    from pipelines.models import ModelRef

    parser = argparse.ArgumentParser()
    parser.add_argument("--plain-only", dest="out")
    parser.add_argument("--arch")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    _, running = run_plain(args.paths, ModelRef(arch=args.arch, seed=0), args.batch_size, args.out)
    print(running)


def run_stage(manifest, ref, batch_size: int, actors: int, out: str) -> tuple[float, float, dict]:
    """(seconds in all, seconds once running, the stage's result)."""
    from pipelines import configschema
    from pipelines.stage import StageContext
    from pipelines.stages.embed.config import EmbedConfig
    from pipelines.stages.embed.stage import EmbedStage

    cfg = configschema.build(EmbedConfig, {"model": {"arch": ref.arch, "seed": ref.seed}, "batch_size": batch_size,
                                           "actors": actors, "num_cpus": 1})
    ctx = StageContext(job="bench", stage="embed", output=out, tracker=None,  # type: ignore[arg-type]  # unused
                       log=logging.getLogger("bench.embed"), progress=False)
    t0 = time.perf_counter()
    result = EmbedStage(cfg).run(ctx, {"source": manifest})
    seconds = time.perf_counter() - t0
    return seconds, result.metrics["running_seconds"], {"result": result, "out": out}


def compare(plain_out: str, stage: dict) -> float:
    """Largest absolute difference between the stage's embeddings and the loop's, row by row (by uid)."""
    plain = pq.read_table(plain_out).to_pandas().set_index("uid")
    got = [pq.read_table(os.path.join(stage["out"], s["path"])).to_pandas() for s in stage["result"].shards]
    worst = 0.0
    for df in got:
        for col in ("image_embedding", "text_embedding"):
            a = np.stack(df[col].to_list()).astype(np.float32)
            b = np.stack(plain.loc[df["uid"], col].to_list()).astype(np.float32)
            worst = max(worst, float(np.abs(a - b).max()))
    if sum(len(d) for d in got) != len(plain):
        return float("inf")
    return worst


def main() -> None:
    if "--plain-only" in sys.argv:
        return plain_only(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4, help="upstream shards (a crawl writes several)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--arch", default="clip-small")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, after one warm-up round")
    parser.add_argument("--out", default="bench-out/embed.json")
    args = parser.parse_args()
    import ray
    import torch

    from pipelines.manifest import Manifest
    from pipelines.models import ModelRef

    torch.set_num_threads(1)  # one thread, as one actor with num_cpus=1 gets
    logging.disable(logging.WARNING)  # "random weights" on every model: known, the embeddings only have to agree
    ref, n, b = ModelRef(arch=args.arch, seed=0), args.rows, args.batch_size
    work = tempfile.mkdtemp(prefix="clipline-bench-embed-")
    t0 = time.perf_counter()
    os.makedirs(os.path.join(work, "src"))
    paths = make_shards(n, args.shards, os.path.join(work, "src"))
    manifest = Manifest(job="bench", stage="source", uses="ingest", fingerprint="0" * 16, code_version="x", params={},
                        inputs={}, shards=[{"path": os.path.basename(p), "rows": pq.read_metadata(p).num_rows,
                                            "bytes": os.path.getsize(p), "sha256": "0" * 64} for p in paths],
                        counts={}, metrics={}, started_at="", finished_at="", location=os.path.join(work, "src"))
    print(f"{n} rows of {SIZE}px JPEGs in {len(paths)} shards built in {time.perf_counter() - t0:.1f}s; model "
          f"{args.arch}, batch {b}, 1 torch thread per model, image and text embeddings", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print("ray started: address=local, num_cpus=2 (before the timings)", flush=True)
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    ways = {"plain": 0, "plain_process": 0, "stage_1": 1, "stage_2": 2}
    rounds: list[dict] = []
    worst = 0.0
    for r in range(args.rounds + 1):
        tag, fig = f"round {r}{' (warm-up)' if r == 0 else ''}", {}
        for way, actors in ways.items():  # one after another within a round, so drift hits all three
            out = os.path.join(work, f"{way}-{r}")
            if way == "plain":
                plain_out = out + ".parquet"
                seconds, steady = run_plain(paths, ref, b, plain_out)
            elif way == "plain_process":
                seconds, steady = run_plain_process(paths, args.arch, b, out + ".parquet")
            else:
                seconds, steady, stage = run_stage(manifest, ref, b, actors, out)
                worst = max(worst, compare(plain_out, stage))
            fig[way], fig[f"{way}_running"] = n / seconds, n / steady
            print(f"{tag:<17} {way:<13} {n} rows in {seconds:6.2f}s = {n / seconds:7.1f} rows/s   "
                  f"once running {steady:6.2f}s = {n / steady:7.1f} rows/s", flush=True)
        for kind in ("", "_running"):
            fig[f"stage1/plain{kind}"] = fig[f"stage_1{kind}"] / fig[f"plain{kind}"]
            fig[f"stage1/plain_process{kind}"] = fig[f"stage_1{kind}"] / fig[f"plain_process{kind}"]
            fig[f"stage2/stage1{kind}"] = fig[f"stage_2{kind}"] / fig[f"stage_1{kind}"]
        print(f"{tag:<17} stage1/plain {fig['stage1/plain']:.2f}x (once running {fig['stage1/plain_running']:.2f}x)"
              f"   stage1/plain_process {fig['stage1/plain_process']:.2f}x"
              f"   stage2/stage1 {fig['stage2/stage1']:.2f}x (once running {fig['stage2/stage1_running']:.2f}x)",
              flush=True)
        rounds.append({k: round(v, 2) for k, v in fig.items()})
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    timed = rounds[1:]
    med = {k: round(statistics.median(rd[k] for rd in timed), 2) for k in rounds[0]}
    agree = worst < TOLERANCE
    print(f"\nmedian of {args.rounds} timed rounds, rows/s end to end (once running: after the model or actors are up):")
    for way in ways:
        print(f"  {way:<13} {med[way]:7.1f}  ({med[f'{way}_running']:7.1f})")
    for ratio in ("stage1/plain", "stage1/plain_process", "stage2/stage1"):
        print(f"  {ratio:<20} {med[ratio]:.2f}x  ({med[f'{ratio}_running']:.2f}x)")
    print(f"embeddings agree: max |plain - stage| = {worst:.2e} ({'<' if agree else 'NOT <'} {TOLERANCE:g})")
    result = {"rows": n, "shards": len(paths), "batch_size": b, "arch": args.arch, "image_px": SIZE, "torch_threads": 1,
              "ray": "address=local, num_cpus=2", "rounds": args.rounds, "warmup": rounds[0], "timed": timed,
              "median": med, "max_abs_diff": worst, "embeddings_agree": agree}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
