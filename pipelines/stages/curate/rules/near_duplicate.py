"""`near_duplicate`: images whose 64-bit pHashes are within a Hamming distance; the first row is kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.configschema import field
from pipelines.stages.curate.rules import Rule, register_rule

if TYPE_CHECKING:
    import ray.data

    from pipelines.stage import StageContext


@dataclass(kw_only=True)
class NearDuplicateConfig:
    """Near-duplicate images: perceptual hashes (64-bit pHash) within a Hamming distance; the first row is kept."""

    max_distance: int = field(4, "largest Hamming distance between pHashes that counts as a duplicate",
                              minimum=0, maximum=16)


@register_rule
class NearDuplicateRule(Rule):
    name = "near_duplicate"
    Config = NearDuplicateConfig

    def decide_set(self, work: ray.data.Dataset, ctx: StageContext) -> tuple[ray.data.Dataset, dict[str, float]]:
        from pipelines.stages.curate import select

        return select.dedup(work, self, "phash", "near_duplicate", self.config.max_distance), {}
