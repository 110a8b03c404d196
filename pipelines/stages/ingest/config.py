"""The ingest stage's parameters: what a job writes under `stages.<name>.with` for `uses: ingest`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class IngestConfig:
    """Image-caption pairs from Parquet files, webdataset tars or a built-in set, written as crawled shards
    (every row `success`) that curate and train read like a crawl's output."""

    builtin: Literal["digits_train"] | None = field(default=None, metadata={
        "help": "a built-in set: scikit-learn's handwritten digits, training split, with captions"})
    path: str | None = field(default=None, metadata={
        "help": "Parquet file(s) or webdataset tar(s): a path or glob (any fsspec URL)"})
    format: Literal["auto", "parquet", "webdataset"] = field(default="auto", metadata={
        "help": "file format; auto: from the extension"})
    image_column: str = field(default="image", metadata={
        "help": "column (webdataset: extension, e.g. jpg) of encoded image bytes"})
    caption_column: str = field(default="caption", metadata={
        "help": "column (webdataset: extension, e.g. txt) of the caption; a list keeps its first caption"})
    image_size: int = field(default=64, metadata={"help": "side of a built-in set's images", "minimum": 8})
    shard_rows: int = field(default=10_000, metadata={"help": "rows per output shard", "minimum": 1})

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("ingest: give exactly one of builtin or path")
