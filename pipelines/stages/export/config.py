"""The export stage's parameters: what a job writes under `stages.<name>.with` for `uses: export`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.configschema import field


@dataclass(kw_only=True)
class ExportConfig:
    """Export a crawl's, ingest's or curate's shards for training outside clipline: webdataset tars that
    open_clip's `open_clip_train` and any webdataset reader read (with open_clip's `sizes.json`), or Parquet
    re-sharded to a fixed number of rows. Only rows with status `success`, an image and a caption are written."""

    format: Literal["webdataset", "parquet"] = field(
        "webdataset", "webdataset: tar shards of <key>.jpg|png|webp, <key>.txt, <key>.json; parquet: the "
                      "upstream columns as they are")
    shard_rows: int = field(10_000, "samples per output shard (all full but the last)", minimum=1)
    caption_column: str = field(
        "caption", "column written as each sample's caption (<key>.txt): `caption` or a passthrough column")
    json_columns: bool = field(
        True, "webdataset: also write <key>.json (uid, url, sizes, sha256, scores, passthrough columns)")

    def required_columns(self) -> dict[str, str]:
        """The column it reads beyond the contract, with the field naming it: checked when the job is loaded
        against what a crawl or ingest it needs writes (and when the stage runs, against the shards)."""
        return {self.caption_column: "caption_column"}
