"""Evaluation of a model in training, on the training ranks (as open_clip evaluates): the evaluate stage's sets
and metrics, through the wrapped model's forward, so DDP and FSDP hooks run as they do in training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pipelines.evaluation.datasets import load
from pipelines.evaluation.embed import encode
from pipelines.evaluation.tasks import mlflow_key, score, texts

if TYPE_CHECKING:
    from pipelines.evaluation.config import EvalSet


class LiveEvaluator:
    """Loaded once per worker; called with the model at the steps the training loop chooses. Every rank must
    call it (FSDP needs every rank's forward); the scores are the same on each."""

    def __init__(self, sets: Sequence[EvalSet], arch: str, batch_size: int, device: torch.device) -> None:
        from pipelines.models import preprocess_cfg, transforms

        size = preprocess_cfg(arch)["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.sets = [(load(d, size), list(dict.fromkeys(d.tasks))) for d in sets]
        self.transform, self.tokenizer = transforms(arch, augment=False)
        self.batch_size, self.device = batch_size, device

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """`eval/<set>/<metric>` for every set and task; NaN (acc5 with under 5 classes) left out."""

        def features(key: str, **inputs: torch.Tensor) -> torch.Tensor:
            out = model(**inputs)  # the wrapped model's forward: DDP and FSDP hooks run as in training
            return out[key] if isinstance(out, dict) else out[0 if key == "image_features" else 1]

        was_training = model.training
        model.eval()
        try:
            result = {}
            for data, tasks in self.sets:
                prompts, captions = texts(data, tasks)
                img, txt = encode(self.transform, self.tokenizer, lambda x: features("image_features", image=x),
                                  lambda t: features("text_features", text=t), data.images, prompts + captions,
                                  self.batch_size, self.device)
                for m in score(data, tasks, img, txt).values():
                    result.update({mlflow_key(data.name, k): v for k, v in m.items() if not math.isnan(v)})
            return result
        finally:
            model.train(was_training)
