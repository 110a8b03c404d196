"""The curate stage's driver: score every crawled row, apply the rules in order, write ledger and shards.

Streaming plan on Ray Data (nothing is gathered in one process but per-shard summaries and histograms):
1. featurize: one task per crawled shard computes per-row scores and the row rules (no image bytes kept,
   except for rows the CLIP scorer still has to see);
2. CLIP scores: an actor pool (`clip_score.actors`) scores those rows in batches;
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
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines import layout, storage
from pipelines.contracts import LEDGER, RULE_REASONS, SCORES
from pipelines.manifest import Manifest
from pipelines.prometheus import CURATE_DROPPED, CURATE_ROWS_IN, CURATE_ROWS_OUT, StageMetrics
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.curate import select
from pipelines.stages.curate.config import CurateConfig
from pipelines.stages.curate.features import KEPT, Featurizer, load_eval_hashes, phash_hex, to_arrow, typed
from pipelines.tracking import log_bar_chart


def _featurize(batch: dict[str, np.ndarray], cfg: CurateConfig, eval_hashes: np.ndarray,
               eval_names: list[str]) -> pd.DataFrame:
    return Featurizer(cfg, eval_hashes, eval_names)(batch)


def _threshold(df: pd.DataFrame, pos: int, threshold: float | None) -> pd.DataFrame:
    """Apply a CLIP-score threshold (a row rule) and drop the columns only the scorer needed."""
    df = df.drop(columns=["image", "caption"], errors="ignore")
    if threshold is None:
        return typed(df)
    scores = df["clip_score"].to_numpy(dtype=np.float32)
    low = (df["drop_at"].to_numpy() > pos) & ~(scores >= threshold)  # NaN (unscorable) fails too
    return typed(select._mark(df, low, pos, "clip_score"))


def funnel_reasons(cfg: CurateConfig) -> list[str]:
    return ["not_downloaded", *[r for rule in cfg.rules for r in RULE_REASONS[rule]]]


@register
class CurateStage(Stage):
    kind = "curate"
    Config = CurateConfig
    dependencies = ("imagehash", "py3langid", "open_clip_torch", "torch", "pillow", "pyarrow")

    def run(self, ctx: StageContext, upstream: dict[str, Manifest]) -> StageResult:
        import ray.data

        cfg: CurateConfig = self.config
        if len(upstream) != 1:
            raise ValueError(f"curate reads exactly one crawl stage; needs: lists {len(upstream)} ({', '.join(upstream)})")
        (crawl,) = upstream.values()
        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = ctx.progress
        dctx.enable_operator_progress_bars = ctx.progress
        pos = {r: i + 1 for i, r in enumerate(cfg.rules)}
        t0 = time.perf_counter()

        eval_hashes, eval_names = (load_eval_hashes(cfg) if "decontaminate" in cfg.rules
                                   else (np.zeros(0, np.int64), []))
        if "decontaminate" in cfg.rules:
            ctx.log.info("decontaminating against %d images of %s", len(eval_hashes),
                         ", ".join(s.name for s in cfg.decontaminate.sets))
        urls = crawl.shard_urls()
        ds = ray.data.from_items([{"shard": i, "url": u} for i, u in enumerate(urls)],
                                 override_num_blocks=max(1, len(urls)))
        ds = ds.map_batches(_featurize, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"cfg": cfg, "eval_hashes": eval_hashes, "eval_names": eval_names})
        clip = cfg.clip_score
        if "clip_score" in cfg.rules:
            from pipelines.stages.curate.scorer import ClipScorer

            ds = ds.map_batches(ClipScorer, batch_size=clip.batch_size, batch_format="pandas",
                                compute=ray.data.ActorPoolStrategy(size=clip.actors), num_cpus=clip.num_cpus,
                                num_gpus=clip.num_gpus,
                                fn_constructor_kwargs={"model": clip.model, "batch_size": clip.batch_size,
                                                       "threads": max(1, int(clip.num_cpus))})
        ds = ds.map_batches(_threshold, batch_format="pandas",
                            fn_kwargs={"pos": pos.get("clip_score", 0), "threshold": clip.threshold})
        work = ds.materialize()
        rows_in = work.count()
        if rows_in != crawl.rows:
            raise RuntimeError(f"curate accounting: the crawl lists {crawl.rows} rows but {rows_in} were read")
        ctx.log.info("scored %d rows in %.1fs", rows_in, time.perf_counter() - t0)

        metrics: dict[str, float] = {}
        # hash partitions of the working table (~300 bytes a row): one block up to 200k rows, then more
        parts = max(1, min(256, math.ceil(rows_in / 200_000)))
        for rule in cfg.rules:
            p = pos[rule]
            if rule in ("dedup_image", "dedup_text", "near_duplicate"):
                work = self._dedup(work, rule, p, cfg.near_duplicate.max_distance, parts)
            elif rule == "clip_score" and clip.top_fraction is not None:
                work, cutoff = self._top_fraction(work, p, clip.top_fraction)
                if cutoff is not None:
                    metrics["clip_score_cutoff"] = cutoff

        summaries = self._write_ledger(ctx, work, parts)
        shards = self._repack(ctx, summaries, dict(enumerate(urls)))
        reasons: Counter[str] = Counter()
        for s in summaries:
            reasons.update(s["reasons"])
        counts = {"rows_in": rows_in, **{f"dropped_{r}": reasons.get(r, 0) for r in funnel_reasons(cfg)},
                  "rows_out": sum(s["rows"] for s in shards)}
        if counts["rows_out"] != reasons.get("kept", 0) or sum(reasons.values()) != rows_in:
            raise RuntimeError(f"curate accounting: {rows_in} rows in, {dict(reasons)} decided, "
                               f"{counts['rows_out']} written")
        metrics["kept_fraction"] = counts["rows_out"] / rows_in if rows_in else 0.0
        prom = StageMetrics.of(ctx)  # the funnel for Prometheus, once its accounting holds
        prom.inc(CURATE_ROWS_IN, rows_in)
        prom.inc_each(CURATE_DROPPED, {r: counts[f"dropped_{r}"] for r in funnel_reasons(cfg)}, "reason")
        prom.inc(CURATE_ROWS_OUT, counts["rows_out"])
        self._plots(ctx, cfg, counts, work)
        ledger = [layout.shard_entry(s["path"], s) for s in summaries]
        return StageResult(shards=[layout.shard_entry(s["path"], s) for s in shards],
                           counts=counts, metrics=metrics, extra={"ledger": ledger})

    # ---- set rules -------------------------------------------------------------------------------------------

    @staticmethod
    def _dedup(work: Any, rule: str, pos: int, max_distance: int, parts: int) -> Any:
        """Dedup rules: with one partition the whole table is one block; otherwise candidates are
        hash-partitioned by their key (each pHash band in turn), so every group lands whole in one block."""
        if parts == 1:
            return work.repartition(1).map_batches(select.in_block, batch_size=None, batch_format="pandas",
                                                   fn_kwargs={"rule": rule, "pos": pos,
                                                              "max_distance": max_distance}).materialize()
        key = {"dedup_image": "sha256", "dedup_text": "text_key", "near_duplicate": "phash"}[rule]
        for band in select.bands(max_distance) if rule == "near_duplicate" else [None]:
            def pick(df: pd.DataFrame, band: tuple[int, int] | None = band) -> pa.Table:
                c = select.candidates(df, pos, key)
                return typed(select.with_band(c, *band) if band else c.assign(_key=c[key]))

            cand = work.map_batches(pick, batch_format="pandas")
            rest = work.map_batches(select.part, batch_format="pandas", fn_kwargs={"pos": pos, "key": key, "want": False})
            decided = cand.repartition(parts, keys=["_key"]).map_batches(
                select.in_partition, batch_size=None, batch_format="pandas",
                fn_kwargs={"rule": rule, "pos": pos, "max_distance": max_distance})
            work = rest.union(decided).materialize()
        return work

    @staticmethod
    def _top_fraction(work: Any, pos: int, fraction: float) -> tuple[Any, float | None]:
        n = int(sum(work.map_batches(lambda df: pd.DataFrame({"n": [len(select.candidates(df, pos))]}),
                                     batch_format="pandas").to_pandas()["n"]))
        k = select.top_count(n, fraction)
        if k == 0:
            return work, None

        def count_pass(prefix: int, shift: int) -> np.ndarray:
            hist = work.map_batches(select.histogram, batch_format="pandas",
                                    fn_kwargs={"pos": pos, "prefix": prefix, "shift": shift}).to_pandas()
            return hist.groupby("byte")["count"].sum().reindex(range(256), fill_value=0).to_numpy()

        key, above = select.kth_key(count_pass, k)
        if above + int(count_pass(key >> 8, 0)[key & 255]) < k:
            key = 0  # fewer scorable rows than k: keep every scored candidate
            above = k
        tied = work.map_batches(select.ties, batch_format="pandas", fn_kwargs={"pos": pos, "key": key}).to_pandas()
        keep = {(int(s), int(r)) for s, r in tied.sort_values(select.ORDER).head(k - above).itertuples(index=False)}
        out = work.map_batches(select.drop_below, batch_format="pandas",
                               fn_kwargs={"pos": pos, "key": key, "keep_ties": keep}).materialize()
        cutoff = np.array([key], dtype=np.uint32)
        cutoff = np.where(cutoff & np.uint32(0x80000000), cutoff & np.uint32(0x7FFFFFFF), ~cutoff).view(np.float32)
        return out, float(cutoff[0])

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
                written = storage.write_shard(out, layout.ledger_name(int(shard)), to_arrow(ledger, LEDGER))
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
                    scores = ledger.select([f.name for f in SCORES]).take(pa.array(mine))
                    for f in SCORES:
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
    def _plots(ctx: StageContext, cfg: CurateConfig, counts: dict[str, int], work: Any) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # the funnel: rows remaining after each reason, in rule order
        steps, left = [("crawled", counts["rows_in"])], counts["rows_in"]
        for r in funnel_reasons(cfg):
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
