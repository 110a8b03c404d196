"""`dedup_image`: exact duplicate images by the sha256 of their bytes; the first row in input order is kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.stages.curate.rules import Rule, register_rule

if TYPE_CHECKING:
    import ray.data

    from pipelines.stage import StageContext


@dataclass(kw_only=True)
class DedupImageConfig:
    """No parameters: rows with the same image bytes are duplicates."""


@register_rule
class DedupImageRule(Rule):
    name = "dedup_image"
    Config = DedupImageConfig

    def reasons(self) -> tuple[str, ...]:
        return ("duplicate_image",)

    def decide_set(self, work: ray.data.Dataset, ctx: StageContext) -> tuple[ray.data.Dataset, dict[str, float]]:
        from pipelines.stages.curate import select

        return select.dedup(work, self, "sha256", "duplicate_image"), {}
