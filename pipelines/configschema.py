"""Typed dataclasses as the single source of a document's JSON Schema, and their instances from parsed YAML/JSON.

Every document clipline validates is declared once, as a dataclass: a stage's `Config` (the `with:` block of
a job), the job document itself (`pipelines/spec.py`) and the stage manifest (`pipelines/manifest.py`).
`dataclass_schema` derives the JSON Schema from it and `build` makes the instance from the validated data,
so schema, defaults and code cannot disagree.  Fields are declared with `field`: its `help` is the
description, and JSON Schema keywords (bounds, `pattern`, ...) ride along in its metadata.  A type may also
carry keywords as `Annotated[T, Keywords(...)]` (e.g. the pattern of a list's items or a mapping's keys); a
`TypedDict` is an object whose keys may be absent (`total=False`), and `Annotated[dict[str, Any], SomeTypedDict]`
gives a plain dict the shape of that TypedDict.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeGuard, Union, get_args, get_origin

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# JSON Schema keywords that `field` and `Keywords` take
_KEYWORDS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "pattern", "const", "description",
})
SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"


class Keywords:
    """JSON Schema keywords added to the schema of the type they annotate: `Annotated[str, Keywords(pattern=...)]`."""

    __slots__ = ("items",)

    def __init__(self, **keywords: Any) -> None:
        _check_keywords(keywords)
        self.items: tuple[tuple[str, Any], ...] = tuple(keywords.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keywords) and other.items == self.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __repr__(self) -> str:
        return f"Keywords({', '.join(f'{k}={v!r}' for k, v in self.items)})"


def _check_keywords(keywords: dict[str, Any]) -> None:
    if unknown := sorted(set(keywords) - _KEYWORDS):
        raise TypeError(f"not a JSON Schema keyword clipline maps: {', '.join(unknown)}")


def field(default: Any = dataclasses.MISSING, help: str | None = None, *,  # noqa: A002 - argparse's name for it
          alias: str | None = None, required: bool = False, stored: bool = True, compare: bool = True,
          **keywords: Any) -> Any:
    """A dataclass field with its schema metadata.

    `help` is the description; `keywords` are JSON Schema keywords (`minimum=0`, `pattern=...`).  A mutable
    default (list, dict, set) is copied for each instance and a dataclass type as the default makes a new
    instance each time (default_factory), so no two configs share one.  `alias` is the key in the document
    when the field's name cannot be it (`with`); `required` makes the document give a field that has a Python
    default; a field that is not `stored` is not part of the document at all.
    """
    _check_keywords(keywords)
    metadata: dict[str, Any] = dict(keywords)
    if help is not None:
        metadata["help"] = help
    if alias is not None:
        metadata["alias"] = alias
    if required:
        metadata["required"] = True
    if not stored:
        metadata["stored"] = False
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, compare=compare)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata, compare=compare)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata,
                                 compare=compare)
    return dataclasses.field(default=default, metadata=metadata, compare=compare)


def key(f: dataclasses.Field[Any]) -> str:
    """The field's key in the document."""
    return str(f.metadata.get("alias", f.name))


def type_schema(tp: Any, refs: dict[Any, str] | None = None) -> dict[str, Any]:
    """The JSON Schema of one Python type annotation; a type in `refs` becomes `{"$ref": refs[tp]}`."""
    refs = refs or {}
    origin = get_origin(tp)
    if isinstance(tp, type) and tp in refs:
        return {"$ref": refs[tp]}
    if tp is Any:
        return {}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp is type(None):
        return {"type": "null"}
    if origin is Annotated:
        base, *extras = get_args(tp)
        schema = type_schema(base, refs)
        for extra in extras:
            if isinstance(extra, Keywords):
                schema.update(extra.items)
            elif isinstance(extra, type) and (typing.is_typeddict(extra) or dataclasses.is_dataclass(extra)):
                schema = type_schema(extra, refs)  # the shape of a plain dict
        return schema
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (Union, types.UnionType):
        options = [type_schema(a, refs) for a in get_args(tp)]
        simple = [o.get("type") for o in options]
        if all(isinstance(t, str) for t in simple) and all(len(o) == 1 for o in options):
            return {"type": simple}
        return {"anyOf": options}
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        return {"type": "array", "items": type_schema(item, refs)}
    if origin is dict or tp is dict:
        key_type, value = get_args(tp) or (str, Any)
        schema = {"type": "object"}
        names = type_schema(key_type, refs)
        names.pop("type", None)
        if names:
            schema["propertyNames"] = names
        if value is not Any:
            schema["additionalProperties"] = type_schema(value, refs)
        return schema
    if isinstance(tp, type) and typing.is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        out: dict[str, Any] = {"type": "object", "properties": {k: type_schema(v, refs) for k, v in hints.items()},
                               "additionalProperties": False}
        required: frozenset[str] = getattr(tp, "__required_keys__", frozenset())
        if required:
            out["required"] = [k for k in hints if k in required]
        if tp.__doc__:
            out["description"] = " ".join(tp.__doc__.split())
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return dataclass_schema(tp, refs)
    raise TypeError(f"no JSON Schema mapping for the annotation {tp!r}")


def dataclass_schema(cls: type, refs: dict[Any, str] | None = None) -> dict[str, Any]:
    """An object schema with one property per stored field; fields without defaults are required."""
    hints = typing.get_type_hints(cls, include_extras=True)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("stored", True):
            continue
        schema = type_schema(hints[f.name], refs)
        if "help" in f.metadata:
            schema["description"] = f.metadata["help"]
        schema.update({k: v for k, v in f.metadata.items() if k in _KEYWORDS})
        if f.metadata.get("required"):
            pass  # the document gives it: a default would only mislead its reader
        elif f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            schema["default"] = dataclasses.asdict(default) if _is_instance(default) else default
        if f.metadata.get("required") or (f.default is dataclasses.MISSING
                                          and f.default_factory is dataclasses.MISSING):
            required.append(key(f))
        props[key(f)] = schema
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # not the signature dataclass writes
        out["description"] = " ".join(cls.__doc__.split())
    return out


def document_schema(cls: type, schema_id: str, title: str, defs: dict[str, Any] | None = None,
                    refs: dict[Any, str] | None = None) -> dict[str, Any]:
    """A top-level schema document ($schema, $id, title) for dataclass `cls`, with `defs` as its `$defs`."""
    out = {"$schema": SCHEMA_DRAFT, "$id": schema_id, "title": title, **dataclass_schema(cls, refs)}
    if defs:
        out["$defs"] = defs
    return out


def _is_instance(value: Any) -> TypeGuard[DataclassInstance]:
    """A dataclass instance (is_dataclass alone is also true of the class itself)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def build(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """An instance of dataclass `cls` from parsed YAML/JSON, nested dataclasses (also in lists and mappings)
    included; keys are fields' document keys (their alias, if any), and absent ones take the field's default."""
    hints = typing.get_type_hints(cls)
    names = {key(f): f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        field_name = names.get(name, name)
        kwargs[field_name] = _build_value(hints.get(field_name, Any), value, f"{path}{name}")
    return cls(**kwargs)


def _build_value(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return build(tp, value, f"{path}.")
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            if isinstance(option, type) and dataclasses.is_dataclass(option) and isinstance(value, dict):
                return build(option, value, f"{path}.")
        return value
    if origin in (list, tuple) and isinstance(value, list):
        (item,) = get_args(tp)[:1] or (Any,)
        return [_build_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        _, item = get_args(tp) or (str, Any)
        return {k: _build_value(item, v, f"{path}.{k}") for k, v in value.items()}
    return value
