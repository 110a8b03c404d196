"""How a training worker's model is spread over the ranks: DDP, or FSDP2 sharding, and torch.compile."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipelines.stages.train.config import TrainConfig


def distributed() -> bool:
    """Whether this process is one rank of a process group (Ray Train's workers are; a unit test is not)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this rank, the number of ranks); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def wrap(model: torch.nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    """The model as this rank trains it: DDP (or FSDP2 with `strategy: fsdp`) over `world` ranks, compiled when
    `compile` is set; a single rank gets the model itself."""
    if world == 1:
        return torch.compile(model) if cfg.compile else model
    if cfg.strategy == "fsdp":
        from open_clip.transformer import ResidualAttentionBlock
        from torch.distributed.fsdp import fully_shard

        for m in list(model.modules()):
            if isinstance(m, ResidualAttentionBlock):
                fully_shard(m)
        # FSDP2 cannot shard 0-d parameters (logit scale and bias): they stay replicated, and engine.step
        # averages their gradients across ranks itself
        scalars = {p for p in model.parameters() if p.ndim == 0}
        fully_shard(model, ignored_params=scalars)
        model.replicated_params = [p for p in model.parameters() if p.ndim == 0 and p.requires_grad]
        return torch.compile(model) if cfg.compile else model
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(ddp) if cfg.compile else ddp  # compiled after wrapping: DDP's bucketing stays in the graph
