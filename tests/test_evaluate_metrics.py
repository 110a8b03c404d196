"""Zero-shot and retrieval metrics on hand-computed cases (CLIP_benchmark's definitions)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pipelines.evaluation import metrics


def test_top1_top5_and_mean_per_class_recall_with_a_class_absent_from_the_targets():
    # 3 classes, so acc5 is NaN; class 2 is predicted once but never a target
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    target = torch.tensor([0, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that class 2 is not in y_true
        m = metrics.zeroshot(logits, target)
    assert m["acc1"] == 0.5  # samples 0 and 1
    assert math.isnan(m["acc5"])
    assert m["mean_per_class_recall"] == pytest.approx((1 / 1 + 1 / 3) / 2)  # class 0: 1 of 1; class 1: 1 of 3


def test_top5_counts_a_true_class_ranked_fifth_but_not_sixth():
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6], [0.0, 1, 2, 3, 4, 5]])
    target = torch.tensor([4, 0, 5])  # ranked 5th, 6th and 1st
    m = metrics.zeroshot(logits, target)
    assert m["acc1"] == pytest.approx(1 / 3) and m["acc5"] == pytest.approx(2 / 3)


def test_ties_go_to_the_lower_class_index():
    logits = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.3, 0.3, 0.3]])
    target = torch.tensor([1, 1, 0])
    m = metrics.zeroshot(logits, target)
    assert m["acc1"] == pytest.approx(2 / 3)  # sample 0 predicts 0 (miss), 1 predicts 1, 2 predicts 0
    assert metrics.accuracy(logits, target, (2,)) == [1.0]


def test_class_vector_is_the_normalised_mean_of_normalised_template_embeddings():
    emb = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0]])  # class 0: two templates, class 1: one
    w = metrics.class_vectors(emb, [2, 1])
    torch.testing.assert_close(w, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]]))


def test_retrieval_with_several_captions_per_image():
    # 3 images; captions 0 and 1 show image 0, caption 2 image 1, captions 3 and 4 image 2
    text_image = [0, 0, 1, 2, 2]
    scores = torch.tensor([  # [texts, images]
        [0.9, 0.1, 0.0],   # caption 0: its image first
        [0.2, 0.8, 0.1],   # caption 1: its image second
        [0.1, 0.2, 0.7],   # caption 2: its image second
        [0.3, 0.2, 0.1],   # caption 3: its image third
        [0.0, 0.1, 0.6],   # caption 4: its image first
    ])
    m = metrics.retrieval_scores(scores, text_image, ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    # per image, over the captions: image 0 best caption 0 (its own); image 1 best caption 1 (not its own),
    # then caption 2 (its own); image 2 best caption 2 (no), then caption 4 (its own)
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(3 / 3)


def test_retrieval_ties_go_to_the_lower_index_and_k_beyond_the_candidates_is_all():
    scores = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    m = metrics.retrieval_scores(scores, [1, 0], ks=(1, 10))
    assert m["image_retrieval_recall@1"] == 0.5  # both texts rank image 0 first: only text 1 is right
    assert m["text_retrieval_recall@1"] == 0.5  # both images rank text 0 first: only image 1's caption
    assert m["image_retrieval_recall@10"] == m["text_retrieval_recall@10"] == 1.0


def test_retrieval_from_embeddings_normalises_them():
    images = torch.tensor([[10.0, 0.0], [0.0, 0.1]])
    texts = torch.tensor([[0.0, 5.0], [1.0, 0.1]])
    m = metrics.retrieval(images, texts, [1, 0], ks=(1,))
    assert m["image_retrieval_recall@1"] == 1.0 and m["text_retrieval_recall@1"] == 1.0
