"""The curate stage's parameters: what a job writes under `stages.<name>.with` for `uses: curate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.models import ModelRef

RULES = ("basic", "language", "dedup_image", "dedup_text", "near_duplicate", "decontaminate", "clip_score")
# rules whose decision for a row depends on other rows: applied after all per-row scores are known
SET_RULES = ("dedup_image", "dedup_text", "near_duplicate", "clip_score_top")

Rule = Literal["basic", "language", "dedup_image", "dedup_text", "near_duplicate", "decontaminate", "clip_score"]


def _f(default, help, **bounds):  # noqa: A002 - short helper for field metadata
    if isinstance(default, (list, dict)) or callable(default):
        factory = default if callable(default) else (lambda: type(default)(default))
        return field(default_factory=factory, metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(kw_only=True)
class BasicRule:
    """DataComp's basic filter by default: caption > 2 words and > 5 characters, min side >= 200, aspect <= 3."""

    min_words: int = _f(3, "fewest whitespace-separated words in the caption", minimum=0)
    min_chars: int = _f(6, "fewest characters in the stripped caption", minimum=0)
    min_side: int = _f(200, "smallest allowed shorter image side, pixels", minimum=0)
    max_side: int | None = _f(None, "largest allowed longer image side, pixels")
    max_aspect: float | None = _f(3.0, "largest allowed longer side / shorter side")
    sides: Literal["original", "stored"] = _f(
        "original", "which image size the side rules read: the source image's (as DataComp) or the stored one's")


@dataclass(kw_only=True)
class LanguageRule:
    """Caption language by py3langid (an offline model inside the package)."""

    keep: list[str] = _f(["en"], "ISO 639-1 codes to keep")
    min_score: float = _f(0.0, "lowest normalised probability of the detected language", minimum=0, maximum=1)


@dataclass(kw_only=True)
class NearDuplicateRule:
    """Near-duplicate images: perceptual hashes (64-bit pHash) within a Hamming distance; the first row is kept."""

    max_distance: int = _f(4, "largest Hamming distance between pHashes that counts as a duplicate", minimum=0, maximum=16)


@dataclass(kw_only=True)
class EvalSet:
    name: str = field(metadata={"help": "name used in the ledger's contaminated_by column"})
    path: str = field(metadata={"help": "Parquet file(s) or glob of the evaluation set's images (fsspec)"})
    image_column: str = _f("image", "column of encoded image bytes")


@dataclass(kw_only=True)
class DecontaminateRule:
    """Drop rows whose image is a near duplicate (pHash) of any image in the named evaluation sets."""

    sets: list[EvalSet] = _f([], "evaluation sets to protect")
    max_distance: int = _f(4, "largest pHash Hamming distance that counts as contamination", minimum=0, maximum=16)


@dataclass(kw_only=True)
class ClipScoreRule:
    """Image-text cosine similarity from an open_clip model, computed by a pool of Ray actors in batches."""

    model: ModelRef = _f(ModelRef, "the scoring model")
    threshold: float | None = _f(None, "keep rows scoring at least this (DataComp's LAION-2B recipe: 0.28 with ViT-B/32)")
    top_fraction: float | None = _f(
        None, "keep this fraction of the rows reaching the rule, best first (ties by input order)",
        exclusiveMinimum=0, maximum=1)
    batch_size: int = _f(64, "images per forward pass", minimum=1)
    actors: int = _f(1, "scoring actors in the pool", minimum=1)
    num_cpus: float = _f(1.0, "CPUs per actor (also its torch threads)", exclusiveMinimum=0)
    num_gpus: float = _f(0.0, "GPUs per actor", minimum=0)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelRef(**self.model)
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("clip_score: give threshold or top_fraction, not both (neither: scores only)")


@dataclass(kw_only=True)
class CurateConfig:
    """Filter, deduplicate and score crawled shards into a curated dataset and a ledger of every row."""

    rules: list[Rule] = _f(["basic", "dedup_image", "dedup_text", "near_duplicate"],
                           "rules applied in this order; a dropped row's reason is the first rule that dropped it")
    basic: BasicRule = _f(BasicRule, "caption and image-size rules")
    language: LanguageRule = _f(LanguageRule, "caption language rule")
    near_duplicate: NearDuplicateRule = _f(NearDuplicateRule, "perceptual-hash dedup")
    decontaminate: DecontaminateRule = _f(DecontaminateRule, "evaluation-set decontamination")
    clip_score: ClipScoreRule = _f(ClipScoreRule, "CLIP-score scoring and selection")
    shard_rows: int | None = _f(10_000, "rows per curated shard (all full but the last)", minimum=1)
    shard_bytes: int | None = _f(None, "image bytes per curated shard instead of rows", minimum=1)

    def __post_init__(self) -> None:
        dup = {r for r in self.rules if self.rules.count(r) > 1}
        if dup:
            raise ValueError(f"rules: {', '.join(sorted(dup))} listed more than once")
        if self.shard_bytes is not None:
            self.shard_rows = None
        if self.shard_rows is None and self.shard_bytes is None:
            raise ValueError("give shard_rows or shard_bytes")
        if "decontaminate" in self.rules and not self.decontaminate.sets:
            raise ValueError("decontaminate: the rule is listed but decontaminate.sets names no evaluation set")
