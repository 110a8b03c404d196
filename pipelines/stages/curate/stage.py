"""The curate stage's driver: score every crawled row, apply the rules in order, write ledger and shards.

The rules are objects (`pipelines.stages.curate.rules`); this driver only sequences them. Streaming plan on
Ray Data (nothing is gathered in one process but per-shard summaries and histograms):
1. featurize: one task per crawled shard computes the features, every rule's per-row scores and the per-row
   rules (no image bytes kept, except for rows a model rule still has to score);
2. model rules (`uses_images`: CLIP score, embedding heads), in rule order: each scores its candidates with
   its own actor pool, then decides per row on those scores;
3. set rules (dedup, near dedup, top fraction) on the materialised working table, in the configured order;
4. the ledger: one Parquet file per crawled shard, one row per crawled row;
5. repack: kept rows are numbered across shards (prefix sums of per-shard counts or image bytes), and each
   curated shard is written by one task from the crawled shards it spans, so shards are full but the last.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines import layout, storage
from pipelines.codedigest import digest_files, module_closure
from pipelines.contracts import NOT_DOWNLOADED, ledger_schema, scored_fields
from pipelines.manifest import Manifest
from pipelines.prometheus import CURATE_DROPPED, CURATE_ROWS_IN, CURATE_ROWS_OUT, StageMetrics
from pipelines.stage import Stage, StageContext, StageResult, plugin_files, register
from pipelines.stages.curate.config import CurateConfig
from pipelines.stages.curate.features import KEPT, Featurizer, phash_hex, to_arrow
from pipelines.stages.curate.rules import Rule, Work, apply_decisions, job_scores
from pipelines.tracking import log_bar_chart


def _featurize(batch: dict[str, np.ndarray], rules: list[Rule], work: Work, sides: str) -> pa.Table:
    return Featurizer(rules, work, sides)(batch)


def _only_candidates_images(df: pd.DataFrame, work: Work, pos: int) -> pa.Table:
    """Before a later model rule scores: rows an earlier rule dropped need no scoring, so no image."""
    return work.table(df.assign(image=df["image"].where(df["drop_at"].to_numpy() > pos, None)))


def _decide_scored(df: pd.DataFrame, rule: Rule) -> pa.Table:
    """A model rule's per-row decisions, once its scores are in."""
    assert rule.work is not None
    return rule.work.table(apply_decisions(df, rule, rule.decide(df, None)))


def _without_images(df: pd.DataFrame, work: Work) -> pa.Table:
    return work.table(df.drop(columns=["image", "caption"], errors="ignore"))


def funnel_reasons(rules: list[Rule]) -> list[str]:
    """Every reason of the job's rules, in rule order: the funnel, the ledger's reasons, Prometheus labels."""
    return list(dict.fromkeys([NOT_DOWNLOADED, *(r for rule in rules for r in rule.reasons())]))


@register
class CurateStage(Stage):
    kind = "curate"
    Config = CurateConfig
    dependencies = ("imagehash", "py3langid", "open_clip_torch", "torch", "pillow", "pyarrow", "scikit-learn")

    def input_identity(self) -> dict[str, Any]:
        """The files the listed rules read from outside the job (head weights, evaluation sets, checkpoints), and
        the code of the plugin rules the job lists (built-in rules are in code_version)."""
        from pipelines.stages.curate import rules

        listed = self.config.instances()
        out: dict[str, Any] = {r.name: ident for r in listed if (ident := r.identity())}
        root = Path(rules.__file__).resolve().parents[4]
        plugins = {r.name: digest_files(module_closure(plugin_files(type(r)), root, "pipelines"), root)
                   for r in listed if r.name in rules.plugins()}
        return {**out, "plugin_code": plugins} if plugins else out

    @classmethod
    def code_files(cls) -> list[Path]:
        """The stage's own closure and every built-in rule module's (found by listing their package, which import
        statements do not show); the plugin rules a job lists are in its input identity instead."""
        from pipelines.stages.curate import rules

        root = Path(rules.__file__).resolve().parents[4]
        return sorted({*super().code_files(),
                       *module_closure(Path(rules.__file__).parent.glob("*.py"), root, "pipelines")})

    def run(self, ctx: StageContext, upstream: dict[str, Manifest]) -> StageResult:
        import ray.data

        cfg: CurateConfig = self.config
        rules = cfg.instances()
        read = cfg.reads()  # other stages' outputs the rules read: in needs (the spec checks it when it loads)
        missing = [f"{field}: {name!r}" for name, field in read.items() if name not in upstream]
        if missing:
            raise ValueError(f"{', '.join(missing)}: not in this stage's needs ({', '.join(upstream)}); add it")
        crawls = [name for name in upstream if name not in read]
        if len(crawls) != 1:
            raise ValueError(f"curate reads exactly one crawl stage besides those its rules name; needs: lists "
                             f"{len(crawls)} ({', '.join(crawls)})")
        crawl = upstream[crawls[0]]
        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = ctx.progress
        dctx.enable_operator_progress_bars = ctx.progress
        t0 = time.perf_counter()

        self.work = Work(job_scores(rules))
        for rule in rules:
            rule.work = self.work
            rule.attach(crawl, {name: upstream[name] for name in rule.reads()})
            rule.prepare(ctx.log)
        self.ledger = ledger_schema([f.arrow() for f in self.work.scores], funnel_reasons(rules))
        urls = crawl.shard_urls()
        ds = ray.data.from_items([{"shard": i, "url": u} for i, u in enumerate(urls)],
                                 override_num_blocks=max(1, len(urls)))
        sides = self.config.basic.sides  # basic.sides, listed or not: which sizes the side features read
        ds = ds.map_batches(_featurize, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"rules": rules, "work": self.work, "sides": sides})
        scored = sorted((r for r in rules if r.uses_images), key=lambda r: r.position)
        for i, rule in enumerate(scored):
            if i:  # the featurize task kept images for the first model rule's candidates
                ds = ds.map_batches(_only_candidates_images, batch_format="pandas",
                                    fn_kwargs={"work": self.work, "pos": rule.position})
            ds = rule.stream(ds, ctx)
            ds = ds.map_batches(_decide_scored, batch_format="pandas", fn_kwargs={"rule": rule})
        if scored:
            ds = ds.map_batches(_without_images, batch_format="pandas", fn_kwargs={"work": self.work})
        work = ds.materialize()
        rows_in = work.count()
        if rows_in != crawl.rows:
            raise RuntimeError(f"curate accounting: the crawl lists {crawl.rows} rows but {rows_in} were read")
        ctx.log.info("scored %d rows in %.1fs", rows_in, time.perf_counter() - t0)

        metrics: dict[str, float] = {}
        for rule in rules:  # set rules, in rule order
            if rule.decides_sets():
                work, rule_metrics = rule.decide_set(work, ctx)
                metrics.update(rule_metrics)

        # hash partitions of the working table (~300 bytes a row): one block up to 200k rows, then more
        parts = max(1, min(256, math.ceil(rows_in / 200_000)))
        summaries = self._write_ledger(ctx, work, parts)
        shards = self._repack(ctx, summaries, dict(enumerate(urls)))
        reasons: Counter[str] = Counter()
        for s in summaries:
            reasons.update(s["reasons"])
        funnel = funnel_reasons(rules)
        counts = {"rows_in": rows_in, **{f"dropped_{r}": reasons.get(r, 0) for r in funnel},
                  "rows_out": sum(s["rows"] for s in shards)}
        if counts["rows_out"] != reasons.get("kept", 0) or sum(reasons.values()) != rows_in:
            raise RuntimeError(f"curate accounting: {rows_in} rows in, {dict(reasons)} decided, "
                               f"{counts['rows_out']} written")
        metrics["kept_fraction"] = counts["rows_out"] / rows_in if rows_in else 0.0
        prom = StageMetrics.of(ctx)  # the funnel for Prometheus, once its accounting holds
        prom.inc(CURATE_ROWS_IN, rows_in)
        prom.inc_each(CURATE_DROPPED, {r: counts[f"dropped_{r}"] for r in funnel}, "reason")
        prom.inc(CURATE_ROWS_OUT, counts["rows_out"])
        self._plots(ctx, cfg, funnel, counts, work)
        ledger = [layout.shard_entry(s["path"], s) for s in summaries]
        return StageResult(shards=[layout.shard_entry(s["path"], s) for s in shards],
                           counts=counts, metrics=metrics, extra={"ledger": ledger})

    # ---- outputs ---------------------------------------------------------------------------------------------

    def _write_ledger(self, ctx: StageContext, work: Any, parts: int) -> list[dict[str, Any]]:
        weight = "rows" if self.config.shard_rows else "image_bytes"
        out = ctx.output

        def write(df: pd.DataFrame) -> pd.DataFrame:
            recs = []
            for shard, g in df.groupby("shard", sort=True):
                g = g.sort_values("row")
                kept = (g["drop_at"] == KEPT).to_numpy()
                reason = g["reason"].to_numpy(dtype=object, copy=True)
                reason[kept] = None
                ledger = g.assign(kept=kept, phash=phash_hex(g["phash"], g["phash_ok"]), reason=reason)
                written = storage.write_shard(out, layout.ledger_name(int(shard)), to_arrow(ledger, self.ledger))
                w = np.ones(int(kept.sum()), np.int64) if weight == "rows" else g["image_bytes"].to_numpy()[kept]
                recs.append({"shard": int(shard), **written, "kept": int(kept.sum()),
                             "weight": int(w.sum()), "last_weight": int(w[-1]) if len(w) else 0,
                             "reasons": dict(Counter("kept" if k else r for k, r in zip(kept, g["reason"],
                                                                                         strict=True)))})
            return pd.DataFrame({"rec": [json.dumps(r) for r in recs]})

        grouped = work.repartition(1) if parts == 1 else work.repartition(parts, keys=["shard"])
        recs = grouped.map_batches(write, batch_size=None, batch_format="pandas").to_pandas()["rec"]
        return sorted((json.loads(r) for r in recs), key=lambda r: r["shard"])

    def _repack(self, ctx: StageContext, summaries: list[dict[str, Any]], crawl_urls: dict[int, str]
                ) -> list[dict[str, Any]]:
        import ray.data

        cfg: CurateConfig = self.config
        target = cfg.shard_rows or cfg.shard_bytes
        assert target is not None
        jobs: dict[int, list[tuple[int, int]]] = {}  # output part -> [(ledger shard, the weight before it)]
        offset, total = 0, 0
        for s in summaries:
            if s["kept"]:
                first, last = offset // target, (offset + s["weight"] - s["last_weight"]) // target
                for j in range(first, last + 1):
                    jobs.setdefault(j, []).append((s["shard"], offset))
            offset += s["weight"]
            total += s["kept"]
        items = [{"part": j, "inputs": json.dumps([(sh, off, crawl_urls[sh]) for sh, off in ins])}
                 for j, ins in sorted(jobs.items())]
        if not items:
            ctx.log.warning("no row was kept: the curated dataset is empty")
            return []
        out = ctx.output
        weight = "rows" if cfg.shard_rows else "image_bytes"
        columns = scored_fields([self.ledger.field(f.name) for f in self.work.scores])

        def build(item: dict[str, Any]) -> dict[str, Any]:
            tables = []
            for shard, off, url in json.loads(item["inputs"]):
                crawled = storage.read_parquet(url)
                ledger = storage.read_parquet(storage.join(out, layout.ledger_name(shard)))
                kept = np.asarray(ledger.column("kept").to_numpy(zero_copy_only=False), dtype=bool)
                w = (np.ones(int(kept.sum()), np.int64) if weight == "rows"
                     else ledger.column("image_bytes").to_numpy()[kept])
                start = off + np.cumsum(w) - w
                mine = np.flatnonzero(kept)[(start // target) == item["part"]]
                if len(mine):
                    t = crawled.take(pa.array(mine))
                    scores = ledger.select([f.name for f in columns]).take(pa.array(mine))
                    for f in columns:
                        t = t.append_column(f, scores.column(f.name).cast(f.type))
                    tables.append(t)
            return storage.write_shard(out, layout.shard_name(item["part"]), pa.concat_tables(tables))

        recs = ray.data.from_items(items, override_num_blocks=len(items)).map(build).take_all()
        written = sum(r["rows"] for r in recs)
        if written != total:
            raise RuntimeError(f"curate repack: {total} rows kept but {written} written")
        return sorted(recs, key=lambda r: r["path"])

    # ---- MLflow charts ---------------------------------------------------------------------------------------

    @staticmethod
    def _plots(ctx: StageContext, cfg: CurateConfig, funnel: list[str], counts: dict[str, int], work: Any) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # the funnel: rows remaining after each reason, in rule order
        steps, left = [("crawled", counts["rows_in"])], counts["rows_in"]
        for r in funnel:
            left -= counts[f"dropped_{r}"]
            steps.append((f"- {r} ({counts[f'dropped_{r}']})", left))
        log_bar_chart(ctx.tracker, steps, f"{ctx.stage}: funnel, {counts['rows_in']} rows in, {counts['rows_out']} out",
                      "rows remaining", f"{ctx.stage}_funnel.png", color="#55a868")

        edges = {"clip_score": np.linspace(-1, 1, 101), "caption_chars": np.unique(np.geomspace(1, 1e5, 60).astype(int)),
                 "min_side": np.unique(np.geomspace(1, 1e5, 60).astype(int))}

        def hist(df: pd.DataFrame) -> pd.DataFrame:
            ok = df["drop_at"].to_numpy() > 0
            kept = df["drop_at"].to_numpy() == KEPT
            rows = []
            for col, e in edges.items():
                v = df[col].to_numpy(dtype=np.float64)
                rows.append({"col": col, "set": "downloaded", "h": np.histogram(v[ok], e)[0]})
                rows.append({"col": col, "set": "kept", "h": np.histogram(v[kept], e)[0]})
            return pd.DataFrame(rows)

        parts = work.map_batches(hist, batch_format="pandas").to_pandas()
        titles = {"clip_score": "CLIP score", "caption_chars": "caption length (characters)",
                  "min_side": "image shorter side (pixels)"}
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for ax, (col, e) in zip(axes, edges.items(), strict=True):
            for name, color in (("downloaded", "#c0c0c0"), ("kept", "#4c72b0")):
                sel = parts[(parts["col"] == col) & (parts["set"] == name)]["h"]
                h = np.sum(np.stack(list(sel)), axis=0) if len(sel) else np.zeros(len(e) - 1)
                ax.stairs(h, e, fill=True, color=color, alpha=0.8, label=name)
                nz = np.flatnonzero(h)
                if name == "downloaded" and len(nz):  # zoom on the data, a few bins either side
                    lo, hi = max(nz[0] - 3, 0), min(nz[-1] + 4, len(e) - 1)
                    ax.set_xlim(e[lo], e[hi])
            if col != "clip_score":
                ax.set_xscale("log")
            elif "clip_score" not in cfg.rules:
                ax.text(0.5, 0.5, "no clip_score rule", transform=ax.transAxes, ha="center")
            ax.set_title(titles[col])
            ax.set_ylabel("rows")
            ax.legend()
        fig.tight_layout()
        ctx.tracker.log_figure(fig, f"{ctx.stage}_histograms.png")
        plt.close(fig)
