"""The crawl stage's driver: stage the inputs, fan shards out as Ray tasks, account for every row."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from pipelines import availability, layout, storage
from pipelines.contracts import OPTOUT_KINDS, STATUSES
from pipelines.prometheus import CRAWL_ROWS, StageMetrics
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.crawl import hosttokens, inputs, plan
from pipelines.stages.crawl.config import CrawlConfig
from pipelines.stages.crawl.tails import Speculation, Tails, discard
from pipelines.tracking import log_bar_chart


@dataclass
class _Staged:
    """The staged inputs: shards (id, url, rows), their plan, and the output a refresh starts from."""

    shards: list[dict[str, Any]]
    total: int  # input rows
    counts: dict[str, int]  # rows_new, rows_retried, rows_reused
    prior: dict[str, Any] | None
    plan: pa.Table
    offsets: list[int]  # shard i's rows are input rows offsets[i] .. offsets[i + 1] - 1

    def shard_plan(self, s: dict[str, Any]) -> pa.Table:
        """Shard s's slice of the plan, as a copy: a pickled slice could carry the whole plan's buffers."""
        part = self.plan.slice(self.offsets[s["id"]], s["rows"])
        return pa.Table.from_pylist(part.to_pylist(), schema=part.schema)


@dataclass
class _Tally:
    """Rows per status and error class over the shards accounted for so far, and what their fetches did."""

    status: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    fetched_ok: int = 0
    copies: Counter[str] = field(default_factory=Counter)  # speculative copies started, won, cancelled, failed
    http_retries: int = 0
    dns: Counter[str] = field(default_factory=Counter)  # resolver cache hits, misses, timeouts
    robots: Counter[str] = field(default_factory=Counter)  # robots.txt fetches, cache hits, timeouts
    host_slots: Counter[str] = field(default_factory=Counter)  # host token service: grants, waits, timeouts

    def add(self, rec: dict[str, Any]) -> None:
        self.status.update(rec["status"])
        self.errors.update(rec["errors"])
        self.fetched_ok += rec.get("fetched_success", 0)  # only a shard task's record has these
        self.http_retries += rec.get("http_retries", 0)
        self.dns.update({k: rec.get(f"dns_{k}", 0) for k in ("hits", "misses", "timeouts")})
        self.robots.update({k: rec.get(f"robots_{k}", 0) for k in ("fetches", "hits", "timeouts")})
        self.host_slots.update({k: rec.get(f"host_slots_{k}", 0) for k in ("granted", "waited", "timeouts")})


@register
class CrawlStage(Stage):
    kind = "crawl"
    Config = CrawlConfig
    dependencies = ("img2dataset", "opencv-python-headless", "pillow", "pyarrow")

    def input_identity(self) -> dict[str, Any]:
        return inputs.identity(self.config)

    def run(self, ctx: StageContext, upstream: dict) -> StageResult:
        """Stage the inputs, keep the shards a previous attempt wrote, crawl the others as Ray tasks, write
        the rows of shards that kept failing as `shard_failed` (or fail, naming them), account for every row."""
        inputs_dir = storage.join(ctx.output, "_inputs")
        staged = self._stage_inputs(ctx, inputs_dir)
        width = self._width()
        self._note_host_limits(ctx, width)
        prom = StageMetrics.of(ctx)
        records, todo = self._resume(ctx, staged)
        resumed = len(records)
        tally = _Tally()
        for r in records.values():
            tally.add(r)
        with hosttokens.running(self.config, ctx.output) as hosts:  # per_host_scope: job - the limits job-wide
            failed, elapsed = self._crawl(ctx, staged, todo, width, records, tally, prom)
        self._write_failed(ctx, staged, failed, records, tally, prom)
        self._check_accounting(staged, records)
        storage.remove_tree(inputs_dir)
        return self._result(ctx, staged, records, tally, failed, resumed=resumed,
                            images_per_sec=tally.fetched_ok / elapsed if todo and elapsed > 0 else 0.0,
                            hosts=hosts.stats if hosts else None)

    def _stage_inputs(self, ctx: StageContext, inputs_dir: str) -> _Staged:
        """The URL lists as input shards with their plan (inputs.py, plan.py), or those a previous attempt staged."""
        cfg: CrawlConfig = self.config
        t0 = time.perf_counter()
        staged = inputs.stage(cfg, inputs_dir, lambda: plan.find_prior(cfg, ctx.output, ctx.log))
        shards, total, prior = staged["shards"], staged["rows"], staged["prior"]
        ctx.log.info("%d input rows in %d shards (staged in %.1fs)", total, len(shards), time.perf_counter() - t0)
        if prior:
            ctx.log.info("refreshing from %s: %s", prior["location"],
                         ", ".join(f"{k.removeprefix('rows_')} {v}" for k, v in staged["counts"].items()))
        offsets = [0]
        for s in shards:
            offsets.append(offsets[-1] + s["rows"])
        return _Staged(shards=shards, total=total, counts=staged["counts"], prior=prior,
                       plan=storage.read_parquet(staged["plan"]), offsets=offsets)

    def _note_host_limits(self, ctx: StageContext, width: int) -> None:
        cfg: CrawlConfig = self.config
        if not (cfg.per_host_connections or cfg.per_host_rate):
            return
        limits = (f"per-host limits ({cfg.per_host_connections or 'no cap on'} connections, "
                  f"{cfg.per_host_rate or 'no limit on'} requests/s)")
        if cfg.per_host_scope == "job":
            ctx.log.info("%s hold for the whole crawl: its %d shard tasks at once lease slots from %d host token "
                         "actor(s)", limits, width, cfg.host_token_actors)
        else:
            ctx.log.info("%s apply within each shard task (per_host_scope: task); up to %d tasks run at once, so one "
                         "host may see that many times the limit", limits, width)

    @staticmethod
    def _resume(ctx: StageContext, staged: _Staged) -> tuple[dict[int, dict[str, Any]], list[tuple[dict[str, Any], str]]]:
        """The records of shards already written (by an earlier attempt), and the (shard, output URL) still to crawl."""
        from pipelines.stages.crawl.shard import describe_shard

        records: dict[int, dict[str, Any]] = {}
        todo = []
        for s in staged.shards:
            out_url = storage.join(ctx.output, layout.shard_name(s["id"]))
            copy_url = storage.join(ctx.output, layout.shard_name(s["id"], copy=True))
            if storage.is_file(out_url):
                records[s["id"]] = describe_shard(out_url)
            elif storage.is_file(copy_url):  # its speculative copy finished first (tails.py)
                records[s["id"]] = describe_shard(copy_url) | {"path": layout.shard_name(s["id"], copy=True)}
            else:
                todo.append((s, out_url))
        if records:
            ctx.log.info("resuming: %d of %d shards were already complete", len(records), len(staged.shards))
        return records, todo

    def _crawl(self, ctx: StageContext, staged: _Staged, todo: list[tuple[dict[str, Any], str]], width: int,
               records: dict[int, dict[str, Any]], tally: _Tally, prom: StageMetrics) -> tuple[dict[int, str], float]:
        """Run a shard task per shard in `todo`, at most `width` at once, adding each one's record as it
        finishes; near the end, a speculative copy of a straggler (tails.py). The error of each shard whose
        tasks still failed after their retries, and the seconds it took."""
        import ray

        from pipelines.stages.crawl.shard import crawl_shard

        cfg: CrawlConfig = self.config
        resources = {"num_cpus": ctx.resources.get("num_cpus", 1), "num_gpus": ctx.resources.get("num_gpus", 0),
                     "memory": ctx.resources.get("memory")}
        remote = ray.remote(crawl_shard).options(**resources, max_retries=cfg.shard_retries, retry_exceptions=True,
                                                 name="crawl_shard")
        # a copy is not retried: the original still runs, with its own retries
        copy_remote = ray.remote(crawl_shard).options(**resources, max_retries=0, name="crawl_shard_copy")
        tails = Tails(Speculation.of(cfg), shards=len(todo))
        prior_urls = staged.prior["shard_urls"] if staged.prior else []
        bar = tqdm(total=staged.total, initial=sum(r["rows"] for r in records.values()), unit="img", desc=ctx.stage,
                   disable=not ctx.progress, smoothing=0.1)
        crawl_t0 = time.perf_counter()
        pending: dict[Any, tuple[dict[str, Any], str]] = {}  # in-flight task -> (shard, output URL)
        losers: dict[Any, str] = {}  # cancelled copies (originals too) -> the file each would write
        errors: dict[int, str] = {}  # a shard's first task error, while its other copy still runs
        queue = list(todo)
        failed: dict[int, str] = {}
        try:
            while queue or pending:
                while queue and len(pending) < width:
                    s, out_url = queue.pop(0)
                    ref = remote.remote(cfg, s["url"], out_url, staged.shard_plan(s), prior_urls, prom)
                    pending[ref] = (s, out_url)
                    tails.started(ref, s["id"])
                due, wait = tails.due(len(queue))
                for straggler in due:
                    s = staged.shards[straggler.shard]
                    copy_url = storage.join(ctx.output, layout.shard_name(s["id"], copy=True))
                    ref = copy_remote.remote(cfg, s["url"], copy_url, staged.shard_plan(s), prior_urls, prom)
                    pending[ref] = (s, copy_url)
                    tails.copy_started(ref, s["id"])
                    ctx.log.info("shard %d: starting a speculative copy: %s", s["id"], straggler.why())
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
                if not ready:
                    continue
                s, out_url = pending.pop(ready[0])
                try:
                    rec = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - the task's own error, after shard_retries reruns
                    lines = str(exc).strip().splitlines() or [""]
                    error = f"{type(exc).__name__}: {lines[-1]}"[:500]
                    settled = tails.done(ready[0], ok=False)
                    if not settled.final:
                        errors.setdefault(s["id"], error)
                        ctx.log.warning("shard %d: its %s failed (%s); its %s goes on", s["id"],
                                        "speculative copy" if settled.copy else "task", error,
                                        "task" if settled.copy else "speculative copy")
                        continue
                    failed[s["id"]] = errors.pop(s["id"], error)
                    ctx.log.warning("shard %d failed after %d retries: %s", s["id"], cfg.shard_retries, failed[s["id"]])
                    continue
                settled = tails.done(ready[0], ok=True)
                errors.pop(s["id"], None)
                if settled.copy:
                    rec["path"] = layout.shard_name(s["id"], copy=True)  # the manifest names the copy's file
                if settled.loser is not None:
                    ray.cancel(settled.loser, force=True)
                    losers[settled.loser] = pending.pop(settled.loser)[1]
                    ctx.log.info("shard %d: the %s finished first; the %s is cancelled", s["id"],
                                 *(("speculative copy", "original") if settled.copy else ("original", "copy")))
                records[s["id"]] = rec
                tally.add(rec)
                prom.inc_each(CRAWL_ROWS, rec["status"], "status")
                status = tally.status
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
            self._settle_losers(ctx, pending, losers)
        bar.close()
        tally.copies.update(tails.counts)
        return failed, time.perf_counter() - crawl_t0

    @staticmethod
    def _settle_losers(ctx: StageContext, pending: dict[Any, tuple[dict[str, Any], str]], losers: dict[Any, str]) -> None:
        """Wait for the cancelled tasks to end, then remove what the losing copies wrote: the winner's file is the
        shard, and a loser that finished as it was cancelled may have written its own."""
        import ray

        waiting = [*pending, *losers]
        if waiting:
            ray.wait(waiting, num_returns=len(waiting), timeout=60)
        for ref, url in losers.items():
            if not ray.wait([ref], timeout=0)[0]:
                ctx.log.warning("a cancelled copy is still running after 60 s; it may yet write %s, which the "
                                "manifest does not list", url)
                continue
            discard(url)

    def _write_failed(self, ctx: StageContext, staged: _Staged, failed: dict[int, str],
                      records: dict[int, dict[str, Any]], tally: _Tally, prom: StageMetrics) -> None:
        """More failed shards than max_failed_shards fail the stage, naming them; fewer are written with every
        row `shard_failed`, so that the output still accounts for each input row."""
        from pipelines.stages.crawl.shard import failed_shard

        cfg: CrawlConfig = self.config
        if len(failed) > cfg.max_failed_shards:
            offsets = staged.offsets
            listing = "; ".join(f"shard {i} (input rows {offsets[i]}-{offsets[i + 1] - 1}): {e}"
                                for i, e in sorted(failed.items()))
            raise RuntimeError(f"crawl: {len(failed)} shard(s) failed after {cfg.shard_retries} retries each, more "
                               f"than max_failed_shards {cfg.max_failed_shards}: {listing}. The {len(records)} "
                               "completed shards are kept; a re-run crawls only the others")
        for i, error in sorted(failed.items()):
            s = staged.shards[i]
            # its own name: whatever kept the task from writing part-NNNNN may still be in the way
            rec = failed_shard(s["url"], storage.join(ctx.output, layout.shard_name(i, failed=True)),
                               staged.shard_plan(s), error)
            ctx.log.warning("shard %d: its %d rows are written as shard_failed (max_failed_shards %d)", i, rec["rows"],
                            cfg.max_failed_shards)
            records[i] = rec
            tally.add(rec)
            prom.inc_each(CRAWL_ROWS, rec["status"], "status")

    @staticmethod
    def _check_accounting(staged: _Staged, records: dict[int, dict[str, Any]]) -> None:
        """Every staged row written, in one record per shard."""
        written = sum(r["rows"] for r in records.values())
        if written != staged.total or len(records) != len(staged.shards):
            raise RuntimeError(f"crawl accounting: {staged.total} input rows staged but {written} written "
                               f"in {len(records)} of {len(staged.shards)} shards")

    def _result(self, ctx: StageContext, staged: _Staged, records: dict[int, dict[str, Any]], tally: _Tally,
                failed: dict[int, str], resumed: int, images_per_sec: float,
                hosts: dict[str, Any] | None = None) -> StageResult:
        """Counts, metrics, the status chart, the shard list and the dataset version this crawl made."""
        status, prior, total = tally.status, staged.prior, staged.total
        counts = {k: status.get(k, 0) for k in STATUSES} | {k: v for k, v in status.items() if k not in STATUSES}
        counts |= {f"error_{k}": v for k, v in tally.errors.items()}
        # rows opted out per kind (robots_txt, x_robots_tag, tdm_reservation, takedown, ...) and rows not fetched
        # because their host's robots.txt could not be read: apart from error_*, so that `clipline status` shows them
        counts |= {f"opted_out_{k}": tally.errors.get(k, 0) for k in OPTOUT_KINDS}
        counts["opted_out_x_robots_tag"] += tally.errors.get("opted_out", 0)  # reused rows of older crawls
        counts |= {"robots_unavailable": tally.errors.get("robots_unavailable", 0)}
        counts |= staged.counts | {"shards_failed": len(failed)}
        metrics = {
            "success_rate": status["success"] / total if total else 0.0,
            "images_per_sec": images_per_sec,
            "shards_resumed": resumed,
            # speculative copies of stragglers (tails.py): started; won (finished first, the original cancelled);
            # cancelled (the original finished first); failed
            **{f"speculative_copies_{k}": tally.copies[k] for k in ("started", "won", "cancelled", "failed")},
            "http_retries": tally.http_retries,  # 429/503 answers retried after their Retry-After or a backoff
            # host lookups answered by the worker's resolver cache (or a resolution in flight), resolved, given up
            "dns_cache_hits": tally.dns["hits"], "dns_cache_misses": tally.dns["misses"],
            "dns_timeouts": tally.dns["timeouts"],
            # robots.txt requests sent, lookups answered by the worker's robots cache (or a fetch in flight), given up
            "robots_fetches": tally.robots["fetches"], "robots_cache_hits": tally.robots["hits"],
            "robots_timeouts": tally.robots["timeouts"],
        }
        if hosts is not None:  # per_host_scope: job - what the host token service did (hosttokens.py)
            metrics |= {
                # requests granted a slot; of those, granted only after waiting behind others; not granted in time
                "host_slots_granted": tally.host_slots["granted"], "host_slots_waited": tally.host_slots["waited"],
                "host_slots_timeouts": tally.host_slots["timeouts"],
                # actor calls (each carries a process's requests and releases of the moment), leases that expired
                # unreleased (a task that died) or whose grant no one collected, the most one host held at once,
                # and the worker processes and nodes that asked
                "host_service_calls": hosts.get("calls", 0),
                "host_leases_expired": hosts.get("expired", 0) + hosts.get("revoked", 0),
                "host_max_connections": hosts.get("max_leases", 0),
                "host_service_processes": hosts.get("clients", 0), "host_service_nodes": hosts.get("nodes", 0),
            }
        self._plot(ctx, {k: v for k, v in counts.items() if not k.startswith(("rows_", "shards_", "opted_out_"))
                                  and k != "robots_unavailable"})
        out_shards = [layout.shard_entry(r.get("path") or layout.shard_name(i, failed=i in failed), r)
                      for i, r in sorted(records.items())]
        version = {"version": prior["version"] + 1 if prior else 1,
                   "refreshed_from": {k: prior[k] for k in ("location", "digest", "version")} if prior else None,
                   "failed_shards": sorted(failed)}
        try:
            metrics |= self._availability(ctx, out_shards, version)
        except Exception as exc:  # noqa: BLE001 - a report on the rows must not undo a crawl that wrote them all
            ctx.log.warning("availability report not made: %s: %s", type(exc).__name__, exc)
        return StageResult(shards=out_shards, counts={"input_rows": total, **counts}, metrics=metrics, extra=version)

    @staticmethod
    def _width() -> int:
        """Shard tasks in flight at once: two per CPU in the cluster, so a worker never waits for its next."""
        import ray

        return max(2, 2 * int(ray.available_resources().get("CPU", 1)))

    @staticmethod
    def _availability(ctx: StageContext, out_shards: list[dict[str, Any]], version: dict[str, Any]) -> dict[str, float]:
        """The version's availability table (pipelines/availability.py) as `{stage}_availability.json` and
        `.png` in the stage's run, and its headline numbers as metrics. It reads the url, status and error_class
        columns of the shards just written, and for link rot uid and fetched_at of this and the previous version."""
        t0 = time.perf_counter()
        rep = availability.report([storage.join(ctx.output, s["path"]) for s in out_shards],
                                  version=version["version"], location=ctx.output,
                                  refreshed_from=version["refreshed_from"])
        ctx.tracker.log_text(json.dumps(rep, indent=1), f"{ctx.stage}_availability.json")
        fig = availability.figure(rep, f"{ctx.stage}: availability of version {version['version']}")
        ctx.tracker.log_figure(fig, f"{ctx.stage}_availability.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        out = {"hosts": rep["hosts"]["distinct"], "availability_seconds": round(time.perf_counter() - t0, 3)}
        if rep["link_rot"]:
            rot = rep["link_rot"][0]
            out |= {"link_rot_rows_refetched": rot["rows_refetched"],
                    "link_rot_rows_now_failing": rot["refetched_now_failing"],
                    "link_rot_rows_reused": rot["rows_reused"]}
        ctx.log.info("availability: %d hosts; %s (%.1fs)", rep["hosts"]["distinct"],
                     "; ".join(f"v{r['from_version']}->v{r['to_version']}: {r['refetched_now_failing']} of "
                               f"{r['rows_refetched']} earlier successes re-fetched now fail, {r['rows_reused']} "
                               "reused (not re-checked)" for r in rep["link_rot"]) or rep.get("note", ""),
                     out["availability_seconds"])
        return out

    @staticmethod
    def _plot(ctx: StageContext, counts: dict[str, int]) -> None:
        """Rows per status as a bar chart in the stage's MLflow run."""
        log_bar_chart(ctx.tracker, [(k, v) for k, v in counts.items() if v], f"{ctx.stage}: rows by status and "
                      "error class", "rows", f"{ctx.stage}_status.png")
