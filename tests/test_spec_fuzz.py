"""Hostile job specs: whatever the file or the `--set` overrides hold, loading either gives a well-typed JobSpec or
raises SpecError naming the file (and the field), and `clipline validate` exits 2 without a traceback.

Generated inputs are arbitrary YAML-ish documents and mutations of the shipped demo job; the plain tests at the end
are the concrete inputs that once escaped as other exceptions (or were accepted when they should not be).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import graphlib
import io
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipelines import cli, preflight, spec
from pipelines.spec import JobSpec, SpecError
from pipelines.stage import registry
from tests.conftest import REPO

# reproducible in CI, nothing written into the tree (no example database), no per-example deadline
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DEMO = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
GOOD = {"name": "j", "stages": {"crawl": {"uses": "crawl", "with": {"input": "/x.parquet"}}}}


# ---- what every outcome must satisfy -------------------------------------------------------------------------------

def _conforms(tp: Any, value: Any) -> bool:
    """Whether a built Config value has its annotated type (int means int, not 64.0 or True)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_conforms(a, value) for a in get_args(tp))
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        return isinstance(value, list) and all(_conforms(item, v) for v in value)
    if origin is dict:
        _, item = get_args(tp) or (str, Any)
        return isinstance(value, dict) and all(isinstance(k, str) and _conforms(item, v) for k, v in value.items())
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return isinstance(value, tp) and all(_conforms(hints[f.name], getattr(value, f.name))
                                             for f in dataclasses.fields(tp))
    raise AssertionError(f"no check for the annotation {tp!r}")


def check_job(job: JobSpec) -> None:
    assert isinstance(job, JobSpec)
    for name, st_ in job.stages.items():
        assert isinstance(name, str) and name == st_.name
        assert _conforms(st_.stage_class.Config, st_.config), f"stage {name}: {st_.config!r}"
        assert isinstance(st_.retries, int) and not isinstance(st_.retries, bool) and st_.retries >= 0
        assert all(isinstance(v, (int, float)) and not math.isnan(v) and v >= 0 for v in st_.resources.values())
    seen: set[str] = set()
    for name, st_ in job.stages.items():  # dependency order
        assert set(st_.needs) <= seen, f"{name} comes before its needs {st_.needs}"
        seen.add(name)


def check_error(message: str, path: Path) -> None:
    assert str(path) in message, message
    if message.startswith("invalid job spec:"):  # one line per problem: `file: field: what`
        for line in message.splitlines()[1:]:
            assert line.startswith(f"  {path}: "), line
            field, _, what = line.removeprefix(f"  {path}: ").partition(": ")
            assert field and what, line


def outcome(path: Path, overrides: list[str] = ()) -> JobSpec | str:
    """Load through the API (and its preflight, as `clipline validate` does) and through `clipline validate`; both
    must agree and neither may escape."""
    overrides = list(overrides)
    try:
        result: JobSpec | str = spec.load(path, overrides)
        preflight.check(result)
    except SpecError as exc:
        result = str(exc)
        check_error(result, path)
    else:
        check_job(result)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["validate", str(path), *(f"--set={o}" for o in overrides)])
    assert "Traceback" not in out.getvalue() + err.getvalue()
    if isinstance(result, str):
        assert rc == cli.EXIT_BAD_SPEC
        assert err.getvalue() == f"clipline: {result}\n"
    else:
        assert rc == 0
        assert out.getvalue().startswith(f"{path}: valid job {result.name!r}: ")
    return result


@pytest.fixture(scope="module")
def job_file(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = tmp_path_factory.mktemp("fuzz")
    # the demo job's storage holds the URL list `clipline demo` writes there, which preflight reads the columns of
    (where / "demo-web").mkdir()
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.png"], "caption": ["a red circle"]}),
                   where / "demo-web" / "urls.parquet")
    DEMO["storage"] = str(where)
    return where / "job.yaml"


def dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


# ---- strategies -------------------------------------------------------------------------------------------------

odd_text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", " ", "\x00", "\t", "\x1b[31m", "\u2028", "\ufeff", "é", "名前", "🙂", "${storage}", "${nope}", "../..",
     "~", "~\x00x", "a b", "-x", "1", "2.5", "true", "null", "x=y", "²", "..", "crawl", "stages", "with"])
huge_ints = st.integers() | st.sampled_from([2**63, -(2**63) - 1, 10**400, -1, 0])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([64.0, 0.5, -0.0, 1e308])
scalars = st.none() | st.booleans() | huge_ints | floats | odd_text
keys = odd_text | st.integers(-3, 3) | st.booleans() | st.none() | st.floats(allow_nan=False)
yamlish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                       max_leaves=12)

TOKENS = ["name: ", "stages:", "\n", "  ", "    ", "- ", "[", "]", "{", "}", ": ", ", ", "&a ", "*a", "*b", "!!binary ",
          "!!set ", "!!python/object:os.system ", "!!float ", "? ", "'", '"', "\\x00", "~", ".nan", ".inf", "1e400",
          "0x1F", "0o17", "2026-01-02", "\t", "\x00", "\x07", "<<: *a", "---\n", "...\n", "%YAML 1.1\n", "crawl",
          "uses: crawl", "with: {input: /x}", "needs: [", "#", "|\n", ">-\n", "é", "\ufeff"]
yaml_text = st.lists(st.sampled_from(TOKENS) | odd_text, max_size=30).map("".join)

names = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a document, the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def leaves(doc: Any) -> list[tuple]:
    return [p for p in paths(doc) if p and not isinstance(get(doc, p), (dict, list))]


@st.composite
def mutated_demo(draw) -> dict:
    """The demo job with one to three mutations: dropped keys, changed types, unknown keys, renamed stages,
    other stage kinds, random `needs`."""
    doc = copy.deepcopy(DEMO)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(doc)))
        node = get(doc, where)
        op = draw(st.sampled_from(["drop", "replace", "add", "rename", "uses", "needs"]))
        if op == "drop" and where:
            parent = get(doc, where[:-1])
            del parent[where[-1]]
        elif op == "replace" and where:
            get(doc, where[:-1])[where[-1]] = draw(yamlish)
        elif op == "add" and isinstance(node, dict):
            node[draw(keys)] = draw(yamlish)
        elif op == "add" and isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(yamlish))
        elif op == "rename" and isinstance(node, dict) and node:
            old = draw(st.sampled_from(list(node)))
            node[draw(keys | names)] = node.pop(old)
        elif op == "uses" and isinstance(doc.get("stages"), dict) and doc["stages"]:
            stage = doc["stages"][draw(st.sampled_from(list(doc["stages"])))]
            if isinstance(stage, dict):
                stage["uses"] = draw(st.sampled_from(sorted(registry())) | odd_text)
        elif op == "needs" and isinstance(doc.get("stages"), dict) and doc["stages"]:
            stage = doc["stages"][draw(st.sampled_from(list(doc["stages"])))]
            if isinstance(stage, dict):
                stage["needs"] = draw(st.lists(st.sampled_from(list(doc["stages"])) | names | odd_text, max_size=3))
    return doc


def override_keys(doc: Any) -> st.SearchStrategy[str]:
    known = [".".join(map(str, p)) for p in paths(doc) if p]
    return st.sampled_from(known) | st.lists(st.sampled_from(["stages", "crawl", "with", "0", "²", "", "x", "needs"])
                                             | odd_text, min_size=1, max_size=5).map(".".join)


@st.composite
def overrides(draw, doc: Any) -> list[str]:
    value = st.just("") | yaml_text | odd_text | yamlish.map(
        lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip())
    items = st.builds(lambda k, v: f"{k}={v}", override_keys(doc), value) | odd_text
    return draw(st.lists(items, max_size=3))


# ---- generated inputs -------------------------------------------------------------------------------------------

@FUZZ
@given(doc=yamlish)
@example(doc={"\r": {0: None}})  # found by CI's run: the key's carriage return ended the error's line before the field
def test_arbitrary_documents(job_file, doc):
    job_file.write_text(dump(doc))
    result = outcome(job_file)
    if not isinstance(doc, dict):
        assert result == f"{job_file}: expected a mapping at the top level, got {type(doc).__name__}"


@FUZZ
@given(text=yaml_text)
def test_arbitrary_yaml_text(job_file, text):
    job_file.write_text(text)
    outcome(job_file)


@FUZZ
@given(data=st.binary(max_size=40))
def test_arbitrary_bytes(job_file, data):
    job_file.write_bytes(data)
    outcome(job_file)


@FUZZ
@given(doc=mutated_demo(), data=st.data())
def test_mutated_demo_job(job_file, doc, data):
    text = dump(doc)
    if data.draw(st.booleans()):  # and sometimes damaged as text: a token spliced in somewhere
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.sampled_from(TOKENS) | odd_text) + text[at:]
    job_file.write_text(text)
    outcome(job_file, data.draw(overrides(doc)))


@FUZZ
@given(data=st.data())
def test_overrides_on_the_demo_job(job_file, data):
    job_file.write_text(dump(DEMO))
    outcome(job_file, data.draw(overrides(DEMO)))


@FUZZ
@given(data=st.data())
def test_a_leaf_replaced_by_a_mapping_is_named(job_file, data):
    """No leaf of the demo job takes a mapping: the error names that leaf's dotted path."""
    doc = copy.deepcopy(DEMO)
    where = data.draw(st.sampled_from(leaves(doc)))
    get(doc, where[:-1])[where[-1]] = {data.draw(names): data.draw(scalars)}
    job_file.write_text(dump(doc))
    result = outcome(job_file)
    assert isinstance(result, str) and f"{job_file}: {spec.dotted(where)}: " in result


@FUZZ
@given(data=st.data())
def test_an_unknown_key_is_named(job_file, data):
    doc = copy.deepcopy(DEMO)
    where = data.draw(st.sampled_from([p for p in paths(doc) if isinstance(get(doc, p), dict)]))
    key = data.draw(names.filter(lambda k: k not in get(doc, where)))
    get(doc, where)[key] = 1
    job_file.write_text(dump(doc))
    result = outcome(job_file)
    assert isinstance(result, str)
    if where == ("stages",):  # a new stage, which must be a mapping
        assert f"{job_file}: stages.{key}: expected object, got int 1" in result
    else:
        assert f"{job_file}: {spec.dotted(where)}: unknown key(s) {key!r}" in result


@FUZZ
@given(data=st.data())
def test_any_needs_graph(job_file, data):
    """Random `needs` (unknown names, self, cycles): an error that says which, or a dependency order."""
    doc = copy.deepcopy(DEMO)
    stages = list(doc["stages"])
    for name in stages:
        doc["stages"][name]["needs"] = data.draw(st.lists(st.sampled_from(stages) | names, max_size=3))
    job_file.write_text(dump(doc))
    result = outcome(job_file)
    needs = {n: s["needs"] for n, s in doc["stages"].items()}
    bad = {n for n, deps in needs.items() if any(d not in needs or d == n for d in deps)}
    if bad:
        assert isinstance(result, str)
        assert any(f"{job_file}: stages.{n}.needs: " in result for n in bad), result
        return
    try:
        graphlib.TopologicalSorter(needs).prepare()
    except graphlib.CycleError:
        assert isinstance(result, str) and f"{job_file}: stages: the needs form a cycle: " in result
    else:
        assert isinstance(result, JobSpec), result
        assert {n: s.needs for n, s in result.stages.items()} == needs


INT_LEAVES = [p for p in leaves(DEMO) if type(get(DEMO, p)) is int and p[0] == "stages"]


@FUZZ
@given(data=st.data())
def test_set_on_an_integer_field_is_applied_or_named(job_file, data):
    where = data.draw(st.sampled_from(INT_LEAVES))
    value = data.draw(huge_ints)
    job_file.write_text(dump(DEMO))
    result = outcome(job_file, [f"{'.'.join(map(str, where))}={value}"])
    if isinstance(result, str):
        # a bound of the field's schema: minimum (>=), exclusiveMinimum (>), maximum (<=)
        assert re.search(rf"{re.escape(f'{job_file}: {spec.dotted(where)}: ')}expected a number (>=|>|<=|<) ",
                         result), result
    else:
        stage = result.stages[where[1]]
        if where[2] == "with":
            got = get(stage.params, where[3:])
        elif where[2] == "resources":
            got = get(stage.resources, where[3:])
        else:
            got = getattr(stage, where[2])
        assert got == value


# ---- the inputs that escaped, as plain regression tests ---------------------------------------------------------

def error(path: Path, overrides: list[str] = (), storage: str | None = None) -> str:
    with pytest.raises(SpecError) as info:
        spec.load(path, list(overrides), storage)
    assert str(path) in str(info.value)
    return str(info.value)


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: j\xff\n")  # was UnicodeDecodeError
    assert error(path) == f"{path}: not UTF-8 text: byte 0xff at offset 7"


def test_nesting_too_deep_for_the_parser(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: " + "[" * 2000 + "]" * 2000)  # was RecursionError from PyYAML's composer
    assert error(path) == f"{path}: not valid YAML: nested too deeply to parse"
    path.write_text(dump(GOOD))
    assert error(path, ["stages.crawl.with.input=" + "[" * 2000]) == (
        f"{path}: --set stages.crawl.with.input: the value is nested too deeply to parse")


def test_nesting_deeper_than_a_spec_needs(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(dump({**GOOD, "ray": {"runtime_env": {"env_vars": [[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]*3}}}))
    # the 65th mapping or list from the top (the document, ray, runtime_env, x and 61 lists) is one too many
    assert error(path, ["ray.runtime_env.x=" + "[" * 70 + "]" * 70]) == (
        f"invalid job spec:\n  {path}: ray.runtime_env.x" + "[0]" * 61 + ": nested more than 64 levels deep")


@pytest.mark.parametrize(("text", "expected"), [
    # was TypeError: sorted() of the unknown keys compared int with str
    ("name: j\n1: x\nzz: y\nstages: {a: {uses: crawl, with: {input: /x}}}\n",
     "(top level): the key 1 is int; keys must be strings (quote it)"),
    # was TypeError: ', '.join() of the stage names met an int
    ("name: j\nstages:\n  1: {uses: crawl, with: {input: /x}}\n  a: {uses: crawl, needs: [zz], with: {input: /x}}\n",
     "stages: the key 1 is int; keys must be strings (quote it)"),
    # was accepted: a stage named by the int 1, which every output path then joins as text
    ("name: j\nstages:\n  1: {uses: crawl, with: {input: /x}}\n", "stages: the key 1 is int"),
    ("name: j\nstages: {a: {uses: crawl, with: {input: /x, ~: 3}}}\n", "stages.a.with: the key None is NoneType"),
])
def test_keys_that_are_not_strings(tmp_path, text, expected):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert f"{path}: {expected}" in error(path)


def test_an_alias_that_contains_itself(tmp_path):
    path = tmp_path / "job.yaml"  # was accepted: a runtime_env Ray cannot serialise
    path.write_text("name: j\nray: {runtime_env: &a {x: *a}}\nstages: {a: {uses: crawl, with: {input: /x}}}\n")
    assert error(path) == f"invalid job spec:\n  {path}: ray.runtime_env.x: a YAML alias that contains itself"


def test_an_alias_bomb_stops_before_the_validator_walks_it(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values
    path = tmp_path / "job.yaml"
    path.write_text("name: j\nray:\n  runtime_env:\n" + "".join(f"    {line}\n" for line in lines) +
                    "stages: {a: {uses: crawl, with: {input: /x}}}\n")
    assert "(top level): more than 100000 values (YAML aliases included)" in error(path)


def test_nan_is_not_a_number_within_bounds(tmp_path):
    path = tmp_path / "job.yaml"  # was accepted: NaN compares false with every bound
    path.write_text("name: j\nstages:\n  a:\n    uses: crawl\n    resources: {num_cpus: .nan}\n"
                    "    with: {input: /x, timeout: .nan}\n")
    assert error(path) == (f"invalid job spec:\n  {path}: stages.a.resources.num_cpus: expected a number, got nan\n"
                           f"  {path}: stages.a.with.timeout: expected a number, got nan")


def test_an_integer_field_takes_no_float(tmp_path):
    path = tmp_path / "job.yaml"  # was accepted: JSON Schema counts 64.0 as an integer, the Config got a float
    path.write_text("name: j\nstages:\n  a:\n    uses: crawl\n    retries: 1.0\n    with: {input: /x, image_size: 64.0}\n")
    assert error(path) == (f"invalid job spec:\n  {path}: stages.a.retries: expected integer, got float 1.0\n"
                           f"  {path}: stages.a.with.image_size: expected integer, got float 64.0")


def test_a_nul_in_the_storage_path(tmp_path):
    path = tmp_path / "job.yaml"  # was ValueError: embedded null byte, from os.path.expanduser
    path.write_text(dump({**GOOD, "storage": "~\x00x"}))
    assert error(path) == f"{path}: storage: a path cannot contain a NUL character, got '~\\x00x'"
    path.write_text(dump(GOOD))
    assert error(path, storage="/a\x00b") == f"{path}: --storage: a path cannot contain a NUL character, got '/a\\x00b'"


@pytest.mark.parametrize(("stages", "expected"), [
    # each was AttributeError: the override looked up `uses` in a stages block before it was validated
    ("[1]", "--set stages.a.with.x: 'a' is not an index into the 1 items of the list in"),
    ("{a: null}", "--set stages.a.with.x: 'a' is not a mapping in"),
    ("{a: text}", "--set stages.a.with.x: 'a' is not a mapping in"),
])
def test_set_into_a_stages_block_that_is_not_one(tmp_path, stages, expected):
    path = tmp_path / "job.yaml"
    path.write_text(f"name: j\nstages: {stages}\n")
    assert expected in error(path, ["stages.a.with.x=1"])


def test_set_with_a_digit_that_int_refuses(tmp_path):
    path = tmp_path / "job.yaml"  # was ValueError from int('²'): str.isdigit() is true for it
    path.write_text(dump(with_networks := {**GOOD, "stages": {"crawl": {"uses": "crawl", "with": {
        "input": "/x", "allow_networks": ["127.0.0.0/8"]}}}}))
    assert with_networks
    assert "--set stages.crawl.with.allow_networks.²: '²' is not an index into the 1 items of the list" in error(
        path, ["stages.crawl.with.allow_networks.²=10.0.0.0/8"])
    assert f"{path}: stages.crawl.needs: expected array, got dict {{'²': 'a'}}" in error(path, ["stages.crawl.needs.²=a"])


def test_set_errors_name_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(dump(GOOD))
    assert error(path, ["stages.crawl.with.image_size"]).startswith(f"{path}: --set 'stages.crawl.with.image_size': ")
    assert error(path, ["stages..x=1"]).startswith(f"{path}: --set 'stages..x=1': empty part")
    assert error(path, ["stages.crawl.with.image_size=[1"]).startswith(
        f"{path}: --set stages.crawl.with.image_size: cannot parse '[1'")
