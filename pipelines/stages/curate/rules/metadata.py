"""`metadata`: keep rows by predicates over the crawled table's columns, such as the LAION and DataComp list
columns the crawl passes through (`punsafe < 0.1`, `WIDTH >= 256`); the grammar is `predicate.py`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.configschema import field
from pipelines.stages.curate.rules import Rule, register_rule

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from pipelines.stages.curate.predicate import Predicate


@dataclass(kw_only=True)
class MetadataConfig:
    """Predicates over crawled columns (passthrough ones included) that a kept row satisfies, all of them."""

    keep: list[str] = field([], "predicates a row must all satisfy, e.g. \"punsafe < 0.1\", \"WIDTH >= 256\", "
                                "\"lang in ['en', 'de']\", \"similarity >= 0.28 or similarity is null\": comparisons "
                                "with a number or 'string', in [...], is [not] null, and/or/not, parentheses; "
                                "a \"quoted name\" is a column; a null value is not kept unless the predicate says "
                                "is null. A dropped row's reason is the first predicate it fails")


@register_rule
class MetadataRule(Rule):
    """Keep rows by predicates over crawled columns (e.g. LAION's punsafe, pwatermark, WIDTH passed through)."""

    name = "metadata"
    Config = MetadataConfig

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parsed": None}  # parsed again where it is used: the text is the state

    def predicates(self) -> list[Predicate]:
        from pipelines.stages.curate.predicate import parse

        if getattr(self, "_parsed", None) is None:
            self._parsed = [parse(text) for text in self.config.keep]
        return self._parsed

    @classmethod
    def reason_doc(cls) -> tuple[str, ...]:
        return (f"{cls.name}: <the predicate>",)

    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{self.name}: {p.text}" for p in self.predicates())

    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for p in self.predicates() for c in p.columns))

    def check(self) -> None:
        from pipelines.stages.curate.predicate import PredicateError, parse

        if not self.config.keep:
            raise ValueError(f"{self.name}.keep: the rule is listed but has no predicates; give at least one, "
                             f"e.g. \"punsafe < 0.1\"")
        seen: dict[str, int] = {}
        for i, text in enumerate(self.config.keep):
            try:
                p = parse(text)
            except PredicateError as exc:
                raise ValueError(f"{self.name}.keep[{i}]: {exc}") from None
            if p.text in seen:
                raise ValueError(f"{self.name}.keep[{i}]: {p.text!r} is the predicate keep[{seen[p.text]}] already "
                                 f"is; give each once")
            seen[p.text] = i

    def decide(self, work: pd.DataFrame, crawled: pa.Table | None) -> list[tuple[str, np.ndarray]]:
        from pipelines.stages.curate.predicate import PredicateError

        if crawled is None:
            raise RuntimeError(f"rule {self.name}: decides in the featurize task, on the crawled shard")
        out = []
        for i, (reason, p) in enumerate(zip(self.reasons(), self.predicates(), strict=True)):
            try:
                out.append((reason, ~p.mask(crawled)))
            except PredicateError as exc:  # a column of another type than the predicate compares it as
                raise ValueError(f"curate rule {self.name}, keep[{i}]: {exc}") from None
        return out
