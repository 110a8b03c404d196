"""`dedup_text`: exact duplicate pairs by normalised caption and URL; the first row in input order is kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.stages.curate.rules import Rule, register_rule

if TYPE_CHECKING:
    import ray.data

    from pipelines.stage import StageContext


@dataclass(kw_only=True)
class DedupTextConfig:
    """No parameters: the key is the caption (NFKC, case-folded, punctuation removed) with the URL."""


@register_rule
class DedupTextRule(Rule):
    name = "dedup_text"
    Config = DedupTextConfig

    def reasons(self) -> tuple[str, ...]:
        return ("duplicate_text",)

    def decide_set(self, work: ray.data.Dataset, ctx: StageContext) -> tuple[ray.data.Dataset, dict[str, float]]:
        from pipelines.stages.curate import select

        return select.dedup(work, self, "text_key", "duplicate_text"), {}
