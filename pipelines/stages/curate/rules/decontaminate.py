"""`decontaminate`: drop rows whose image is a near duplicate (pHash) of an image of an evaluation set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.configschema import field
from pipelines.stages.curate.rules import Rule, ScoreField, register_rule

if TYPE_CHECKING:
    import logging

    import numpy as np
    import pandas as pd
    import pyarrow as pa


@dataclass(kw_only=True)
class EvalSet:
    name: str = field(help="name used in the ledger's contaminated_by column")
    path: str = field(help="Parquet file(s) or glob of the evaluation set's images (fsspec)")
    image_column: str = field("image", "column of encoded image bytes")


@dataclass(kw_only=True)
class DecontaminateConfig:
    """Drop rows whose image is a near duplicate (pHash) of any image in the named evaluation sets."""

    sets: list[EvalSet] = field([], "evaluation sets to protect")
    max_distance: int = field(4, "largest pHash Hamming distance that counts as contamination", minimum=0, maximum=16)


@register_rule
class DecontaminateRule(Rule):
    name = "decontaminate"
    Config = DecontaminateConfig
    scores = (ScoreField("eval_distance", "int32", "smallest pHash distance to an evaluation-set image"),
              ScoreField("contaminated_by", "string", "evaluation set of that nearest image"))

    def check(self) -> None:
        if not self.config.sets:
            raise ValueError("decontaminate: the rule is listed but decontaminate.sets names no evaluation set")

    def reasons(self) -> tuple[str, ...]:
        return ("contaminated",)

    def identity(self) -> dict[str, Any]:
        from pipelines import storage

        files = []
        for es in self.config.sets:
            fs, pattern = storage.filesystem(es.path)
            files += [fs.unstrip_protocol(p) for p in sorted(fs.glob(pattern))]
        return storage.file_keys(files)

    def prepare(self, log: logging.Logger) -> None:
        """pHashes of every image in the configured evaluation sets, with each one's set name."""
        import numpy as np
        import pyarrow.parquet as pq

        from pipelines import storage
        from pipelines.stages.curate.features import phash

        hashes: list[int] = []
        names: list[str] = []
        for es in self.config.sets:
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
        self.hashes, self.names = np.array(hashes, dtype=np.int64), names
        log.info("decontaminating against %d images of %s", len(hashes), ", ".join(s.name for s in self.config.sets))

    def score(self, crawled: pa.Table, work: pd.DataFrame) -> dict[str, Any]:
        import numpy as np

        from pipelines.stages.curate.features import hamming

        n = len(work)
        dist = np.full(n, np.nan)
        names: list[str | None] = [None] * n
        present = work["phash_ok"].to_numpy(dtype=bool)
        if len(self.hashes) and present.any():
            h = work["phash"].to_numpy(dtype=np.int64)[present]
            d = hamming(h[:, None], self.hashes[None, :])
            best = d.argmin(axis=1)
            idx = np.flatnonzero(present)
            dist[idx] = d[np.arange(len(h)), best]
            for i, b in zip(idx, best, strict=True):
                names[i] = self.names[b]
        return {"eval_distance": dist, "contaminated_by": names}

    def decide(self, work: pd.DataFrame, crawled: pa.Table | None) -> list[tuple[str, np.ndarray]]:
        import numpy as np

        dist = np.nan_to_num(work["eval_distance"].to_numpy(dtype=np.float64), nan=np.inf)
        return [("contaminated", dist <= self.config.max_distance)]
