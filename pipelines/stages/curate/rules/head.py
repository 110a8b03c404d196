"""`head`: an embedding-head classifier (pipelines/heads.py) on a CLIP model's image embeddings.

LAION's aesthetic and NSFW predictors are such heads.  A pool of Ray actors, each loading the CLIP model and the
head once, embeds every candidate row's image and writes the head's score to a column named by the head's
`output` (e.g. `aesthetic`); the rule then drops rows scoring below `min` or above `max`.  A row whose image
cannot be decoded scores NaN, and is dropped.  The reason is `head:<output>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.configschema import field
from pipelines.embedding import ActorPool, model_identity
from pipelines.models import ModelRef
from pipelines.stages.curate.rules import (
    BASE,
    EXTRA,
    TAIL,
    Rule,
    ScoreField,
    Work,
    contract_scores,
    register_rule,
)

if TYPE_CHECKING:
    import logging

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import ray.data

    from pipelines.heads import HeadConfig
    from pipelines.stage import StageContext


@dataclass(kw_only=True)
class HeadRuleConfig(ActorPool):
    """A small classifier on CLIP image embeddings (LAION's aesthetic or NSFW predictor, say): keep rows it scores
    within [min, max]."""

    path: str | None = field(None, "the head's directory (fsspec): head.json and head.safetensors (pipelines/heads.py)")
    model: ModelRef = field(ModelRef, "the open_clip model whose image embeddings the head reads")
    min: float | None = field(None, "drop rows the head scores below this")
    max: float | None = field(None, "drop rows the head scores above this")

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelRef(**self.model)


@register_rule
class HeadRule(Rule):
    """Scores each candidate's image embedding with an embedding head; drops rows outside [min, max]."""

    name = "head"
    Config = HeadRuleConfig
    uses_images = True

    def __init__(self, config: Any, position: int) -> None:
        super().__init__(config, position)
        self._head: HeadConfig | None = None  # read from the head's directory on first use (a small JSON file)

    def head(self) -> HeadConfig:
        """The head's config, read once, its score name checked against the working table's columns."""
        if self._head is None:
            from pipelines import heads

            if not self.config.path:
                raise ValueError("head.path: the rule is listed but names no head directory")
            cfg = heads.read_config(self.config.path)
            taken = {n for n, _ in (*BASE, *TAIL)} | set(EXTRA) | {f.name for f in contract_scores()}
            if cfg.output in taken:
                raise ValueError(f"head {self.config.path}: output {cfg.output!r} is already a column of the curate "
                                 "working table; rename the head's output")
            self._head = cfg
        return self._head

    @property
    def output(self) -> str:
        return self.head().output

    @classmethod
    def reason_doc(cls) -> tuple[str, ...]:
        return ("head:<output>",)

    def reasons(self) -> tuple[str, ...]:
        return (f"head:{self.output}",) if self.config.path else (self.name,)

    def score_fields(self) -> tuple[ScoreField, ...]:
        if not self.config.path:
            return ()
        return (ScoreField(self.output, "float32", f"score of the embedding head at {self.config.path}"),)

    def check(self) -> None:
        c = self.config
        if not c.path:
            raise ValueError("head.path: the rule is listed but names no head directory")
        if c.min is None and c.max is None:
            raise ValueError("head: give min, max or both (rows scoring outside [min, max] are dropped)")
        for key in ("min", "max"):
            value = getattr(c, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"head.{key}: must be a finite number, got {value}")
        if c.min is not None and c.max is not None and c.min > c.max:
            raise ValueError(f"head: min ({c.min}) is above max ({c.max}); no row could be kept")

    def identity(self) -> dict[str, Any]:
        from pipelines import heads, storage

        files = [storage.join(self.config.path, n) for n in (heads.CONFIG_FILE, heads.WEIGHTS_FILE)]
        return {"head": storage.file_keys(files), "model": model_identity(self.config.model)}

    def prepare(self, log: logging.Logger) -> None:
        """Read the head on the driver, so that a missing file or a weight of the wrong shape stops the stage
        before any actor starts; check its input width against the model's embedding width when the config
        names it (a model_uri's config is only known once downloaded, and an actor checks it)."""
        from pipelines import heads, models

        self._head = None
        cfg = self.head()
        heads.load_head(self.config.path)  # the module is dropped: self must stay picklable and light
        ref = self.config.model
        if not ref.model_uri:
            dim = models.model_config(ref.arch).get("embed_dim")
            if dim is not None and dim != cfg.input_dim:
                raise ValueError(f"head {self.config.path}: reads {cfg.input_dim}-dim embeddings (layers "
                                 f"{list(cfg.layers)}), but model {ref.arch} embeds images in {dim}")
        log.info("head %s: %s from %s embeddings (layers %s)", self.config.path, cfg.output, ref.model_uri or ref.arch,
                 list(cfg.layers))

    def stream(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        from pipelines.embedding import model_pass

        return model_pass(ds, HeadScorer, self.config, self.work, head=self.config.path)

    def decide(self, work: pd.DataFrame, crawled: pa.Table | None) -> list[tuple[str, np.ndarray]]:
        import numpy as np

        scores = work[self.output].to_numpy(dtype=np.float32)
        c = self.config
        keep = ~np.isnan(scores)  # unscorable: dropped
        if c.min is not None:
            keep &= scores >= c.min
        if c.max is not None:
            keep &= scores <= c.max
        return [(f"head:{self.output}", ~keep)]


class HeadScorer:
    """A Ray Data actor: the CLIP model and the head loaded once, each batch's images embedded and scored.

    Rows whose `image` is null (dropped by an earlier rule, or not downloaded) pass through unscored."""

    def __init__(self, model: ModelRef, head: str, batch_size: int, threads: int, work: Work | None = None,
                 device: str | None = None) -> None:
        from pipelines import heads
        from pipelines.embedding import load_model

        self.model, self.preprocess, _, self.device = load_model(model, threads, device)
        self.head, self.config = heads.load_head(head)
        self.head.to(self.device)
        self.where = head
        self.batch_size = batch_size
        self.work = work  # None: return pandas batches (scoring outside a curate stage)

    def scores(self, images: list[bytes]) -> np.ndarray:
        """The head's score of each image, in batches of `batch_size`; NaN for an image that cannot be decoded."""
        import numpy as np
        import torch

        from pipelines.embedding import embed_images

        out = np.full(len(images), np.nan, dtype=np.float32)
        emb, bad = embed_images(self.model, self.preprocess, images, self.batch_size, self.device)
        if emb is None:
            return out
        if emb.shape[1] != self.config.input_dim:
            raise ValueError(f"head {self.where}: reads {self.config.input_dim}-dim embeddings (layers "
                             f"{list(self.config.layers)}), but the model embeds images in {emb.shape[1]}")
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):  # the head on the batches the model saw
                out[start:start + self.batch_size] = self.head(emb[start:start + self.batch_size]).cpu().numpy()
        out[bad] = np.nan
        return out

    def __call__(self, batch: pd.DataFrame) -> pa.Table | pd.DataFrame:
        import numpy as np

        name = self.config.output
        todo = batch["image"].notna().to_numpy()
        if todo.any():
            values = (batch[name].to_numpy(dtype=np.float32).copy() if name in batch
                      else np.full(len(batch), np.nan, dtype=np.float32))
            values[todo] = self.scores(list(batch["image"][todo]))
            batch = batch.assign(**{name: values})
        return self.work.table(batch) if self.work is not None else batch
