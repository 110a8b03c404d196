"""One config mechanism: `configschema.field` declares every field, the schema and the instance come from the
dataclass, and no two configs share a mutable default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import jsonschema
import pytest

from pipelines import configschema
from pipelines.configschema import Keywords, build, dataclass_schema, field
from pipelines.stage import builtin_kinds, config_class

# the fewest `with:` values each built-in Config needs
REQUIRED: dict[str, dict[str, Any]] = {
    "crawl": {"input": "/x.parquet"},
    "ingest": {"builtin": "digits_train"},
    "curate": {},
    "train": {},
    "evaluate": {"datasets": [{"name": "d", "builtin": "digits"}]},
}


def _containers(value: Any, path: str = "") -> dict[str, Any]:
    """Every mutable object inside a config (lists, dicts, dataclass instances), by its dotted path."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out[path] = value
        for f in dataclasses.fields(value):
            out.update(_containers(getattr(value, f.name), f"{path}.{f.name}"))
    elif isinstance(value, list):
        out[path] = value
        for i, v in enumerate(value):
            out.update(_containers(v, f"{path}[{i}]"))
    elif isinstance(value, dict):
        out[path] = value
        for k, v in value.items():
            out.update(_containers(v, f"{path}.{k}"))
    return out


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_two_default_configs_share_no_mutable_value(kind):
    cls = config_class(kind)
    a, b = build(cls, REQUIRED[kind]), build(cls, REQUIRED[kind])
    left, right = _containers(a), _containers(b)
    shared = sorted(p for p in left if p in right and left[p] is right[p])
    assert shared == [], f"{kind}: fields whose default object two instances share: {shared}"


def test_train_configs_do_not_share_lists_or_nested_configs():
    train = config_class("train")
    a, b = train(), train()
    a.eval_datasets.append("x")
    a.model.arch = "changed"
    a.register.alias = "changed"
    assert b.eval_datasets == [] and b.model.arch == "clip-tiny" and b.register.alias == "candidate"


def test_a_mutable_default_is_copied_deeply_for_each_instance():
    @dataclass(kw_only=True)
    class C:
        nested: dict[str, list[str]] = field({"a": ["x"]}, "a dict of lists")
        items: list[str] = field(["x"], "a list")

    a, b = C(), C()
    a.nested["a"].append("y")
    a.items.append("y")
    assert b.nested == {"a": ["x"]} and b.items == ["x"]
    assert dataclass_schema(C)["properties"]["nested"]["default"] == {"a": ["x"]}


def test_field_refuses_a_keyword_json_schema_does_not_have():
    with pytest.raises(TypeError, match="minimun"):
        field(1, "typo", minimun=0)


def test_every_stage_config_field_is_declared_with_configschema_field():
    """A field made with dataclasses.field directly would escape the mutable-default handling; each has help."""
    seen: set[type] = set()

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for f in dataclasses.fields(cls):
            assert "help" in f.metadata, f"{cls.__name__}.{f.name} has no help"
            tp = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if isinstance(tp, type) and dataclasses.is_dataclass(tp) and tp.__module__.startswith("pipelines.stages"):
                walk(tp)

    for kind in builtin_kinds():
        walk(config_class(kind))


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_schema_defaults_build_what_the_dataclass_defaults_are(kind):
    """Why the job loader fills in no defaults: a `with:` block given every schema default builds the same
    config as one given none (the dataclass fills them itself)."""
    cls = config_class(kind)
    schema = dataclass_schema(cls)
    given = {k: p["default"] for k, p in schema["properties"].items() if "default" in p} | REQUIRED[kind]
    assert build(cls, given) == build(cls, REQUIRED[kind])
    assert dataclasses.asdict(build(cls, given)) == dataclasses.asdict(build(cls, REQUIRED[kind]))


class _Shape(TypedDict, total=False):
    size: Annotated[int, Keywords(minimum=0)]


@dataclass(kw_only=True)
class _Doc:
    """A document."""

    name: Annotated[str, Keywords(pattern="^[a-z]+$")] = field(help="its name")
    with_: dict[str, Any] = field({}, "a free mapping", alias="with")
    tags: dict[Annotated[str, Keywords(pattern="^t")], int] = field({}, "tag counts", minProperties=0)
    shape: _Shape = field({}, "keys that may be absent")
    plain: list[Annotated[dict[str, Any], _Shape]] = field([], "plain dicts shaped like _Shape")
    version: int = field(1, "written by the code, required in the document", required=True, const=1)
    location: str = field("", "not in the document", stored=False)


def test_document_schema_and_build():
    schema = configschema.document_schema(_Doc, "https://example.org/doc.json", "a doc")
    assert list(schema)[:3] == ["$schema", "$id", "title"] and schema["description"] == "A document."
    props = schema["properties"]
    assert set(props) == {"name", "with", "tags", "shape", "plain", "version"}
    assert schema["required"] == ["name", "version"]
    assert props["name"] == {"type": "string", "pattern": "^[a-z]+$", "description": "its name"}
    assert props["with"] == {"type": "object", "description": "a free mapping", "default": {}}
    assert props["tags"]["propertyNames"] == {"pattern": "^t"}
    assert props["shape"]["properties"]["size"] == {"type": "integer", "minimum": 0}
    assert props["plain"]["items"] == {"type": "object", "properties": {"size": {"type": "integer", "minimum": 0}},
                                       "additionalProperties": False}
    ok = {"name": "a", "with": {"x": [1]}, "tags": {"t1": 2}, "shape": {}, "plain": [{"size": 1}], "version": 1}
    jsonschema.validate(ok, schema)
    for bad in ({**ok, "name": "A"}, {**ok, "tags": {"x": 1}}, {**ok, "shape": {"size": -1}},
                {**ok, "plain": [{"other": 1}]}, {**ok, "version": 2}, {"name": "a"}, {**ok, "location": "/"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    doc = build(_Doc, ok)
    assert doc.with_ == {"x": [1]} and doc.plain == [{"size": 1}] and doc.location == ""


@dataclass(kw_only=True)
class _Inner:
    n: int = field(0, "n")


@dataclass(kw_only=True)
class _Outer:
    items: dict[str, _Inner] = field({}, "by name")


def test_build_makes_dataclasses_inside_mappings():
    assert build(_Outer, {"items": {"a": {"n": 2}}}).items == {"a": _Inner(n=2)}
