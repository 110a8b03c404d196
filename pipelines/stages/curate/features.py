"""Per-row features and the per-row rules: everything about a crawled row that does not depend on other rows.

`Featurizer` turns one crawled shard into the stage's working table (no image bytes, except for rows a model
rule still has to score): the features every rule may read (caption length, sides, sha256, text key, pHash),
each rule's own scores, `drop_at` (the position in `rules` of the first rule that dropped the row; 0 = not
downloaded, `KEPT` = none so far) and `reason`. Rules scored by a model decide after their pass, and set rules
later still; each only lowers `drop_at`, so the first rule in the configured order always wins.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.stages.curate.rules import KEPT, Rule, Work, apply_decisions

__all__ = ["KEPT", "Featurizer", "hamming", "phash", "phash_hex", "text_key", "to_arrow"]

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalise_caption(caption: str | None) -> str:
    """Caption key for text dedup: Unicode NFKC, case-folded, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", caption or "").casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def text_key(caption: str | None, url: str | None) -> str:
    return hashlib.sha1(f"{normalise_caption(caption)}\x1f{(url or '').strip()}".encode()).hexdigest()


def phash(data: bytes | None) -> int | None:
    """64-bit pHash of encoded image bytes as a signed int64 (Arrow has no unsigned default), None if unreadable."""
    if not data:
        return None
    import imagehash
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            bits = imagehash.phash(im.convert("RGB")).hash.flatten()
    except Exception:  # noqa: BLE001  (an unreadable image simply has no hash)
        return None
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between int64 hashes, broadcasting."""
    return np.bitwise_count(np.bitwise_xor(a.astype(np.int64).view(np.uint64), b.astype(np.int64).view(np.uint64)))


class Featurizer:
    """Reads one crawled shard (a one-row batch naming it) and returns its working table."""

    def __init__(self, rules: list[Rule], work: Work, sides: str = "original") -> None:
        self.rules = rules
        self.work = work
        self.sides = sides  # basic.sides: which sizes the side features read, the source's or the stored ones
        model_rules = [r.position for r in rules if r.uses_images]
        self.keep_images = min(model_rules) if model_rules else None  # rows a model rule may still score

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        frames = [self.featurize(int(s), str(u)) for s, u in zip(batch["shard"], batch["url"], strict=True)]
        return self.work.table(pd.concat(frames, ignore_index=True))

    def featurize(self, shard: int, url: str) -> pd.DataFrame:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        missing = {"uid", "url", "caption", "status", "image"} - set(table.column_names)
        if missing:
            raise ValueError(f"{url}: not a crawled shard: no column(s) {', '.join(sorted(missing))}")
        df = table.select([c for c in ("uid", "url", "caption", "status", "image", "source", "source_row", "width",
                                       "height", "original_width", "original_height", "sha256")
                           if c in table.column_names]).to_pandas()
        out = features(df, shard, self.sides)
        for name, values in self.work.empty_scores(len(df)).items():
            out[name] = values
        ok = out["drop_at"].to_numpy() > 0
        for rule in self.rules:
            for name, values in rule.score(table, out).items():
                out[name] = values
        for rule in self.rules:  # in order: a rule only drops rows no earlier rule dropped
            if not rule.uses_images:  # those decide once their model pass has scored
                out = apply_decisions(out, rule, rule.decide(out, table))
        if self.keep_images is not None:
            out["image"] = df["image"].where(ok & (out["drop_at"].to_numpy() > self.keep_images), None)
            out["caption"] = df["caption"]
        return out


def features(df: pd.DataFrame, shard: int, sides: str) -> pd.DataFrame:
    """The features of a crawled shard's rows that every rule may read, and drop_at/reason before any rule."""
    n = len(df)
    out = pd.DataFrame({
        "uid": df["uid"], "source": df["source"], "source_row": df["source_row"].astype("int64"),
        "shard": np.full(n, shard, dtype=np.int32), "row": np.arange(n, dtype=np.int32),
        "status": df["status"],
    })
    ok = (df["status"] == "success").to_numpy() & df["image"].notna().to_numpy()
    caption = df["caption"].fillna("")
    out["caption_words"] = caption.map(lambda c: len(c.split())).astype("int32")
    out["caption_chars"] = caption.map(lambda c: len(c.strip())).astype("int32")
    w, h = df["width"], df["height"]
    if sides == "original" and "original_width" in df:
        w, h = df["original_width"].fillna(w), df["original_height"].fillna(h)
    w, h = w.fillna(0).to_numpy(np.int64), h.fillna(0).to_numpy(np.int64)
    out["min_side"] = np.minimum(w, h).astype("int32")
    out["max_side"] = np.maximum(w, h).astype("int32")
    with np.errstate(divide="ignore", invalid="ignore"):
        out["aspect_ratio"] = np.where(out["min_side"] > 0, out["max_side"] / out["min_side"].clip(lower=1), np.nan
                                       ).astype("float32")
    images = df["image"].where(ok, None)
    sha = df["sha256"] if "sha256" in df else pd.Series([None] * n)
    out["sha256"] = [s or (hashlib.sha256(b).hexdigest() if b is not None else None)
                     for s, b in zip(sha, images, strict=True)]
    out["image_bytes"] = images.map(lambda b: len(b) if b is not None else 0).astype("int64")
    out["text_key"] = [text_key(c, u) for c, u in zip(df["caption"], df["url"], strict=True)]
    hashes = [phash(b) for b in images]
    # int64 with a flag, not a nullable column: Ray Data's pandas round trip would turn it into float64
    out["phash_ok"] = np.array([h is not None for h in hashes], dtype=bool)
    out["phash"] = np.array([h or 0 for h in hashes], dtype=np.int64)
    out["drop_at"] = np.where(ok, KEPT, 0).astype(np.int32)
    reason = np.full(n, None, dtype=object)
    reason[~ok] = "not_downloaded"
    out["reason"] = reason
    return out


def to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def phash_hex(values: Any, present: Any) -> list[str | None]:
    return [f"{int(v) & ((1 << 64) - 1):016x}" if ok else None for v, ok in zip(values, present, strict=True)]
