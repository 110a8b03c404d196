"""What a job writes for one evaluation set: under the evaluate stage's `datasets` and the train stage's
`eval_datasets` alike (the evaluation library reads it: `datasets.load`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipelines.configschema import field

DEFAULT_TEMPLATES = ("a photo of a {c}.",)


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
    classnames_file: str | None = field(
        None, "a JSON file (any fsspec URL) holding the class names as a list, instead of classnames")
    templates: list[str] | dict[str, list[str]] = field(
        list(DEFAULT_TEMPLATES), "prompt templates with {c}, or a dict of templates per class name")
    templates_file: str | None = field(
        None, "a JSON file (any fsspec URL) holding the templates (a list, or a dict per class name), instead of "
              "templates")
    tasks: list[Literal["zeroshot", "retrieval"]] = field(["zeroshot", "retrieval"], "what to compute")
    limit: int | None = field(None, "evaluate only the first N images", minimum=1)

    def __post_init__(self) -> None:
        # a file's lists become the set's own, so they are part of the stage's params (its fingerprint) and
        # reach the workers resolved; building the set again from those params reads the same file
        if self.classnames_file is not None:
            names = _read_json(self.name, "classnames_file", self.classnames_file)
            if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
                raise ValueError(f"dataset {self.name}: classnames_file {self.classnames_file}: expected a JSON list "
                                 f"of non-empty strings, got {_kind(names)}")
            if self.classnames and self.classnames != names:
                raise ValueError(f"dataset {self.name}: give classnames or classnames_file, not both")
            self.classnames = names
        if self.templates_file is not None:
            templates = _read_json(self.name, "templates_file", self.templates_file)
            if not _is_templates(templates):
                raise ValueError(f"dataset {self.name}: templates_file {self.templates_file}: expected a JSON list of "
                                 f"strings or an object of lists of strings per class name, got {_kind(templates)}")
            if self.templates not in (list(DEFAULT_TEMPLATES), templates):
                raise ValueError(f"dataset {self.name}: give templates or templates_file, not both")
            self.templates = templates
        if self.path is not None:
            self._check_templates()
        if (self.builtin is None) == (self.path is None):
            raise ValueError(f"dataset {self.name}: give exactly one of builtin or path")
        if self.path and "zeroshot" in self.tasks and not (self.classnames and self.label_column):
            raise ValueError(f"dataset {self.name}: zero-shot needs classnames and label_column")
        if self.path and "retrieval" in self.tasks and not self.caption_column:
            raise ValueError(f"dataset {self.name}: retrieval needs caption_column")

    def _check_templates(self) -> None:
        """Every class has templates, and each formats with `{c}` alone (as `EvalData.prompts` formats them)."""
        where = "templates_file " + self.templates_file if self.templates_file else "templates"
        if isinstance(self.templates, dict):
            lacking = [c for c in self.classnames if not self.templates.get(c)]
            if lacking:
                raise ValueError(f"dataset {self.name}: {where}: no templates for the class(es) "
                                 f"{', '.join(map(repr, lacking[:5]))}{', ...' if len(lacking) > 5 else ''}")
            every = [t for ts in self.templates.values() for t in ts]
        else:
            every = list(self.templates)
        if not every:
            raise ValueError(f"dataset {self.name}: {where}: expected at least one template")
        for t in every:
            try:
                t.format(c="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"dataset {self.name}: {where}: the template {t!r} does not format with {{c}} "
                                 f"alone ({type(exc).__name__}: {exc}); write a literal brace as {{{{ or }}}}") from None


def _read_json(name: str, key: str, url: str) -> Any:
    import json

    from pipelines import storage

    try:
        return storage.read_json(url)
    except FileNotFoundError:
        raise ValueError(f"dataset {name}: {key} {url}: no such file") from None
    except (json.JSONDecodeError, UnicodeError) as exc:
        raise ValueError(f"dataset {name}: {key} {url}: not valid JSON ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a directory, a NUL in the path, a store that refuses: name the file
        raise ValueError(f"dataset {name}: {key} {url}: cannot read it ({type(exc).__name__}: {exc})") from None


def _is_templates(value: Any) -> bool:
    def strings(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, str) for t in v)

    return strings(value) or (isinstance(value, dict) and all(strings(v) for v in value.values()))


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
