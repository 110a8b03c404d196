"""The Arrow contracts between stages: the crawled, curated and ledger schemas (DESIGN.md, data contracts).

Every stage that writes or reads these tables imports them from here, never from another stage's package:
crawl and ingest write `CRAWLED`; curate reads it and writes curated shards and the ledger, whose schemas
(`curated_schema`, `ledger_schema`) take the score columns and reasons of the job's rules.
`schemas/*.schema.json` are generated from these (`clipline schemas`).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

# ---- crawled shards (stages crawl and ingest) ----------------------------------------------------------------

STATUSES = ("success", "failed_to_download", "failed_to_resize", "opted_out", "blocked", "invalid", "duplicate")
# the error classes of rows a site opted out (status opted_out), by how it said so; a crawl's manifest counts each
# as opted_out_<kind>. Rows crawled before the kinds were told apart have error_class opted_out (X-Robots-Tag).
OPTOUT_KINDS = ("robots_txt", "x_robots_tag", "tdm_reservation")

CRAWLED = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False, metadata={"doc": "128-bit hex id of (url, caption)"}),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("status", pa.string(), nullable=False, metadata={"doc": " | ".join(STATUSES)}),
        pa.field("error_class", pa.string(), metadata={
            "doc": "invalid_url, missing_caption, ssrf, dns, connection, timeout, tls, redirect, protocol, "
                   "http_4xx, http_429, http_5xx, http_other, too_large, too_many_pixels, decode, duplicate, shard_failed, "
                   "robots_unavailable (the host's robots.txt answered 5xx or 429: not fetched, retried by a refresh); "
                   "with status opted_out: robots_txt, x_robots_tag, tdm_reservation, opted_out (X-Robots-Tag, in "
                   "crawls made before these were told apart), takedown (a row `clipline takedown` emptied)"}),
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("image", pa.binary(), metadata={"doc": "encoded image bytes"}),
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string(), metadata={"doc": "sha256 of the encoded image bytes"}),
        pa.field("fetched_at", pa.timestamp("ms", tz="UTC")),
        pa.field("attempts", pa.int32(), metadata={
            "doc": "fetches of this (url, caption) so far, across refreshes; 0 if never fetched"}),
        pa.field("source", pa.string(), nullable=False, metadata={"doc": "input file the row came from"}),
        pa.field("source_row", pa.int64(), nullable=False, metadata={"doc": "0-based row index in that file"}),
    ]
)


def uid(url: str | None, caption: str | None) -> str:
    """Stable 128-bit id of a (url, caption) pair: the same pair has the same uid in every run."""
    return hashlib.sha256(f"{url or ''}\x1f{caption or ''}".encode()).hexdigest()[:32]


# ---- curated shards and the ledger (stage curate) ------------------------------------------------------------
# The rules' own score columns and reasons come from the rule registry (pipelines/stages/curate/rules/): the
# schemas below take them as arguments, so that this module stays a leaf that every stage may import.

NOT_DOWNLOADED = "not_downloaded"  # the reason of a row the crawl did not store an image for: always first
TAKEDOWN = "takedown"  # the reason of a row removed by `clipline takedown` from a released version

# features of every row, computed before any rule
FEATURES = [
    pa.field("caption_words", pa.int32(), metadata={"doc": "whitespace-separated words in the caption"}),
    pa.field("caption_chars", pa.int32(), metadata={"doc": "characters in the stripped caption"}),
    pa.field("min_side", pa.int32(), metadata={"doc": "shorter image side read by the basic rule"}),
    pa.field("max_side", pa.int32(), metadata={"doc": "longer image side read by the basic rule"}),
    pa.field("aspect_ratio", pa.float32(), metadata={"doc": "longer side / shorter side"}),
    pa.field("phash", pa.string(), metadata={"doc": "64-bit perceptual hash of the stored image, hex"}),
]


# The order of the feature and score columns in the ledger and curated shards (as it was before rules were
# objects, so files of both versions line up); columns of rules added since follow, in the order given.
SCORE_ORDER = ("caption_words", "caption_chars", "min_side", "max_side", "aspect_ratio", "language", "language_score",
               "phash", "eval_distance", "contaminated_by", "clip_score", "semantic_cluster", "semantic_similarity",
               "query_match", "query_similarity")


def scored_fields(scores: list[pa.Field]) -> list[pa.Field]:
    """The features and the rules' score columns, in the contract's order."""
    rank = {name: i for i, name in enumerate(SCORE_ORDER)}
    return sorted([*FEATURES, *scores], key=lambda f: rank.get(f.name, len(rank)))  # stable: new ones keep order


def ledger_schema(scores: list[pa.Field], reasons: list[str]) -> pa.Schema:
    """The ledger: one row per crawled row, with the rules' score columns and the reasons they can give."""
    return pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False, metadata={"doc": "the crawled row's uid"}),
            pa.field("source", pa.string(), nullable=False, metadata={"doc": "input file of the crawled row"}),
            pa.field("source_row", pa.int64(), nullable=False, metadata={"doc": "its row in that file"}),
            pa.field("shard", pa.int32(), nullable=False, metadata={"doc": "index of the crawled shard"}),
            pa.field("row", pa.int32(), nullable=False, metadata={"doc": "row within the crawled shard"}),
            pa.field("status", pa.string(), nullable=False, metadata={"doc": "the crawl status"}),
            pa.field("kept", pa.bool_(), nullable=False),
            pa.field("reason", pa.string(), metadata={
                "doc": "first rule that dropped the row: " + ", ".join(dict.fromkeys([NOT_DOWNLOADED, *reasons]))}),
            pa.field("sha256", pa.string(), metadata={"doc": "sha256 of the image bytes"}),
            pa.field("image_bytes", pa.int64(), metadata={"doc": "size of the stored image"}),
            *scored_fields(scores),
        ]
    )


def curated_schema(scores: list[pa.Field]) -> pa.Schema:
    """Curated shards: the crawled columns, then the features and rule scores of each kept row."""
    return pa.schema([*CRAWLED, *scored_fields(scores)])


# ---- embeddings (stage embed) --------------------------------------------------------------------------------
# One row per successful row of the dataset version embedded, in its order; a shard per upstream shard. Only the
# columns of the embeddings the stage was asked for are written.

EMBEDDINGS = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False, metadata={"doc": "the embedded row's uid"}),
        pa.field("image_embedding", pa.list_(pa.float16()), metadata={
            "doc": "L2-normalised image embedding (float16, the model's embed_dim values); null where the row has "
                   "no image or it cannot be decoded"}),
        pa.field("text_embedding", pa.list_(pa.float16()), metadata={
            "doc": "L2-normalised embedding of the caption (float16); null where the caption is null"}),
    ]
)
