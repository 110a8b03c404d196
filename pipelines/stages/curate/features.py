"""Per-row scores and the row rules: everything about a crawled row that does not depend on other rows.

`featurize` turns one crawled shard into the stage's working table (no image bytes, except for rows the
CLIP scorer still has to see) with `drop_at`, the position in `rules` of the first rule that dropped the
row (0 = not downloaded, `KEPT` = none so far), and `reason`.  Set rules (dedup, top fraction) later lower
`drop_at` for rows they drop, so the first rule in the configured order always wins.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.stages.curate.config import CurateConfig

if TYPE_CHECKING:
    from py3langid.langid import LanguageIdentifier

KEPT = 1 << 14  # drop_at of a row no rule has dropped

# The working table, fixed so that every block has the same Arrow schema whatever its values (a block whose
# reasons are all null would otherwise infer a null-typed column, and Ray cannot concatenate it with others).
WORK = pa.schema([
    ("uid", pa.string()), ("source", pa.string()), ("source_row", pa.int64()), ("shard", pa.int32()),
    ("row", pa.int32()), ("status", pa.string()), ("caption_words", pa.int32()), ("caption_chars", pa.int32()),
    ("min_side", pa.int32()), ("max_side", pa.int32()), ("aspect_ratio", pa.float32()), ("sha256", pa.string()),
    ("image_bytes", pa.int64()), ("text_key", pa.string()), ("phash_ok", pa.bool_()), ("phash", pa.int64()),
    ("language", pa.string()), ("language_score", pa.float32()), ("eval_distance", pa.float64()),
    ("contaminated_by", pa.string()), ("clip_score", pa.float32()), ("drop_at", pa.int32()), ("reason", pa.string()),
])
EXTRA = {"image": pa.binary(), "caption": pa.string(), "_key": pa.string()}


def typed(df: pd.DataFrame) -> pa.Table:
    """The working table as Arrow with its fixed schema (plus the optional scorer and group-key columns)."""
    fields = list(WORK) + [pa.field(c, t) for c, t in EXTRA.items() if c in df.columns]
    if "_key" in df.columns:
        df = df.assign(_key=df["_key"].astype(str))
    return pa.Table.from_pandas(df[[f.name for f in fields]], schema=pa.schema(fields), preserve_index=False)

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


def load_eval_hashes(cfg: CurateConfig) -> tuple[np.ndarray, list[str]]:
    """pHashes of every image in the configured evaluation sets, with each one's set name."""
    hashes: list[int] = []
    names: list[str] = []
    for es in cfg.decontaminate.sets:
        fs, pattern = storage.filesystem(es.path)
        paths = sorted(fs.glob(pattern))
        if not paths:
            raise FileNotFoundError(f"decontaminate.sets[{es.name}]: no file matches {es.path}")
        for p in paths:
            with fs.open(p, "rb") as f:
                table = pq.read_table(f)
            if es.image_column not in table.column_names:
                raise ValueError(f"decontaminate.sets[{es.name}]: {p} has no column {es.image_column!r}; "
                                 f"columns: {', '.join(table.column_names)}")
            for data in table.column(es.image_column).to_pylist():
                h = phash(data)
                if h is not None:
                    hashes.append(h)
                    names.append(es.name)
    return np.array(hashes, dtype=np.int64), names


class Featurizer:
    """Reads one crawled shard (a one-row batch naming it) and returns its working table."""

    def __init__(self, cfg: CurateConfig, eval_hashes: np.ndarray, eval_names: list[str]) -> None:
        self.cfg = cfg
        self.pos: dict[str, int] = {r: i + 1 for i, r in enumerate(cfg.rules)}  # 0 is reserved for not_downloaded
        self.eval_hashes = eval_hashes
        self.eval_names = eval_names
        self._lang: LanguageIdentifier | None = None  # loaded on first use

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        frames = [self.featurize(int(s), str(u)) for s, u in zip(batch["shard"], batch["url"], strict=True)]
        return typed(pd.concat(frames, ignore_index=True))

    def featurize(self, shard: int, url: str) -> pd.DataFrame:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        missing = {"uid", "url", "caption", "status", "image"} - set(table.column_names)
        if missing:
            raise ValueError(f"{url}: not a crawled shard: no column(s) {', '.join(sorted(missing))}")
        df = table.to_pandas()
        cfg, n = self.cfg, len(df)
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
        if cfg.basic.sides == "original" and "original_width" in df:
            w, h = df["original_width"].fillna(w), df["original_height"].fillna(h)
        w, h = w.fillna(0).to_numpy(np.int64), h.fillna(0).to_numpy(np.int64)
        out["min_side"] = np.minimum(w, h).astype("int32")
        out["max_side"] = np.maximum(w, h).astype("int32")
        with np.errstate(divide="ignore", invalid="ignore"):
            out["aspect_ratio"] = np.where(out["min_side"] > 0, out["max_side"] / out["min_side"].clip(lower=1), np.nan
                                           ).astype("float32")
        images = df["image"].where(ok, None)
        sha = df["sha256"] if "sha256" in df else pd.Series([None] * n)
        out["sha256"] = [s or (hashlib.sha256(b).hexdigest() if b is not None else None) for s, b in zip(sha, images,
                                                                                                        strict=True)]
        out["image_bytes"] = images.map(lambda b: len(b) if b is not None else 0).astype("int64")
        out["text_key"] = [text_key(c, u) for c, u in zip(df["caption"], df["url"], strict=True)]
        hashes = [phash(b) for b in images]
        # int64 with a flag, not a nullable column: Ray Data's pandas round trip would turn it into float64
        out["phash_ok"] = np.array([h is not None for h in hashes], dtype=bool)
        out["phash"] = np.array([h or 0 for h in hashes], dtype=np.int64)
        out["language"], out["language_score"] = self._languages(caption, "language" in cfg.rules)
        out["eval_distance"], out["contaminated_by"] = self._contamination(out["phash"], out["phash_ok"])
        out["clip_score"] = np.full(n, np.nan, dtype=np.float32)

        drop_at = np.where(ok, KEPT, 0).astype(np.int32)
        reason = np.full(n, None, dtype=object)
        reason[~ok] = "not_downloaded"

        def drop(rule: str, mask: np.ndarray, why: str) -> None:
            hit = mask & (drop_at > self.pos[rule])
            drop_at[hit] = self.pos[rule]
            reason[hit] = why

        # row rules, in reverse order so that the earliest failing rule (and sub-check) is the one recorded
        for rule in reversed(cfg.rules):
            if rule == "basic":
                b = cfg.basic
                checks = [("caption_words", out["caption_words"].to_numpy() < b.min_words),
                          ("caption_chars", out["caption_chars"].to_numpy() < b.min_chars),
                          ("min_side", out["min_side"].to_numpy() < b.min_side),
                          ("max_side", out["max_side"].to_numpy() > (b.max_side if b.max_side is not None else 1 << 62)),
                          ("aspect_ratio", np.nan_to_num(out["aspect_ratio"].to_numpy(), nan=np.inf)
                           > (b.max_aspect if b.max_aspect is not None else np.inf))]
                for why, mask in reversed(checks):
                    drop("basic", mask, why)
            elif rule == "language":
                lang_ok = out["language"].isin(cfg.language.keep).to_numpy() & (
                    out["language_score"].to_numpy() >= cfg.language.min_score)
                drop("language", ~lang_ok, "language")
            elif rule == "decontaminate":
                dist = np.nan_to_num(out["eval_distance"].to_numpy(dtype=np.float64), nan=np.inf)
                drop("decontaminate", dist <= cfg.decontaminate.max_distance, "contaminated")
        out["drop_at"] = drop_at
        out["reason"] = reason
        if "clip_score" in cfg.rules:
            # only rows no earlier row rule dropped go through the scorer (set rules come later)
            out["image"] = images.where(drop_at > self.pos["clip_score"], None)
            out["caption"] = df["caption"]
        return out

    def _languages(self, captions: pd.Series, wanted: bool) -> tuple[list, np.ndarray]:
        if not wanted:
            return [None] * len(captions), np.full(len(captions), np.nan, dtype=np.float32)
        if self._lang is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._lang = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        pairs = [self._lang.classify(c) if c.strip() else (None, 0.0) for c in captions]
        return [p[0] for p in pairs], np.array([p[1] for p in pairs], dtype=np.float32)

    def _contamination(self, hashes: pd.Series, present: pd.Series) -> tuple[np.ndarray, list]:
        n = len(hashes)
        dist = np.full(n, np.nan)
        names: list[str | None] = [None] * n
        present = present.to_numpy()
        if len(self.eval_hashes) and present.any():
            h = hashes[present].to_numpy(dtype=np.int64)
            d = hamming(h[:, None], self.eval_hashes[None, :])
            best = d.argmin(axis=1)
            idx = np.flatnonzero(present)
            dist[idx] = d[np.arange(len(h)), best]
            for i, b in zip(idx, best, strict=True):
                names[i] = self.eval_names[b]
        return dist, names


def to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def phash_hex(values: Any, present: Any) -> list[str | None]:
    return [f"{int(v) & ((1 << 64) - 1):016x}" if ok else None for v, ok in zip(values, present, strict=True)]
