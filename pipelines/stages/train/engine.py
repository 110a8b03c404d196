"""What one training worker does, independent of Ray: loss, optimiser, schedule, a step (checkpoints are in
`checkpoint.py`, DDP and FSDP in `parallel.py`).

The conventions are open_clip's: local loss with features gathered *with* gradients (memory grows with
local x global batch, not global squared); gradient accumulation caches every micro-batch's features first,
so each micro-batch's loss still sees all of the step's negatives; AdamW with no weight decay on gains,
biases and the logit scale; linear warmup then cosine decay; the logit scale clamped to [0, ln 100].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

LOGIT_SCALE_MAX = math.log(100)


def make_loss(kind: str, rank: int, world_size: int) -> nn.Module:
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)


def no_decay(name: str, p: torch.Tensor) -> bool:
    """open_clip's exclusion: gains, biases, norms and the logit scale/bias get no weight decay."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): warmup, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def scheduler(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))


def unwrap(model: nn.Module) -> nn.Module:
    """The open_clip model inside DDP and torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _outputs(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(image=images, text=texts)
    if not isinstance(out, dict):  # models created without output_dict
        keys = ("image_features", "text_features", "logit_scale", "logit_bias")
        out = dict(zip(keys, out, strict=False))  # three outputs when the model has no logit_bias
    return out


def _loss(loss_fn: nn.Module, feats: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {"logit_bias": out["logit_bias"]} if out.get("logit_bias") is not None else {}
    return loss_fn(feats["image_features"], feats["text_features"], out["logit_scale"], **kwargs)


@contextlib.contextmanager
def _sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP and FSDP2)."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def step(model: nn.Module, loss_fn: nn.Module, opt: torch.optim.Optimizer, micro: list[tuple[torch.Tensor, torch.Tensor]],
         autocast: Any = contextlib.nullcontext, grad_clip: float | None = None) -> float:
    """One optimizer step over `micro` micro-batches; returns the loss of the whole step's batch."""
    opt.zero_grad(set_to_none=True)
    if len(micro) == 1:
        images, texts = micro[0]
        with autocast():
            out = _outputs(model, images, texts)
            loss = _loss(loss_fn, out, out)
        loss.backward()
        value = loss.detach()
    else:
        keys = ("image_features", "text_features")
        with torch.no_grad(), autocast():  # cache every micro-batch's features: the negatives of the step
            cached = [_outputs(model, i, t) for i, t in micro]
        last = len(micro) - 1
        for j, (images, texts) in enumerate(micro):
            with _sync(model, j == last):
                with autocast():
                    out = _outputs(model, images, texts)
                    feats = {k: torch.cat([out[k] if m == j else c[k] for m, c in enumerate(cached)]) for k in keys}
                    # the logit scale and bias enter the step's loss once: their gradient flows on one pass only
                    scales = out if j == last else {k: v.detach() for k, v in out.items() if v is not None}
                    loss = _loss(loss_fn, feats, scales)
                loss.backward()
            value = loss.detach()  # each recomputation gives the same full-batch loss
    for p in getattr(model, "replicated_params", ()):  # parameters FSDP leaves unsharded: average them here
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return float(value)
