"""The per-worker training loop that Ray Train runs on every rank.

Every rank carries the stage run's tracking handle (`pipelines.tracking.WorkerTracker`, in the plan); only
rank 0's writes anything (Ray Train V2 has no MLflow callback).  The MLflow run id and the data position
(epoch, step within the epoch) live in every checkpoint, so a worker group restarted by `FailureConfig`,
or a re-run of the job, continues the same run.  Steps already logged before a failure are not logged again
when they are recomputed, so the run's metric history has no gap and no duplicate step.  The model's
parallel wrapping is in `parallel.py`, checkpoints in `checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from pipelines.console import train_reporter
from pipelines.evaluation.live import LiveEvaluator
from pipelines.prometheus import TRAIN_DATA_WAIT, TRAIN_LOSS, TRAIN_SAMPLES, TRAIN_STEPS
from pipelines.stages.train import checkpoint, data, engine, parallel
from pipelines.stages.train.config import TrainConfig
from pipelines.stages.train.validate import eval_steps
from pipelines.tracking import WorkerTracker

# dense bf16 peak FLOP/s of one accelerator, by device-name substring, most specific first (vendor datasheets)
PEAK_BF16 = [("GH200", 989.4e12), ("H200", 989.4e12), ("H100 PCIe", 756e12), ("H100", 989.4e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
             ("A10G", 70e12), ("A10", 125e12)]
METRIC = "train/loss"


@dataclass
class Plan:
    """What the driver decided before the workers start (all ranks get the same plan)."""

    arch: str
    steps_per_epoch: int
    planned_steps: int
    tracker: WorkerTracker  # the stage run's MLflow run and Prometheus labels; each rank takes its own (on_rank)
    stream: data.Stream  # the curated shards and the data seed: what each rank's rows are planned from
    rows_dir: str | None = None  # `log_rows`: where each rank writes the row ids of its steps


def peak_flops(cfg: TrainConfig, device: torch.device, bf16: bool) -> float | None:
    """The accelerator's peak for MFU: `peak_flops`, else the bf16 table when training in bf16 on a known GPU."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def flops_per_sample(model: torch.nn.Module, loss_kind: str, image_size: int, context_length: int,
                     device: torch.device, autocast: Any) -> float:
    """Model FLOPs of one training sample (forward + backward), counted once by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 2
    images = torch.randn(n, 3, image_size, image_size, device=device)
    texts = torch.randint(0, 1000, (n, context_length), device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast():
            out = engine._outputs(model, images, texts)
            loss = engine._loss(engine.make_loss(loss_kind, 0, 1), out, out)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


class StepLog:
    """What the loop records at each step, on every rank (the tracker does nothing off rank 0): MLflow metrics,
    batched and sent every `every` steps, skipping steps the run already has (a stretch recomputed after a
    restart); the Prometheus counters and gauges on every step, recomputed ones too (they measure work done)."""

    def __init__(self, tracker: WorkerTracker, every: int) -> None:
        self.tracker, self.every = tracker, every
        self.logged = tracker.last_step(METRIC)

    def step(self, step: int, metrics: dict[str, float], samples: int) -> None:
        if step > self.logged:
            self.tracker.log_metrics(metrics, step)
            self.logged = step
            if step % self.every == 0:
                self.flush()
        self.tracker.inc(TRAIN_STEPS)
        self.tracker.inc(TRAIN_SAMPLES, samples)
        self.tracker.set(TRAIN_LOSS, metrics["train/loss"])
        self.tracker.set(TRAIN_DATA_WAIT, metrics["train/data_wait_fraction"])

    def flush(self) -> None:
        self.tracker.flush()


class RowsLog:
    """`log_rows`: the global row ids each step of this rank trained, written at every checkpoint as one Parquet
    file of the steps since the last (`<rows_dir>/rank-RRR/steps-FIRST-LAST.parquet`).  Steps after the last
    checkpoint are recomputed after a restart and written then, so the files cover each step once."""

    def __init__(self, rows_dir: str | None, rank: int, step: int) -> None:
        self.dir = None if rows_dir is None else f"{rows_dir}/rank-{rank:03d}"
        self.first = step + 1
        self.steps: list[int] = []
        self.rows: list[int] = []

    def add(self, step: int, rows: list[torch.Tensor]) -> None:
        if self.dir is not None:
            ids = torch.cat(rows).tolist()
            self.steps.extend([step] * len(ids))
            self.rows.extend(ids)

    def write(self, step: int) -> None:
        if self.dir is None or not self.steps:
            return
        import pyarrow as pa

        from pipelines import storage

        table = pa.table({"step": pa.array(self.steps, pa.int64()), "row": pa.array(self.rows, pa.int64())})
        storage.write_parquet(storage.join(self.dir, f"steps-{self.first:08d}-{step:08d}.parquet"), table)
        self.first, self.steps, self.rows = step + 1, [], []


@dataclass
class Setup:
    """What `build` makes for one rank."""

    model: Any  # wrapped for the ranks (parallel.wrap)
    loss: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    flops_per_sample: float
    autocast: Callable[[], Any]
    bf16: bool


def build(cfg: TrainConfig, plan: Plan, device: torch.device) -> Setup:
    """The model wrapped for the ranks, its loss, optimizer and schedule, for this rank."""
    from pipelines.models import create

    rank, world = parallel.rank_and_world()
    kwargs: dict[str, Any] = {"output_dict": True}
    if cfg.loss == "siglip":  # SigLIP's initialisation (open_clip's --siglip)
        kwargs.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    ref = cfg.model
    model, _, _ = create(ref, device=str(device), **kwargs)
    model.train()
    if cfg.lock.image:
        model.lock_image_tower(unlocked_groups=cfg.lock.image_unlocked_groups)
    if cfg.lock.text:
        model.lock_text_tower(unlocked_layers=cfg.lock.text_unlocked_layers)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext)
    size = model.visual.image_size
    fps = flops_per_sample(model, cfg.loss, size[0] if isinstance(size, tuple) else size, model.context_length,
                           device, autocast)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = parallel.wrap(model, cfg, world, device)
    # after wrapping: FSDP replaces the parameters with sharded ones, which the optimizer must hold
    opt = engine.optimizer(engine.unwrap(model), cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    sched = engine.scheduler(opt, cfg.warmup, plan.planned_steps)
    return Setup(model, engine.make_loss(cfg.loss, rank, world), opt, sched, fps, autocast, bf16)


_END = object()


def primed(it: Iterator[Any]) -> Iterator[Any]:
    """`it`, its first item fetched from now on in a thread; the first `next` waits for that fetch (and raises
    what it raised)."""
    box: dict[str, Any] = {}

    def fetch() -> None:
        try:
            box["item"] = next(it, _END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
            box["error"] = exc

    thread = threading.Thread(target=fetch, name="clipline-first-batch", daemon=True)
    thread.start()

    def items() -> Iterator[Any]:
        thread.join()
        if "error" in box:
            raise box["error"]
        if box["item"] is _END:
            return
        yield box["item"]
        yield from it

    return items()


def data_tasks(cfg: TrainConfig) -> int | None:
    """Ray Data decode tasks at once for each rank: 0 decodes in the worker's own thread (a CPU worker's default),
    None as many as Ray Data schedules (a GPU worker's default)."""
    if cfg.data_tasks is not None:
        return cfg.data_tasks
    return None if cfg.use_gpu else 0


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    plan: Plan = config["plan"]
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    state: dict[str, Any] = {"step": 0, "epoch": 0, "step_in_epoch": 0, "samples": 0, "data_seed": plan.stream.seed}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = checkpoint.read_state(d)
        state["data_seed"] = saved.get("data_seed", plan.stream.seed)
    # This rank's rows in the plan's order over every epoch, as one stream (an epoch boundary is only a count
    # of steps, so the pipeline never stops); a restored rank starts it after the rows its steps consumed.
    # Its first batch is asked for now, in a thread: Ray Data's coordinator, its worker processes and the
    # first reads start while this rank builds its model.
    stream = replace(plan.stream, seed=state["data_seed"])
    consumed = (saved["step"] if ckpt is not None else 0) * cfg.batch_size * cfg.accum_freq
    tasks = data_tasks(cfg)
    if tasks == 0:  # in this process, a thread ahead of the steps (data.LocalBatches)
        batches: Iterator[Any] = data.LocalBatches(stream, rank, world, consumed, cfg.model.arch, cfg.augment,
                                                   cfg.batch_size, device)
    else:
        ds = data.rank_dataset(stream, rank, world, consumed, cfg.model.arch, cfg.augment, cfg.data_cpus, tasks)
        batches = primed(iter(ds.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, device=device,
            dtypes={"image": torch.float32, "text": torch.long, "row": torch.long}, prefetch_batches=2))
            if ds is not None else iter(()))
    setup = build(cfg, plan, device)
    model, loss_fn, opt, sched = setup.model, setup.loss, setup.opt, setup.sched
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = {**state, **checkpoint.load(d, model, opt, sched)}
    tracker = plan.tracker.on_rank(rank)
    log = StepLog(tracker, cfg.log_every)
    progress = train_reporter(rank, plan.planned_steps)  # rank 0: step, loss, rate, evaluations to the console
    if ckpt is not None:
        tracker.set_tag("clipline.train.restored_from_step", str(state["step"]))
    with tracker.system_metrics(cfg.system_metrics):
        peak = peak_flops(cfg, device, setup.bf16)
        inline = cfg.eval_datasets and cfg.eval_mode == "inline"
        evaluator = LiveEvaluator(cfg.eval_datasets, plan.arch, cfg.eval_batch_size, device) if inline else None
        evals = set(eval_steps(plan.planned_steps, cfg.eval_every)) if cfg.eval_datasets else set()
        global_batch = cfg.batch_size * cfg.accum_freq * world
        # The data position (epoch, step in the epoch) counts steps; the rows are the plan's (data.rank_stream)
        step, epoch, in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        samples = state["samples"]
        rows_log = RowsLog(plan.rows_dir, rank, step)
        try:
            micro, wait = [], 0.0
            t_start = time.perf_counter()
            while step < plan.planned_steps:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"train data: the stream ended on worker {rank} after step {step} of "
                                       f"{plan.planned_steps} ({cfg.batch_size} x {cfg.accum_freq} rows a step)")
                wait += time.perf_counter() - t0
                micro.append((batch["image"], batch["text"], batch["row"]))
                if len(micro) < cfg.accum_freq:
                    continue
                lr = opt.param_groups[0]["lr"]  # the rate this step used
                loss = engine.step(model, loss_fn, opt, [(i, t) for i, t, _ in micro], setup.autocast, cfg.grad_clip)
                sched.step()
                rows_log.add(step + 1, [r for _, _, r in micro])
                step, in_epoch, samples, micro = step + 1, in_epoch + 1, samples + global_batch, []
                if in_epoch >= plan.steps_per_epoch:
                    epoch, in_epoch = epoch + 1, 0
                t_end = time.perf_counter()
                metrics = _step_metrics(cfg, model, lr, loss, t_end - t_start, wait, global_batch, world,
                                        setup.flops_per_sample, peak, device)
                if evaluator is not None and step in evals:
                    scores = evaluator(model)  # every rank runs the forward passes (FSDP needs them all)
                    metrics.update(scores if rank == 0 else {})
                log.step(step, metrics, global_batch)
                progress.step(step, metrics)
                validate = evaluator is None and step in evals  # async: a checkpoint Ray Train evaluates aside
                if validate or step % cfg.checkpoint_every == 0 or step == plan.planned_steps:
                    log.flush()  # metrics up to this step are in MLflow before the checkpoint that covers them
                    rows_log.write(step)  # and the rows its steps trained
                    checkpoint.report(model, opt, sched, rank, {
                        "step": step, "epoch": epoch, "step_in_epoch": in_epoch, "samples": samples,
                        "loss": metrics["train/loss"], "mlflow_run_id": tracker.run_id, "arch": plan.arch,
                        "planned_steps": plan.planned_steps, "data_seed": state["data_seed"]}, validate=validate)
                wait, t_start = 0.0, t_end  # logging and checkpoints count in the next step's time
        finally:
            log.flush()
            if isinstance(batches, data.LocalBatches):
                batches.close()


def _step_metrics(cfg: TrainConfig, model: Any, lr: float, loss: float, seconds: float, wait: float,
                  global_batch: int, world: int, fps: float, peak: float | None, device: torch.device) -> dict[str, float]:
    """Every rank's speed, data wait and local loss gathered (on the device: NCCL has no CPU tensors);
    the loss logged is the mean of the ranks' local losses, which is the global batch's loss."""
    local = cfg.batch_size * cfg.accum_freq / seconds
    wait_frac = min(1.0, wait / seconds) if seconds > 0 else 0.0
    per = torch.tensor([local, wait_frac, loss], dtype=torch.float64, device=device)
    if parallel.distributed():
        gathered = [torch.zeros_like(per) for _ in range(world)]
        dist.all_gather(gathered, per)
    else:
        gathered = [per]
    rows = [g.tolist() for g in gathered]
    rates = [r[0] for r in rows]
    global_rate = global_batch / max(seconds, 1e-9)
    out = {"train/loss": sum(r[2] for r in rows) / len(rows), "train/lr": lr,
           "train/logit_scale": math.exp(_scalar(engine.unwrap(model).logit_scale)),
           "train/samples_per_s": global_rate,
           "train/samples_per_s_per_worker": sum(rates) / len(rates),
           "train/data_wait_fraction": sum(r[1] for r in rows) / len(rows),
           "train/flops_per_s": fps * global_rate}
    for r, rate in enumerate(rates):
        out[f"train/worker_{r}/samples_per_s"] = rate
    if peak:
        out["train/mfu"] = fps * global_rate / (peak * world)
    return out


def _scalar(p: torch.Tensor) -> float:
    p = p.detach()
    return float(p.full_tensor() if hasattr(p, "full_tensor") else p)  # FSDP2 parameters are DTensors
