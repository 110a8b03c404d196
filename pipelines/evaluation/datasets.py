"""Evaluation datasets: Parquet files with configurable columns, and built-ins that need no download.

- `demo_heldout`: the demo generator's images under a seed the demo never crawls (18 color-shape classes),
  with the generator's captions for retrieval (two per image);
- `digits`: scikit-learn's handwritten digits (1,797 real 8x8 scans that ship inside the package), scaled
  up; the last `DIGITS_HELD_OUT` are the held-out split, the rest are for training (`clipline` never
  evaluates on rows it trains on when the job uses the two splits).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from pipelines import pairs

if TYPE_CHECKING:
    from pipelines.evaluation.config import EvalSet

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# CLIP_benchmark's MNIST templates
DIGIT_TEMPLATES = ['a photo of the number: "{c}".']
# prompts in the words of the demo web's captions, as CLIP's prompts are in the words of web alt text; the
# ensemble spans the backgrounds so the class vector does not lean on one
SHAPE_TEMPLATES = ["a photo of a {c} on white", "a photo of a {c} on black", "a photo of a {c} on gray",
                   "a {c} at the center on a white background", "a {c} at the center on a black background",
                   "a {c} at the center on a gray background"]
DIGITS_HELD_OUT = 597  # of 1,797: the last third, about 60 per class
DEMO_HELDOUT_SEED = 1  # the demo crawls seed 0


@dataclass
class EvalData:
    """Images (encoded bytes) with labels and/or captions, ready to embed."""

    name: str
    images: list[bytes]
    labels: list[int] | None = None
    classnames: list[str] = field(default_factory=list)
    templates: list[str] | dict[str, list[str]] = field(default_factory=list)
    captions: list[list[str]] | None = None  # per image, one or more

    def prompts(self) -> tuple[list[str], list[int]]:
        """Every class's prompts, flattened, and how many each class has."""
        texts, counts = [], []
        for c in self.classnames:
            ts = self.templates[c] if isinstance(self.templates, dict) else self.templates
            texts += [t.format(c=c) for t in ts]
            counts.append(len(ts))
        return texts, counts


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def digits_images(split: str, size: int = 64) -> tuple[list[bytes], list[int]]:
    """scikit-learn's digits as RGB PNGs (white on black, as scanned), `train` or `heldout` split."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    cut = len(d.target) - DIGITS_HELD_OUT
    idx = range(cut) if split == "train" else range(cut, len(d.target))
    images = []
    for i in idx:
        arr = (d.images[i] * (255 / 16)).astype(np.uint8)
        images.append(_png(Image.fromarray(arr, "L").resize((size, size), Image.BILINEAR).convert("RGB")))
    return images, [int(d.target[i]) for i in idx]


def digits_captions(labels: list[int]) -> list[str]:
    forms = ['a photo of the number: "{c}".', "the digit {c}", "a handwritten {c}", "{c}, written by hand"]
    return [forms[i % len(forms)].format(c=DIGIT_NAMES[y]) for i, y in enumerate(labels)]


def builtin(name: str, size: int = 64, limit: int | None = None) -> EvalData:
    if name == "digits":
        images, labels = digits_images("heldout", size)
        data = EvalData("digits", images, labels, list(DIGIT_NAMES), list(DIGIT_TEMPLATES),
                        [[c] for c in digits_captions(labels)])
    elif name == "demo_heldout":
        from pipelines.demo import web

        n = limit or 540
        samples = [web.sample(DEMO_HELDOUT_SEED, i) for i in range(n)]
        classes = [f"{c} {s}" for c in web.COLORS for s in web.SHAPES]
        images = [_png(web.render(s, size)) for s in samples]
        captions = [[s.caption, s.captioned(s.template + 1)] for s in samples]
        data = EvalData("demo_heldout", images, [classes.index(s.label) for s in samples], classes,
                        list(SHAPE_TEMPLATES), captions)
    else:
        raise ValueError(f"evaluate: unknown built-in dataset {name!r}; built-ins: demo_heldout, digits")
    if limit is not None:
        data.images = data.images[:limit]
        data.labels = data.labels[:limit] if data.labels else None
        data.captions = data.captions[:limit] if data.captions else None
    return data



def load(cfg: EvalSet, size: int) -> EvalData:
    """The set a job names: a built-in at this image size, or the columns of its files (any fsspec URL)."""
    if cfg.builtin:
        data = builtin(cfg.builtin, size, cfg.limit)
        data.name = cfg.name  # metrics and files carry the job's name for the set
        return data
    # EvalSet.__post_init__ holds these: a set from files has a path, and the columns its tasks need
    assert cfg.path is not None
    roles = {"image": cfg.image_column}
    if "zeroshot" in cfg.tasks:
        assert cfg.label_column
        roles["label"] = cfg.label_column
    if "retrieval" in cfg.tasks:
        assert cfg.caption_column
        roles["caption"] = cfg.caption_column
    cols = pairs.read_columns(cfg.name, cfg.path, cfg.format, roles)
    n = len(cols["image"]) if cfg.limit is None else min(cfg.limit, len(cols["image"]))
    labels = pairs.as_labels(cfg.name, cols["label"][:n], len(cfg.classnames)) if "label" in cols else None
    captions = pairs.as_captions(cfg.name, cols["caption"][:n]) if "caption" in cols else None
    return EvalData(cfg.name, cols["image"][:n], labels, list(cfg.classnames), cfg.templates, captions)
