"""CLIP scoring throughput: a plain one-process loop against the curate stage's Ray Data actor pool.

Both score the same in-memory rows (64 px JPEGs and captions from the demo web) with the same model, seed,
batch size and one torch thread per scorer, so the 1-actor ratio shows what Ray Data's actor pool costs or
saves on top of the model itself, and the 2-actor run shows the scaling a 2-core machine allows. Ray is
started once before the timings, the input is materialized in the object store before the clock starts,
and each clipline run includes starting its actors (as the stage does). Round 0 is a warm-up, reported
separately. The scores of both ways must agree (max abs difference < 1e-4), or the benchmark fails.

    .venv/bin/python -m tests.benchmarks.clip_score [--rows N] [--batch-size B] [--arch A] [--rounds R]
"""

from __future__ import annotations

import argparse
import hashlib
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
import pandas as pd

from pipelines.stages.curate.scorer import ClipScorer

TOLERANCE, BLOCKS, SIZE = 1e-4, 8, 64


def make_rows(n: int) -> pd.DataFrame:
    """The curate stage's working table for n crawled-and-kept rows, plus the scorer's image and caption."""
    from pipelines.demo import web
    from pipelines.stages.curate import features

    samples = [web.sample(0, i) for i in range(n)]
    images = []
    for s in samples:
        buf = io.BytesIO()  # always JPEG (the demo web serves every 4th image as PNG), as the crawl re-encodes
        web.render(s, SIZE).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    captions = [s.caption for s in samples]
    hashes = [features.phash(b) for b in images]
    return pd.DataFrame({
        "uid": [f"bench-{i:08d}" for i in range(n)], "source": "bench", "source_row": np.arange(n, dtype=np.int64),
        "shard": (np.arange(n) // 1000).astype(np.int32), "row": (np.arange(n) % 1000).astype(np.int32),
        "status": "success", "caption_words": np.array([len(c.split()) for c in captions], dtype=np.int32),
        "caption_chars": np.array([len(c) for c in captions], dtype=np.int32),
        "min_side": np.int32(SIZE), "max_side": np.int32(SIZE), "aspect_ratio": np.float32(1.0),
        "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "image_bytes": np.array([len(b) for b in images], dtype=np.int64),
        "text_key": [features.text_key(c, f"http://bench/img/{i}") for i, c in enumerate(captions)],
        "phash_ok": np.array([h is not None for h in hashes]), "phash": np.array([h or 0 for h in hashes], np.int64),
        "language": "en", "language_score": np.float32(0.95), "eval_distance": np.nan, "contaminated_by": None,
        "clip_score": np.float32(np.nan), "drop_at": np.int32(features.KEPT), "reason": None,
        "image": images, "caption": captions,
    })


def run_plain(rows: pd.DataFrame, ref, batch_size: int) -> tuple[np.ndarray, float, float]:
    """The loop anyone would write first: (scores, seconds in all, seconds after the model was created)."""
    import torch
    from PIL import Image

    from pipelines import models

    t0 = time.perf_counter()
    model, preprocess, tokenizer = models.create(ref)  # timed, as each clipline actor creates its own
    t1 = time.perf_counter()
    images, captions = list(rows["image"]), list(rows["caption"])
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                              for b in images[start:start + batch_size]])
        tokens = tokenizer(captions[start:start + batch_size])
        with torch.inference_mode():
            img = model.encode_image(pixels, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
        out.append((img * txt).sum(-1).numpy())
    t2 = time.perf_counter()
    return np.concatenate(out), t2 - t0, t2 - t1


class Stamped(ClipScorer):
    """ClipScorer unchanged, noting when its first batch started and its latest one ended: a new actor pool pays
    for process start, torch import and model creation on every run, which at a few thousand rows can outweigh
    the scoring itself, so the steady rate once actors are up is reported beside the end-to-end one."""

    def __init__(self, *args, stamps: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.path, self.first = os.path.join(stamps, f"{os.getpid()}.json"), None

    def __call__(self, batch: pd.DataFrame):
        self.first = self.first or time.time()
        out = super().__call__(batch)
        with open(self.path, "w") as f:
            json.dump([self.first, time.time()], f)
        return out


def run_clipline(ds, ref, batch_size: int, actors: int) -> tuple[np.ndarray, pd.Index, float, float]:
    """(scores, uids, seconds in all, seconds from the first batch any actor started to the last one ended)."""
    import ray.data

    stamps = tempfile.mkdtemp(prefix="clipline-bench-")
    t0 = time.perf_counter()
    scored = ds.map_batches(Stamped, batch_size=batch_size, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, fn_constructor_kwargs={"model": ref, "batch_size": batch_size,
                                                               "threads": 1, "stamps": stamps}).materialize()
    seconds = time.perf_counter() - t0
    spans = [json.load(open(os.path.join(stamps, f))) for f in os.listdir(stamps)]
    shutil.rmtree(stamps, ignore_errors=True)
    steady = max(s[1] for s in spans) - min(s[0] for s in spans)
    # Ray Data does not keep row order across actors: line the scores up with the input by uid
    out = scored.select_columns(["uid", "clip_score"]).to_pandas().set_index("uid")["clip_score"]
    return out.to_numpy(dtype=np.float32), out.index, seconds, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--arch", default="clip-small")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, after one warm-up round")
    parser.add_argument("--out", default="bench-out/clip_score.json")
    args = parser.parse_args()
    import ray
    import torch

    from pipelines.models import ModelRef

    torch.set_num_threads(1)  # one thread, as one actor with num_cpus=1 gets
    logging.disable(logging.WARNING)  # "random weights" on every model: known, the scores only have to agree
    ref, n, b = ModelRef(arch=args.arch, seed=0), args.rows, args.batch_size
    t0 = time.perf_counter()
    rows = make_rows(n)
    print(f"{n} rows of {SIZE}px JPEGs built in {time.perf_counter() - t0:.1f}s; model {args.arch}, batch {b}, "
          f"1 torch thread per scorer", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print("ray started: address=local, num_cpus=2 (before the timings)", flush=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data logs each dataset's plan on every run
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    step = -(-n // BLOCKS)  # several blocks, as several crawled shards would be, already in the object store
    ds = ray.data.from_pandas([rows.iloc[i:i + step] for i in range(0, n, step)]).materialize()

    ways = {"plain": 0, "clipline_1": 1, "clipline_2": 2}
    rounds: list[dict] = []
    worst = 0.0
    for r in range(args.rounds + 1):
        tag, fig = f"round {r}{' (warm-up)' if r == 0 else ''}", {}
        for way, actors in ways.items():  # one after another within a round, so drift hits all three
            if not actors:
                scores, seconds, steady = run_plain(rows, ref, b)
                plain = pd.Series(scores, index=rows["uid"].to_numpy())
            else:
                scores, uids, seconds, steady = run_clipline(ds, ref, b, actors)
                assert len(scores) == n, f"{way}: {len(scores)} of {n} rows came back"
                diff = np.abs(scores - plain.loc[uids].to_numpy())
                worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max()))  # NaN: unscored
            fig[way], fig[f"{way}_steady"] = n / seconds, n / steady
            print(f"{tag:<17} {way:<10} {n} rows in {seconds:6.2f}s = {n / seconds:7.1f} rows/s   "
                  f"steady {steady:6.2f}s = {n / steady:7.1f} rows/s", flush=True)
        for kind in ("", "_steady"):
            fig[f"clipline1/plain{kind}"] = fig[f"clipline_1{kind}"] / fig[f"plain{kind}"]
            fig[f"clipline2/clipline1{kind}"] = fig[f"clipline_2{kind}"] / fig[f"clipline_1{kind}"]
        print(f"{tag:<17} clipline1/plain {fig['clipline1/plain']:.2f}x (steady {fig['clipline1/plain_steady']:.2f}x)"
              f"   clipline2/clipline1 {fig['clipline2/clipline1']:.2f}x "
              f"(steady {fig['clipline2/clipline1_steady']:.2f}x)", flush=True)
        rounds.append({k: round(v, 2) for k, v in fig.items()})
    ray.shutdown()

    timed = rounds[1:]
    med = {k: round(statistics.median(rd[k] for rd in timed), 2) for k in rounds[0]}
    agree = worst < TOLERANCE
    print(f"\nmedian of {args.rounds} timed rounds, rows/s end to end (steady, once the model or actors are up):")
    for way in ways:
        print(f"  {way:<10} {med[way]:7.1f}  ({med[f'{way}_steady']:7.1f})")
    for ratio in ("clipline1/plain", "clipline2/clipline1"):
        print(f"  {ratio:<19} {med[ratio]:.2f}x  ({med[f'{ratio}_steady']:.2f}x)")
    print(f"scores agree: max |plain - clipline| = {worst:.2e} ({'<' if agree else 'NOT <'} {TOLERANCE:g})")
    result = {"rows": n, "batch_size": b, "arch": args.arch, "image_px": SIZE, "torch_threads": 1,
              "ray": "address=local, num_cpus=2", "input_blocks": BLOCKS, "rounds": args.rounds,
              "warmup": rounds[0], "timed": timed, "median": med, "max_abs_diff": worst, "scores_agree": agree}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
