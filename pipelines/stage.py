"""The stage interface and the registry that maps a job's `uses:` to a stage class.

A stage is a class with a nested keyword-only `Config` dataclass and one method, `run(ctx, inputs)`.
It reads its upstream stages' manifests, writes shards under `ctx.output` through `pipelines.storage`,
and returns a `StageResult`.  It never decides where it is scheduled or whether it is cached: the
runner owns ordering, fingerprints, retries and manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipelines.codedigest import digest_files, module_closure

if TYPE_CHECKING:
    from pipelines.manifest import Manifest
    from pipelines.tracking import StageTracker

_REGISTRY: dict[str, type[Stage]] = {}
ENTRY_POINTS = "clipline.stages"  # a user's stages: `kind = "package.module:Class"` in a package's entry points


@dataclass
class StageContext:
    """What the runner hands a stage: where to write, what it may use, where to report."""

    job: str
    stage: str
    output: str  # fsspec URL of this stage's fingerprinted output directory
    tracker: StageTracker
    log: logging.Logger
    resources: dict[str, float] = field(default_factory=dict)
    progress: bool = True  # show progress bars


@dataclass
class StageResult:
    """What a stage produced: its shard files (relative to ctx.output), counts and final metrics."""

    shards: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Base class: subclasses set `kind`, define a nested `Config` dataclass and implement `run`."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    # distributions whose version changes the stage's output (decoders, resizers): part of code_version
    dependencies: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    def input_identity(self) -> dict[str, Any]:
        """Identity of data the stage reads from outside the job (source stages); part of the fingerprint."""
        return {}

    def run(self, ctx: StageContext, inputs: dict[str, Manifest]) -> StageResult:
        raise NotImplementedError

    @classmethod
    def code_files(cls) -> list[Path]:
        """The files of the stage's package and every project module they import (`pipelines.codedigest`);
        for a plugin's stage, the files of its own package."""
        here = Path(inspect.getfile(cls)).resolve()
        package_root = Path(__file__).resolve().parent
        start = plugin_files(cls) if not here.is_relative_to(package_root) else here.parent.glob("*.py")
        return module_closure(start, package_root.parent, package_root.name)

    @classmethod
    def code_version(cls) -> str:
        """Digest of every line the stage runs and its dependencies' versions: either changing invalidates the cache."""
        h = hashlib.sha256()
        for dist in cls.dependencies:
            h.update(f"{dist}=={importlib.metadata.version(dist)}".encode())
        h.update(digest_files(cls.code_files(), Path(__file__).resolve().parents[1]).encode())
        return h.hexdigest()[:16]


def plugin_files(cls: type) -> list[Path]:
    """A plugin class's own code: the modules of its package, or its module alone when it has no package."""
    here = Path(inspect.getfile(cls)).resolve()
    return sorted(here.parent.glob("*.py")) if "." in cls.__module__ else [here]


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage usable as `uses: <kind>` in job specs."""
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"stage {cls.__name__} needs a nested Config dataclass")
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"a stage named {cls.kind!r} is already registered ({_REGISTRY[cls.kind].__name__})")
    _REGISTRY[cls.kind] = cls
    return cls


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _entry_points() -> dict[str, str]:
    """Stage kinds installed packages provide (entry point group `clipline.stages`): kind -> module:Class."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def is_path(kind: str) -> bool:
    """`uses: package.module:Class`, a stage class named by where it lives rather than by a registered kind."""
    return ":" in kind


def _plugin(kind: str) -> type[Stage]:
    """The Stage class of an entry point or a `module:Class` path, imported and checked."""
    where = kind if is_path(kind) else _entry_points()[kind]
    origin = f"{where}" if is_path(kind) else f"{where} (entry point {kind!r} in group {ENTRY_POINTS})"
    try:
        cls = _load(where)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises (SyntaxError too) is the plugin's error
        raise ImportError(f"stage {origin}: cannot import it: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TypeError(f"stage {origin}: expected a subclass of pipelines.stage.Stage, got {cls!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"stage {origin}: needs a nested Config dataclass")
    if not is_path(kind) and getattr(cls, "kind", None) != kind:
        raise ValueError(f"stage {origin}: the class's kind is {getattr(cls, 'kind', None)!r}, not {kind!r}")
    return cls


def kinds() -> list[str]:
    """Every stage kind a job may use: the built-in ones, those registered, and installed plugins' entry points."""
    from pipelines.stages import BUILTIN

    return sorted({*BUILTIN, *_REGISTRY, *_entry_points()})


def config_class(kind: str) -> type:
    """A kind's Config dataclass, without importing a built-in's stage driver (validation stays light)."""
    from pipelines.stages import BUILTIN

    if kind in _REGISTRY:
        return _REGISTRY[kind].Config
    if kind in BUILTIN:
        return _load(BUILTIN[kind][0])
    if is_path(kind) or kind in _entry_points():
        return _plugin(kind).Config
    raise KeyError(f"no stage kind {kind!r}; expected one of {', '.join(kinds())}")


def stage_class(kind: str) -> type[Stage]:
    """A kind's Stage class; a built-in driver is imported (and so registered) on first use."""
    from pipelines.stages import BUILTIN

    if kind not in _REGISTRY and kind in BUILTIN:
        _load(BUILTIN[kind][1])
    if kind not in _REGISTRY and (is_path(kind) or kind in _entry_points()):
        return _plugin(kind)
    if kind not in _REGISTRY:
        raise KeyError(f"no stage kind {kind!r}; expected one of {', '.join(kinds())}")
    return _REGISTRY[kind]
def registry() -> dict[str, type[Stage]]:
    """Every stage class, built-in drivers imported: for tools that need them all, not for validation."""
    return {kind: stage_class(kind) for kind in kinds()}


def builtin_kinds() -> list[str]:
    from pipelines.stages import BUILTIN

    return list(BUILTIN)
