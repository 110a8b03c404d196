"""CLIP embeddings of image bytes and captions on a pool of Ray Data actors: what the curate stage's model rules
(clip_score, head, semantic_dedup) and the embed stage share.

`ActorPool` is the settings every such pool takes (a model rule's Config and the embed stage's Config extend it);
`model_pass` runs a callable actor class over a Ray Data dataset with them; `load_model` is what each actor does
once; `embed_images` and `embed_texts` are the batch loops it runs; `unit` L2-normalises their output and says
which rows have an embedding.  Light at import (torch, PIL, Ray inside the functions): job validation imports
the configs that extend `ActorPool`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.configschema import field

if TYPE_CHECKING:
    import numpy as np

    from pipelines.models import ModelRef


@dataclass(kw_only=True)
class ActorPool:
    """Settings of a pool of Ray actors that each hold one model (see `model_pass`); a Config extends this."""

    batch_size: int = field(64, "images (or captions) per forward pass", minimum=1)
    actors: int = field(1, "actors in the pool, each holding the model", minimum=1)
    num_cpus: float = field(1.0, "CPUs per actor (also its torch threads)", exclusiveMinimum=0)
    num_gpus: float = field(0.0, "GPUs per actor", minimum=0)


def model_identity(ref: ModelRef) -> dict[str, Any]:
    """The keys of a ModelRef's files (a checkpoint, a JSON architecture): part of the fingerprint of a stage that
    runs the model (a model rule's `identity()`, the embed stage's input identity), so new weights at the same
    path are a new output."""
    from pipelines import storage

    files = [f for f in (ref.checkpoint, ref.arch if str(ref.arch).endswith(".json") else None) if f]
    return storage.file_keys(files) if files else {}


def load_model(model: ModelRef, threads: int, device: str | None = None) -> tuple[Any, Any, Any, str]:
    """What an actor does once: torch on `threads` threads, then (model in eval mode, image preprocessing,
    tokenizer, device), on CUDA when there is one unless `device` says otherwise."""
    import torch

    from pipelines import models

    torch.set_num_threads(max(1, threads))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net, preprocess, tokenizer = models.create(model, device=device)
    return net, preprocess, tokenizer, device


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


def embed_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int, device: str) -> Any:
    """An open_clip model's text embeddings, not normalised, as `embed_images` makes image ones: a float32 torch
    tensor on `device`, texts x dimensions (None for no text)."""
    import torch

    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                parts.append(model.encode_text(tokens).float())
    return torch.cat(parts) if parts else None


def unit(emb: Any, bad: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows' embeddings (`embed_images`' or `embed_texts`' tensor, or None) L2-normalised, as one float32 array
    (rows x dimensions; zero columns when `emb` is None), and which rows have one: not an image that could not be
    decoded (in `bad`), nor one whose unit embedding is not finite (a bf16 overflow on CUDA, say)."""
    import numpy as np
    import torch

    if emb is None:
        return np.zeros((n, 0), dtype=np.float32), np.zeros(n, dtype=bool)
    vectors = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
    ok = np.isfinite(vectors).all(axis=1)
    ok[bad] = False
    return vectors, ok


def model_pass(ds: Any, scorer: type, config: Any, work: Any, **kwargs: Any) -> Any:
    """`ds` scored by a pool of `config.actors` Ray actors of class `scorer`, each with `config.num_cpus` CPUs (its
    torch threads) and `config.num_gpus` GPUs, in batches of `config.batch_size`: a model rule's `stream`."""
    import ray.data

    return ds.map_batches(scorer, batch_size=config.batch_size, batch_format="pandas",
                          compute=ray.data.ActorPoolStrategy(size=config.actors), num_cpus=config.num_cpus,
                          num_gpus=config.num_gpus,
                          fn_constructor_kwargs={"model": config.model, "batch_size": config.batch_size, "work": work,
                                                 "threads": max(1, int(config.num_cpus)), **kwargs})
