"""`language`: the caption's language by py3langid (an offline model inside the package)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.configschema import field
from pipelines.stages.curate.rules import Rule, ScoreField, register_rule

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa


@dataclass(kw_only=True)
class LanguageConfig:
    """Caption language by py3langid (an offline model inside the package)."""

    keep: list[str] = field(["en"], "ISO 639-1 codes to keep")
    min_score: float = field(0.0, "lowest normalised probability of the detected language", minimum=0, maximum=1)


@register_rule
class LanguageRule(Rule):
    name = "language"
    Config = LanguageConfig
    scores = (ScoreField("language", "string", "py3langid's language of the caption (language rule only)"),
              ScoreField("language_score", "float32", "its normalised probability"))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}  # the identifier is loaded again where it is used

    def score(self, crawled: pa.Table, work: pd.DataFrame) -> dict[str, Any]:
        import numpy as np

        if getattr(self, "_model", None) is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        captions = [c or "" for c in crawled.column("caption").to_pylist()]
        pairs = [self._model.classify(c) if c.strip() else (None, 0.0) for c in captions]
        return {"language": [p[0] for p in pairs],
                "language_score": np.array([p[1] for p in pairs], dtype=np.float32)}

    def decide(self, work: pd.DataFrame, crawled: pa.Table | None) -> list[tuple[str, np.ndarray]]:
        ok = work["language"].isin(self.config.keep).to_numpy() & (
            work["language_score"].to_numpy() >= self.config.min_score)
        return [("language", ~ok)]
