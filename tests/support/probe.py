"""A test-only stage downstream of crawl: counts its input rows, and fails on demand.

`fail_marker`: fail while this file exists.  `fail_times_file`: fail while the number in this file is
positive, decrementing it each time (to exercise the runner's retries).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.crawl.shard import write_shard


@dataclass(kw_only=True)
class ProbeConfig:
    fail_marker: str | None = None
    fail_times_file: str | None = None


@register
class ProbeStage(Stage):
    kind = "probe"
    Config = ProbeConfig

    def run(self, ctx: StageContext, inputs: dict) -> StageResult:
        cfg = self.config
        if cfg.fail_marker and os.path.exists(cfg.fail_marker):
            raise RuntimeError(f"probe told to fail by {cfg.fail_marker}")
        if cfg.fail_times_file:
            left = int(open(cfg.fail_times_file).read())
            if left > 0:
                open(cfg.fail_times_file, "w").write(str(left - 1))
                raise OSError(f"transient probe failure, {left - 1} left")
        statuses = []
        for m in inputs.values():
            for url in m.shard_urls():
                statuses += pq.read_table(url, columns=["status"]).column("status").to_pylist()
        table = pa.table({"status": statuses, "error_class": pa.array([None] * len(statuses), pa.string())})
        rec = write_shard(table, storage.join(ctx.output, "part-00000.parquet"))
        return StageResult(shards=[{"path": "part-00000.parquet", **{k: rec[k] for k in ("rows", "bytes", "sha256")}}],
                           counts={"rows_seen": len(statuses)})
