"""CLIP scores: image-text cosine similarity from an open_clip model, one model per Ray actor.

`ClipScorer` is a callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(size=n))`: Ray Data keeps a pool of
`n` actors, each loading the model once and scoring batches of rows as they stream past.  Rows whose
`image` is null (already dropped by an earlier row rule, or not downloaded) are passed through unscored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipelines.embedding import decode, load_model
from pipelines.models import ModelRef
from pipelines.stages.curate.rules import Work


class ClipScorer:
    def __init__(self, model: ModelRef, batch_size: int, threads: int, work: Work | None = None,
                 device: str | None = None) -> None:
        self.work = work  # None: return pandas batches (scoring outside a curate stage, as the benchmark does)
        self.model, self.preprocess, self.tokenizer, self.device = load_model(model, threads, device)
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


