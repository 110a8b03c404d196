"""Arrow schemas of the curate stage's outputs (see DESIGN.md, data contracts)."""

from __future__ import annotations

import pyarrow as pa

from pipelines.stages.crawl.schema import CRAWLED

# reasons in the order rules can report them; `not_downloaded` is implicit and always first
BASIC_REASONS = ("caption_words", "caption_chars", "min_side", "max_side", "aspect_ratio")
RULE_REASONS = {
    "basic": BASIC_REASONS,
    "language": ("language",),
    "dedup_image": ("duplicate_image",),
    "dedup_text": ("duplicate_text",),
    "near_duplicate": ("near_duplicate",),
    "decontaminate": ("contaminated",),
    "clip_score": ("clip_score",),
}

SCORES = [
    pa.field("caption_words", pa.int32(), metadata={"doc": "whitespace-separated words in the caption"}),
    pa.field("caption_chars", pa.int32(), metadata={"doc": "characters in the stripped caption"}),
    pa.field("min_side", pa.int32(), metadata={"doc": "shorter image side read by the basic rule"}),
    pa.field("max_side", pa.int32(), metadata={"doc": "longer image side read by the basic rule"}),
    pa.field("aspect_ratio", pa.float32(), metadata={"doc": "longer side / shorter side"}),
    pa.field("language", pa.string(), metadata={"doc": "py3langid's language of the caption (language rule only)"}),
    pa.field("language_score", pa.float32(), metadata={"doc": "its normalised probability"}),
    pa.field("phash", pa.string(), metadata={"doc": "64-bit perceptual hash of the stored image, hex"}),
    pa.field("eval_distance", pa.int32(), metadata={"doc": "smallest pHash distance to an evaluation-set image"}),
    pa.field("contaminated_by", pa.string(), metadata={"doc": "evaluation set of that nearest image"}),
    pa.field("clip_score", pa.float32(), metadata={"doc": "cosine similarity of image and caption embeddings"}),
]

LEDGER = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False, metadata={"doc": "the crawled row's uid"}),
        pa.field("source", pa.string(), nullable=False, metadata={"doc": "input file of the crawled row"}),
        pa.field("source_row", pa.int64(), nullable=False, metadata={"doc": "its row in that file"}),
        pa.field("shard", pa.int32(), nullable=False, metadata={"doc": "index of the crawled shard"}),
        pa.field("row", pa.int32(), nullable=False, metadata={"doc": "row within the crawled shard"}),
        pa.field("status", pa.string(), nullable=False, metadata={"doc": "the crawl status"}),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), metadata={
            "doc": "first rule that dropped the row: not_downloaded, "
                   + ", ".join(r for rs in RULE_REASONS.values() for r in rs)}),
        pa.field("sha256", pa.string(), metadata={"doc": "sha256 of the image bytes"}),
        pa.field("image_bytes", pa.int64(), metadata={"doc": "size of the stored image"}),
        *SCORES,
    ]
)

CURATED = pa.schema([*CRAWLED, *SCORES])
