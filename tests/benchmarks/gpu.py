"""The GPU path: clipline's training step, its train stage fed by Ray Data, and its inference, on every GPU here.

One command on a GPU machine, sized to end within 10 minutes there (not yet run on one). The model is ViT-B-32
(open_clip's architecture) with random weights: `pipelines.models.create` builds every model with
`pretrained=None`, so nothing is downloaded.

    .venv/bin/python -m tests.benchmarks.gpu [--arch A] [--batch-size B] [--steps S] [--warmup W] [--peak-flops F]
        [--parts model,data,inference] [--out PATH]
    .venv/bin/python -m tests.benchmarks.gpu --smoke     # CPU check that it runs: clip-tiny, gloo, 2 ranks

Without a GPU and without `--smoke` it prints "no GPU: skipped, run with --smoke for the CPU check" and exits 0
(so `make bench` passes on a CPU machine). The smoke figures only show that the code runs; they measure nothing.

1. model: model-bound training throughput of clipline's own step, with data already on the device. Each
   rank (torch.multiprocessing spawn, torch.distributed over 127.0.0.1: nccl on GPU, gloo on CPU) builds the
   model with `pipelines.models.create`, counts its FLOPs with `loop.flops_per_sample`, wraps it with
   `parallel.wrap` (from a TrainConfig built with `configschema.build`), and trains with `engine.make_loss`,
   `engine.optimizer`, `engine.scheduler` and `engine.step` under bf16 autocast (the stage's `precision:
   auto`: bf16 on GPU, fp32 on CPU), on random images at the model's size (224 px for ViT-B-32) and random token ids made on the device before
   the clock starts. Configs: 1 rank, then DDP and FSDP2 over all N GPUs (N >= 2; `parallel.wrap` gives a
   single rank the bare model, so at N = 1 there is only the first). Each step is timed on every rank
   (the step ends with the loss read back, which waits for the GPU); the first `--warmup` steps are left
   out. Figures: step samples/s = per-rank batch / the slowest rank's median step time; global samples/s =
   that x ranks; MFU = flops_per_sample x global samples/s / (peak x ranks), peak
   from `--peak-flops` or else `loop.peak_flops` (the bf16 table PEAK_BF16: H100 and H200 are known; on CPU
   there is none and MFU is null); peak memory = the largest `torch.cuda.max_memory_allocated` of the ranks.
2. data: data-fed training, the train stage end to end through `pipelines.runner.run_job` (a local Ray over
   the whole machine; the test-only `demo_curated` source stage writes demo-web JPEGs at `--image-px` as
   curated shards first), `use_gpu: true`, one worker per GPU, the same per-worker batch. Read back from the
   stage's MLflow run: steady = the median of `train/samples_per_s` (global) after the warm-up steps; data
   wait = the mean and the largest `train/data_wait_fraction` over those steps (how much of a step the GPU
   waited for Ray Data to decode and augment); MFU = the median `train/mfu`. Compare steady with part 1's
   figure at the same number of ranks: the gap is what the data path (and Ray Train) costs.
3. inference: images/s over demo-web JPEGs at `--image-px`, decode and preprocessing included (the stages
   embed and score encoded images). embed: `pipelines.evaluation.embed.Embedder` in this process on GPU 0
   (what one actor of the evaluate stage does; it runs the model as created, fp32, where the scorer uses bf16
   autocast), and `EmbedPool` with one actor per GPU on a local Ray (its
   `embed` call timed once the actors are up). clip score: the curate stage's `ClipScorer` in this process on
   GPU 0, and as the curate stage runs it: Ray Data `map_batches` over an actor pool of one actor per GPU,
   from the first batch an actor started to the last one ended (the rate with the pass's start, the actors'
   start included, is in the JSON too). Parts 2 and 3 share one local Ray instance. Model only: the scorer's
   forward passes (bf16 autocast, as `ClipScorer` runs them) on preprocessed batches already on the device,
   which shows how much of the figures above is the model and how much decoding. Each in-process figure is
   timed after one warm-up batch.

The table is printed; the JSON results go to `--out` (default: a file in a new temporary folder); Ray's output
goes beside it in a `.log` file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
from pipelines.offline import keep_local  # noqa: E402  (before ray or mlflow are imported)

keep_local(ray_head=True)

from pipelines.stages.curate.scorer import ClipScorer  # noqa: E402

SKIP_MESSAGE = "no GPU: skipped, run with --smoke for the CPU check"
PARTS = ("model", "data", "inference")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. model-bound training --------------------------------------------------------------------------------


def train_config(o: dict[str, Any], world: int, strategy: str) -> Any:
    from pipelines.configschema import build
    from pipelines.stages.train.config import TrainConfig

    return build(TrainConfig, {"model": {"arch": o["arch"], "seed": 0}, "workers": world, "use_gpu": o["cuda"],
                               "strategy": strategy, "batch_size": o["batch_size"],
                               "steps": o["warmup"] + o["steps"], "peak_flops": o["peak_flops"],
                               "compile": o["compile"], "system_metrics": False})


def train_config_run(rank: int, world: int, strategy: str, device: Any, o: dict[str, Any]) -> dict[str, Any]:
    """One config on this rank: build as the stage does, then `warmup + steps` timed steps of engine.step."""
    import torch

    from pipelines.models import create
    from pipelines.stages.train import engine, loop, parallel

    cfg = train_config(o, world, strategy)
    model, _, _ = create(cfg.model, device=str(device), output_dict=True)
    model.train()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")  # as loop.build
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    ctx, vocab = model.context_length, model.vocab_size
    fps = loop.flops_per_sample(model, cfg.loss, size, ctx, device, autocast)
    model = parallel.wrap(model, cfg, world, device)
    opt = engine.optimizer(engine.unwrap(model), cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    sched = engine.scheduler(opt, cfg.warmup, cfg.steps)
    loss_fn = engine.make_loss(cfg.loss, rank, world)
    g = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own batches, as data parallelism
    b = cfg.batch_size
    batches = [(torch.randn(b, 3, size, size, device=device, generator=g),
                torch.randint(0, vocab, (b, ctx), device=device, generator=g))
               for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for s in range(cfg.steps):
        t = time.perf_counter()
        losses.append(engine.step(model, loss_fn, opt, [batches[s % 2]], autocast, cfg.grad_clip))  # reads the loss
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    peak = loop.peak_flops(cfg, device, bf16)
    del model, opt, sched, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"median_step_s": statistics.median(times[o["warmup"]:]), "peak_memory_bytes": mem,
            "flops_per_sample": fps, "peak_flops": peak, "bf16": bf16, "loss_first": losses[0], "loss_last": losses[-1]}


def rank_main(rank: int, world: int, port: int, o: dict[str, Any], out_path: str) -> None:
    """A spawned rank: every config in turn (the 1-rank config on rank 0 while the others wait)."""
    import torch
    import torch.distributed as dist

    logging.disable(logging.WARNING)  # "random weights" on every model: known
    # open_clip's ClipLoss gathers with torch.distributed.nn.all_gather, which torch marks deprecated
    warnings.filterwarnings("ignore", category=FutureWarning, module="open_clip")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if o["cuda"]:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(o["threads"])
        device = torch.device("cpu")
    dist.init_process_group("nccl" if o["cuda"] else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if o["cuda"] else {}))
    results = []
    try:
        for name, w, strategy in o["configs"]:
            mine = train_config_run(rank, w, strategy, device, o) if rank < w else None
            got: list[Any] = [None] * world
            dist.all_gather_object(got, mine)  # also the barrier that keeps idle ranks out of the way
            if rank == 0:
                runs = [r for r in got if r is not None]
                slowest = max(r["median_step_s"] for r in runs)
                b, first = o["batch_size"], runs[0]
                glob = b * w / slowest
                peak = first["peak_flops"]
                mems = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None]
                results.append({
                    "config": name, "ranks": w, "strategy": strategy, "batch_per_rank": b,
                    "median_step_s": slowest, "step_samples_per_s": b / slowest,
                    "global_samples_per_s": glob, "flops_per_sample": first["flops_per_sample"],
                    "peak_flops": peak, "mfu": first["flops_per_sample"] * glob / (peak * w) if peak else None,
                    "peak_memory_bytes": max(mems) if mems else None, "bf16": first["bf16"],
                    "loss_first": first["loss_first"], "loss_last": first["loss_last"]})
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def run_model(o: dict[str, Any], world: int, tmp: str) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    configs = [("1 rank", 1, "ddp")]
    if world >= 2:
        configs += [(f"DDP x{world}", world, "ddp"), (f"FSDP2 x{world}", world, "fsdp")]
    out_path = os.path.join(tmp, "model.json")
    mp.spawn(rank_main, args=(world, free_port(), {**o, "configs": configs}, out_path), nprocs=world, join=True)
    with open(out_path) as f:
        return json.load(f)


# --- 2. data-fed training through the train stage -----------------------------------------------------------


def run_data(o: dict[str, Any], workers: int, store: str, log: Any) -> dict[str, Any]:
    from mlflow import MlflowClient

    import tests.support.sources  # noqa: F401  (registers the demo_curated source stage)
    from pipelines import spec
    from pipelines.runner import run_job

    steps = o["warmup"] + o["steps"]
    ray_cfg: dict[str, Any] = {"address": "local", **({"num_cpus": o["ray_cpus"]} if o["ray_cpus"] else {})}
    raw = {"name": "bench-gpu", "storage": store, "tracking": {"uri": f"sqlite:///{store}/mlflow.db"}, "ray": ray_cfg,
           "stages": {
               "data": {"uses": "demo_curated", "with": {"rows": o["rows"], "size": o["image_px"]}},
               "train": {"uses": "train", "needs": ["data"], "with": {
                   "model": {"arch": o["arch"], "seed": 0}, "workers": workers, "use_gpu": o["cuda"],
                   "cpus_per_worker": o["cpus_per_worker"], "batch_size": o["batch_size"], "steps": steps,
                   "checkpoint_every": steps, "system_metrics": False, "peak_flops": o["peak_flops"],
                   "register": {"enabled": False}}}}}
    t0 = time.perf_counter()
    with into(log):
        outcomes = run_job(spec.resolve(raw, "bench-gpu"), progress=False)
    seconds = time.perf_counter() - t0
    (m,) = [x.manifest for x in outcomes if x.stage == "train"]
    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])

    def after_warmup(key: str) -> list[float]:
        return [x.value for x in client.get_metric_history(m.mlflow_run_id, key) if x.step > o["warmup"]]

    rate, wait, mfu = (after_warmup(k) for k in ("train/samples_per_s", "train/data_wait_fraction", "train/mfu"))
    return {"workers": workers, "use_gpu": o["cuda"], "batch_per_worker": o["batch_size"], "steps": steps,
            "rows": o["rows"], "image_px": o["image_px"], "steady_samples_per_s": statistics.median(rate),
            "data_wait_mean": statistics.mean(wait), "data_wait_max": max(wait),
            "mfu": statistics.median(mfu) if mfu else None, "run_job_seconds": seconds}


# --- 3. inference -------------------------------------------------------------------------------------------


def images(n: int, px: int) -> tuple[list[bytes], list[str]]:
    """n demo-web JPEGs (the crawl re-encodes every image as JPEG) and their captions."""
    import io

    from pipelines.demo import web

    data, caps = [], []
    for i in range(n):
        s = web.sample(0, i)
        buf = io.BytesIO()
        web.render(s, px).save(buf, format="JPEG", quality=90)
        data.append(buf.getvalue())
        caps.append(s.caption)
    return data, caps


def timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def in_process(ref: Any, data: list[bytes], caps: list[str], b: int, threads: int) -> dict[str, float]:
    """The embedder and the scorer in this process (on GPU 0 when there is one), and the scorer's model alone."""
    import torch

    from pipelines.evaluation.embed import Embedder
    from pipelines.stages.curate.scorer import ClipScorer, decode

    n, out = len(data), {}
    emb = Embedder(ref, threads=threads)  # cuda:0 when there is a GPU

    def embed_all() -> None:
        for i in range(0, n, b):
            emb.embed("image", data[i:i + b])

    emb.embed("image", data[:b])  # warm-up
    out["embed_in_process_images_per_s"] = n / timed(embed_all)

    scorer = ClipScorer(ref, batch_size=b, threads=threads)
    scorer.scores(data[:b], caps[:b])  # warm-up
    out["clip_score_in_process_images_per_s"] = n / timed(scorer.scores, data, caps)

    # model only: the scorer's forward passes on batches preprocessed and moved to the device beforehand
    dev = scorer.device
    pixels = decode(scorer.preprocess, data[:b])[0].to(dev)
    tokens = scorer.tokenizer(caps[:b]).to(dev)
    reps = max(1, n // b)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            for _ in range(reps):
                img = scorer.model.encode_image(pixels, normalize=True)
                txt = scorer.model.encode_text(tokens, normalize=True)
                (img.float() * txt.float()).sum(-1).cpu()

    forward()  # warm-up
    out["clip_score_model_only_images_per_s"] = reps * b / timed(forward)
    return out


class Stamped(ClipScorer):
    """The curate stage's ClipScorer unchanged, noting when its first batch started and its latest one ended, so
    the pool's rate once its actors are up is reported beside the one that includes starting them."""

    def __init__(self, *args: Any, stamps: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path, self.first = os.path.join(stamps, f"{os.getpid()}.json"), None

    def __call__(self, batch: Any) -> Any:
        self.first = self.first or time.time()
        out = super().__call__(batch)
        with open(self.path, "w") as f:
            json.dump([self.first, time.time()], f)
        return out


def run_inference(o: dict[str, Any], actors: int, tmp: str) -> dict[str, Any]:
    """Part 3, on the Ray instance already started."""
    import numpy as np
    import pandas as pd
    import ray.data
    import torch

    from pipelines.evaluation.embed import EmbedPool
    from pipelines.models import ModelRef

    ref, b, threads = ModelRef(arch=o["arch"], seed=0), o["infer_batch"], o["infer_threads"]
    data, caps = images(o["infer_images"], o["image_px"])
    n = len(data)
    out: dict[str, Any] = {"images": n, "image_px": o["image_px"], "batch_size": b, "actors": actors,
                           "threads_per_process": threads, **in_process(ref, data, caps, b, threads)}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the actors below share GPU 0 with this process

    gpus = 1.0 if o["cuda"] else 0.0
    with EmbedPool(ref, actors=actors, num_cpus=threads, num_gpus=gpus) as pool:
        pool.embed(data[:b * actors], [], b)  # warm-up: the actors are up and each has run a batch
        out["embed_pool_images_per_s"] = n / timed(pool.embed, data, [], b)
    step = -(-n // (4 * actors))  # several blocks, already in the object store before the clock starts
    table = pd.DataFrame({"image": data, "caption": caps, "clip_score": np.float32(np.nan)})
    ds = ray.data.from_pandas([table.iloc[i:i + step] for i in range(0, n, step)]).materialize()
    stamps = tempfile.mkdtemp(prefix="stamps-", dir=tmp)

    def score() -> None:  # as the curate stage's model_pass, with the scorer noting its times
        ds.map_batches(Stamped, batch_size=b, batch_format="pandas",
                       compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads, num_gpus=gpus,
                       fn_constructor_kwargs={"model": ref, "batch_size": b, "threads": threads,
                                              "stamps": stamps}).materialize()

    out["clip_score_pool_images_per_s"] = n / timed(score)
    spans = [json.load(open(os.path.join(stamps, f))) for f in os.listdir(stamps)]
    out["clip_score_pool_steady_images_per_s"] = n / (max(e for _, e in spans) - min(b0 for b0, _ in spans))
    return out


@contextlib.contextmanager
def local_ray(o: dict[str, Any], log: Any) -> Any:
    """One local Ray for parts 2 and 3 (run_job uses a Ray it finds connected, and leaves it up)."""
    import ray

    with into(log):
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 **({"num_cpus": o["ray_cpus"]} if o["ray_cpus"] else {}))
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data logs each dataset's plan
    try:
        yield
    finally:
        with into(log):
            ray.shutdown()


# --- the run ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def into(log: Any):
    """What Ray, its workers and MLflow print during a run, to the log file."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield
    log.flush()


def options(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    smoke = args.smoke

    def pick(small: Any, full: Any, given: Any) -> Any:  # the flag if given, else the mode's default
        return given if given is not None else (small if smoke else full)

    cpus = os.cpu_count() or 1
    return {"cuda": cuda, "arch": args.arch or ("clip-tiny" if smoke else "ViT-B-32"),
            "batch_size": pick(8, 256, args.batch_size), "steps": pick(3, 30, args.steps),
            "warmup": pick(2, 10, args.warmup), "peak_flops": args.peak_flops, "compile": args.compile,
            "threads": 1, "image_px": 64 if smoke else args.image_px, "rows": pick(64, 4096, args.rows),
            "cpus_per_worker": 1 if smoke else 2, "ray_cpus": 2 if smoke else None,
            "infer_images": pick(64, 4096, args.infer_images), "infer_batch": pick(16, 256, args.infer_batch),
            "infer_threads": 1 if smoke else max(1, cpus // max(1, args.gpus_for_threads))}


def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def show(result: dict[str, Any]) -> None:
    print(f"\n{result['mode']} on {result['device']} ({result['ranks']} rank{'s' if result['ranks'] > 1 else ''} in part 1), {result['arch']}, "
          f"batch {result['options']['batch_size']} per rank:")
    if "model" in result:
        print("1. model-bound training (synthetic batches on the device; clipline's engine.step)")
        print(f"  {'config':<12} {'step/s':>8} {'samples/s/rank':>15} {'global/s':>10} {'MFU':>7} {'peak mem':>9}")
        for r in result["model"]:
            mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**30
            print(f"  {r['config']:<12} {1 / r['median_step_s']:8.2f} {r['step_samples_per_s']:15.1f} "
                  f"{r['global_samples_per_s']:10.1f} {fmt(r['mfu'], '7.1%'):>7} {'-' if mem is None else f'{mem:.2f}G':>9}")
    if "data" in result:
        d = result["data"]
        print(f"2. data-fed training (the train stage via run_job, {d['workers']} worker(s), "
              f"{d['image_px']} px JPEGs)")
        print(f"  steady {d['steady_samples_per_s']:.1f} samples/s global   data wait mean "
              f"{d['data_wait_mean']:.2f} max {d['data_wait_max']:.2f}   MFU {fmt(d['mfu'], '.1%')}   "
              f"run_job {d['run_job_seconds']:.0f}s")
    if "inference" in result:
        i = result["inference"]
        print(f"3. inference, images/s ({i['images']} JPEGs at {i['image_px']} px, batch {i['batch_size']}, "
              f"decode included unless model only)")
        print(f"  embed      in process {i['embed_in_process_images_per_s']:8.1f}   pool x{i['actors']} "
              f"{i['embed_pool_images_per_s']:8.1f}")
        print(f"  clip score in process {i['clip_score_in_process_images_per_s']:8.1f}   pool x{i['actors']} "
              f"{i['clip_score_pool_steady_images_per_s']:8.1f} (with its start "
              f"{i['clip_score_pool_images_per_s']:.1f})   model only {i['clip_score_model_only_images_per_s']:8.1f}")
    print(f"took {result['minutes']:.1f} min; results in {result['out']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU check: clip-tiny, a few steps, gloo, 2 ranks, 1 data worker")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--ranks", type=int, default=None,
                        help="ranks for part 1 (default: every GPU; 2 in smoke mode)")
    parser.add_argument("--arch", default=None, help="open_clip architecture, random weights (ViT-B-32; smoke clip-tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per rank per step (256; smoke 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (30; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the figures (10; smoke 2)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s of one device for MFU (default: clipline's bf16 table; none on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the stage's compile)")
    parser.add_argument("--image-px", type=int, default=256, help="side of the JPEGs of parts 2 and 3")
    parser.add_argument("--rows", type=int, default=None, help="curated rows for part 2 (4096; smoke 64)")
    parser.add_argument("--infer-images", type=int, default=None, help="images for part 3 (4096; smoke 64)")
    parser.add_argument("--infer-batch", type=int, default=None, help="batch of part 3 (256; smoke 16)")
    parser.add_argument("--out", default=None, help="JSON results (default: in a new temporary folder)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")

    import torch

    gpus = torch.cuda.device_count()
    if not args.smoke and gpus == 0:
        print(SKIP_MESSAGE)
        return 0
    cuda = gpus > 0 and not args.smoke
    ranks = args.ranks or (2 if args.smoke else gpus)
    args.gpus_for_threads = max(1, gpus)
    o = options(args, cuda)
    if not 0 < o["warmup"] or o["steps"] < 1:
        parser.error("--warmup must be at least 1 and --steps at least 1")
    logging.disable(logging.WARNING)  # "random weights" and Ray's start-up notes; errors still show
    tmp = tempfile.mkdtemp(prefix="clipline-bench-gpu-")
    out = args.out or os.path.join(tmp, "gpu.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    log_path = os.path.splitext(out)[0] + ".log"
    log = open(log_path, "w")  # open to the end: Ray's handlers may hold it
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    result: dict[str, Any] = {"mode": "smoke (CPU check, not a measurement)" if args.smoke else "gpu",
                              "device": device, "gpus": gpus if cuda else 0, "ranks": ranks, "arch": o["arch"],
                              "parts": parts, "options": o, "out": out, "log": log_path}
    print(f"{result['mode']}: {device}, {ranks} ranks for part 1, {o['arch']} (random weights), parts "
          f"{', '.join(parts)}; Ray's output in {log_path}", flush=True)
    t0 = time.perf_counter()
    try:
        if "model" in parts:
            result["model"] = run_model(o, ranks, tmp)
            print(f"part 1 done after {time.perf_counter() - t0:.0f}s", flush=True)
        with local_ray(o, log) if {"data", "inference"} & set(parts) else contextlib.nullcontext():
            if "data" in parts:
                result["data"] = run_data(o, gpus if cuda else 1, os.path.join(tmp, "store"), log)
                print(f"part 2 done after {time.perf_counter() - t0:.0f}s", flush=True)
            if "inference" in parts:
                result["inference"] = run_inference(o, gpus if cuda else 1, tmp)
                print(f"part 3 done after {time.perf_counter() - t0:.0f}s", flush=True)
    except BaseException:
        print(f"failed; Ray's output is in {log_path}", file=sys.stderr)
        raise
    result["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    for r in result.get("model", []):  # JSON has no NaN: a figure that is not finite is a failure to see
        assert math.isfinite(r["global_samples_per_s"]), r
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
