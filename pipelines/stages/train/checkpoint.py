"""Training checkpoints: the files (safetensors weights, optimizer tensors, JSON state), gathered from every rank
and reported to Ray Train, and restored into a fresh model on every rank.

Nothing in a checkpoint is unpickled: weights are safetensors, the optimizer is read with `weights_only=True`,
the state (step, data position, MLflow run id, scheduler) is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from pipelines.stages.train.engine import unwrap
from pipelines.stages.train.parallel import distributed

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state on CPU (a collective under DDP/FSDP: every rank must call it)."""
    if distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(unwrap(model), opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        msd, osd = unwrap(model).state_dict(), opt.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in msd.items()}, osd


def save(path: str, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any], sched: Any, state: dict[str, Any]) -> None:
    """Write a checkpoint directory: safetensors weights, optimizer tensors, and the JSON training state."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(model_sd, os.path.join(path, MODEL_FILE))
    torch.save(optim_sd, os.path.join(path, OPTIM_FILE))
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump({**state, "scheduler": sched.state_dict()}, f, indent=2)


def load(path: str, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """Restore a checkpoint written by `save` into model, optimizer and scheduler; return the training state.

    Every rank calls it; nothing is unpickled (`weights_only=True`, safetensors)."""
    from safetensors.torch import load_file

    msd = load_file(os.path.join(path, MODEL_FILE))
    osd = torch.load(os.path.join(path, OPTIM_FILE), map_location="cpu", weights_only=True)
    if distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(unwrap(model), opt, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(msd)
        opt.load_state_dict(osd)
    state = read_state(path)
    sched.load_state_dict(state.pop("scheduler"))
    return state


def read_state(path: str) -> dict[str, Any]:
    """A checkpoint's JSON training state (step, data position and seed, MLflow run id), without its tensors."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def report(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, rank: int, state: dict[str, Any],
           validate: bool = False) -> None:
    """A checkpoint of `state` (its `step` and `loss` are Ray Train's metrics) reported to Ray Train: every rank
    reports (a collective gathers the full state); rank 0 writes the files. `validate`: Ray Train evaluates it in
    a task of its own (`validate.CheckpointEvaluator`) while training goes on."""
    import ray.train

    model_sd, optim_sd = full_state(model, opt)
    metrics = {"step": state["step"], "loss": state["loss"]}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp, model_sd, optim_sd, sched, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{state['step']:08d}", validation=validate)
