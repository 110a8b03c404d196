"""Ray Data side of training: curated shards -> decoded, augmented, tokenised numpy batches.

Decoding and the model's preprocessing run in Ray Data tasks on CPU (anywhere in the cluster), never in
the training workers; each worker iterates only its own split of the stream (`get_dataset_shard`).
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=4)
def _transforms(arch: str, augment: bool) -> tuple[Any, Any]:
    """(image transform, tokenizer) for an architecture, built once per Ray worker process."""
    from pipelines.models import transforms

    return transforms(arch, augment)


def preprocess(batch: dict[str, np.ndarray], arch: str, augment: bool) -> dict[str, np.ndarray]:
    """Decode, transform and tokenise a batch (random augmentation: a new crop every epoch)."""
    import torch
    from PIL import Image

    transform, tokenizer = _transforms(arch, augment)
    captions = [str(c) for c in batch["caption"]]
    images = []
    for i, data in enumerate(batch["image"]):
        try:
            with Image.open(io.BytesIO(data)) as im:
                images.append(transform(im.convert("RGB")))
        except Exception as exc:  # noqa: BLE001 - curated rows decoded once already; name the row
            raise ValueError(f"train data: cannot decode image of row {batch['uid'][i]!r}: {exc}") from None
    return {"image": torch.stack(images).numpy(), "text": tokenizer(captions).numpy()}


def dataset(urls: list[str], arch: str, augment: bool, seed: int | None, data_cpus: float, batch_rows: int = 64) -> Any:
    """A lazy Ray Dataset of preprocessed rows over the curated shards; every pass (epoch) reads the files in
    a new shuffled order (a fixed order with `seed`).  `randomize_block_order` would instead wait for every
    block of the pass before passing any on."""
    import ray.data

    shuffle = "files" if seed is None else ray.data.FileShuffleConfig(seed=seed)
    ds = ray.data.read_parquet(urls, columns=["uid", "image", "caption"], shuffle=shuffle)
    return ds.map_batches(preprocess, batch_size=batch_rows, batch_format="numpy", num_cpus=data_cpus,
                          fn_kwargs={"arch": arch, "augment": augment})
