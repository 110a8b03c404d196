"""`basic`: DataComp's basic filter, caption length and image sides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipelines.configschema import field
from pipelines.stages.curate.rules import Rule, register_rule

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa


@dataclass(kw_only=True)
class BasicConfig:
    """DataComp's basic filter by default: caption > 2 words and > 5 characters, min side >= 200, aspect <= 3."""

    min_words: int = field(3, "fewest whitespace-separated words in the caption", minimum=0)
    min_chars: int = field(6, "fewest characters in the stripped caption", minimum=0)
    min_side: int = field(200, "smallest allowed shorter image side, pixels", minimum=0)
    max_side: int | None = field(None, "largest allowed longer image side, pixels")
    max_aspect: float | None = field(3.0, "largest allowed longer side / shorter side")
    sides: Literal["original", "stored"] = field(
        "original", "which image size the side rules read: the source image's (as DataComp) or the stored one's")


@register_rule
class BasicRule(Rule):
    """Caption words and characters, shorter and longer side, aspect ratio: the first failing check is the reason."""

    name = "basic"
    Config = BasicConfig

    def reasons(self) -> tuple[str, ...]:
        return ("caption_words", "caption_chars", "min_side", "max_side", "aspect_ratio")

    def decide(self, work: pd.DataFrame, crawled: pa.Table | None) -> list[tuple[str, np.ndarray]]:
        import numpy as np

        b = self.config
        aspect = np.nan_to_num(work["aspect_ratio"].to_numpy(dtype=np.float64), nan=np.inf)
        return [("caption_words", work["caption_words"].to_numpy() < b.min_words),
                ("caption_chars", work["caption_chars"].to_numpy() < b.min_chars),
                ("min_side", work["min_side"].to_numpy() < b.min_side),
                ("max_side", work["max_side"].to_numpy() > (b.max_side if b.max_side is not None else 1 << 62)),
                ("aspect_ratio", aspect > (b.max_aspect if b.max_aspect is not None else np.inf))]
