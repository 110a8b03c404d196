"""The ingest stage: an image-text dataset that already exists (Parquet, webdataset, a built-in) as crawled shards."""

from pipelines.stages.ingest.stage import IngestStage

__all__ = ["IngestStage"]
