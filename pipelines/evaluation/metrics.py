"""Zero-shot classification and retrieval metrics, computed as LAION's CLIP_benchmark 1.6.2 computes them.

The inputs are L2-normalised embeddings, as `pipelines.evaluation.embed` gives them and as CLIP_benchmark
holds them after its `F.normalize(model.encode_*(...))`; nothing here normalises them again (a second
`F.normalize` moves the last bit of many rows, and with it the order of near-equal scores).

- zero-shot (`clip_benchmark/metrics/zeroshot_classification.py`): a class vector is the mean of the
  class's template embeddings divided by its norm; logits are `100. * images @ classifier`; `acc1` and
  `acc5` are top-k accuracy through `torch.topk` (`acc5` is NaN with fewer than 5 classes),
  `mean_per_class_recall` is scikit-learn's `balanced_accuracy_score` of the `argmax` predictions.
- retrieval (`zeroshot_retrieval.py`): scores = texts @ images.T; `image_retrieval_recall@k` is the
  fraction of texts whose image is among the `torch.topk(scores, k)` images, `text_retrieval_recall@k` the
  fraction of images with any of their captions among the top k texts (an image without captions counts
  as a miss, as its 0/0 does there).

Ties rank as they rank there: the same `torch.topk` on the same values, whose pick among equal scores is
what torch gives (on CPU not the lower index; `argmax` takes the first).  The one departure: a k beyond the
number of candidates, where CLIP_benchmark's `topk` raises, is taken as all of them (recall 1).
tests/test_evaluate_metrics.py checks every case against CLIP_benchmark's own functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def class_vectors(text_embed: torch.Tensor, templates_per_class: Sequence[int]) -> torch.Tensor:
    """[classes, dim] zero-shot weights from [sum(templates), dim] normalised template embeddings grouped by
    class (`zero_shot_classifier`)."""
    out, i = [], 0
    for n in templates_per_class:
        e = text_embed[i:i + n].mean(dim=0)
        e /= e.norm()
        out.append(e)
        i += n
    return torch.stack(out)


def zeroshot_logits(image_embed: torch.Tensor, class_vecs: torch.Tensor) -> torch.Tensor:
    """[images, classes] logits as `run_classification` computes them: `100. * image_features @ classifier`."""
    return (100. * image_embed) @ class_vecs.t()


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int]) -> list[float]:
    """Top-k accuracy for each k (`accuracy`)."""
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0).item()) / n for k in topk]


def zeroshot(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score

    if logits.shape[1] >= 5:
        acc1, acc5 = accuracy(logits, target, (1, 5))
    else:
        (acc1,), acc5 = accuracy(logits, target, (1,)), math.nan
    pred = logits.argmax(dim=1)
    return {"acc1": acc1, "acc5": acc5,
            "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), pred.numpy()))}


def _recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """Per query: the fraction of its positives among its k best-scoring candidates (`recall_at_k`; a
    gather instead of its one-hot product, the same count without a [queries, k, candidates] tensor)."""
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)[1]
    hits = positives.gather(1, top).sum(dim=1)
    return hits / positives.sum(dim=1)


def retrieval(image_embed: torch.Tensor, text_embed: torch.Tensor, text_image: Sequence[int],
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`text_image[t]` is the index of caption t's image; an image may have several captions (or none)."""
    return retrieval_scores(text_embed @ image_embed.t(), text_image, ks)


def retrieval_scores(scores: torch.Tensor, text_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recalls from a [texts, images] score matrix."""
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text_image)), torch.as_tensor(text_image, dtype=torch.long)] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (_recall_at_k(scores, positives.long(), k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (_recall_at_k(scores.t(), positives.t().long(), k) > 0).float().mean().item()
    return out
