"""CLIP scores: image-text cosine similarity from an open_clip model, one model per Ray actor.

`ClipScorer` is a callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(size=n))`: Ray Data keeps a pool of
`n` actors, each loading the model once and scoring batches of rows as they stream past.  Rows whose
`image` is null (already dropped by an earlier row rule, or not downloaded) are passed through unscored.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

from pipelines.models import ModelRef
from pipelines.stages.curate.rules import Work


def decode(preprocess: Any, images: list[bytes]) -> tuple[Any, list[int]]:
    """A model's input batch from encoded images, and the indices of those that cannot be decoded (their slots
    are zeros, and the caller scores them NaN, which every selection drops); None when none decodes."""
    import torch
    from PIL import Image

    tensors, bad = [], []
    for i, b in enumerate(images):
        try:
            tensors.append(preprocess(Image.open(io.BytesIO(b)).convert("RGB")))
        except Exception:  # noqa: BLE001  (an undecodable image is the caller's NaN, not a failed pool)
            bad.append(i)
            tensors.append(None)
    shape = next((t.shape for t in tensors if t is not None), None)
    if shape is None:
        return None, bad
    return torch.stack([t if t is not None else torch.zeros(shape) for t in tensors]), bad


def embed_images(model: Any, preprocess: Any, images: list[bytes], batch_size: int, device: str
                 ) -> tuple[Any, list[int]]:
    """An open_clip model's image embeddings, not normalised: a float32 torch tensor on `device`, images x
    dimensions, from forward passes of `batch_size` images (under bf16 autocast on CUDA); and the indices of the
    images that cannot be decoded, whose rows are zeros.  The tensor is None when no image decodes."""
    import torch

    out, bad = None, []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels, failed = decode(preprocess, images[start:start + batch_size])
            bad += [start + i for i in failed]
            if pixels is None:
                continue
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                emb = model.encode_image(pixels.to(device)).float()
            if out is None:
                out = torch.zeros((len(images), emb.shape[1]), dtype=torch.float32, device=emb.device)
            out[start:start + len(emb)] = emb
        if out is not None and bad:
            out[bad] = 0.0
    return out, bad


def model_pass(ds: Any, scorer: type, config: Any, work: Any, **kwargs: Any) -> Any:
    """`ds` scored by a pool of `config.actors` Ray actors of class `scorer`, each with `config.num_cpus` CPUs (its
    torch threads) and `config.num_gpus` GPUs, in batches of `config.batch_size`: a model rule's `stream`."""
    import ray.data

    return ds.map_batches(scorer, batch_size=config.batch_size, batch_format="pandas",
                          compute=ray.data.ActorPoolStrategy(size=config.actors), num_cpus=config.num_cpus,
                          num_gpus=config.num_gpus,
                          fn_constructor_kwargs={"model": config.model, "batch_size": config.batch_size, "work": work,
                                                 "threads": max(1, int(config.num_cpus)), **kwargs})


class ClipScorer:
    def __init__(self, model: ModelRef, batch_size: int, threads: int, work: Work | None = None,
                 device: str | None = None) -> None:
        import torch

        self.work = work  # None: return pandas batches (scoring outside a curate stage, as the benchmark does)

        from pipelines import models

        torch.set_num_threads(max(1, threads))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.preprocess, self.tokenizer = models.create(model, device=self.device)
        self.batch_size = batch_size

    def scores(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, caption) pair, in batches of `batch_size`."""
        import torch

        out = np.empty(len(images), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            imgs = images[start:start + self.batch_size]
            pixels, bad = decode(self.preprocess, imgs)
            if pixels is None:
                out[start:start + len(imgs)] = np.nan
                continue
            tokens = self.tokenizer([c or "" for c in captions[start:start + self.batch_size]])
            with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16,
                                                        enabled=self.device == "cuda"):
                img = self.model.encode_image(pixels.to(self.device), normalize=True)
                txt = self.model.encode_text(tokens.to(self.device), normalize=True)
            out[start:start + len(imgs)] = (img.float() * txt.float()).sum(-1).cpu().numpy()
            out[[start + i for i in bad]] = np.nan
        return out

    def __call__(self, batch: pd.DataFrame) -> Any:
        todo = batch["image"].notna().to_numpy()
        if todo.any():
            scores = batch["clip_score"].to_numpy(dtype=np.float32).copy()
            scores[todo] = self.scores(list(batch["image"][todo]), list(batch["caption"][todo]))
            batch = batch.assign(clip_score=scores)
        return self.work.table(batch) if self.work is not None else batch


