"""The embed stage's parameters: what a job writes under `stages.<name>.with` for `uses: embed`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipelines.configschema import field
from pipelines.embedding import ActorPool
from pipelines.models import ModelRef

if TYPE_CHECKING:
    from pipelines.preflight import Check

KINDS = ("image", "text")


@dataclass(kw_only=True)
class EmbedConfig(ActorPool):
    """Image and text embeddings (float16, L2-normalised) of every successful row of a crawl's, ingest's or curate's
    output, keyed by uid, as Parquet shards beside it: computed once per dataset version and model."""

    model: ModelRef = field(ModelRef, "the open_clip model that embeds images and captions")
    embeddings: list[Literal["image", "text"]] = field(
        list(KINDS), "which embeddings to write: image (of the stored image bytes), text (of the caption)", minItems=1)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelRef(**self.model)
        unknown = [k for k in self.embeddings if k not in KINDS]
        if unknown:
            raise ValueError(f"embeddings: expected image, text or both, got {', '.join(map(repr, unknown))}")
        if len(set(self.embeddings)) != len(self.embeddings):
            raise ValueError(f"embeddings: {self.embeddings} lists one kind twice")

    def preflight(self, check: Check) -> None:
        """Before the run (`pipelines.preflight`): the model's architecture exists and its checkpoint fits it."""
        check.attempt(check.model, "model", self.model)
