"""The curate stage's parameters: what a job writes under `stages.<name>.with` for `uses: curate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.configschema import field
from pipelines.models import ModelRef

RULES = ("basic", "language", "dedup_image", "dedup_text", "near_duplicate", "decontaminate", "clip_score")
# rules whose decision for a row depends on other rows: applied after all per-row scores are known
SET_RULES = ("dedup_image", "dedup_text", "near_duplicate", "clip_score_top")

Rule = Literal["basic", "language", "dedup_image", "dedup_text", "near_duplicate", "decontaminate", "clip_score"]




@dataclass(kw_only=True)
class BasicRule:
    """DataComp's basic filter by default: caption > 2 words and > 5 characters, min side >= 200, aspect <= 3."""

    min_words: int = field(3, "fewest whitespace-separated words in the caption", minimum=0)
    min_chars: int = field(6, "fewest characters in the stripped caption", minimum=0)
    min_side: int = field(200, "smallest allowed shorter image side, pixels", minimum=0)
    max_side: int | None = field(None, "largest allowed longer image side, pixels")
    max_aspect: float | None = field(3.0, "largest allowed longer side / shorter side")
    sides: Literal["original", "stored"] = field(
        "original", "which image size the side rules read: the source image's (as DataComp) or the stored one's")


@dataclass(kw_only=True)
class LanguageRule:
    """Caption language by py3langid (an offline model inside the package)."""

    keep: list[str] = field(["en"], "ISO 639-1 codes to keep")
    min_score: float = field(0.0, "lowest normalised probability of the detected language", minimum=0, maximum=1)


@dataclass(kw_only=True)
class NearDuplicateRule:
    """Near-duplicate images: perceptual hashes (64-bit pHash) within a Hamming distance; the first row is kept."""

    max_distance: int = field(4, "largest Hamming distance between pHashes that counts as a duplicate",
                              minimum=0, maximum=16)


@dataclass(kw_only=True)
class EvalSet:
    name: str = field(help="name used in the ledger's contaminated_by column")
    path: str = field(help="Parquet file(s) or glob of the evaluation set's images (fsspec)")
    image_column: str = field("image", "column of encoded image bytes")


@dataclass(kw_only=True)
class DecontaminateRule:
    """Drop rows whose image is a near duplicate (pHash) of any image in the named evaluation sets."""

    sets: list[EvalSet] = field([], "evaluation sets to protect")
    max_distance: int = field(4, "largest pHash Hamming distance that counts as contamination", minimum=0, maximum=16)


@dataclass(kw_only=True)
class ClipScoreRule:
    """Image-text cosine similarity from an open_clip model, computed by a pool of Ray actors in batches."""

    model: ModelRef = field(ModelRef, "the scoring model")
    threshold: float | None = field(
        None, "keep rows scoring at least this (DataComp's LAION-2B recipe: 0.28 with ViT-B/32)")
    top_fraction: float | None = field(
        None, "keep this fraction of the rows reaching the rule, best first (ties by input order)",
        exclusiveMinimum=0, maximum=1)
    batch_size: int = field(64, "images per forward pass", minimum=1)
    actors: int = field(1, "scoring actors in the pool", minimum=1)
    num_cpus: float = field(1.0, "CPUs per actor (also its torch threads)", exclusiveMinimum=0)
    num_gpus: float = field(0.0, "GPUs per actor", minimum=0)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelRef(**self.model)
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("clip_score: give threshold or top_fraction, not both (neither: scores only)")


@dataclass(kw_only=True)
class CurateConfig:
    """Filter, deduplicate and score crawled shards into a curated dataset and a ledger of every row."""

    rules: list[Rule] = field(["basic", "dedup_image", "dedup_text", "near_duplicate"],
                              "rules applied in this order; a dropped row's reason is the first rule that dropped it")
    basic: BasicRule = field(BasicRule, "caption and image-size rules")
    language: LanguageRule = field(LanguageRule, "caption language rule")
    near_duplicate: NearDuplicateRule = field(NearDuplicateRule, "perceptual-hash dedup")
    decontaminate: DecontaminateRule = field(DecontaminateRule, "evaluation-set decontamination")
    clip_score: ClipScoreRule = field(ClipScoreRule, "CLIP-score scoring and selection")
    shard_rows: int | None = field(10_000, "rows per curated shard (all full but the last)", minimum=1)
    shard_bytes: int | None = field(None, "image bytes per curated shard instead of rows", minimum=1)

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
