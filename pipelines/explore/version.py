"""The version `clipline explore` opens and the model it embeds with: a curate stage's current output, the crawl it
curated, its ledger with the crawled url and caption, and the model resolved from `--model`, the dataset's scoring
model or the model trained on it (see the package's docstring)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines import manifest, storage
from pipelines.manifest import Manifest
from pipelines.models import ModelRef

if TYPE_CHECKING:
    from pipelines.spec import JobSpec


class ExploreError(ValueError):
    """A job, stage or model the explorer cannot open: the message says what to run or pass instead."""


@dataclass
class Version:
    """The curate output to explore, the crawl it curated and every stage's current output."""

    job: JobSpec
    stage: str
    curate: Manifest
    crawl: Manifest
    current: dict[str, Manifest | None]


def pick_stage(job: JobSpec, stage: str | None) -> str:
    """`stage`, checked to be a curate stage of the job, or the job's last curate stage."""
    if stage is not None:
        if stage not in job.stages:
            raise ExploreError(f"job {job.name!r} has no stage {stage!r} (its stages: {', '.join(job.stages)})")
        if job.stages[stage].uses != "curate":
            raise ExploreError(f"--stage {stage}: explore reads a curate stage's ledger (why each row was kept or "
                               f"dropped); {stage!r} uses {job.stages[stage].uses}")
        return stage
    curates = [n for n, s in job.stages.items() if s.uses == "curate"]
    if not curates:
        raise ExploreError(f"job {job.name!r} has no curate stage: explore reads a curate stage's ledger")
    return curates[-1]


def open_version(job: JobSpec, stage: str | None = None) -> Version:
    from pipelines.takedown import current_outputs

    name = pick_stage(job, stage)
    current = current_outputs(job)
    m = current[name]
    if m is None:
        raise ExploreError(f"stage {name!r} of job {job.name!r} has no output for this spec yet: run "
                           f"`clipline run {job.source} --until {name}` first")
    paths = [i["path"] for i in m.inputs.values() if isinstance(i, dict) and "path" in i]
    read = [manifest.read(p) for p in paths]
    crawl = next((u for u in read if u is not None and u.uses != "embed"), None)
    if crawl is None:
        raise ExploreError(f"{name}: the crawled shards it curated are gone ({', '.join(paths)})")
    return Version(job, name, m, crawl, current)


# ---- the model -----------------------------------------------------------------------------------------------


def rules_of(m: Manifest) -> list[Any]:
    from pipelines import configschema
    from pipelines.stages.curate.config import CurateConfig

    return list(configschema.build(CurateConfig, m.params).instances())


def stage_model(v: Version, name: str, why: str) -> ModelRef:
    from pipelines.models import trained

    st, out = v.job.stages[name], v.current.get(name)
    if st.uses not in ("train", "embed"):
        raise ExploreError(f"{why}: stage {name!r} uses {st.uses}; name a train or embed stage, an MLflow model "
                           "URI (models:/NAME@ALIAS) or an architecture (with --checkpoint)")
    if out is None:
        raise ExploreError(f"{why}: stage {name!r} has no output for this spec yet: run "
                           f"`clipline run {v.job.source} --until {name}` first")
    return trained(out) if st.uses == "train" else ModelRef(**out.params["model"])


def resolve_model(v: Version, model: str | None = None, checkpoint: str | None = None) -> tuple[ModelRef, str]:
    """The model that embeds rows and queries, and a line saying which and why."""
    if checkpoint and not model:
        raise ExploreError("--checkpoint needs --model ARCH (the architecture the weights are for)")
    if model:
        if model in v.job.stages:
            if checkpoint:
                raise ExploreError(f"--checkpoint: --model {model} is a stage of the job, which names its weights")
            return stage_model(v, model, f"--model {model}"), f"the model of stage {model!r} (--model)"
        if model.startswith(("models:/", "runs:/")):
            if checkpoint:
                raise ExploreError("--checkpoint: an MLflow model URI names its weights")
            return ModelRef(model_uri=model), f"{model} (--model)"
        return ModelRef(arch=model, checkpoint=checkpoint), f"{model} {checkpoint or '(random weights)'} (--model)"
    for rule in rules_of(v.curate):
        embeddings = getattr(rule.config, "embeddings", None)
        if embeddings:
            return (stage_model(v, embeddings, f"{rule.name}.embeddings"),
                    f"the dataset's scoring model: {rule.name} reads stage {embeddings!r}'s embeddings")
        ref = getattr(rule.config, "model", None)
        if isinstance(ref, ModelRef):
            return ref, f"the dataset's scoring model: {rule.name}'s model"
    trains = [n for n, s in v.job.stages.items() if s.uses == "train" and v.stage in s.needs]
    if len(trains) == 1 and v.current.get(trains[0]) is not None:
        return (stage_model(v, trains[0], "the model trained on it"),
                f"the model stage {trains[0]!r} trained on this version (its curate rules score with none)")
    raise ExploreError(
        f"{v.stage}: its rules score with no model (no clip_score or semantic_dedup) and "
        + (f"no train stage trained on it yet (run `clipline run {v.job.source} --until {trains[0]}`)"
           if len(trains) == 1 else f"{len(trains)} train stages read it")
        + ": name one with --model TRAIN_STAGE, --model models:/NAME@ALIAS or --model ARCH --checkpoint FILE")


def model_key(ref: ModelRef) -> str:
    """The model's part of the cache key: its reference and its files' keys; for `models:/NAME@ALIAS` also the
    version the alias names now (an alias moved to new weights is a new key)."""
    from pipelines.embedding import model_identity

    key: dict[str, Any] = {"model": asdict(ref), "files": model_identity(ref)}
    if ref.model_uri and ref.model_uri.startswith("models:/") and "@" in ref.model_uri:
        from mlflow import MlflowClient

        name, alias = ref.model_uri.removeprefix("models:/").split("@", 1)
        try:
            key["version"] = MlflowClient().get_model_version_by_alias(name, alias).version
        except Exception as exc:  # noqa: BLE001 - a registry that cannot answer: the model cannot load either
            raise ExploreError(f"--model {ref.model_uri}: the registry cannot resolve the alias: {exc}") from None
    return storage.canonical_digest(key)[:16]


# ---- the rows ------------------------------------------------------------------------------------------------


def load_rows(v: Version) -> pd.DataFrame:
    """The ledger, every row, with the crawled url and caption, in ledger order (crawled shard, row)."""
    entries = v.curate.extra.get("ledger", [])
    if not entries:
        raise ExploreError(f"{v.stage}: its manifest lists no ledger ({v.curate.location})")
    parts = [storage.read_parquet(storage.join(v.curate.location, e["path"])).to_pandas() for e in entries]
    rows = pd.concat(parts, ignore_index=True)
    urls = v.crawl.shard_urls()
    crawled = pd.concat([storage.read_parquet(u, ["uid", "url", "caption"]).to_pandas() for u in urls],
                        ignore_index=True)
    rows = rows.merge(crawled, on="uid", how="left", validate="one_to_one")
    rows = rows.sort_values(["shard", "row"], kind="stable").reset_index(drop=True)
    return rows


def score_columns(rows: pd.DataFrame) -> list[str]:
    """The ledger's numeric columns with at least one value: what the score filter and the cards show."""
    skip = {"shard", "row", "source_row"}
    return [c for c in rows.columns if c not in skip and pd.api.types.is_numeric_dtype(rows[c])
            and not pd.api.types.is_bool_dtype(rows[c]) and rows[c].notna().any()]


def phash_bits(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The ledger's hex pHashes as uint64, and which rows have one."""
    present = values.notna().to_numpy()
    out = np.zeros(len(values), dtype=np.uint64)
    out[present] = [int(h, 16) for h in values[present]]
    return out, present


def hamming64(a: np.ndarray, b: np.uint64) -> np.ndarray:
    x = np.bitwise_xor(a, b)
    return np.unpackbits(x.view(np.uint8).reshape(len(x), 8), axis=1).sum(axis=1)
