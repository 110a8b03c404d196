"""From an evaluation set's embeddings to each task's metrics, and the names they are logged under."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.evaluation import metrics
from pipelines.evaluation.datasets import EvalData

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}  # CLIP_benchmark's names


def mlflow_key(name: str, metric: str) -> str:
    """`eval/<dataset>/<metric>`, `@` written as `_at_` (MLflow keys take no `@`)."""
    return f"eval/{name}/{metric.replace('@', '_at_')}"


def main_metric(task: str, m: dict[str, float]) -> float:
    """The number DataComp averages: acc1, or the mean of image and text recall@1."""
    if task == "zeroshot":
        return m["acc1"]
    return (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2


def captions_of(data: EvalData) -> list[list[str]]:
    """Each image's captions; an error naming the set when it has none (retrieval needs them)."""
    if data.captions is None:
        raise ValueError(f"dataset {data.name}: retrieval needs captions, and this set has none")
    return data.captions


def texts(data: EvalData, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(class prompts, captions flattened): the texts to embed, in this order, for these tasks."""
    prompts = data.prompts()[0] if "zeroshot" in tasks else []
    captions = [c for cs in captions_of(data) for c in cs] if "retrieval" in tasks else []
    return prompts, captions


def caption_images(data: EvalData) -> list[int]:
    """For each flattened caption, the index of its image."""
    return [i for i, cs in enumerate(captions_of(data)) for _ in cs]


def zeroshot_logits(data: EvalData, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """[images, classes] logits from normalised image embeddings and the class prompts' embeddings."""
    prompts, counts = data.prompts()
    return metrics.zeroshot_logits(img, metrics.class_vectors(txt[:len(prompts)], counts))


def score(data: EvalData, tasks: Sequence[str], img: torch.Tensor, txt: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each task's metrics from the L2-normalised embeddings of `data.images` and of `texts(data, tasks)` (as
    `pipelines.evaluation.embed` gives them): the evaluate stage and the train stage's periodic evaluation
    both end here, with CLIP_benchmark's numbers for these embeddings."""
    out = {}
    n_prompts = len(texts(data, tasks)[0])
    for task in tasks:
        if task == "zeroshot":
            out[task] = metrics.zeroshot(zeroshot_logits(data, img, txt), torch.tensor(data.labels))
        else:
            out[task] = metrics.retrieval(img, txt[n_prompts:], caption_images(data))
    return out
