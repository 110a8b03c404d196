"""The curate stage's parameters: what a job writes under `stages.<name>.with` for `uses: curate`.

`rules:` lists rules by name, and each rule's settings sit under its name (`with.basic.min_side`). The rules
are the registry's (`pipelines.stages.curate.rules`: the built-in ones and those of installed plugins), so
`CurateConfig` is made from it: one field per registered rule, typed by that rule's Config, which puts a
plugin's settings into the job schema exactly as a built-in's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipelines.configschema import field
from pipelines.stages.curate import rules as rule_registry

if TYPE_CHECKING:
    from pipelines.preflight import Check

DEFAULT_RULES = ["basic", "dedup_image", "dedup_text", "near_duplicate"]


@dataclass(kw_only=True)
class CurateSettings:
    """Filter, deduplicate and score crawled shards into a curated dataset and a ledger of every row."""

    rules: list[str] = field(DEFAULT_RULES,
                             "rules applied in this order; a dropped row's reason is the first rule that dropped it")
    shard_rows: int | None = field(10_000, "rows per curated shard (all full but the last)", minimum=1)
    shard_bytes: int | None = field(None, "image bytes per curated shard instead of rows", minimum=1)

    def __post_init__(self) -> None:
        dup = {r for r in self.rules if self.rules.count(r) > 1}
        if dup:
            raise ValueError(f"rules: {', '.join(sorted(dup))} listed more than once")
        if self.shard_bytes is not None:
            self.shard_rows = None
        if self.shard_rows is None and self.shard_bytes is None:
            raise ValueError("give shard_rows or shard_bytes")
        for rule in self.instances():
            rule.check()

    def instances(self) -> list[rule_registry.Rule]:
        """The listed rules, in order, each with its settings and position."""
        return rule_registry.instances(self)

    def reads(self) -> dict[str, str]:
        """Stages the listed rules read besides the crawl (`semantic_dedup.embeddings`), each with the field naming
        it: each must be in the stage's needs, which the job's loading checks."""
        return {stage: f"{rule.name}.{setting}" for rule in self.instances() for stage, setting in rule.reads().items()}

    def preflight(self, check: Check) -> None:
        """Before the run (`pipelines.preflight`): each listed rule's own checks of the files it names."""
        for rule in self.instances():
            check.attempt(rule.preflight, check)

    def required_columns(self) -> dict[str, str]:
        """Crawled columns beyond the contract that the listed rules read, each with the first rule reading it."""
        out: dict[str, str] = {}
        for rule in self.instances():
            for col in rule.columns():
                out.setdefault(col, rule.name)
        return out


def _help(cls: type[rule_registry.Rule]) -> str:
    doc = cls.__doc__ or cls.Config.__doc__ or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    origin = "" if cls.__module__.startswith(rule_registry.__name__ + ".") else f" (plugin {cls.__module__})"
    return f"settings of the {cls.name} rule{origin}" + (f": {first}" if first else "")


def make(reg: dict[str, type[rule_registry.Rule]]) -> type:
    """A CurateConfig class with one field per rule of `reg`."""
    names = tuple(reg)
    rule_name = Literal[names]  # type: ignore[valid-type]  # an enum of the registry's names in the schema
    fields: list[tuple[str, Any, Any]] = [
        ("rules", list[rule_name], field(DEFAULT_RULES, "rules applied in this order; a dropped row's reason is "
                                         "the first rule that dropped it")),
        *((name, cls.Config, field(cls.Config, _help(cls))) for name, cls in reg.items()),
    ]
    cls = dataclasses.make_dataclass("CurateConfig", fields, bases=(CurateSettings,), kw_only=True,
                                     namespace={"__doc__": CurateSettings.__doc__})
    cls.__module__ = __name__  # pickled by reference, as `pipelines.stages.curate.config.CurateConfig`
    return cls


if TYPE_CHECKING:
    CurateConfig = CurateSettings
else:
    CurateConfig = make(rule_registry.registry())
