"""Training throughput: a plain open_clip loop against clipline's train stage, and the stage on 2 workers.

All runs train the same tiny model (clip-tiny, seed 0) on the same curated Parquet shards (demo-web samples
written once by the test-only `demo_curated` source stage) with the same per-worker batch, the stage's
default AdamW hyper-parameters, the stage's own preprocessing function
(`pipelines.stages.train.data.preprocess`, training augmentation on) and one torch thread per trainer:

1. anchor: the loop anyone would write first, in this process: `pipelines.models.create(..., output_dict=True)`,
   open_clip's `ClipLoss()`, `torch.optim.AdamW`, the shards read in order with pyarrow and each batch
   decoded and transformed inside the loop, then forward, loss, backward, step. Each step is timed from
   reading its batch to the end of `opt.step()`; end to end runs from model creation to the last step.
2. clipline: the train stage with `workers: 1`, run by `pipelines.runner.run_job` (`ray.address: local`,
   `num_cpus: 2`: the runner starts Ray and stops it after each run). Steady = the median of the MLflow
   history of `train/samples_per_s` over the steps after `--skip`; data wait = the mean of
   `train/data_wait_fraction` over the same steps, and its largest value there (step by step: a stall at an
   epoch boundary shows as a step waiting on its data); end to end = steps x batch / the manifest's stage
   `seconds` (Ray Train and Ray Data start-up, the worker's model creation and publishing the model
   included; starting Ray itself not). The stage times a step from the end of the previous one (its
   MLflow write included) to its metrics; "wall" is the same steady steps over their wall time from the
   MLflow metric timestamps (ms), which includes any stall between epochs (the stage streams every epoch
   as one Ray Data pass, so there should be none). The anchor gets both figures too: the median of its per-step
   rates, and its steady steps over their wall time. Only the final checkpoint is written
   (`checkpoint_every` = steps), as the anchor writes none. Anchor and clipline alternate, `--rounds`
   times, so drift on the machine hits both; the medians over the rounds are printed, and the ratio
   clipline / anchor (the issue's target is >= 0.9x steady; it is printed, not asserted).
3. scaling: a 2-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, 2 logical CPUs per node).
   Ray rewrites a 127.0.0.1 cluster address to the node's own IP when a driver joins, so the nodes use that
   address, which the kernel routes over the loopback device. The stage joins through the job's
   `ray.address` with `cpus_per_worker: 1`, once with `workers: 1` and once with `workers: 2` (the same
   per-worker batch, so twice the global batch; `--scaling-rounds` rounds, the order flipped each round, as
   a fresh cluster's first job also starts its worker processes). Printed: the global
   samples/s of both and the ratio. Both nodes share the machine's 2 physical cores: 2 workers compete for
   them with each other and with Ray Data's decode tasks, so this shows the cost and overlap of data
   parallelism, not what 2 real nodes would give.

Ray's and the workers' output goes to `<out>.log` beside the JSON results, so the table stays readable.

    .venv/bin/python -m tests.benchmarks.train_vs_open_clip [--rows N] [--batch-size B] [--steps S]
        [--skip K] [--rounds R] [--scaling-rounds R] [--no-scaling]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

ARCH, TARGET = "clip-tiny", 0.9


def job(store: str, args: argparse.Namespace, address: str, workers: int = 1) -> dict[str, Any]:
    """The job spec: `demo_curated` -> `train`, tracked in a sqlite file under the temporary storage."""
    ray_cfg: dict[str, Any] = {"address": address, **({"num_cpus": 2} if address == "local" else {})}
    return {"name": "bench", "storage": store, "tracking": {"uri": f"sqlite:///{store}/mlflow.db"}, "ray": ray_cfg,
            "stages": {
                "data": {"uses": "demo_curated", "with": {"rows": args.rows}},
                "train": {"uses": "train", "needs": ["data"], "with": {
                    "model": {"arch": ARCH, "seed": 0}, "workers": workers, "cpus_per_worker": 1,
                    "batch_size": args.batch_size, "steps": args.steps, "augment": True,
                    "checkpoint_every": args.steps, "system_metrics": False, "register": {"enabled": False}}}}}


def make_data(store: str, args: argparse.Namespace) -> list[str]:
    """Write the curated shards (the runner starts and stops a local Ray for it); the anchor reads these files."""
    from pipelines import spec
    from pipelines.runner import Selection, run_job

    outcomes = run_job(spec.resolve(job(store, args, "local"), "bench"), Selection(only=["data"]), progress=False)
    (m,) = [o.manifest for o in outcomes if o.stage == "data"]
    return m.shard_urls()


def steady(rates: dict[int, float], ends: dict[int, float], skip: int, batch: int) -> dict[str, float]:
    """Figures of the steps after `skip`: the median per-step rate, samples over wall time, the longest step.

    `ends[s]` is when step s ended, in seconds (`ends[0]`, if there, when the loop started)."""
    last = max(rates)
    gaps = [ends[s] - ends[s - 1] for s in range(skip + 1, last + 1)]
    return {"steady": statistics.median(v for s, v in rates.items() if s > skip),
            "steady_wall": (last - skip) * batch / (ends[last] - ends[skip]), "longest_step": max(gaps)}


def run_anchor(urls: list[str], args: argparse.Namespace) -> dict[str, float]:
    """A plain single-process open_clip loop over the same shards, decoding each batch inside the loop."""
    import pyarrow.parquet as pq
    import torch
    from open_clip.loss import ClipLoss

    from pipelines.models import ModelRef, create
    from pipelines.stages.train.config import TrainConfig
    from pipelines.stages.train.data import preprocess

    b, hp = args.batch_size, TrainConfig()
    # the stage's preprocess has taken an augmentation seed in some versions; give the stage's default
    extra = {"seed": hp.seed} if "seed" in inspect.signature(preprocess).parameters else {}

    def batches():  # the shards in order, over and over; a partial batch at the end of a pass is dropped
        while True:
            left: dict[str, list] = {"uid": [], "image": [], "caption": []}
            for url in urls:
                table = pq.read_table(url, columns=list(left))
                for k in left:
                    left[k] += table.column(k).to_pylist()
                while len(left["uid"]) >= b:
                    yield {k: np.array(v[:b], dtype=object) for k, v in left.items()}
                    left = {k: v[b:] for k, v in left.items()}

    t0 = time.perf_counter()
    model, _, _ = create(ModelRef(arch=ARCH, seed=0), output_dict=True)
    model.train()
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=(hp.beta1, hp.beta2),
                            eps=hp.eps)
    source = batches()
    rates, ends, loss = {}, {0: time.perf_counter()}, float("nan")
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        x = preprocess(next(source), ARCH, True, **extra)
        out = model(image=torch.from_numpy(x["image"]), text=torch.from_numpy(x["text"]))
        value = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        loss = float(value.detach())
        ends[step] = time.perf_counter()
        rates[step] = b / (ends[step] - t)
    seconds = time.perf_counter() - t0
    return {**steady(rates, ends, args.skip, b), "e2e": args.steps * b / seconds, "seconds": seconds,
            "final_loss": loss, "data_wait": float("nan"), "max_data_wait": float("nan")}


def run_clipline(store: str, args: argparse.Namespace, address: str, workers: int) -> dict[str, float]:
    """The whole job through run_job: the curated data is a cache hit, the train stage runs.

    Its output is removed afterwards, so the next run trains afresh instead of hitting the cache."""
    from mlflow import MlflowClient

    from pipelines import spec, storage
    from pipelines.runner import run_job

    raw = job(store, args, address, workers)
    t0 = time.perf_counter()
    outcomes = run_job(spec.resolve(raw, "bench"), progress=False)
    total = time.perf_counter() - t0
    (m,) = [o.manifest for o in outcomes if o.stage == "train"]
    assert m.counts["steps"] == args.steps, m.counts
    storage.remove_tree(m.location)
    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])

    def history(key: str) -> dict[int, Any]:
        return {x.step: x for x in client.get_metric_history(m.mlflow_run_id, key)}

    rate, wait = history("train/samples_per_s"), history("train/data_wait_fraction")
    assert sorted(rate) == list(range(1, args.steps + 1)), sorted(rate)
    global_batch = args.batch_size * workers
    figures = steady({s: x.value for s, x in rate.items()}, {s: x.timestamp / 1000 for s, x in rate.items()},
                     args.skip, global_batch)
    return {**figures, "e2e": args.steps * global_batch / m.metrics["seconds"], "seconds": m.metrics["seconds"],
            "run_job_seconds": total, "final_loss": m.metrics["final_loss"],
            "data_wait": statistics.mean(x.value for s, x in wait.items() if s > args.skip),
            "max_data_wait": max(x.value for s, x in wait.items() if s > args.skip)}


@contextlib.contextmanager
def into(log: Any):
    """Send what Ray, its workers and MLflow print during a run to the log file."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield
    log.flush()


def show(tag: str, way: str, r: dict[str, float]) -> None:
    wait = "" if np.isnan(r["data_wait"]) else f"  data wait {r['data_wait']:.2f} (max {r['max_data_wait']:.2f})"
    print(f"{tag:<8} {way:<11} steady {r['steady']:6.1f}/s  wall {r['steady_wall']:6.1f}/s  longest step "
          f"{r['longest_step']:5.2f}s  end to end {r['e2e']:6.1f}/s ({r['seconds']:5.1f}s)  "
          f"loss {r['final_loss']:.3f}{wait}", flush=True)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def ratios(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    return {k: num[k] / den[k] for k in ("steady", "steady_wall", "e2e")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024,
                        help="curated rows (demo_curated); 1,024 at batch 64 is 16 steps an epoch, so the default "
                             "60 steps cross 3 epoch boundaries")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per worker per step")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the steady figures")
    parser.add_argument("--rounds", type=int, default=2, help="anchor / clipline alternations")
    parser.add_argument("--scaling-rounds", type=int, default=2,
                        help="1 / 2 worker rounds on the cluster (the order flips every round)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 2-node cluster part")
    parser.add_argument("--out", default="bench-out/train_vs_open_clip.json")
    args = parser.parse_args()
    if not 0 < args.skip < args.steps - 1:
        parser.error("--skip must be at least 1 and leave at least 2 steady steps")
    import ray
    import torch

    import tests.support.sources  # noqa: F401  (registers the demo_curated source stage)

    torch.set_num_threads(1)  # as the stage's worker: max(1, floor(cpus_per_worker=1)) threads
    logging.disable(logging.WARNING)  # "random weights" and Ray's start-up notes; errors still show
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    log_path = os.path.splitext(args.out)[0] + ".log"
    log = open(log_path, "w")  # open to the end: Ray's handlers may hold it
    store = tempfile.mkdtemp(prefix="clipline-bench-train-")
    b, t_all = args.batch_size, time.perf_counter()
    result: dict[str, Any] = {"arch": ARCH, "rows": args.rows, "batch_size": b, "steps": args.steps,
                              "skip": args.skip, "rounds": args.rounds, "torch_threads": 1}
    try:
        t0 = time.perf_counter()
        with into(log):
            urls = make_data(store, args)
        print(f"{args.rows} curated rows in {len(urls)} shards written in {time.perf_counter() - t0:.1f}s; model "
              f"{ARCH}, batch {b} per worker, {args.steps} steps, the first {args.skip} left out of the steady "
              f"figures, 1 torch thread per trainer; Ray's output in {log_path}", flush=True)
        print("samples/s:", flush=True)

        runs: dict[str, list[dict[str, float]]] = {"anchor": [], "clipline_1": []}
        for r in range(args.rounds):
            for way in runs:  # one after the other within a round, so drift hits both
                assert not ray.is_initialized(), "Ray is still up from the run before"
                with into(log):
                    res = run_anchor(urls, args) if way == "anchor" else run_clipline(store, args, "local", 1)
                runs[way].append(res)
                show(f"round {r}", way, res)
        med = {way: median_of(v) for way, v in runs.items()}
        result["anchor_vs_clipline"] = {"runs": runs, "median": med, "ratio": ratios(med["clipline_1"], med["anchor"])}

        if not args.no_scaling:
            from ray.cluster_utils import Cluster

            assert not ray.is_initialized(), "Ray is still up from the comparison"
            print("\nscaling on a 2-node Ray cluster on this machine (num_cpus=2 per node; the machine has 2 "
                  "physical cores, which the 2 workers share with each other and with the decode tasks):",
                  flush=True)
            t0 = time.perf_counter()
            node = {"num_cpus": 2, "object_store_memory": 512 * 1024**2}
            with into(log):
                cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
            try:
                with into(log):
                    cluster.add_node(**node)
                    cluster.wait_for_nodes()
                print(f"cluster of 2 nodes at {cluster.address} up in {time.perf_counter() - t0:.1f}s", flush=True)
                scale: dict[str, list[dict[str, float]]] = {"workers_1": [], "workers_2": []}
                for r in range(args.scaling_rounds):
                    # a fresh cluster's first job starts its worker processes: alternate who goes first
                    for way in (list(scale) if r % 2 == 0 else list(scale)[::-1]):
                        with into(log):
                            res = run_clipline(store, args, cluster.address, int(way[-1]))
                        scale[way].append(res)
                        show(f"round {r}", way, res)
            finally:
                with into(log):
                    ray.shutdown()  # the runner stays connected to a cluster it joined
                    cluster.shutdown()
            smed = {way: median_of(v) for way, v in scale.items()}
            result["scaling"] = {"runs": scale, "median": smed, "ratio": ratios(smed["workers_2"], smed["workers_1"])}
    except BaseException:
        print(f"failed; Ray's output is in {log_path}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(store, ignore_errors=True)
    minutes = (time.perf_counter() - t_all) / 60

    print(f"\nmedian of the rounds, samples/s (global): steady = median per-step rate after {args.skip} steps, "
          f"wall = those steps over their wall time, e2e = all steps over the run (for clipline: the stage's "
          f"seconds)")
    print(f"  {'':<24} {'steady':>8} {'wall':>8} {'e2e':>8} {'longest step':>13} {'data wait':>10} {'max':>6}")
    rows = [("anchor (plain loop)", med["anchor"]), ("clipline, 1 worker", med["clipline_1"])]
    if "scaling" in result:
        rows += [("cluster, 1 worker", smed["workers_1"]), ("cluster, 2 workers", smed["workers_2"])]
    for name, r in rows:
        wait = "" if np.isnan(r["data_wait"]) else f"{r['data_wait']:10.2f} {r['max_data_wait']:6.2f}"
        print(f"  {name:<24} {r['steady']:8.1f} {r['steady_wall']:8.1f} {r['e2e']:8.1f} {r['longest_step']:12.2f}s "
              f"{wait}")
    q = result["anchor_vs_clipline"]["ratio"]
    print(f"  {'clipline / anchor':<24} {q['steady']:7.2f}x {q['steady_wall']:7.2f}x {q['e2e']:7.2f}x   "
          f"issue target steady >= {TARGET}x: {'met' if q['steady'] >= TARGET else 'NOT met'}")
    if "scaling" in result:
        q = result["scaling"]["ratio"]
        print(f"  {'2 workers / 1 worker':<24} {q['steady']:7.2f}x {q['steady_wall']:7.2f}x {q['e2e']:7.2f}x   "
              f"2 workers on 2 shared physical cores")
    print(f"benchmark took {minutes:.1f} min")
    result["minutes"] = round(minutes, 2)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
