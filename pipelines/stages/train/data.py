"""Ray Data side of training: curated shards -> decoded, augmented, tokenised numpy batches.

Decoding and the model's preprocessing run in Ray Data tasks on CPU (anywhere in the cluster), never in
the training workers; each worker iterates only its own split of the stream (`get_dataset_shard`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
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


def pass_order(urls: list[str], passes: int, seed: int | None) -> list[str]:
    """The shard files of `passes` passes, one after the other, each pass in a shuffled order: the same order
    every pass with `seed`, a new one each pass without."""
    fixed = np.random.default_rng(seed).permutation(len(urls)) if seed is not None else None
    rng = np.random.default_rng()
    return [urls[i] for _ in range(passes) for i in (fixed if fixed is not None else rng.permutation(len(urls)))]


def passes_needed(planned_steps: int, steps_per_epoch: int) -> int:
    return -(-planned_steps // steps_per_epoch)


COLUMNS = ["uid", "image", "caption"]
MAX_BLOCKS = 10_000  # blocks of the file list: more (files x passes) share a block and its task reads them in turn


def read_and_preprocess(files: dict[str, np.ndarray], arch: str, augment: bool,
                        batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Read each curated shard named in the batch, `batch_rows` rows at a time, and yield them preprocessed
    (Ray Data sends each yielded block on as it is made, so a long file streams)."""
    import pyarrow.parquet as pq

    from pipelines import storage

    for url in files["path"]:
        fs, path = storage.filesystem(str(url))
        with fs.open(path, "rb") as fh:
            for rb in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=COLUMNS):
                yield preprocess({c: rb.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}, arch, augment)


def dataset(urls: list[str], arch: str, augment: bool, seed: int | None, data_cpus: float, passes: int = 1,
            batch_rows: int = 64) -> Any:
    """A lazy Ray Dataset of preprocessed rows: `passes` passes (epochs) over the curated shards as one stream,
    so a worker's iterator runs through every epoch without the pipeline stopping and starting again at each
    boundary (each new pass of Ray Data's streaming split left the workers idle ~5 s on the demo's data).

    The stream is the list of files of every pass, each pass in its own shuffled order (`pass_order`); map
    tasks read and preprocess them.  Ray Data runs a few tasks at once, so the last rows of one pass can mix
    with the first of the next, as the per-worker shuffle buffer mixes rows within a pass.  (`read_parquet`
    cannot express the passes: its read tasks drop a file listed twice.)"""
    import ray.data

    items = [{"path": u} for u in pass_order(urls, passes, seed)]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    return ds.map_batches(read_and_preprocess, batch_size=1, batch_format="numpy", num_cpus=data_cpus,
                          fn_kwargs={"arch": arch, "augment": augment, "batch_rows": batch_rows})
