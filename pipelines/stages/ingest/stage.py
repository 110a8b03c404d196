"""The ingest stage: pairs that need no crawl become shards in the crawled schema (DESIGN.md, data contracts).

Every image is opened (header and pixel count checked, as the crawl checks them) so a bad file fails here,
naming the file and sample, not three stages later in a training worker.  The rows' `url` is where the
sample came from (`<file>#<key or row>`), so `uid` is stable across runs and distinct across samples.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pyarrow as pa
from PIL import Image

from pipelines import layout, pairs, storage
from pipelines.contracts import CRAWLED, uid
from pipelines.stage import Stage, StageContext, StageResult, register
from pipelines.stages.ingest.config import IngestConfig

MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


@register
class IngestStage(Stage):
    kind = "ingest"
    Config = IngestConfig
    dependencies = ("pillow", "scikit-learn", "pyarrow")

    def input_identity(self) -> dict[str, Any]:
        cfg: IngestConfig = self.config
        if cfg.builtin:
            return {"builtin": cfg.builtin}
        assert cfg.path is not None  # IngestConfig: exactly one of builtin and path
        return {"files": storage.file_keys(pairs.list_files("ingest", cfg.path))}

    def run(self, ctx: StageContext, upstream: dict) -> StageResult:
        cfg: IngestConfig = self.config
        images, captions, where = self._read(cfg)
        ctx.log.info("ingesting %d pairs from %s", len(images), cfg.builtin or cfg.path)
        # source_row is the row's index within its own file (the crawled schema's meaning): rows come grouped by file
        sources = [w.rsplit("#", 1)[0] for w in where]
        source_row: list[int] = []
        for j, src in enumerate(sources):
            source_row.append(source_row[-1] + 1 if j and src == sources[j - 1] else 0)
        shards = []
        for i, start in enumerate(range(0, len(images), cfg.shard_rows)):
            rows = [_row(images[j], captions[j], where[j], sources[j], source_row[j])
                    for j in range(start, min(len(images), start + cfg.shard_rows))]
            table = pa.Table.from_pylist(rows, schema=CRAWLED)
            shards.append(storage.write_shard(ctx.output, layout.shard_name(i), table))
        return StageResult(shards=shards, counts={"input_rows": len(images), "success": len(images)})

    @staticmethod
    def _read(cfg: IngestConfig) -> tuple[list[bytes], list[str], list[str]]:
        if cfg.builtin == "digits_train":
            from pipelines.evaluation import datasets

            images, labels = datasets.digits_images("train", cfg.image_size)
            return images, datasets.digits_captions(labels), [f"builtin:digits_train#{j}" for j in range(len(images))]
        assert cfg.path is not None  # IngestConfig: exactly one of builtin and path
        cols = pairs.read_columns("ingest", cfg.path, cfg.format, {"image": cfg.image_column,
                                                                   "caption": cfg.caption_column})
        return cols["image"], [cs[0] for cs in pairs.as_captions("ingest", cols["caption"])], cols["where"]


def _row(data: Any, caption: str, where: str, source: str, source_row: int) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise ValueError(f"ingest: {where}: the image is {type(data).__name__}, expected encoded image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height, fmt = im.width, im.height, (im.format or "").lower()
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} pixels is over the cap of {MAX_PIXELS}")
            im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder error: name the sample
        raise ValueError(f"ingest: {where}: not a readable image ({exc})") from None
    return {"uid": uid(where, caption), "url": where, "caption": caption, "status": "success", "image": data,
            "image_format": "jpg" if fmt == "jpeg" else fmt, "width": width, "height": height,
            "original_width": width, "original_height": height, "sha256": hashlib.sha256(data).hexdigest(),
            "source": source, "source_row": source_row}
