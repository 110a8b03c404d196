"""The crawl stage's driver: stage the inputs, fan shards out as Ray tasks, account for every row."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from tqdm import tqdm

from pipelines import storage
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.crawl import inputs
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.stages.crawl.schema import STATUSES
from pipelines.tracking import log_bar_chart


@register
class CrawlStage(Stage):
    kind = "crawl"
    Config = CrawlConfig
    dependencies = ("img2dataset", "opencv-python-headless", "albumentations", "pillow", "pyarrow")

    def input_identity(self) -> dict[str, Any]:
        return inputs.identity(self.config)

    def run(self, ctx: StageContext, upstream: dict) -> StageResult:
        import ray

        from pipelines.stages.crawl.shard import crawl_shard, describe_shard

        cfg: CrawlConfig = self.config
        inputs_dir = storage.join(ctx.output, "_inputs")
        t0 = time.perf_counter()
        staged = inputs.stage(cfg, inputs_dir)
        total = sum(s["rows"] for s in staged)
        ctx.log.info("%d input rows in %d shards (staged in %.1fs)", total, len(staged), time.perf_counter() - t0)

        remote = ray.remote(crawl_shard).options(
            num_cpus=ctx.resources.get("num_cpus", 1), num_gpus=ctx.resources.get("num_gpus", 0),
            memory=ctx.resources.get("memory"), max_retries=3, name="crawl_shard",
        )
        max_in_flight = max(2, 2 * int(ray.available_resources().get("CPU", 1)))
        records: dict[int, dict[str, Any]] = {}
        todo = []
        for s in staged:
            out_url = storage.join(ctx.output, f"part-{s['id']:05d}.parquet")
            if storage.exists(out_url):
                records[s["id"]] = describe_shard(out_url)
            else:
                todo.append((s, out_url))
        resumed = len(records)
        if resumed:
            ctx.log.info("resuming: %d of %d shards were already complete", resumed, len(staged))

        status: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for r in records.values():
            status.update(r["status"])
            errors.update(r["errors"])
        bar = tqdm(total=total, initial=sum(r["rows"] for r in records.values()), unit="img", desc=ctx.stage,
                   disable=not ctx.progress, smoothing=0.1)
        crawl_t0 = time.perf_counter()
        pending: dict[Any, int] = {}  # in-flight task -> shard id
        queue = list(todo)
        done_rows = 0
        try:
            while queue or pending:
                while queue and len(pending) < max_in_flight:
                    s, out_url = queue.pop(0)
                    pending[remote.remote(cfg, s["url"], out_url)] = s["id"]
                ready, _ = ray.wait(list(pending), num_returns=1)
                rec = ray.get(ready[0])
                records[pending.pop(ready[0])] = rec
                status.update(rec["status"])
                errors.update(rec["errors"])
                done_rows += rec["rows"]
                bar.update(rec["rows"])
                bar.set_postfix(ok=f"{status['success'] / max(1, sum(status.values())):.0%}")
                ctx.tracker.log_metrics({"rows_done": sum(status.values()), "success": status["success"],
                                         "rows_per_sec": done_rows / max(time.perf_counter() - crawl_t0, 1e-9)},
                                        step=len(records))
        finally:
            # a failing shard must not leave siblings running: they would write part files behind a retry
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=60)
        bar.close()
        elapsed = time.perf_counter() - crawl_t0
        new_ok = sum(records[s["id"]]["status"].get("success", 0) for s, _ in todo)

        written = sum(r["rows"] for r in records.values())
        if written != total or len(records) != len(staged):
            raise RuntimeError(f"crawl accounting: {total} input rows staged but {written} written "
                               f"in {len(records)} of {len(staged)} shards")
        storage.remove_tree(inputs_dir)
        counts = {k: status.get(k, 0) for k in STATUSES} | {k: v for k, v in status.items() if k not in STATUSES}
        counts |= {f"error_{k}": v for k, v in errors.items()}
        metrics = {
            "success_rate": status["success"] / total if total else 0.0,
            "images_per_sec": new_ok / elapsed if todo and elapsed > 0 else 0.0,
            "shards_resumed": resumed,
        }
        self._plot(ctx, counts)
        shards = [{"path": f"part-{i:05d}.parquet", "rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"]}
                  for i, r in sorted(records.items())]
        return StageResult(shards=shards, counts={"input_rows": total, **counts}, metrics=metrics)

    @staticmethod
    def _plot(ctx: StageContext, counts: dict[str, int]) -> None:
        """Rows per status as a bar chart in the stage's MLflow run."""
        log_bar_chart(ctx.tracker, [(k, v) for k, v in counts.items() if v], f"{ctx.stage}: rows by status and "
                      "error class", "rows", f"{ctx.stage}_status.png")
