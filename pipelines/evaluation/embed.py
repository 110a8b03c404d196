"""Embeddings on Ray: a pool of actors (Ray Data `map_batches` with a callable class) embeds images and texts
in batches, so a large evaluation set spreads over the cluster.  `encode` is the batch loop the actors run,
and what the train stage calls on its live model every `eval_every` steps."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

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
    """Holds one model; embeds a batch of images (bytes) or texts (str), L2-normalised, float32."""

    def __init__(self, model: ModelRef, threads: int = 1) -> None:
        import torch

        from pipelines.models import create

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.preprocess, self.tokenizer = create(model, device=self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """A batch may hold both kinds (Ray Data fills batches across blocks): each is embedded apart."""
        import torch

        out = []
        with torch.no_grad():
            for kind, rows in batch.groupby("kind", sort=False):
                if kind == "image":
                    emb = encode_images(self.preprocess, list(rows["image"]), self.model.encode_image, self.device)
                else:
                    emb = encode_texts(self.tokenizer, list(rows["text"]), self.model.encode_text, self.device)
                emb = emb.cpu().numpy()
                out.append(pd.DataFrame({"kind": kind, "i": rows["i"].to_numpy(), "embedding": list(emb)}))
        return pd.concat(out, ignore_index=True)


def embed(model: ModelRef, images: list[bytes], texts: list[str], batch_size: int = 128, actors: int = 1,
          num_cpus: float = 1.0, num_gpus: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, text embeddings), in input order, computed by an actor pool on the Ray cluster."""
    import ray.data

    rows: list[dict[str, Any]] = [{"kind": "image", "i": i, "image": b, "text": ""} for i, b in enumerate(images)]
    parts = [pd.DataFrame(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    trows = [{"kind": "text", "i": i, "image": b"", "text": t} for i, t in enumerate(texts)]
    parts += [pd.DataFrame(trows[i:i + batch_size]) for i in range(0, len(trows), batch_size)]
    ds = ray.data.from_pandas(parts)
    out = ds.map_batches(Embedder, batch_size=batch_size, batch_format="pandas",
                         compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=num_cpus, num_gpus=num_gpus,
                         fn_constructor_kwargs={"model": model, "threads": max(1, int(num_cpus))})
    result = out.to_pandas()
    embeddings = {}
    for kind, n in (("image", len(images)), ("text", len(texts))):
        sel = result[result["kind"] == kind]
        if len(sel) != n:
            raise RuntimeError(f"evaluate: {n} {kind}s sent to the embedding actors, {len(sel)} came back")
        arr = np.stack(sel["embedding"].to_numpy()) if n else np.zeros((0, 0), np.float32)
        embeddings[kind] = arr[np.argsort(sel["i"].to_numpy())].astype(np.float32)
    return embeddings["image"], embeddings["text"]
