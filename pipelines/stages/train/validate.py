"""Evaluation while training, asynchronously (`eval_mode: async`): Ray Train's checkpoint validation.

At each evaluation step the ranks report a checkpoint with `validation=True` and train on; Ray Train's
controller runs `CheckpointEvaluator` on it as a Ray task (one at a time, in step order, with the resources
`eval_cpus`/`eval_gpus` ask for) and waits for the last before `fit` returns.  The task scores the checkpoint's
weights as the evaluate stage scores a model (a fresh open_clip model, `LiveEvaluator`'s sets and metrics), logs
`eval/...` to the train run at the checkpoint's step, shows them on the console, and writes them to
`<output>/evals/step-NNNNNNNN.json` (or what went wrong to `...error.json`), which the driver reads after `fit`:
Ray Train only logs a validation that failed, the driver says which step and why.

A validation Ray Train restarts (the controller died before it ended) finds its step's file and does not log the
metrics a second time.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines import storage
from pipelines.console import train_reporter

if TYPE_CHECKING:
    from pipelines.evaluation.config import EvalSet
    from pipelines.tracking import WorkerTracker


def eval_steps(planned: int, every: int | None) -> list[int]:
    """The steps evaluated: every `every`-th and always the last."""
    return sorted({*(range(every, planned + 1, every) if every else ()), planned})


def result_url(evals_dir: str, step: int, error: bool = False) -> str:
    return storage.join(evals_dir, f"step-{step:08d}{'.error' if error else ''}.json")


@dataclass
class CheckpointEvaluator:
    """Ray Train's validation function (picklable: the driver builds it, the controller ships it to each task)."""

    sets: list[EvalSet]
    arch: str
    batch_size: int
    threads: int
    use_gpu: bool
    tracker: WorkerTracker  # the train run's handle, as rank 0 carries it
    evals_dir: str

    def __call__(self, ckpt: Any) -> dict[str, float]:
        from pipelines.stages.train import checkpoint

        with ckpt.as_directory() as d:
            step = int(checkpoint.read_state(d)["step"])
            done = result_url(self.evals_dir, step)
            if storage.exists(done):  # a validation restarted after it had logged: nothing twice
                return dict(storage.read_json(done)["metrics"])
            try:
                scores = self._score(os.path.join(d, checkpoint.MODEL_FILE))
            except BaseException as exc:
                storage.write_json(result_url(self.evals_dir, step, error=True),
                                   {"step": step, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc()})
                raise
        self.tracker.log_metrics(scores, step)
        self.tracker.flush()
        storage.write_json(done, {"step": step, "metrics": scores})
        train_reporter(0, 0).evaluation(step, scores)  # to the driver's console, if one listens
        return scores

    def _score(self, weights: str) -> dict[str, float]:
        import torch

        from pipelines.evaluation.live import LiveEvaluator
        from pipelines.models import ModelRef, create

        torch.set_num_threads(self.threads)
        device = torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")
        model, _, _ = create(ModelRef(arch=self.arch, checkpoint=weights), device=str(device))
        with torch.no_grad():
            return LiveEvaluator(self.sets, self.arch, self.batch_size, device)(model)


def collect(evals_dir: str, steps: list[int]) -> tuple[list[int], dict[int, str]]:
    """After `fit`: (the steps evaluated, what went wrong by step) of the planned evaluation steps; a step with
    neither file never ran (Ray Train had not started it)."""
    done, failed = [], {}
    for step in steps:
        if storage.exists(result_url(evals_dir, step)):
            done.append(step)
        elif storage.exists(result_url(evals_dir, step, error=True)):
            failed[step] = storage.read_json(result_url(evals_dir, step, error=True))["error"]
        else:
            failed[step] = "never run (Ray Train did not start its validation)"
    return done, failed
