"""Zero-shot and retrieval metrics: hand-computed cases, and CLIP_benchmark 1.6.2's own functions on the same
embeddings, ties included (repeated captions, repeated images, classes whose prompts embed alike).

CLIP_benchmark is installed by pip (tests/fixtures/clip_benchmark.txt, hash-pinned, --no-deps) into a
temporary folder: its declared dependencies (transformers, pycocoevalcap) are for its other benchmarks, and
importing its metric modules opens no connection. Without it these tests fail, they do not skip.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.evaluation import embed, metrics, tasks
from pipelines.evaluation.datasets import EvalData

PINNED = Path(__file__).parent / "fixtures" / "clip_benchmark.txt"
# its `accuracy` ends in float() of a one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays
# can be converted"); the installed copy takes the element instead: the same number, its ranking untouched
NUMPY_2_4 = (".sum(0, keepdim=True).cpu().numpy()) / n", ".sum(0, keepdim=True).cpu().numpy()[0]) / n")


@pytest.fixture(scope="module")
def cb(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """CLIP_benchmark's zeroshot_classification and zeroshot_retrieval modules."""
    target = tmp_path_factory.mktemp("clip_benchmark")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--no-deps", "--require-hashes", "-r", str(PINNED), "--target", str(target)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"pip could not install CLIP_benchmark from {PINNED}:\n{run.stderr[-2000:]}"
    source = target / "clip_benchmark" / "metrics" / "zeroshot_classification.py"
    text = source.read_text(encoding="utf-8")
    assert text.count(NUMPY_2_4[0]) == 1, f"{source}: not the accuracy() of CLIP_benchmark 1.6.2"
    source.write_text(text.replace(*NUMPY_2_4), encoding="utf-8")
    sys.path.insert(0, str(target))
    try:
        from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    finally:
        sys.path.remove(str(target))
    assert Path(zeroshot_retrieval.__file__).is_relative_to(target)
    return SimpleNamespace(zsc=zeroshot_classification, zsr=zeroshot_retrieval)


class Lookup:
    """A CLIP model of fixed embeddings: an image is its index, a text its row in `texts` (so a repeated
    caption embeds exactly alike); `alias` makes other texts embed as a given one."""

    def __init__(self, images: torch.Tensor, texts: dict[str, torch.Tensor], alias: dict[str, str] | None = None):
        self.images, self.rows = images, torch.stack(list(texts.values()))
        self.index = {t: i for i, t in enumerate(texts)}
        self.alias = alias or {}

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[self.alias.get(t, t)] for t in texts], dtype=torch.long)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.images[x]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rows[tokens]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (i % 256, i // 256, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _index(img: Image.Image) -> torch.Tensor:
    r, g, _ = img.getpixel((0, 0))
    return torch.tensor(r + 256 * g)


def ours(model: Lookup, data: EvalData, which: list[str]) -> dict[str, dict[str, float]]:
    """Our numbers as the train stage's periodic evaluation gets them: embed.encode, then tasks.score."""
    prompts, captions = tasks.texts(data, which)
    img, txt = embed.encode(_index, model.tokenizer, model.encode_image, model.encode_text, data.images,
                            prompts + captions, 3, "cpu")
    return tasks.score(data, which, img, txt)


@dataclass
class Indexed(torch.utils.data.Dataset):
    items: list[Any]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def theirs_zeroshot(cb: Any, model: Lookup, data: EvalData, batch_size: int) -> dict[str, float]:
    assert data.labels is not None
    loader = torch.utils.data.DataLoader(
        Indexed([(torch.tensor(i), y) for i, y in enumerate(data.labels)], data.classnames), batch_size=batch_size)
    return cb.zsc.evaluate(model, loader, model.tokenizer, data.classnames, data.templates, "cpu", amp=False)


def theirs_retrieval(cb: Any, model: Lookup, captions: list[list[str]], ks: list[int], batch_size: int) -> dict[str, float]:
    def collate(batch: list[Any]) -> Any:
        return torch.stack([i for i, _ in batch]), [c for _, c in batch]

    loader = torch.utils.data.DataLoader(Indexed([(torch.tensor(i), c) for i, c in enumerate(captions)], []),
                                         batch_size=batch_size, collate_fn=collate)
    return cb.zsr.evaluate(model, loader, model.tokenizer, "cpu", amp=False, recall_k_list=ks)


def assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


def stable_sort_recalls(model: Lookup, captions: list[list[str]], k: int) -> dict[str, float]:
    """What the metrics computed before they ranked as CLIP_benchmark: ties to the lower index."""
    text_image = [i for i, cs in enumerate(captions) for _ in cs]
    img = F.normalize(model.encode_image(torch.arange(len(captions))).float(), dim=-1)
    txt = F.normalize(model.encode_text(model.tokenizer([c for cs in captions for c in cs])).float(), dim=-1)
    scores = txt @ img.t()
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(text_image)), torch.tensor(text_image)] = True
    out = {}
    for side, s, p in (("image", scores, pos), ("text", scores.t(), pos.t())):
        top = torch.sort(s, dim=1, descending=True, stable=True)[1][:, :k]
        out[f"{side}_retrieval_recall@{k}"] = float((p.gather(1, top).sum(1) > 0).float().mean())
    return out


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- CLIP_benchmark's numbers on the same embeddings -------------------------------------------------------


@pytest.mark.parametrize("classes", [7, 3])  # 3: acc5 is NaN
def test_zeroshot_on_random_embeddings_with_several_templates_per_class(cb, classes):
    names = [f"class{c}" for c in range(classes)]
    templates = ["a photo of a {c}", "a drawing of a {c}", "{c}"]
    prompts = [t.format(c=c) for c in names for t in templates]
    model = Lookup(_randn(40, 16, seed=1), dict(zip(prompts, _randn(len(prompts), 16, seed=2), strict=True)))
    labels = [i % classes for i in range(40)]
    data = EvalData("random", [_png(i) for i in range(40)], labels, names, templates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn, when a class is never predicted
        got = ours(model, data, ["zeroshot"])["zeroshot"]
        for batch_size in (4, 64):
            assert_same(got, theirs_zeroshot(cb, model, data, batch_size))
    assert 0 < got["acc1"] < 1


def test_zeroshot_with_tied_class_vectors_and_tied_images(cb):
    # four classes whose prompts embed alike, so every image ties among them; images 0-9 lie near them, and
    # 20-29 repeat 0-19; class-specific prompts (CuPL-style templates), two to four per class
    names = ["cat", "kitty", "puss", "moggy", "dog", "bird", "fish"]
    words = ["a", "one", "the", "some"]
    own = {c: [f"{w} {c}" for w in words[:2 + i % 3]] for i, c in enumerate(names)}
    synonyms = ("kitty", "puss", "moggy")
    own.update({c: [f"{w} {c}" for w in words[:len(own["cat"])]] for c in synonyms})
    alias = {f"{w} {c}": f"{w} cat" for c in synonyms for w in words}
    texts = [p for c in names if c not in synonyms for p in own[c]]
    rows = _randn(len(texts), 8, seed=4)
    # the tied classes' prompts embed as one axis, so an image's score against each is that coordinate of it,
    # exactly, in any matrix kernel: with a random direction the tie held or broke by a rounding that depends on
    # the CPU's kernels and the batch (CLIP_benchmark scores batch by batch)
    rows[:len(own["cat"])] = F.one_hot(torch.tensor(0), 8).float()
    images = _randn(20, 8, seed=3)
    images[:10] += 3 * rows[0]
    model = Lookup(torch.cat([images, images]), dict(zip(texts, rows, strict=True)), alias)
    labels = [i % 7 for i in range(40)]
    data = EvalData("tied", [_png(i) for i in range(40)], labels, names, own)
    img, txt = embed.encode(_index, model.tokenizer, model.encode_image, model.encode_text, data.images,
                            data.prompts()[0], 3, "cpu")
    logits = tasks.zeroshot_logits(data, img, txt)
    assert (logits[:, 0:1] == logits[:, 1:4]).all() and (logits[:20, :4] == logits[20:, :4]).all()  # exact ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(model, data, ["zeroshot"])["zeroshot"]
        for batch_size in (3, 64):
            assert_same(got, theirs_zeroshot(cb, model, data, batch_size))
    # the ties decide: acc1 follows topk's pick among the tied classes, not argmax's first one
    assert got["acc1"] != float((logits.argmax(dim=1) == torch.tensor(labels)).float().mean())


def test_retrieval_on_random_embeddings_with_several_captions_per_image_and_one_without(cb):
    captions = [[f"caption {i}.{j}" for j in range(i % 3)] for i in range(24)]  # image 0, 3, ...: none
    flat = [c for cs in captions for c in cs]
    model = Lookup(_randn(24, 16, seed=5), dict(zip(flat, _randn(len(flat), 16, seed=6), strict=True)))
    got = ours(model, EvalData("random", [_png(i) for i in range(24)], captions=captions), ["retrieval"])
    for batch_size in (5, 64):
        assert_same(got["retrieval"], theirs_retrieval(cb, model, captions, [1, 5, 10], batch_size))
    assert got["retrieval"]["text_retrieval_recall@10"] <= 2 / 3  # an image without captions is a miss


def test_retrieval_with_repeated_captions_and_repeated_images_ranks_ties_as_clip_benchmark(cb):
    # 30 images, 6 of them the same picture; two captions each, many of them the same few words, so that
    # one image's query ties among a dozen captions, and a caption's among the repeated pictures
    common = ["a photo", "an image", "a picture"]
    captions = [[f"caption {i}", common[i % 3]] if i % 2 else [common[i % 3], common[(i + 1) % 3]]
                for i in range(30)]
    distinct = list(dict.fromkeys(c for cs in captions for c in cs))
    pictures = _randn(30, 4, seed=7)
    pictures[[4, 9, 14, 19, 24]] = pictures[29].clone()
    model = Lookup(pictures, dict(zip(distinct, _randn(len(distinct), 4, seed=8), strict=True)))
    got = ours(model, EvalData("tied", [_png(i) for i in range(30)], captions=captions), ["retrieval"])["retrieval"]
    for batch_size in (7, 64):
        assert_same(got, theirs_retrieval(cb, model, captions, [1, 5, 10], batch_size))
    # the ties decide: ranked with ties to the lower index, as before, the numbers were not CLIP_benchmark's
    assert any(stable_sort_recalls(model, captions, k).items() - got.items() for k in (1, 5, 10))


def test_retrieval_with_k_beyond_the_candidates_is_clip_benchmarks_recall_at_all_of_them(cb):
    captions = [["a"], ["b"], ["a"]]  # 3 images, 3 captions, two alike
    model = Lookup(_randn(3, 4, seed=9), {"a": _randn(4, seed=10), "b": _randn(4, seed=11)})
    got = ours(model, EvalData("small", [_png(i) for i in range(3)], captions=captions), ["retrieval"])["retrieval"]
    at_all = theirs_retrieval(cb, model, captions, [3], 3)
    for k in (5, 10):
        assert {m: got[f"{m}@{k}"] for m in ("image_retrieval_recall", "text_retrieval_recall")} == \
            {m: at_all[f"{m}@3"] for m in ("image_retrieval_recall", "text_retrieval_recall")} == \
            {"image_retrieval_recall": 1.0, "text_retrieval_recall": 1.0}
    assert got["image_retrieval_recall@1"] == theirs_retrieval(cb, model, captions, [1], 3)["image_retrieval_recall@1"]
    with pytest.raises(RuntimeError, match="out of range"):  # where CLIP_benchmark's topk gives up
        theirs_retrieval(cb, model, captions, [5], 3)


# --- hand-computed cases --------------------------------------------------------------------------------


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


def test_class_vector_is_the_normalised_mean_of_the_template_embeddings_and_logits_are_scaled_by_100():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # normalised; class 0: two templates, class 1: one
    w = metrics.class_vectors(emb, [2, 1])
    torch.testing.assert_close(w, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]]))
    torch.testing.assert_close(metrics.zeroshot_logits(torch.tensor([[0.0, 1.0]]), w),
                               torch.tensor([[100 / math.sqrt(2), 100.0]]))


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


def test_retrieval_scores_are_the_dot_products_of_the_given_normalised_embeddings():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = F.normalize(torch.tensor([[0.1, 1.0], [1.0, 0.1]]), dim=-1)
    m = metrics.retrieval(images, texts, [1, 0], ks=(1,))
    assert m["image_retrieval_recall@1"] == 1.0 and m["text_retrieval_recall@1"] == 1.0
