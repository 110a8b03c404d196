"""A test-only source stage: demo-web samples written as a curated dataset, so train tests skip crawl and curate."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pipelines import storage
from pipelines.demo import web
from pipelines.stage import Stage, StageResult, register


@dataclass(kw_only=True)
class DemoCuratedConfig:
    rows: int = field(default=256, metadata={"help": "samples"})
    seed: int = field(default=0, metadata={"help": "demo web seed"})
    shard_rows: int = field(default=128, metadata={"help": "rows per shard"})
    size: int = field(default=64, metadata={"help": "image side"})


@register
class DemoCurated(Stage):
    kind = "demo_curated"
    Config = DemoCuratedConfig

    def run(self, ctx, inputs):
        cfg = self.config
        shards = []
        for i, start in enumerate(range(0, cfg.rows, cfg.shard_rows)):
            idx = range(start, min(cfg.rows, start + cfg.shard_rows))
            table = pa.table({"uid": [f"{cfg.seed}-{j}" for j in idx],
                              "image": [web.encoded(cfg.seed, j, cfg.size)[0] for j in idx],
                              "caption": [web.sample(cfg.seed, j).caption for j in idx]})
            path = f"part-{i:05d}.parquet"
            shards.append({"path": path, **storage.write_parquet(storage.join(ctx.output, path), table)})
        return StageResult(shards=shards)


@dataclass(kw_only=True)
class CrawledFilesConfig:
    files: list[str] = field(default_factory=list, metadata={"help": "crawled-schema Parquet files, one shard each"})


class CrawledFiles(Stage):
    """Crawled-schema Parquet files a test wrote (rows of any status, images that do not decode), copied as the
    shards of a source stage: `uses: tests.support.sources:CrawledFiles`, where ingest would refuse such rows."""

    kind = "crawled_files"
    Config = CrawledFilesConfig

    def input_identity(self):
        return {"files": storage.file_keys(self.config.files)}

    def run(self, ctx, inputs):
        shards = []
        for i, url in enumerate(self.config.files):
            path = f"part-{i:05d}.parquet"
            shards.append({"path": path, **storage.write_parquet(storage.join(ctx.output, path),
                                                                 storage.read_parquet(url))})
        return StageResult(shards=shards)
