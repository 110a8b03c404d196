"""JSON Schema generated from a stage's keyword-only Config dataclass.

The dataclass is the single source of truth for a stage's parameters: the job schema embeds what this
module derives from it, so the two can never disagree.  Field metadata may carry `help` (the
description) and JSON Schema bounds (`minimum`, `maximum`, `exclusiveMinimum`, `minLength`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, Union, get_args, get_origin

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "minItems", "pattern")


def type_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of one Python type annotation."""
    origin = get_origin(tp)
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
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (Union, types.UnionType):
        options = [type_schema(a) for a in get_args(tp)]
        simple = [o.get("type") for o in options]
        if all(isinstance(t, str) for t in simple) and all(len(o) == 1 for o in options):
            return {"type": simple}
        return {"anyOf": options}
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        return {"type": "array", "items": type_schema(item)}
    if origin is dict:
        _, value = get_args(tp) or (str, Any)
        return {"type": "object", "additionalProperties": type_schema(value)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    raise TypeError(f"no JSON Schema mapping for the annotation {tp!r}")


def dataclass_schema(cls: type) -> dict[str, Any]:
    """An object schema with one property per field; fields without defaults are required."""
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        schema = type_schema(hints[f.name])
        if "help" in f.metadata:
            schema["description"] = f.metadata["help"]
        for key in _BOUNDS:
            if key in f.metadata:
                schema[key] = f.metadata[key]
        if f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            schema["default"] = dataclasses.asdict(default) if _is_instance(default) else default
        else:
            required.append(f.name)
        props[f.name] = schema
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    return out


def _is_instance(value: Any) -> TypeGuard[DataclassInstance]:
    """A dataclass instance (is_dataclass alone is also true of the class itself)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def build(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """An instance of dataclass `cls` from parsed YAML/JSON, nested dataclasses (also in lists) included."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _build_value(hints.get(name, Any), value, f"{path}{name}")
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
    return value
