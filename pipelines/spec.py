"""Job specs: load a YAML file, apply `--set` overrides, validate against the job schema, resolve.

The job schema is generated from dataclasses (see `pipelines.configschema`): the document is `JobDocument`,
each stage a `StageDocument`, and the `with:` block of each stage the schema of that stage's Config.  The
validated document is built into those dataclasses, which fill in what it leaves out.  The copy in
`schemas/job.schema.json` is the same document, written by `clipline schemas --write` and checked by
the tests.  Every error names the file, the dotted path of the field and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import graphlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypedDict, cast

import jsonschema
import yaml

from pipelines import configschema, storage
from pipelines.configschema import Keywords, dataclass_schema
from pipelines.stage import Stage, config_class, is_path, stage_class
from pipelines.stage import kinds as stage_kinds

SCHEMA_ID = "https://clipline.dev/schemas/job.schema.json"
_NAME = "^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# A real spec is a few levels deep and has hundreds of values; the limits stop a YAML alias bomb (a few
# lines whose aliases expand to billions of values) before the schema validator walks every expansion.
MAX_DEPTH, MAX_VALUES = 64, 100_000
# JSON Schema counts 64.0 as an integer; a stage given `image_size: 64.0` would then get a float
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, inst: isinstance(inst, int) and not isinstance(inst, bool)),
)


class SpecError(ValueError):
    """A job spec that cannot run; the message names the file and the field."""


Name = Annotated[str, Keywords(pattern=_NAME)]  # a job or stage name: part of output paths


@dataclass(kw_only=True)
class Tracking:
    """Where the job's MLflow runs go."""

    uri: str | None = configschema.field(
        None, "MLflow tracking URI; else MLFLOW_TRACKING_URI; else sqlite under storage")
    experiment: str | None = configschema.field(None, "defaults to the job name")
    required: bool = configschema.field(
        True, "true: a tracking server that does not answer at start fails the job before any work; false: the "
              "run is written to a local spool for `clipline replay`")


@dataclass(kw_only=True)
class RaySettings:
    """The Ray instance the job's stages run on."""

    address: str = configschema.field(
        "local", "'local' starts Ray here, 'auto' joins a running cluster, or ray://HOST:PORT")
    runtime_env: dict[str, Any] = configschema.field({}, "Ray runtime environment of the job's tasks")
    num_cpus: int | None = configschema.field(None, "CPUs of a local Ray instance (default: all)", minimum=1)


class Resources(TypedDict, total=False):
    """Ray resources per worker task of the stage; only the keys given are passed to Ray."""

    num_cpus: Annotated[float, Keywords(minimum=0)]
    num_gpus: Annotated[float, Keywords(minimum=0)]
    memory: Annotated[float, Keywords(minimum=0, description="bytes")]


@dataclass(kw_only=True)
class StageDocument:
    """One entry of a job's `stages`."""

    uses: str = configschema.field(help="the registered stage kind that runs this stage")  # an enum of the kinds
    needs: list[Name] = configschema.field([], "stages whose outputs this stage reads")
    with_: dict[str, Any] = configschema.field({}, "the stage's parameters (its Config)", alias="with")
    resources: Resources = configschema.field({}, "Ray resources per worker task of the stage")
    retries: int = configschema.field(
        0, "times the runner reruns a failed stage, reusing its completed shards", minimum=0)


@dataclass(kw_only=True)
class JobDocument:
    """A clipline job: named stages, what each uses and needs, where outputs and runs go."""

    name: Name = configschema.field(help="job name; part of every output path")
    storage: str = configschema.field(
        "./clipline-data", "fsspec URL under which outputs are written; relative paths are against the cwd")
    tracking: Tracking = configschema.field(Tracking, "MLflow tracking")
    ray: RaySettings = configschema.field(RaySettings, "Ray")
    stages: dict[Name, StageDocument] = configschema.field(
        help="the job's stages by name; run in the order their needs give", minProperties=1)


def job_schema(kinds: list[str] | None = None) -> dict[str, Any]:
    """The JSON Schema of a job spec (`JobDocument`), with one `with:` schema per registered stage kind."""
    kinds = stage_kinds() if kinds is None else sorted(kinds)
    stage = dataclass_schema(StageDocument)
    stage["properties"]["uses"] = {"enum": kinds, "description": stage["properties"]["uses"]["description"]}
    stage["allOf"] = [
        {
            "if": {"properties": {"uses": {"const": kind}}, "required": ["uses"]},
            "then": {"properties": {"with": {"$ref": f"#/$defs/{kind}"}}},
        }
        for kind in kinds
    ]
    defs = {"stage": stage}
    for k in kinds:
        try:
            defs[k] = dataclass_schema(config_class(k))
        except (ImportError, TypeError, ValueError) as exc:  # a plugin that does not load
            raise SpecError(f"stage kind {k!r}: {exc}") from None
    return configschema.document_schema(JobDocument, SCHEMA_ID, "clipline job", defs,
                                        refs={StageDocument: "#/$defs/stage"})


def schema_for(raw: Any, source: str) -> dict[str, Any]:
    """The job schema for one document: every installed kind, and each `uses: package.module:Class` the document
    names (imported here, so that one that does not import is an error naming its field)."""
    paths: set[str] = set()
    stages = raw.get("stages") if isinstance(raw, dict) else None
    for name, st in (stages.items() if isinstance(stages, dict) else ()):
        uses = st.get("uses") if isinstance(st, dict) else None
        if isinstance(uses, str) and is_path(uses):
            try:
                config_class(uses)
            except (ImportError, TypeError, ValueError) as exc:
                raise SpecError(f"{source}: stages.{name}.uses: {exc}") from None
            paths.add(uses)
    return job_schema([*stage_kinds(), *sorted(paths)]) if paths else job_schema()


@dataclass
class StageSpec:
    name: str
    uses: str
    needs: list[str]
    config: Any  # the stage's Config instance
    params: dict[str, Any]  # the resolved `with:` block, defaults filled in
    resources: dict[str, float] = field(default_factory=dict)
    retries: int = 0

    @property
    def stage_class(self) -> type[Stage]:
        return stage_class(self.uses)

    def build(self) -> Stage:
        return self.stage_class(self.config)


@dataclass
class JobSpec:
    name: str
    storage: str  # resolved: an absolute path or URL
    tracking: Tracking
    ray: RaySettings
    stages: dict[str, StageSpec]  # in dependency order
    source: str
    raw: dict[str, Any]

    @property
    def tracking_uri(self) -> str | None:
        return self.tracking.uri

    @property
    def tracking_required(self) -> bool:
        return self.tracking.required

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def ray_address(self) -> str:
        return self.ray.address

    @property
    def runtime_env(self) -> dict[str, Any]:
        return self.ray.runtime_env

    @property
    def ray_num_cpus(self) -> int | None:
        return self.ray.num_cpus

    def downstream(self, name: str) -> set[str]:
        out, frontier = {name}, [name]
        while frontier:
            cur = frontier.pop()
            for s in self.stages.values():
                if cur in s.needs and s.name not in out:
                    out.add(s.name)
                    frontier.append(s.name)
        return out

    def upstream(self, name: str) -> set[str]:
        out, frontier = {name}, [name]
        while frontier:
            for dep in self.stages[frontier.pop()].needs:
                if dep not in out:
                    out.add(dep)
                    frontier.append(dep)
        return out


def dotted(path: Any) -> str:
    """`stages.crawl.with.image_size`, with list indices as `[i]`; a key that would not read as one (empty, with a
    dot, spaces at its ends or a control character such as a carriage return, which would end the error's line)
    is quoted: `stages['\\r']`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part or not part.isprintable() or part.strip() != part or "." in part:
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _describe(err: jsonschema.ValidationError) -> str:
    v, inst = err.validator, err.instance
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(inst) - set(allowed)) if isinstance(inst, dict) else []
        return f"unknown key(s) {', '.join(map(repr, extra))}; expected one of: {', '.join(allowed)}"
    if v == "required":
        return err.message.replace("is a required property", "is required but missing")
    if v == "type":
        want = err.validator_value if isinstance(err.validator_value, str) else " or ".join(err.validator_value)
        return f"expected {want}, got {type(inst).__name__} {inst!r}"
    if v == "enum":
        return f"expected one of {', '.join(map(repr, err.validator_value))}, got {inst!r}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
        return f"expected a number {words[v]} {err.validator_value}, got {inst!r}"
    if v == "pattern":
        return f"expected a string matching {err.validator_value}, got {inst!r}"
    if v == "minProperties":
        return "expected at least one entry"
    return err.message


def _data_errors(raw: Any) -> list[str]:
    """What JSON Schema cannot check or see: keys that are not strings, NaN (it passes every bound), a YAML
    alias that contains itself, and nesting or size past MAX_DEPTH and MAX_VALUES."""
    errors: list[str] = []
    seen = 0

    def walk(value: Any, path: list[Any], parents: tuple[int, ...]) -> None:
        nonlocal seen
        seen += 1
        if seen > MAX_VALUES:
            return
        where = dotted(path)
        if isinstance(value, float) and value != value:
            errors.append(f"{where}: expected a number, got nan")
        if not isinstance(value, (dict, list)):
            return
        if id(value) in parents:
            errors.append(f"{where}: a YAML alias that contains itself")
            return
        if len(parents) >= MAX_DEPTH:
            errors.append(f"{where}: nested more than {MAX_DEPTH} levels deep")
            return
        inner = (*parents, id(value))
        if isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, [*path, i], inner)
            return
        for key, item in value.items():
            if isinstance(key, str):
                walk(item, [*path, key], inner)
            else:
                errors.append(f"{where}: the key {key!r} is {type(key).__name__}; keys must be strings (quote it)")

    walk(raw, [], ())
    if seen > MAX_VALUES:
        errors.append(f"(top level): more than {MAX_VALUES} values (YAML aliases included); a job spec is smaller")
    return errors


def validate(raw: Any, source: str, schema: dict[str, Any] | None = None) -> None:
    """Raise SpecError listing every schema violation as `file: field.path: what was expected`."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if problems := _data_errors(raw):  # before the schema, whose validator assumes JSON-like data
        raise SpecError("invalid job spec:\n  " + "\n  ".join(f"{source}: {p}" for p in problems))
    schema = schema or schema_for(raw, source)
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    # if/then branches report the same problem twice (once per branch); keep the most specific ones
    leaves = [e for e in errors if e.validator not in ("allOf", "if", "then")]
    lines = sorted({f"{source}: {dotted(e.absolute_path)}: {_describe(e)}" for e in leaves or errors})
    if lines:
        raise SpecError("invalid job spec:\n  " + "\n  ".join(lines))


def _schema_at(schema: dict[str, Any], raw: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    """The schema of the field at path, following stages.<name>.with into that stage's Config."""
    defs = schema["$defs"]
    node: dict[str, Any] | None
    if path[0] == "stages" and len(path) >= 2:
        node, rest = defs["stage"], path[2:]
        if rest and rest[0] == "with":
            stages = raw.get("stages")  # not yet validated: any YAML value
            stage = stages.get(path[1]) if isinstance(stages, dict) else None
            uses = stage.get("uses") if isinstance(stage, dict) else None
            node = defs.get(uses) if isinstance(uses, str) else None
            rest = rest[1:]
    else:
        node, rest = schema, path
    for key in rest:
        if node is None:
            return None
        node = node.get("items") if _is_index(key) else node.get("properties", {}).get(key)
    return node


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str,
                    schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """`stages.crawl.with.image_size=32` style overrides, each value typed by the schema at its path; a number
    in the path indexes a list (`stages.evaluate.with.datasets.0.limit=60`)."""
    raw = copy.deepcopy(raw)
    schema = schema or schema_for(raw, source)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"{source}: --set {item!r}: expected KEY=VALUE, e.g. stages.crawl.with.image_size=32")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        if not all(path):
            raise SpecError(f"{source}: --set {item!r}: empty part in the key {key!r}")
        target = _schema_at(schema, raw, path)
        types_ = target.get("type") if target else None
        types_ = [types_] if isinstance(types_, str) else (types_ or [])
        if types_ == ["string"] or (target and "enum" in target and all(isinstance(x, str) for x in target["enum"])):
            value: Any = text
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise SpecError(f"{source}: --set {key}: cannot parse {text!r}: {exc}") from None
            except RecursionError:
                raise SpecError(f"{source}: --set {key}: the value is nested too deeply to parse") from None
            if "string" in types_ and not isinstance(value, (str, type(None))) and "integer" not in types_:
                value = text
        node: Any = raw
        for part, nxt in zip(path[:-1], path[1:], strict=True):
            node = _step(node, part, _is_index(nxt), key, source)
        if isinstance(node, list):
            _step(node, path[-1], False, key, source)  # checks the index
            node[int(path[-1])] = value
        else:
            node[path[-1]] = value
    return raw


def _is_index(part: str) -> bool:
    # ASCII only: str.isdigit() is true for '²', which int() refuses
    return part.isascii() and part.isdigit()


def _step(node: Any, part: str, list_next: bool, key: str, source: str) -> Any:
    """One step down an override's path: into a mapping (created when missing) or a list item."""
    if isinstance(node, list):
        if not _is_index(part) or int(part) >= len(node):
            raise SpecError(f"--set {key}: {part!r} is not an index into the {len(node)} items of the list in {source}")
        return node[int(part)]
    if not isinstance(node, dict):
        raise SpecError(f"--set {key}: {part!r} is not a mapping in {source}")
    child = node.setdefault(part, [] if list_next else {})
    if not isinstance(child, (dict, list)):
        raise SpecError(f"--set {key}: {part!r} is not a mapping in {source}")
    return child


def _interpolate(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_interpolate(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, variables) for k, v in value.items()}
    return value


def resolve(raw: dict[str, Any], source: str, storage_override: str | None = None,
            schema: dict[str, Any] | None = None) -> JobSpec:
    """Validate a raw spec and turn it into typed stage configs in dependency order.  Keys the spec leaves
    out take their dataclass defaults, which are the schema's (both come from the same fields)."""
    validate(raw, source, schema or schema_for(raw, source))
    doc: JobDocument = configschema.build(JobDocument, raw)
    store_url, store_field = (storage_override, "--storage") if storage_override else (doc.storage, "storage")
    if "\0" in store_url:  # os.path.expanduser raises on it; no filesystem takes it
        raise SpecError(f"{source}: {store_field}: a path cannot contain a NUL character, got {store_url!r}")
    store = storage.resolve(store_url)
    variables = {"storage": store, "job": doc.name}

    for name, st in doc.stages.items():
        for dep in st.needs:
            if dep not in doc.stages:
                raise SpecError(
                    f"{source}: stages.{name}.needs: unknown stage {dep!r}; expected one of {', '.join(doc.stages)}"
                )
            if dep == name:
                raise SpecError(f"{source}: stages.{name}.needs: a stage cannot need itself")
    try:
        order = list(graphlib.TopologicalSorter({n: s.needs for n, s in doc.stages.items()}).static_order())
    except graphlib.CycleError as exc:
        raise SpecError(f"{source}: stages: the needs form a cycle: {' -> '.join(exc.args[1])}") from None

    stages: dict[str, StageSpec] = {}
    for name in order:
        st = doc.stages[name]
        try:
            config = configschema.build(config_class(st.uses), _interpolate(st.with_, variables))
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{source}: stages.{name}.with: {exc}") from None
        stages[name] = StageSpec(
            name=name,
            uses=st.uses,
            needs=list(st.needs),
            config=config,
            params=dataclasses.asdict(config),
            resources=dict(cast("dict[str, float]", st.resources)),  # a TypedDict of floats
            retries=st.retries,
        )
    _check_columns(stages, source)
    _check_reads(stages, source)
    return JobSpec(name=doc.name, storage=store, tracking=doc.tracking, ray=doc.ray, stages=stages, source=source,
                   raw=raw)


def _check_columns(stages: dict[str, StageSpec], source: str) -> None:
    """A stage that reads columns beyond the contracts (a curate rule over passthrough columns) must find them in
    what each stage it needs writes, where that stage's config says (`output_columns`)."""
    for name, st in stages.items():
        required = getattr(st.config, "required_columns", None)
        if required is None:
            continue
        for column, reader in required().items():
            for dep in st.needs:
                written = getattr(stages[dep].config, "output_columns", None)
                if written is not None and column not in (cols := written()):
                    hint = (f"; add it to stages.{dep}.with.passthrough" if stages[dep].uses == "crawl" else "")
                    raise SpecError(f"{source}: stages.{name}.with.{reader}: reads the column {column!r}, which stage "
                                    f"{dep!r} ({stages[dep].uses}) does not write{hint}; its columns: "
                                    f"{', '.join(cols)}")


def _check_reads(stages: dict[str, StageSpec], source: str) -> None:
    """A stage whose settings name another stage it reads (`semantic_dedup.embeddings`) must list it in `needs`."""
    for name, st in stages.items():
        reads = getattr(st.config, "reads", None)
        for stage, field_ in (reads() if reads is not None else {}).items():
            if stage not in st.needs:
                raise SpecError(f"{source}: stages.{name}.with.{field_}: names stage {stage!r}, which is not in "
                                f"stages.{name}.needs ({', '.join(st.needs) or 'empty'}); add it there")


def load(path: str | Path, overrides: list[str] | None = None, storage_override: str | None = None) -> JobSpec:
    """Read, override, validate and resolve a job spec file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{source}: cannot read the job spec: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{source}: not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise SpecError(f"{source}: not valid YAML: nested too deeply to parse") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    schema = schema_for(raw, source)
    if overrides:
        raw = apply_overrides(raw, overrides, source, schema)
    return resolve(raw, source, storage_override, schema_for(raw, source) if overrides else schema)
