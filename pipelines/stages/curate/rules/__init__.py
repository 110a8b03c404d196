"""Curate rules: the protocol every rule follows, and the registry of built-in and plugin rules.

A rule is one class: its `name` (what a job lists in `rules:`, and the key of its config under `with:`), its
`Config` dataclass (validated into the job schema like every other config), the reasons it can give, the
score columns it writes, and how it decides:

- per row (`decide`), in the task that reads each crawled shard, or after its own scoring pass for rules that
  score images with a model (`uses_images`: `stream` adds their scores with a Ray Data actor pool);
- over the whole set (`decide_set`), on the materialised working table, for decisions that depend on other
  rows (dedup, a top fraction).

Built-in rules are the modules of this package, each registering itself with `@register_rule`; adding one
touches one file. A user's own rules come from Python entry points in the `clipline.rules` group
(`name = "package.module:Class"`). The ledger's reasons, the funnel, the report and the Prometheus labels all
come from the rules of the job (`reasons()`), and the ledger's score columns from their `score_fields()`.

Modules here stay light at import (configs only at the top level; pandas, numpy work and models inside
methods): validating a job imports every rule's module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import logging

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import ray.data

    from pipelines.manifest import Manifest
    from pipelines.preflight import Check
    from pipelines.stage import StageContext


ENTRY_POINTS = "clipline.rules"
KEPT = 1 << 14  # drop_at of a row no rule has dropped; rule positions are 1..len(rules), 0 is not downloaded


@dataclass(frozen=True)
class ScoreField:
    """A column a rule writes: to the working table, the ledger and the curated shards."""

    name: str
    type: str  # an Arrow type name: string, float32, float64, int32, int64, bool
    doc: str

    def arrow(self) -> pa.Field:
        import pyarrow as pa

        return pa.field(self.name, pa.type_for_alias(self.type), metadata={"doc": self.doc})


class Rule:
    """A curate rule. Subclasses set `name`, `Config`, and override what they decide with (see the module doc)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    scores: ClassVar[tuple[ScoreField, ...]] = ()
    # scores image bytes in stream(), then decides per row on those scores; a rule may turn it off for one
    # instance (semantic_dedup reading an embed stage's embeddings instead of running its model)
    uses_images: bool = False

    def __init__(self, config: Any, position: int) -> None:
        self.config = config
        self.position = position  # 1-based place in `rules:`; a candidate row has drop_at > position
        self.work: Work | None = None  # the job's working-table schema, set by the stage before prepare()

    def work_table(self, df: pd.DataFrame) -> pa.Table:
        """A block of the working table with the job's fixed schema: what map_batches functions return."""
        if self.work is None:
            raise RuntimeError(f"rule {self.name}: work_table() before the curate stage set the working schema")
        return self.work.table(df)

    def reasons(self) -> tuple[str, ...]:
        """Every ledger reason the rule can write, in the order it checks them."""
        return (self.name,)

    def score_fields(self) -> tuple[ScoreField, ...]:
        return self.scores

    @classmethod
    def reason_doc(cls) -> tuple[str, ...]:
        """The reasons as the ledger's contract documents them; a rule whose reasons its settings name says
        their form (`head:<output>`)."""
        return cls(cls.Config(), 1).reasons()

    def columns(self) -> tuple[str, ...]:
        """Crawled columns the rule reads beyond the crawled contract (passthrough ones): checked at spec time."""
        return ()

    def check(self) -> None:
        """Spec-time checks beyond the schema; raise ValueError naming the field."""

    def identity(self) -> dict[str, Any]:
        """Files outside the job that the rule reads (weights, evaluation sets), by their fsspec keys (size and
        modification time, or ETag): part of the stage's fingerprint, so that replacing one reruns the stage."""
        return {}

    def reads(self) -> dict[str, str]:
        """Upstream stages (names that must be in the curate stage's `needs`) the rule reads besides the crawl it
        curates, each with the setting that names it (checked when the job is loaded)."""
        return {}

    def attach(self, crawl: Manifest, upstream: dict[str, Manifest]) -> None:
        """On the driver, before prepare(): the crawl the stage curates and the outputs of the stages `reads()`
        names; raise ValueError naming the field when one is not what the rule reads."""

    def prepare(self, log: logging.Logger) -> None:
        """On the driver, once before any task: load what every task needs. The rule must stay picklable."""

    def preflight(self, check: Check) -> None:
        """Before the run (`pipelines.preflight`): the files the rule names exist; raise or record a `Problem` whose
        field is under the rule's name (`query_subset.queries[0].image`)."""

    def score(self, crawled: pa.Table, work: pd.DataFrame) -> dict[str, Any]:
        """Per-row values of the rule's score fields for one crawled shard (in the featurize task)."""
        return {}

    def decide(self, work: pd.DataFrame, crawled: pa.Table | None) -> list[tuple[str, np.ndarray]]:
        """(reason, mask of rows the rule drops) pairs, earlier ones winning; only candidates are affected."""
        return []

    def stream(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        """uses_images rules: `ds` with the rule's scores filled in (rows needing none have a null `image`)."""
        raise NotImplementedError(f"rule {self.name}: uses_images is set but stream() is not implemented")

    def decide_set(self, work: ray.data.Dataset, ctx: StageContext) -> tuple[ray.data.Dataset, dict[str, float]]:
        """Set rules: the working table with this rule's drops marked, and metrics to log."""
        return work, {}

    @classmethod
    def decides_sets(cls) -> bool:
        return cls.decide_set is not Rule.decide_set


_RULES: dict[str, type[Rule]] = {}
_LOADED = False


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make a rule usable in a curate stage's `rules:`."""
    import dataclasses
    import keyword

    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        raise TypeError(f"rule {cls.__name__}: `name` must be an identifier that is not a Python keyword and does not "
                        f"start with _ (it is a key under `with:` and a config field), got {name!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"rule {name}: needs a Config dataclass")
    if name in RESERVED:
        raise ValueError(f"rule {name}: the name is a curate setting; choose another")
    if name in _RULES and _RULES[name] is not cls:
        raise ValueError(f"a rule named {name!r} is already registered ({_RULES[name].__module__}.{_RULES[name].__name__})")
    _RULES[name] = cls
    return cls


# Names a rule cannot take: the curate settings and methods that share `with:` and the config class with the
# rules' fields (CurateSettings; listed here, not read from it, which would import the config while it is made).
RESERVED = frozenset({"rules", "shard_rows", "shard_bytes", "instances", "required_columns", "reads", "preflight"})


def _load() -> None:
    """Import the built-in rule modules and the plugins' entry points; a plugin that fails is an error every
    time (not once, then missing)."""
    global _LOADED
    if _LOADED:
        return
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{mod}")
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
        try:
            cls = ep.load()
        except Exception as exc:
            raise ImportError(f"rule plugin {ep.name!r} ({ep.value}, entry point group {ENTRY_POINTS}): cannot "
                              f"load it: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"rule plugin {ep.name!r} ({ep.value}): expected a Rule subclass, got {cls!r}")
        if getattr(cls, "name", None) != ep.name:
            raise ValueError(f"rule plugin {ep.value}: its entry point is named {ep.name!r} but the rule's name is "
                             f"{getattr(cls, 'name', None)!r}; they must agree")
        register_rule(cls)
    _LOADED = True


def registry() -> dict[str, type[Rule]]:
    """Every rule by name: the built-in ones, then plugins, each group in name order (not in the order they were
    imported: a rule module imported before the registry first loads, by a test or a user's code, would otherwise
    move its rule, and with it the generated job schema)."""
    _load()
    ours = sorted(n for n, c in _RULES.items() if c.__module__.startswith(f"{__name__}."))
    return {n: _RULES[n] for n in [*ours, *sorted(n for n in _RULES if n not in ours)]}


def builtin() -> dict[str, type[Rule]]:
    return {n: c for n, c in registry().items() if c.__module__.startswith(f"{__name__}.")}


def plugins() -> dict[str, type[Rule]]:
    return {n: c for n, c in registry().items() if not c.__module__.startswith(f"{__name__}.")}


def rule_class(name: str) -> type[Rule]:
    rules = registry()
    if name not in rules:
        raise KeyError(f"no curate rule {name!r}; expected one of {', '.join(rules)}")
    return rules[name]


def instances(cfg: Any) -> list[Rule]:
    """The rules a CurateConfig lists, in order, each with its config and position."""
    return [rule_class(name)(getattr(cfg, name), i + 1) for i, name in enumerate(cfg.rules)]


# ---- the working table ---------------------------------------------------------------------------------------

# Columns every row has (computed from the crawled shard before any rule), then every built-in rule's scores
# (null where the rule is not used, so the ledger has one schema), then the scores of the job's plugin rules.
BASE = (
    ("uid", "string"), ("source", "string"), ("source_row", "int64"), ("shard", "int32"), ("row", "int32"),
    ("status", "string"), ("caption_words", "int32"), ("caption_chars", "int32"), ("min_side", "int32"),
    ("max_side", "int32"), ("aspect_ratio", "float32"), ("sha256", "string"), ("image_bytes", "int64"),
    ("text_key", "string"), ("phash_ok", "bool"), ("phash", "int64"),
)
TAIL = (("drop_at", "int32"), ("reason", "string"))
# image bytes and captions while a model rule still has to score them; the group key of a dedup partition;
# image embeddings from the semantic_dedup rule's model pass to its set decision, which drops them; the embeddings
# query_subset reads from an embed stage, a column of its own (it may read text embeddings, and semantic_dedup drops
# `_embedding` with its decision), until its decision drops them
EXTRA = {"image": "binary", "caption": "string", "_key": "string", "_embedding": "list<float32>",
         "_query_embedding": "list<float32>"}


def arrow_type(name: str) -> pa.DataType:
    """An Arrow type by its pyarrow alias (`float32`, `string`, ...) or as `list<alias>`."""
    import pyarrow as pa

    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(arrow_type(name[5:-1]))
    return pa.type_for_alias(name)


def contract_scores() -> list[ScoreField]:
    """The score columns of the built-in rules, in registry order: part of the ledger's contract."""
    seen: dict[str, ScoreField] = {}
    for cls in builtin().values():
        for f in cls.scores:
            seen.setdefault(f.name, f)
    return list(seen.values())


def job_scores(rules: list[Rule]) -> list[ScoreField]:
    """The contract's score columns and those of the job's other rules (plugins, config-named columns). A rule
    may not write a column another rule or the working table already has."""
    from pipelines.contracts import FEATURES

    taken = {n for n, _ in BASE} | {n for n, _ in TAIL} | set(EXTRA) | {f.name for f in FEATURES}
    out: dict[str, ScoreField] = {}
    owner: dict[str, str] = {}
    for cls in builtin().values():
        for f in cls.scores:
            out.setdefault(f.name, f)
            owner.setdefault(f.name, cls.name)
    for r in rules:
        for f in r.score_fields():
            if f.name in taken:
                raise ValueError(f"rule {r.name}: its score column {f.name!r} is a column every row already has")
            if f.name in out and (out[f.name] != f or owner[f.name] != r.name):
                raise ValueError(f"rule {r.name}: its score column {f.name!r} is also rule {owner[f.name]}'s")
            out[f.name], owner[f.name] = f, r.name
    return list(out.values())


class Work:
    """The working table's fixed Arrow schema for one job: every block has it, whatever its values (a block
    whose reasons are all null would otherwise infer a null-typed column that Ray cannot concatenate)."""

    def __init__(self, scores: list[ScoreField]) -> None:
        self.scores = scores

    def schema(self, extra: list[str] = ()) -> pa.Schema:  # type: ignore[assignment]
        import pyarrow as pa

        cols = [*BASE, *((f.name, f.type) for f in self.scores), *TAIL, *((c, EXTRA[c]) for c in extra)]
        return pa.schema([(n, arrow_type(t)) for n, t in cols])

    def table(self, df: pd.DataFrame) -> pa.Table:
        """A block of the working table (plus the image, caption, group-key and embedding columns when present)."""
        import pyarrow as pa

        extra = [c for c in EXTRA if c in df.columns]
        if "_key" in df.columns:
            df = df.assign(_key=df["_key"].astype(str))
        schema = self.schema(extra)
        lists = [f for f in schema if pa.types.is_list(f.type)]  # the embeddings
        flat = pa.schema([f for f in schema if f not in lists])
        table = pa.Table.from_pandas(df[flat.names], schema=flat, preserve_index=False)
        for f in lists:
            # from Arrow, not through pandas: the pandas metadata of a list column in Ray's batches names a
            # pyarrow dtype ("list<item: float>[pyarrow]") that pandas cannot read back, as Ray's hash partitioning
            # of the block does; and it stays one Arrow array, not a Python list a row
            table = table.append_column(f, pa.array(df[f.name], type=f.type))
        return table.select(schema.names)

    def empty_scores(self, n: int) -> dict[str, Any]:
        """Null values of every score column (NaN for numbers), for rows before the rules score them."""
        import numpy as np

        return {f.name: np.full(n, np.nan, dtype=f.type if f.type.startswith("float") else "float64")
                if f.type.startswith(("float", "int")) else [None] * n for f in self.scores}


def candidates(df: pd.DataFrame, position: int) -> np.ndarray:
    """Rows no rule before `position` dropped."""
    return df["drop_at"].to_numpy() > position


def mark(df: pd.DataFrame, mask: np.ndarray, position: int, reason: str) -> pd.DataFrame:
    """`df` with the rows in `mask` dropped at `position` for `reason` (the group-key column removed)."""
    df = df.copy()
    drop_at = df["drop_at"].to_numpy().copy()
    reasons = df["reason"].to_numpy(dtype=object).copy()
    drop_at[mask] = position
    reasons[mask] = reason
    return df.assign(drop_at=drop_at, reason=reasons).drop(columns=["_key"], errors="ignore")


def apply_decisions(df: pd.DataFrame, rule: Rule, decisions: list[tuple[str, np.ndarray]]) -> pd.DataFrame:
    """Mark the rows a per-row rule drops: only candidates, the first listed reason of a row winning."""
    import numpy as np

    drop_at = df["drop_at"].to_numpy().copy()
    reasons = df["reason"].to_numpy(dtype=object).copy()
    known = set(rule.reasons())
    for reason, mask in decisions:
        if reason not in known:
            raise ValueError(f"rule {rule.name}: decided reason {reason!r}, which is not one of its reasons() "
                             f"({', '.join(known)})")
        hit = np.asarray(mask, dtype=bool) & (drop_at > rule.position)
        drop_at[hit] = rule.position
        reasons[hit] = reason
    return df.assign(drop_at=drop_at, reason=reasons)


def schemas() -> dict[str, pa.Schema]:
    """The ledger and curated schemas of the built-in rules: the contract in `schemas/*.schema.json` (a job's
    plugin rules, and rules whose columns their settings name, add columns after these)."""
    from pipelines.contracts import TAKEDOWN, curated_schema, ledger_schema

    scores = [f.arrow() for f in contract_scores()]
    reasons = [r for cls in builtin().values() for r in cls.reason_doc()]
    return {"ledger": ledger_schema(scores, [*reasons, TAKEDOWN]), "curated": curated_schema(scores)}
