"""The embed stage's driver: a dataset version's image and text embeddings, written once per (dataset, model).

One pass on Ray Data: the upstream shards (a crawl's, ingest's or curate's) are items, and a pool of `actors`
actors (`ShardEmbedder`, each loading the model once, with `num_cpus` CPUs and `num_gpus` GPUs) takes one shard
at a time: it reads the shard in slices (only uid, status, image and caption), embeds the rows with status
`success` in batches of `batch_size` (`pipelines.embedding`: the curate model rules' code), L2-normalises, stores
float16 and writes `part-NNNNN.parquet` with the upstream shard's number, whole or not at all.  A shard an
earlier attempt wrote is described, not embedded again (resume).  Rows of another status are counted as
`skipped_<status>`, not written; a successful row without an image, or whose image cannot be decoded, has a null
image embedding.  Caching is the runner's: the fingerprint covers the upstream manifest's digest, the params
(the model among them) and the model's files (`input_identity`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pyarrow as pa

from pipelines import layout, storage
from pipelines.contracts import EMBEDDINGS
from pipelines.embedding import embed_images, embed_texts, load_model, model_identity, unit
from pipelines.manifest import Manifest, parquet_schema
from pipelines.models import ModelRef
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.embed.config import EmbedConfig

COLUMN = {"image": "image_embedding", "text": "text_embedding"}
SOURCE = {"image": "image", "text": "caption"}  # the upstream column each kind embeds
READ_ROWS = 4096  # upstream rows read at once: an actor holds one slice of image bytes, not a whole shard


def vectors(values: Any, ok: Any) -> pa.Array:
    """A list<float16> column from unit float32 vectors (rows x dimensions) and which rows have one (null else)."""
    import numpy as np

    n, dim = values.shape
    offsets = np.zeros(n + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(ok.astype(np.int64) * dim)
    flat = pa.array(values[ok].astype(np.float16).ravel(), type=pa.float16())
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~ok))


def output_schema(kinds: list[str]) -> pa.Schema:
    return pa.schema([EMBEDDINGS.field("uid"), *(EMBEDDINGS.field(COLUMN[k]) for k in kinds)])


def width(table: pa.Table) -> int | None:
    """The embeddings' width: the length of the first vector written (None when no row has one)."""
    for column in table.columns[1:]:
        lengths = column.combine_chunks().value_lengths().drop_null()
        if len(lengths):
            return int(lengths[0].as_py())
    return None


def shard_counts(upstream: pa.Table, written: pa.Table) -> dict[str, int]:
    """What a shard adds to the stage's counts: rows read and written, rows skipped by status, and written rows
    without an image embedding."""
    status = Counter(upstream.column("status").to_pylist())
    out = {"rows_in": upstream.num_rows, "rows_out": written.num_rows,
           **{f"skipped_{s}": n for s, n in status.items() if s != "success"}}
    if "image_embedding" in written.column_names:
        out["no_image_embedding"] = written.column("image_embedding").null_count
    return out


class ShardEmbedder:
    """A Ray Data actor: the model loaded once (`embedding.load_model`), then whole upstream shards embedded and
    written, one output shard each; returns each shard's manifest record and counts (JSON, one row a shard)."""

    def __init__(self, model: ModelRef, batch_size: int, threads: int, kinds: list[str], output: str,
                 device: str | None = None) -> None:
        self.model, self.preprocess, self.tokenizer, self.device = load_model(model, threads, device)
        self.batch_size, self.kinds, self.output = batch_size, kinds, output
        self.schema = output_schema(kinds)

    def embed(self, table: pa.Table) -> pa.Table:
        """The output rows of one slice of an upstream shard: its successful rows, in order."""
        import numpy as np
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("status"), "success"))
        n = table.num_rows
        columns: dict[str, pa.Array] = {"uid": table.column("uid").combine_chunks()}
        for kind in self.kinds:
            values = table.column(SOURCE[kind]).to_pylist()
            todo = [i for i, v in enumerate(values) if v is not None]
            items = [values[i] for i in todo]
            if kind == "image":
                emb, bad = embed_images(self.model, self.preprocess, items, self.batch_size, self.device)
            else:
                emb, bad = embed_texts(self.model, self.tokenizer, items, self.batch_size, self.device), []
            got, ok = unit(emb, bad, len(items))
            full, has = np.zeros((n, got.shape[1]), dtype=np.float32), np.zeros(n, dtype=bool)
            full[todo], has[todo] = got, ok
            columns[COLUMN[kind]] = vectors(full, has)
        return pa.table(columns, schema=self.schema)

    def shard(self, index: int, url: str) -> dict[str, Any]:
        """Embed and write one upstream shard (or describe what an earlier attempt wrote): its manifest record, its
        counts, the embeddings' width and when the work began and ended (wall clock, for the running rate)."""
        started = time.time()
        return {**self._shard(index, url), "started": started, "ended": time.time()}

    def _shard(self, index: int, url: str) -> dict[str, Any]:
        import pyarrow.parquet as pq

        path = layout.shard_name(index)
        out_url = storage.join(self.output, path)
        read = ["uid", "status", *(SOURCE[k] for k in self.kinds)]
        fs, where = storage.filesystem(url)
        if storage.is_file(out_url):  # written by an earlier attempt of this fingerprint: describe it
            with fs.open(where, "rb") as f:
                upstream = pq.read_table(f, columns=["status"])
            ofs, opath = storage.filesystem(out_url)
            with ofs.open(opath, "rb") as f:
                data = f.read()
            written = pq.read_table(pa.BufferReader(data))
            return {**layout.shard_record(path, written.num_rows, data), "counts": shard_counts(upstream, written),
                    "dim": width(written), "resumed": True}
        parts, statuses = [], []
        with fs.open(where, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS, columns=read):
                slice_ = pa.Table.from_batches([batch])
                statuses.append(slice_.select(["status"]))
                parts.append(self.embed(slice_))
        written = pa.concat_tables(parts) if parts else self.schema.empty_table()
        upstream = pa.concat_tables(statuses) if statuses else pa.table({"status": pa.array([], pa.string())})
        record = storage.write_shard(self.output, path, written)
        return {**record, "counts": shard_counts(upstream, written), "dim": width(written), "resumed": False}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        return {"record": [json.dumps(self.shard(int(i), str(u))) for i, u in zip(batch["shard"], batch["url"],
                                                                                   strict=True)]}


def _check_upstream(name: str, manifest: Manifest, cfg: EmbedConfig) -> None:
    """Fail before any actor starts when the upstream output is not Parquet with the columns embedding reads."""
    what = f"embed: the upstream stage {name!r} (uses: {manifest.uses})"
    names = parquet_schema(manifest, "embed").names
    missing = [c for c in ("uid", "status", *(SOURCE[k] for k in cfg.embeddings)) if c not in names]
    if missing:
        raise ValueError(f"{what} has no column(s) {', '.join(missing)} (embeddings: {cfg.embeddings}); embed reads "
                         "a crawl, ingest or curate stage")


@register
class EmbedStage(Stage):
    kind = "embed"
    Config = EmbedConfig
    dependencies = ("open_clip_torch", "torch", "pillow", "pyarrow")

    def input_identity(self) -> dict[str, Any]:
        """The model's files (a checkpoint, a JSON architecture): new weights at the same path are a new output."""
        ident = model_identity(self.config.model)
        return {"model": ident} if ident else {}

    def run(self, ctx: StageContext, upstream: dict[str, Manifest]) -> StageResult:
        import ray.data

        cfg: EmbedConfig = self.config
        if len(upstream) != 1:
            raise ValueError(f"embed reads exactly one crawl, ingest or curate stage; needs: lists {len(upstream)} "
                             f"({', '.join(upstream)})")
        ((name, source),) = upstream.items()
        urls = source.shard_urls()
        if urls:
            _check_upstream(name, source, cfg)
        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = ctx.progress
        dctx.enable_operator_progress_bars = ctx.progress
        recs: list[dict[str, Any]] = []
        if urls:
            items = [{"shard": i, "url": u} for i, u in enumerate(urls)]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardEmbedder, batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(items))), num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus,
                fn_constructor_kwargs={"model": cfg.model, "batch_size": cfg.batch_size, "kinds": list(cfg.embeddings),
                                       "threads": max(1, int(cfg.num_cpus)), "output": ctx.output})
            recs = sorted((json.loads(row["record"]) for row in ds.take_all()), key=lambda r: r["path"])
        counts: Counter[str] = Counter({"rows_in": 0, "rows_out": 0})
        for r in recs:
            counts.update(r["counts"])
        if counts["rows_in"] != source.rows:
            raise RuntimeError(f"embed accounting: {name!r} lists {source.rows} rows but {counts['rows_in']} were read")
        resumed = sum(r["resumed"] for r in recs)
        if resumed:
            ctx.log.info("resuming: %d of %d shards were already written", resumed, len(recs))
        model = cfg.model.model_uri or cfg.model.arch
        dim = next((r["dim"] for r in recs if r["dim"] is not None), None)
        # from the first shard an actor began to the last one it finished: the stage's time less the actors' start
        running = max(r["ended"] for r in recs) - min(r["started"] for r in recs) if recs else 0.0
        metrics = {"running_seconds": round(running, 3),
                   "rows_per_s_running": round(counts["rows_out"] / running, 1) if running > 0 else 0.0}
        ctx.log.info("embedded %d of %d rows of %r with %s (%s, %s dimensions, float16) into %d shards; %.1f rows/s "
                     "once the actors were up", counts["rows_out"], counts["rows_in"], name, model,
                     "+".join(cfg.embeddings), dim, len(recs), metrics["rows_per_s_running"])
        return StageResult(shards=[layout.shard_entry(r["path"], r) for r in recs], counts=dict(counts),
                           metrics=metrics,
                           extra={"model": model, "embeddings": list(cfg.embeddings), "dim": dim, "dtype": "float16",
                                  "columns": output_schema(list(cfg.embeddings)).names})
