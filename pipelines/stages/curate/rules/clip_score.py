"""`clip_score`: image-text cosine similarity from an open_clip model, scored by a pool of Ray actors.

Keep rows by a `threshold` (a per-row decision once the scores are in) or the best `top_fraction` of the rows
reaching the rule (a set decision: the exact k-th best score by radix select), or only score them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.configschema import field
from pipelines.embedding import ActorPool, model_identity
from pipelines.models import ModelRef
from pipelines.stages.curate.rules import Rule, ScoreField, register_rule

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import ray.data

    from pipelines.stage import StageContext


@dataclass(kw_only=True)
class ClipScoreConfig(ActorPool):
    """Image-text cosine similarity from an open_clip model, computed by a pool of Ray actors in batches."""

    model: ModelRef = field(ModelRef, "the scoring model")
    threshold: float | None = field(
        None, "keep rows scoring at least this (DataComp's LAION-2B recipe: 0.28 with ViT-B/32)")
    top_fraction: float | None = field(
        None, "keep this fraction of the rows reaching the rule, best first (ties by input order)",
        exclusiveMinimum=0, maximum=1)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelRef(**self.model)
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("clip_score: give threshold or top_fraction, not both (neither: scores only)")


@register_rule
class ClipScoreRule(Rule):
    name = "clip_score"
    Config = ClipScoreConfig
    scores = (ScoreField("clip_score", "float32", "cosine similarity of image and caption embeddings"),)
    uses_images = True

    def identity(self) -> dict[str, Any]:
        return model_identity(self.config.model)

    def stream(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        from pipelines.embedding import model_pass
        from pipelines.stages.curate.scorer import ClipScorer

        return model_pass(ds, ClipScorer, self.config, self.work)

    def decide(self, work: pd.DataFrame, crawled: pa.Table | None) -> list[tuple[str, np.ndarray]]:
        if self.config.threshold is None:
            return []
        scores = work["clip_score"].to_numpy(dtype="float32")
        return [("clip_score", ~(scores >= self.config.threshold))]  # NaN (unscorable) fails too

    def decide_set(self, work: ray.data.Dataset, ctx: StageContext) -> tuple[ray.data.Dataset, dict[str, float]]:
        if self.config.top_fraction is None:
            return work, {}
        from pipelines.stages.curate import select

        work, cutoff = select.top_fraction(work, self, self.config.top_fraction, "clip_score")
        return work, ({"clip_score_cutoff": cutoff} if cutoff is not None else {})
