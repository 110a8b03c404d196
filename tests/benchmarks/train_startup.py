"""The train stage's fixed start-up on CPU workers: decoding in a thread of each training worker (clipline's
default, `data_tasks: null`, which is 0 for CPU workers) and one Ray Data decode task at a time per worker
(`data_tasks: 1`) against the anchor, as many as Ray Data schedules (`data_tasks: 64`), side by side in one
process, in turn (the order reversed every other round), `--rounds` times.

The job is `train_vs_open_clip`'s (clip-tiny, the same curated demo shards written once, a local Ray of 2 CPUs
started and stopped by the runner for each run) with `--workers` workers of `cpus_per_worker: 0.5` and a short
run (`--steps`), where the start-up is most of the stage. Figures per run: the stage's seconds (the manifest's),
the mean and the largest `train/data_wait_fraction` of the steps after the first (a decode task that cannot keep
up shows there, step by step), and the median `train/samples_per_s` of those steps.

    .venv/bin/python -m tests.benchmarks.train_startup [--workers W] [--steps S] [--rows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
from typing import Any

from tests.benchmarks.train_vs_open_clip import into, job, make_data

WAYS = {"as many Ray Data tasks as it schedules (anchor)": 64, "one Ray Data task at a time": 1,
        "a thread of the worker (clipline)": None}


def run(store: str, args: argparse.Namespace, tasks: int | None) -> dict[str, float]:
    from mlflow import MlflowClient

    from pipelines import spec, storage
    from pipelines.runner import run_job

    raw = job(store, args, "local", workers=args.workers)
    raw["stages"]["train"]["with"].update(cpus_per_worker=0.5, data_tasks=tasks)
    outcomes = run_job(spec.resolve(raw, "bench"), progress=False)
    (m,) = [o.manifest for o in outcomes if o.stage == "train"]
    storage.remove_tree(m.location)
    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])

    def after_first(key: str) -> list[float]:
        return [x.value for x in client.get_metric_history(m.mlflow_run_id, key) if x.step > 1]

    wait = after_first("train/data_wait_fraction")
    return {"seconds": m.metrics["seconds"], "wait_mean": statistics.mean(wait), "wait_max": max(wait),
            "samples_per_s": statistics.median(after_first("train/samples_per_s"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import tests.support.sources  # noqa: F401  (registers the demo_curated source stage)

    logging.disable(logging.WARNING)
    os.makedirs("bench-out", exist_ok=True)
    log = open("bench-out/train_startup.log", "w")  # open to the end: Ray's handlers may hold it
    store = tempfile.mkdtemp(prefix="clipline-bench-startup-")
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
    try:
        with into(log):
            make_data(store, args)
        print(f"clip-tiny, {args.workers} workers of 0.5 CPU, batch {args.batch_size}, {args.steps} steps on "
              f"{args.rows} rows; Ray's output in {log.name}", flush=True)
        for r in range(args.rounds):
            for way in list(WAYS) if r % 2 == 0 else list(WAYS)[::-1]:
                with into(log):
                    res = run(store, args, WAYS[way])
                runs[way].append(res)
                print(f"round {r} {way:<48} stage {res['seconds']:5.1f}s  data wait mean {res['wait_mean']:.3f} "
                      f"max {res['wait_max']:.3f}  {res['samples_per_s']:5.0f} samples/s", flush=True)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    med = {w: {k: statistics.median(r[k] for r in v) for k in v[0]} for w, v in runs.items()}
    anchor = med[next(iter(WAYS))]
    print(f"\nmedian of {args.rounds} rounds:")
    for w, m in med.items():
        print(f"  {w:<48} stage {m['seconds']:5.1f}s ({m['seconds'] / anchor['seconds']:.2f}x the anchor's)  "
              f"data wait mean {m['wait_mean']:.3f} max {m['wait_max']:.3f}  {m['samples_per_s']:5.0f} samples/s")


if __name__ == "__main__":
    main()
