"""Embeddings on Ray: a pool of actors (`EmbedPool`, one per stage, reused for each of its datasets) embeds
images and texts in batches, so a large evaluation set spreads over the cluster.  `encode` is the batch loop the actors run,
and what the train stage calls on its live model every `eval_every` steps."""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import numpy as np

from pipelines.models import ModelRef


def encode_images(preprocess: Any, data: list[bytes], fn: Any, device: Any) -> Any:
    """L2-normalised float32 embeddings of encoded images, through `fn` (e.g. `model.encode_image`)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in data])
    return F.normalize(fn(x.to(device)).float(), dim=-1)


def encode_texts(tokenizer: Any, texts: list[str], fn: Any, device: Any) -> Any:
    import torch.nn.functional as F

    return F.normalize(fn(tokenizer(texts).to(device)).float(), dim=-1)


def encode(preprocess: Any, tokenizer: Any, image_fn: Any, text_fn: Any, images: list[bytes], texts: list[str],
           batch_size: int, device: Any) -> tuple[Any, Any]:
    """(image embeddings, text embeddings) as CPU tensors, in batches, without gradients, in one process."""
    import torch

    with torch.no_grad():
        img = [encode_images(preprocess, images[i:i + batch_size], image_fn, device).cpu()
               for i in range(0, len(images), batch_size)]
        txt = [encode_texts(tokenizer, texts[i:i + batch_size], text_fn, device).cpu()
               for i in range(0, len(texts), batch_size)]
    return (torch.cat(img) if img else torch.zeros(0, 0)), (torch.cat(txt) if txt else torch.zeros(0, 0))


class Embedder:
    """Holds one model; embeds a batch of images (bytes) or texts (str), L2-normalised, float32.  The features
    are the model's normalised ones (`normalize=True`, what its forward returns), so the scores equal, bit for bit,
    those the train stage logs from the forward of the model it trains (`pipelines.evaluation.live`): normalising
    the raw features once gives other last bits, enough to flip a near tie in zero-shot accuracy."""

    def __init__(self, model: ModelRef, threads: int = 1) -> None:
        import torch

        from pipelines.models import create

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.preprocess, self.tokenizer = create(model, device=self.device)

    def embed(self, kind: str, items: list[Any]) -> np.ndarray:
        import torch

        with torch.no_grad():
            if kind == "image":
                emb = encode_images(self.preprocess, items, partial(self.model.encode_image, normalize=True),
                                    self.device)
            else:
                emb = encode_texts(self.tokenizer, items, partial(self.model.encode_text, normalize=True),
                                   self.device)
        return emb.cpu().numpy().astype(np.float32)


class EmbedPool:
    """`actors` Embedder actors on the Ray cluster, made once and used for every dataset a stage embeds, so each
    set does not pay the actors' start (a new process, torch and open_clip imported, the model loaded): on the
    demo's two sets that start was most of the stage.  An actor lost with its node is restarted elsewhere and
    its batch retried (`max_restarts`, `max_task_retries`)."""

    def __init__(self, model: ModelRef, actors: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 restarts: int = 3) -> None:
        import ray

        cls = ray.remote(Embedder).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=restarts,
                                           max_task_retries=restarts)
        self.actors = [cls.remote(model, max(1, int(num_cpus))) for _ in range(actors)]

    def embed(self, images: list[bytes], texts: list[str], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """(image embeddings, text embeddings), in input order; batches go to whichever actor is free."""
        from ray.util import ActorPool

        batches: list[tuple[str, list[Any]]] = [("image", images[i:i + batch_size])
                                                for i in range(0, len(images), batch_size)]
        batches += [("text", texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        out = list(ActorPool(self.actors).map(lambda actor, b: actor.embed.remote(*b), batches))  # in order
        embeddings = {}
        for kind, n in (("image", len(images)), ("text", len(texts))):
            parts = [e for (k, _), e in zip(batches, out, strict=True) if k == kind]
            arr = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
            if len(arr) != n:
                raise RuntimeError(f"evaluate: {n} {kind}s sent to the embedding actors, {len(arr)} came back")
            embeddings[kind] = arr
        return embeddings["image"], embeddings["text"]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> EmbedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embed(model: ModelRef, images: list[bytes], texts: list[str], batch_size: int = 128, actors: int = 1,
          num_cpus: float = 1.0, num_gpus: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, text embeddings), in input order, computed by a pool of actors made for this call."""
    with EmbedPool(model, actors, num_cpus, num_gpus) as pool:
        return pool.embed(images, texts, batch_size)
