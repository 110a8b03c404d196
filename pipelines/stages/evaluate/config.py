"""The evaluate stage's parameters: what a job writes under `stages.<name>.with` for `uses: evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.configschema import field
from pipelines.models import ModelRef


@dataclass(kw_only=True)
class EvalSet:
    """One evaluation dataset: a built-in, or Parquet files or webdataset tars with named columns (a webdataset's
    columns are its members' extensions: `image_column: jpg`, `caption_column: txt`, `label_column: cls`)."""

    name: str = field(help="name in metrics (eval/<name>/...) and in the results file")
    builtin: Literal["demo_heldout", "digits"] | None = field(
        None, "a built-in set: the demo generator's held-out seed, or scikit-learn's held-out digits")
    path: str | None = field(None, "Parquet file(s) or webdataset tar(s): a path or glob (any fsspec URL)")
    format: Literal["auto", "parquet", "webdataset"] = field("auto", "file format; auto: from the extension")
    image_column: str = field("image", "column (webdataset: extension) of encoded image bytes")
    label_column: str | None = field("label", "column of integer class indices (zero-shot)")
    caption_column: str | None = field(None, "column of a caption or a list of captions per image (retrieval)")
    classnames: list[str] = field([], "class names, in label order (zero-shot)")
    templates: list[str] | dict[str, list[str]] = field(
        ["a photo of a {c}."], "prompt templates with {c}, or a dict of templates per class name")
    tasks: list[Literal["zeroshot", "retrieval"]] = field(["zeroshot", "retrieval"], "what to compute")
    limit: int | None = field(None, "evaluate only the first N images", minimum=1)

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.path is None):
            raise ValueError(f"dataset {self.name}: give exactly one of builtin or path")
        if self.path and "zeroshot" in self.tasks and not (self.classnames and self.label_column):
            raise ValueError(f"dataset {self.name}: zero-shot needs classnames and label_column")
        if self.path and "retrieval" in self.tasks and not self.caption_column:
            raise ValueError(f"dataset {self.name}: retrieval needs caption_column")


@dataclass(kw_only=True)
class EvaluateConfig:
    """Zero-shot classification and retrieval metrics (CLIP_benchmark's definitions), logged to MLflow."""

    model: ModelRef | None = field(None, "the model; default: the upstream train stage's final model")
    datasets: list[EvalSet] = field([], "datasets to evaluate on")
    batch_size: int = field(128, "images or texts per forward pass", minimum=1)
    actors: int = field(1, "embedding actors (Ray Data actor pool)", minimum=1)
    num_cpus: float = field(1.0, "CPUs per actor (also its torch threads)", exclusiveMinimum=0)
    num_gpus: float = field(0.0, "GPUs per actor", minimum=0)
    examples: int = field(6, "retrieval queries shown in the examples grid per dataset", minimum=0)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("evaluate: datasets names no dataset")
        names = [d["name"] if isinstance(d, dict) else d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"evaluate: dataset name(s) {', '.join(dup)} used more than once")
