"""The train stage's parameters: what a job writes under `stages.<name>.with` for `uses: train`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipelines.configschema import field
from pipelines.evaluation.config import EvalSet
from pipelines.models import ModelRef

if TYPE_CHECKING:
    from pipelines.preflight import Check


@dataclass(kw_only=True)
class Lock:
    """Freeze towers as open_clip's --lock-image / --lock-text do (LiT-style training)."""

    image: bool = field(False, "freeze the image tower")
    image_unlocked_groups: int = field(0, "leave this many last layer groups of the image tower trainable", minimum=0)
    text: bool = field(False, "freeze the text tower")
    text_unlocked_layers: int = field(0, "leave this many last text layers trainable", minimum=0)


@dataclass(kw_only=True)
class Register:
    """Where the trained model goes in the MLflow model registry."""

    name: str | None = field(None, "registered model name (default: <job>-<stage>); null to only log the model")
    alias: str = field("candidate", "alias set on the new version, so `models:/<name>@<alias>` loads it")
    enabled: bool = field(True, "register the model at all")


@dataclass(kw_only=True)
class TrainConfig:
    """Train an open_clip model on curated shards with Ray Train (DDP or FSDP), checkpointed and resumable."""

    model: ModelRef = field(ModelRef, "architecture (name or JSON config) and optional initial weights")
    lock: Lock = field(Lock, "tower locking")
    loss: Literal["clip", "siglip"] = field("clip", "contrastive loss: CLIP's softmax InfoNCE or SigLIP's sigmoid loss")
    # scale
    workers: int = field(1, "Ray Train workers (data-parallel ranks)", minimum=1)
    use_gpu: bool = field(False, "one GPU per worker")
    cpus_per_worker: float = field(1.0, "CPUs Ray reserves per worker; torch uses max(1, floor(this)) threads",
                                   exclusiveMinimum=0)
    strategy: Literal["ddp", "fsdp"] = field("ddp", "data parallelism: DDP replicas or FSDP2 sharded parameters")
    max_failures: int = field(2, "worker-group restarts from the last checkpoint before the run fails", minimum=0)
    # data
    batch_size: int = field(64, "samples per worker per micro-batch", minimum=1)
    accum_freq: int = field(1, "micro-batches per step; features are cached so the loss sees all of their negatives",
                            minimum=1)
    epochs: int = field(1, "passes over the curated data", minimum=1)
    steps: int | None = field(None, "optimizer steps to run instead of whole epochs (the data repeats as needed)",
                              minimum=1)
    data_cpus: float = field(0.5, "CPUs per Ray Data decode/augment task", exclusiveMinimum=0)
    data_tasks: int | None = field(
        None, "Ray Data decode/augment tasks running at once for each worker; 0: none, the worker decodes in a "
        "thread of its own, ahead of its steps (no Ray Data process, each of which imports torch and open_clip, "
        "about 5 s of CPU at start-up); null: 0 for a CPU worker (its steps are compute-bound), no limit for a GPU "
        "worker (Ray Data schedules as many as there are CPUs for them)", minimum=0)
    augment: bool = field(True, "the model's training preprocessing (random resized crop); false: the eval transform")
    shuffle_buffer: int = field(256, "rows shuffled together: each worker's stream is cut into windows of this many "
                                "rows, each permuted from the data seed, the epoch and its position (so batches differ "
                                "every epoch and a resumed run replays them exactly); 0 turns it off", minimum=0)
    seed: int | None = field(
        None, "data seed: the shard file order is the same every epoch; null: a seed drawn when the run starts "
        "(kept in its checkpoints) and a new file order each epoch")
    log_rows: bool = field(False, "write the global row ids each step trained, per worker, under <output>/rows/ "
                           "(Parquet, one file per checkpoint interval): which rows each checkpoint has seen")
    # optimisation
    lr: float = field(5e-4, "peak learning rate (AdamW)", exclusiveMinimum=0)
    weight_decay: float = field(0.2, "AdamW weight decay; gains, biases and logit scale get none", minimum=0)
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.98, "AdamW beta2")
    eps: float = field(1e-6, "AdamW epsilon")
    warmup: int = field(10, "linear warmup steps, then cosine decay to zero", minimum=0)
    grad_clip: float | None = field(None, "clip the gradient norm to this")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", "autocast: auto is bf16 on GPU and fp32 on CPU")
    grad_checkpointing: bool = field(False, "recompute activations in the backward pass to save memory")
    compile: bool = field(False, "torch.compile the model")
    # bookkeeping
    checkpoint_every: int = field(50, "steps between checkpoints (one is always written at the end)", minimum=1)
    keep_checkpoints: int = field(2, "checkpoints kept in storage", minimum=1)
    log_every: int = field(1, "steps between metric logs to MLflow", minimum=1)
    peak_flops: float | None = field(None, "peak FLOP/s of one accelerator for MFU; known GPUs are looked up")
    system_metrics: bool = field(True, "log MLflow system metrics (CPU, memory, GPU) from rank 0")
    register: Register = field(Register, "model registry")
    # evaluation while training (open_clip's --zeroshot-frequency): the evaluate stage's datasets and metrics
    eval_datasets: list[EvalSet] = field(
        [], "datasets (as in the evaluate stage) scored on the live model at the end and every eval_every steps")
    eval_every: int | None = field(None, "steps between evaluations on eval_datasets (one is always run at the end)",
                                   minimum=1)
    eval_batch_size: int = field(128, "images or texts per forward pass when evaluating", minimum=1)
    eval_mode: Literal["async", "inline"] = field(
        "async", "async: each evaluation is a Ray task on the checkpoint of its step (Ray Train's asynchronous "
        "validation) while the ranks train on; inline: on the training ranks between steps (open_clip's way)")
    eval_cpus: float = field(1.0, "async evaluation: CPUs its Ray task reserves (torch uses max(1, floor(this)) "
                             "threads)", exclusiveMinimum=0)
    eval_gpus: float = field(0.0, "async evaluation: GPUs its Ray task reserves (it evaluates on a GPU if > 0)",
                             minimum=0)

    def __post_init__(self) -> None:
        if self.eval_every and not self.eval_datasets:
            raise ValueError("train: eval_every is set but eval_datasets names no dataset")
        if (self.model.get("model_uri") if isinstance(self.model, dict) else self.model.model_uri):
            raise ValueError("train: model.model_uri cannot initialise training yet; give model.arch and "
                             "model.checkpoint (the model.safetensors of an earlier train stage)")

    def preflight(self, check: Check) -> None:
        """Before the run (`pipelines.preflight`): the architecture and the initial checkpoint, and the files and
        columns of each in-training evaluation set."""
        check.attempt(check.model, "model", self.model)
        for i, d in enumerate(self.eval_datasets):
            check.attempt(check.eval_set, f"eval_datasets[{i}]", d)
