"""The ingest stage's parameters: what a job writes under `stages.<name>.with` for `uses: ingest`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipelines.configschema import field

if TYPE_CHECKING:
    from pipelines.preflight import Check


@dataclass(kw_only=True)
class IngestConfig:
    """Image-caption pairs from Parquet files, webdataset tars or a built-in set, written as crawled shards
    (every row `success`) that curate and train read like a crawl's output."""

    builtin: Literal["digits_train"] | None = field(
        None, "a built-in set: scikit-learn's handwritten digits, training split, with captions")
    path: str | None = field(None, "Parquet file(s) or webdataset tar(s): a path or glob (any fsspec URL)")
    format: Literal["auto", "parquet", "webdataset"] = field("auto", "file format; auto: from the extension")
    image_column: str = field("image", "column (webdataset: extension, e.g. jpg) of encoded image bytes")
    caption_column: str = field(
        "caption", "column (webdataset: extension, e.g. txt) of the caption; a list keeps its first caption")
    image_size: int = field(64, "side of a built-in set's images", minimum=8)
    shard_rows: int = field(10_000, "rows per output shard", minimum=1)

    def output_columns(self) -> list[str]:
        """The crawled contract's columns: ingest passes no other column through."""
        from pipelines.contracts import CRAWLED

        return list(CRAWLED.names)

    def preflight(self, check: Check) -> None:
        """Before the run: the files exist and have the image and caption columns."""
        from pipelines import pairs
        from pipelines.preflight import Problem

        for url in check.files("path", self.path) if self.path else []:
            try:
                fmt = pairs.file_format("ingest", url, self.format)
            except ValueError as exc:
                raise Problem("format", str(exc)) from None
            check.require("path", url, fmt, {"image_column": self.image_column, "caption_column": self.caption_column})

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("ingest: give exactly one of builtin or path")
