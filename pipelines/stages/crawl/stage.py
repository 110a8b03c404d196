"""The crawl stage's driver: stage the inputs, fan shards out as Ray tasks, account for every row."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from pipelines import layout, storage
from pipelines.contracts import STATUSES
from pipelines.prometheus import CRAWL_ROWS, StageMetrics
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.crawl import inputs, plan
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.tracking import log_bar_chart


@register
class CrawlStage(Stage):
    kind = "crawl"
    Config = CrawlConfig
    dependencies = ("img2dataset", "opencv-python-headless", "pillow", "pyarrow")

    def input_identity(self) -> dict[str, Any]:
        return inputs.identity(self.config)

    def run(self, ctx: StageContext, upstream: dict) -> StageResult:
        import ray

        from pipelines.stages.crawl.shard import crawl_shard, describe_shard, failed_shard

        cfg: CrawlConfig = self.config
        inputs_dir = storage.join(ctx.output, "_inputs")
        t0 = time.perf_counter()
        staged = inputs.stage(cfg, inputs_dir, lambda: plan.find_prior(cfg, ctx.output, ctx.log))
        shards, total, prior = staged["shards"], staged["rows"], staged["prior"]
        ctx.log.info("%d input rows in %d shards (staged in %.1fs)", total, len(shards), time.perf_counter() - t0)
        if prior:
            ctx.log.info("refreshing from %s: %s", prior["location"],
                         ", ".join(f"{k.removeprefix('rows_')} {v}" for k, v in staged["counts"].items()))
        width = self._width()
        if cfg.per_host_connections or cfg.per_host_rate:
            ctx.log.info("per-host limits (%s connections, %s requests/s) apply within each shard task; up to %d "
                         "tasks run at once, so one host may see that many times the limit",
                         cfg.per_host_connections or "no cap on", cfg.per_host_rate or "no limit on", width)
        plan_table = storage.read_parquet(staged["plan"])
        offsets = [0]
        for s in shards:
            offsets.append(offsets[-1] + s["rows"])
        prior_urls = prior["shard_urls"] if prior else []

        remote = ray.remote(crawl_shard).options(
            num_cpus=ctx.resources.get("num_cpus", 1), num_gpus=ctx.resources.get("num_gpus", 0),
            memory=ctx.resources.get("memory"), max_retries=cfg.shard_retries, retry_exceptions=True,
            name="crawl_shard",
        )
        prom = StageMetrics.of(ctx)
        records: dict[int, dict[str, Any]] = {}
        todo = []
        for s in shards:
            out_url = storage.join(ctx.output, layout.shard_name(s["id"]))
            if storage.is_file(out_url):
                records[s["id"]] = describe_shard(out_url)
            else:
                todo.append((s, out_url))
        resumed = len(records)
        if resumed:
            ctx.log.info("resuming: %d of %d shards were already complete", resumed, len(shards))

        status: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for r in records.values():
            status.update(r["status"])
            errors.update(r["errors"])
        bar = tqdm(total=total, initial=sum(r["rows"] for r in records.values()), unit="img", desc=ctx.stage,
                   disable=not ctx.progress, smoothing=0.1)
        crawl_t0 = time.perf_counter()
        pending: dict[Any, tuple[dict[str, Any], str]] = {}  # in-flight task -> (shard, output URL)
        queue = list(todo)
        failed: dict[int, str] = {}
        fetched_ok = http_retries = 0

        def shard_plan(s: dict[str, Any]) -> Any:  # a copy: a pickled slice could carry the whole plan's buffers
            part = plan_table.slice(offsets[s["id"]], s["rows"])
            return pa.Table.from_pylist(part.to_pylist(), schema=part.schema)


        try:
            while queue or pending:
                while queue and len(pending) < width:
                    s, out_url = queue.pop(0)
                    pending[remote.remote(cfg, s["url"], out_url, shard_plan(s), prior_urls, prom)] = (s, out_url)
                ready, _ = ray.wait(list(pending), num_returns=1)
                s, out_url = pending.pop(ready[0])
                try:
                    rec = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - the task's own error, after shard_retries reruns
                    lines = str(exc).strip().splitlines() or [""]
                    failed[s["id"]] = f"{type(exc).__name__}: {lines[-1]}"[:500]
                    ctx.log.warning("shard %d failed after %d retries: %s", s["id"], cfg.shard_retries, failed[s["id"]])
                    continue
                records[s["id"]] = rec
                status.update(rec["status"])
                errors.update(rec["errors"])
                prom.inc_each(CRAWL_ROWS, rec["status"], "status")
                fetched_ok += rec.get("fetched_success", 0)
                http_retries += rec.get("http_retries", 0)
                bar.update(rec["rows"])
                bar.set_postfix(ok=f"{status['success'] / max(1, sum(status.values())):.0%}")
                ctx.tracker.log_metrics({"rows_done": sum(status.values()), "success": status["success"],
                                         "rows_per_sec": sum(status.values()) / max(time.perf_counter() - crawl_t0,
                                                                                    1e-9)},
                                        step=len(records))
        finally:
            # a failing stage must not leave shard tasks running: they would write part files behind a retry
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=60)
        bar.close()
        elapsed = time.perf_counter() - crawl_t0
        if len(failed) > cfg.max_failed_shards:
            listing = "; ".join(f"shard {i} (input rows {offsets[i]}-{offsets[i + 1] - 1}): {e}"
                                for i, e in sorted(failed.items()))
            raise RuntimeError(f"crawl: {len(failed)} shard(s) failed after {cfg.shard_retries} retries each, more "
                               f"than max_failed_shards {cfg.max_failed_shards}: {listing}. The {len(records)} "
                               "completed shards are kept; a re-run crawls only the others")
        for i, error in sorted(failed.items()):
            s = shards[i]
            # its own name: whatever kept the task from writing part-NNNNN may still be in the way
            rec = failed_shard(s["url"], storage.join(ctx.output, layout.shard_name(i, failed=True)), shard_plan(s),
                               error)
            ctx.log.warning("shard %d: its %d rows are written as shard_failed (max_failed_shards %d)", i, rec["rows"],
                            cfg.max_failed_shards)
            records[i] = rec
            status.update(rec["status"])
            errors.update(rec["errors"])
            prom.inc_each(CRAWL_ROWS, rec["status"], "status")

        written = sum(r["rows"] for r in records.values())
        if written != total or len(records) != len(shards):
            raise RuntimeError(f"crawl accounting: {total} input rows staged but {written} written "
                               f"in {len(records)} of {len(shards)} shards")
        storage.remove_tree(inputs_dir)
        counts = {k: status.get(k, 0) for k in STATUSES} | {k: v for k, v in status.items() if k not in STATUSES}
        counts |= {f"error_{k}": v for k, v in errors.items()}
        counts |= staged["counts"] | {"shards_failed": len(failed)}
        metrics = {
            "success_rate": status["success"] / total if total else 0.0,
            "images_per_sec": fetched_ok / elapsed if todo and elapsed > 0 else 0.0,
            "shards_resumed": resumed,
            "http_retries": http_retries,  # 429/503 answers retried after their Retry-After or a backoff
        }
        self._plot(ctx, {k: v for k, v in counts.items() if not k.startswith(("rows_", "shards_"))})
        out_shards = [layout.shard_entry(layout.shard_name(i, failed=i in failed), r) for i, r in sorted(records.items())]
        version = {"version": prior["version"] + 1 if prior else 1,
                   "refreshed_from": {k: prior[k] for k in ("location", "digest", "version")} if prior else None,
                   "failed_shards": sorted(failed)}
        return StageResult(shards=out_shards, counts={"input_rows": total, **counts}, metrics=metrics, extra=version)

    @staticmethod
    def _width() -> int:
        """Shard tasks in flight at once: two per CPU in the cluster, so a worker never waits for its next."""
        import ray

        return max(2, 2 * int(ray.available_resources().get("CPU", 1)))

    @staticmethod
    def _plot(ctx: StageContext, counts: dict[str, int]) -> None:
        """Rows per status as a bar chart in the stage's MLflow run."""
        log_bar_chart(ctx.tracker, [(k, v) for k, v in counts.items() if v], f"{ctx.stage}: rows by status and "
                      "error class", "rows", f"{ctx.stage}_status.png")
