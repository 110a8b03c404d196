"""Zero-shot classification and retrieval metrics, defined exactly as LAION's CLIP_benchmark defines them.

- zero-shot: a class vector is the mean of the class's L2-normalised template embeddings, normalised again;
  logits are image embeddings (normalised) times class vectors; `acc1` and `acc5` are top-k accuracy over
  all samples (`acc5` is NaN with fewer than 5 classes), `mean_per_class_recall` is scikit-learn's
  `balanced_accuracy_score` (recall averaged over the classes present in the targets).
- retrieval: scores = texts x images; `image_retrieval_recall@k` is the fraction of texts whose image is
  among the k best-scoring images for the text, `text_retrieval_recall@k` the fraction of images with any
  of their captions among the k best-scoring texts.

CLIP_benchmark ranks with `torch.topk`, whose order among equal scores is unspecified; here every ranking is
a stable descending sort, so a tie goes to the lower index (as `argmax`, which CLIP_benchmark uses for
the per-class recall, does).  Without ties the two are the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def class_vectors(text_embed: torch.Tensor, templates_per_class: Sequence[int]) -> torch.Tensor:
    """[classes, dim] zero-shot weights from [sum(templates), dim] template embeddings grouped by class."""
    out, i = [], 0
    for n in templates_per_class:
        e = F.normalize(text_embed[i:i + n].float(), dim=-1).mean(dim=0)
        out.append(e / e.norm())
        i += n
    return torch.stack(out)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores per row, best first, ties to the lower index."""
    return torch.sort(scores, dim=1, descending=True, stable=True)[1][:, :k]


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int]) -> list[float]:
    pred = _top(logits, max(topk)).t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0)) / n for k in topk]


def zeroshot(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score

    classes = logits.shape[1]
    if classes >= 5:
        acc1, acc5 = accuracy(logits, target, (1, 5))
    else:
        (acc1,), acc5 = accuracy(logits, target, (1,)), math.nan
    pred = logits.argmax(dim=1)
    return {"acc1": acc1, "acc5": acc5,
            "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), pred.numpy()))}


def _recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """Per query: the fraction of its positives among its k best-scoring candidates."""
    top = _top(scores, k)
    hits = positives.gather(1, top).sum(dim=1)
    return hits / positives.sum(dim=1)


def retrieval(image_embed: torch.Tensor, text_embed: torch.Tensor, text_image: Sequence[int],
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`text_image[t]` is the index of caption t's image; an image may have several captions."""
    scores = F.normalize(text_embed.float(), dim=-1) @ F.normalize(image_embed.float(), dim=-1).t()
    return retrieval_scores(scores, text_image, ks)


def retrieval_scores(scores: torch.Tensor, text_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recalls from a [texts, images] score matrix."""
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text_image)), torch.as_tensor(text_image)] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((_recall_at_k(scores, positives.float(), k) > 0).float().mean())
        out[f"text_retrieval_recall@{k}"] = float((_recall_at_k(scores.t(), positives.t().float(), k) > 0).float().mean())
    return out
