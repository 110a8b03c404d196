"""What a job writes for one evaluation set: under the evaluate stage's `datasets` and the train stage's
`eval_datasets` alike (the evaluation library reads it: `datasets.load`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.configschema import field


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
