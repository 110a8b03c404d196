"""The export stage's driver: crawled or curated shards out as webdataset tars (open_clip) or re-sharded Parquet.

Two passes on Ray Data, as curate's repack (nothing but counts is gathered on the driver):
1. plan: one task per upstream shard decides which of its rows are exported (status `success`, an image, a
   caption; for webdataset also an image format open_clip decodes) and counts why the others are skipped;
2. write: exported rows are numbered across shards (prefix sums of the per-shard counts), and each output
   shard is written by one task from the upstream shards it spans, so shards are full but the last.
A tar is built in memory and written in one `storage.atomic_write`, so S3 sees it whole or not at all; its
members are in row order, each sample's members sorted by name, with a fixed mtime, owner and mode, so the
same rows always give the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from typing import Any

import pyarrow as pa

from pipelines import layout, storage
from pipelines.contracts import CRAWLED
from pipelines.manifest import Manifest, parquet_schema
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.export.config import ExportConfig

# the crawled columns every exported row needs (the caption column is checked apart: it is configurable)
NEEDED = ("uid", "url", "status", "image", "image_format", "width", "height")
# what <key>.json says of a sample from the crawled columns; every column outside CRAWLED (curate's scores,
# a rule's scores, the input's passthrough columns) follows, binary columns and null values left out
JSON_BASE = ("uid", "url", "caption", "width", "height", "original_width", "original_height", "sha256",
             "source", "source_row")
# stored image_format -> member extension, for the formats open_clip_train decodes ("jpg;png;jpeg;webp")
EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
# why a row is not exported, besides its crawl status (a non-success row counts as `skipped_<status>`)
NO_IMAGE, NO_CAPTION, IMAGE_FORMAT = "no_image", "no_caption", "image_format"


def sniff(data: bytes) -> str | None:
    """The extension of encoded image bytes whose format the row does not say, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def select(table: pa.Table, cfg: ExportConfig) -> tuple[list[int], list[str | None], Counter[str]]:
    """The rows of one upstream shard that are exported (indices, in order), each one's image extension
    (webdataset; None for parquet), and the count of every other row by the reason it is skipped."""
    status = table.column("status").to_pylist()
    images = table.column("image").to_pylist()
    captions = table.column(cfg.caption_column).to_pylist()
    formats = table.column("image_format").to_pylist()
    rows: list[int] = []
    exts: list[str | None] = []
    skipped: Counter[str] = Counter()
    for i, (st, image, caption, fmt) in enumerate(zip(status, images, captions, formats, strict=True)):
        ext = None
        if st != "success":
            reason: str | None = st
        elif not image:
            reason = NO_IMAGE
        elif caption is None or not caption.strip():
            reason = NO_CAPTION  # open_clip_train drops a sample without <key>.txt; parquet keeps the same rows
        elif cfg.format == "webdataset":
            ext = EXTENSIONS.get(fmt.lower()) if fmt else sniff(image)
            reason = IMAGE_FORMAT if ext is None else None  # gif, bmp, ...: open_clip_train skips them silently
        else:
            reason = None
        if reason is None:
            rows.append(i)
            exts.append(ext)
        else:
            skipped[reason] += 1
    return rows, exts, skipped


def _float(value: float, float32: bool) -> float | None:
    if math.isnan(value) or math.isinf(value):
        return None
    return float(f"{value:.7g}") if float32 else value  # a float32 score as written, not 0.2800000011920929


def sample_json(table: pa.Table, row: int, extra: list[str]) -> bytes:
    """<key>.json: the sample's identity and sizes, then its scores and passthrough columns (nulls left out)."""
    out: dict[str, Any] = {}
    for name in [c for c in JSON_BASE if c in table.column_names] + extra:
        value = table.column(name)[row].as_py()
        if isinstance(value, float):
            value = _float(value, pa.types.is_float32(table.schema.field(name).type))
        if value is not None:
            out[name] = value
    return json.dumps(out, ensure_ascii=False, sort_keys=False, default=str).encode()


def write_tar(table: pa.Table, exts: list[str | None], cfg: ExportConfig) -> bytes:
    """One webdataset shard of every row of `table`: <uid>.<ext>, <uid>.txt and (json_columns) <uid>.json."""
    crawled = set(CRAWLED.names)
    extra = [f.name for f in table.schema
             if f.name not in crawled and not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        uids = table.column("uid").to_pylist()
        images = table.column("image").to_pylist()
        captions = table.column(cfg.caption_column).to_pylist()
        for row, (key, image, caption, ext) in enumerate(zip(uids, images, captions, exts, strict=True)):
            members = {f"{key}.{ext}": image, f"{key}.txt": caption.encode()}
            if cfg.json_columns:
                members[f"{key}.json"] = sample_json(table, row, extra)
            for name in sorted(members):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(members[name]))
    return buf.getvalue()


def shards_pattern(count: int) -> str:
    """The brace pattern open_clip_train's --train-data takes for shards 0..count-1 (braceexpand)."""
    if count == 1:
        return layout.tar_name(0)
    return layout.tar_name(0).replace("00000", f"{{00000..{count - 1:05d}}}")


def _check_upstream(name: str, manifest: Manifest, cfg: ExportConfig) -> None:
    """Fail before any task when the upstream output is not crawled-schema Parquet or lacks the caption column."""
    what = f"export: the upstream stage {name!r} (uses: {manifest.uses})"
    schema = parquet_schema(manifest, "export")
    names = schema.names
    missing = [c for c in NEEDED if c not in names]
    if missing:
        raise ValueError(f"{what} lacks the crawled column(s) {', '.join(missing)}; export reads a crawl, ingest "
                         "or curate stage")
    if cfg.caption_column not in names:
        raise ValueError(f"export: caption_column: {name!r} has no column {cfg.caption_column!r}; its columns: "
                         f"{', '.join(names)}")
    kind = schema.field(cfg.caption_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"export: caption_column: {name!r}'s column {cfg.caption_column!r} is {kind}, not a string")


@register
class ExportStage(Stage):
    kind = "export"
    Config = ExportConfig
    dependencies = ("pyarrow",)

    def run(self, ctx: StageContext, upstream: dict[str, Manifest]) -> StageResult:
        cfg: ExportConfig = self.config
        if len(upstream) != 1:
            raise ValueError(f"export reads exactly one crawl, ingest or curate stage; needs: lists {len(upstream)} "
                             f"({', '.join(upstream)})")
        ((name, source),) = upstream.items()
        if source.shards:
            _check_upstream(name, source, cfg)
        plan = self._plan(ctx, source)
        rows_in = sum(p["rows"] for p in plan)
        if rows_in != source.rows:
            raise RuntimeError(f"export accounting: {name!r} lists {source.rows} rows but {rows_in} were read")
        skipped: Counter[str] = Counter()
        for p in plan:
            skipped.update(json.loads(p["skipped"]))
        recs = self._write(ctx, plan)
        rows_out = sum(r["rows"] for r in recs)
        if rows_out + sum(skipped.values()) != rows_in:
            raise RuntimeError(f"export accounting: {rows_in} rows in, {rows_out} written, skipped {dict(skipped)}")
        counts = {"rows_in": rows_in, "rows_out": rows_out, **{f"skipped_{r}": n for r, n in sorted(skipped.items())}}
        extra: dict[str, Any] = {"format": cfg.format}
        if cfg.format == "webdataset":
            storage.write_json(storage.join(ctx.output, layout.WDS_SIZES), {r["path"]: r["rows"] for r in recs})
            extra.update(sizes=layout.WDS_SIZES, train_data=shards_pattern(len(recs)) if recs else None)
            if recs:
                ctx.log.info("train open_clip on it: python -m pipelines.stages.export.openclip --dataset-type "
                             "webdataset --train-data '%s' --train-num-samples %d ...",
                             storage.join(ctx.output, extra["train_data"]), rows_out)
        if not recs:
            ctx.log.warning("no row of %r was exported (%s)", name, dict(skipped) or "it has no rows")
        ctx.log.info("exported %d of %d rows as %d %s shards; skipped %s", rows_out, rows_in, len(recs), cfg.format,
                     dict(skipped))
        return StageResult(shards=[layout.shard_entry(r["path"], r) for r in recs], counts=counts,
                           metrics={"exported_fraction": rows_out / rows_in if rows_in else 0.0}, extra=extra)

    def _plan(self, ctx: StageContext, source: Manifest) -> list[dict[str, Any]]:
        """Per upstream shard (in order): its url, rows, how many it exports and why the rest are skipped."""
        import ray.data

        cfg: ExportConfig = self.config
        urls = source.shard_urls()
        if not urls:
            return []
        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = ctx.progress
        dctx.enable_operator_progress_bars = ctx.progress
        columns = sorted({"status", "image", "image_format", cfg.caption_column})

        def count(item: dict[str, Any]) -> dict[str, Any]:
            import pyarrow.parquet as pq

            fs, path = storage.filesystem(item["url"])
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=columns)
            rows, _, skipped = select(table, cfg)
            return {**item, "rows": table.num_rows, "exported": len(rows), "skipped": json.dumps(dict(skipped))}

        items = [{"shard": i, "url": u} for i, u in enumerate(urls)]
        out = ray.data.from_items(items, override_num_blocks=len(items)).map(count).take_all()
        return sorted(out, key=lambda p: p["shard"])

    def _write(self, ctx: StageContext, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the output shards, one Ray task each; their records (path, rows, bytes, sha256) in order."""
        import ray.data

        cfg: ExportConfig = self.config
        target = cfg.shard_rows
        jobs: dict[int, list[tuple[str, int]]] = {}  # output part -> [(upstream shard url, exported rows before it)]
        offset = 0
        for p in plan:
            if p["exported"]:
                for j in range(offset // target, (offset + p["exported"] - 1) // target + 1):
                    jobs.setdefault(j, []).append((p["url"], offset))
            offset += p["exported"]
        if not jobs:
            return []
        out = ctx.output

        def build(item: dict[str, Any]) -> dict[str, Any]:
            part, tables, exts = item["part"], [], []
            for url, off in json.loads(item["inputs"]):
                table = storage.read_parquet(url)
                rows, row_exts, _ = select(table, cfg)
                mine = [k for k in range(len(rows)) if (off + k) // target == part]
                tables.append(table.take(pa.array([rows[k] for k in mine], pa.int64())))
                exts += [row_exts[k] for k in mine]
            table = pa.concat_tables(tables, promote_options="permissive")
            if cfg.format == "parquet":
                return storage.write_shard(out, layout.shard_name(part), table)
            data = write_tar(table, exts, cfg)
            path = layout.tar_name(part)
            storage.atomic_write(storage.join(out, path), data)
            return layout.shard_record(path, table.num_rows, data)

        items = [{"part": j, "inputs": json.dumps(ins)} for j, ins in sorted(jobs.items())]
        recs = ray.data.from_items(items, override_num_blocks=len(items)).map(build).take_all()
        if [r["rows"] for r in sorted(recs, key=lambda r: r["path"])][:-1] != [target] * (len(recs) - 1):
            raise RuntimeError(f"export: shards of {[r['rows'] for r in recs]} rows, expected {target} but the last")
        return sorted(recs, key=lambda r: r["path"])
