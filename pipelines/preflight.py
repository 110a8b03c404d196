"""Checks that run before Ray starts: what can be known wrong about a job from its spec and files alone.

`clipline run` and `clipline validate` call `check(job)` right after the spec loads; a problem raises
`spec.SpecError` (exit 2) naming the file and the field (`stages.evaluate.with.model.checkpoint: /x/y.pt: no
such file`), before any stage directory or MLflow run exists.

Each stage kind contributes its own checks: a stage's Config may define `preflight(check: Check)`, which looks
at its files through the `Check` it is handed and raises `Problem(field, message)` (or calls `check.problem`)
for what is wrong. Built-in kinds do (crawl, ingest, train, evaluate); a plugin stage without the method is
not checked. The checks are cheap by design: a Parquet file's footer, a CSV header line, a tar's first
sample, a safetensors header, a model built on PyTorch's meta device (no memory, no weights); nothing is
unpickled (`torch.load(weights_only=True)`). What an upstream stage writes is not checked (it does not exist
yet), nor is a file on a store this machine cannot reach (a warning says so; the stage checks it where it
runs).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.evaluation.config import EvalSet
    from pipelines.models import ModelRef
    from pipelines.spec import JobSpec

log = logging.getLogger("clipline")

MAX_FILES = 256  # files of one glob whose columns are read; a URL list of more parts is checked on its first ones
_SAFETENSORS_HEADER_MAX = 100 * 2**20


class Problem(Exception):
    """What a Config's `preflight` raises: the field under the stage's `with:` and what is wrong with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class Unreachable(Exception):
    """A file whose store did not answer (no credentials, no network): not checked here."""


class Check:
    """What one stage's `preflight` is handed: the job, the stage, and readers of the files it names."""

    def __init__(self, job: JobSpec, stage: str) -> None:
        self.job, self.stage = job, stage
        self.problems: list[Problem] = []
        from pipelines import storage

        # what the stages this one needs write lies under {storage}/{job}/{stage}/: not there before they run
        self._upstream = [storage.join(job.storage, job.name, dep)
                          for dep in sorted(job.upstream(stage) - {stage})]

    def problem(self, field: str, message: str) -> None:
        """Record a problem and carry on checking the stage's other fields."""
        self.problems.append(Problem(field, message))

    def attempt(self, fn: Callable[..., object], *args: Any) -> None:
        """Run one check, recording the Problem it raises, so that the next check (another dataset, another
        input) still runs; a store that does not answer is a warning."""
        try:
            fn(*args)
        except Problem as p:
            self.problems.append(p)
        except Unreachable as exc:
            log.warning("stages.%s: not checked before the run, its store did not answer: %s", self.stage, exc)

    def produced_upstream(self, url: str) -> bool:
        from pipelines import storage

        resolved = storage.resolve(url) if url else url
        return any(resolved == d or resolved.startswith(d + "/") for d in self._upstream)

    @contextmanager
    def reading(self, field: str, url: str) -> Iterator[None]:
        """Turn what reading `url` raises into a Problem naming the field and the file (a store that does not
        answer into `Unreachable`)."""
        try:
            yield
        except (Problem, Unreachable):
            raise
        except FileNotFoundError:
            raise Problem(field, f"{url}: no such file") from None
        except IsADirectoryError:
            raise Problem(field, f"{url}: a directory, not a file") from None
        except PermissionError as exc:
            raise Problem(field, f"{url}: cannot read it ({exc.strerror or exc})") from None
        except (ValueError, TypeError, UnicodeError) as exc:  # fsspec: an unknown protocol; a NUL in a path
            raise Problem(field, f"{url if url.isprintable() else repr(url)}: cannot read it: {exc}") from None
        except ImportError as exc:  # fsspec names the package a protocol needs (gcsfs, adlfs, ...)
            raise Problem(field, f"{url}: {exc}") from None
        except OSError as exc:  # a bad gzip stream, a disk error; from a remote store, also a connection refused
            from pipelines import storage

            if not storage.is_local(url):
                raise Unreachable(f"{url}: {type(exc).__name__}: {exc}") from None
            raise Problem(field, f"{url}: cannot read it ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - botocore's, aiohttp's, ...: whatever an unreachable store raises
            raise Unreachable(f"{url}: {type(exc).__name__}: {exc}") from None

    # ---- files --------------------------------------------------------------------------------------------------

    def files(self, field: str, pattern: str) -> list[str]:
        """The files a path or glob names; a Problem when it names none. Empty (nothing to check) for a path an
        upstream stage writes."""
        from pipelines import storage

        if self.produced_upstream(pattern):
            return []
        with self.reading(field, pattern):
            found = storage.expand(pattern)
        if not found:
            glob = any(c in pattern for c in "*?[")
            raise Problem(field, f"{pattern}: {'the glob matches no file' if glob else 'no such file'}")
        return found[:MAX_FILES]

    def columns(self, field: str, url: str, fmt: str) -> list[str]:
        """The column names of one file, from as little of it as tells them: a Parquet footer, a CSV or TSV
        header line, the first JSON line's keys, the member extensions of a tar's first sample."""
        with self.reading(field, url):
            if fmt == "parquet":
                return _parquet_columns(url)
            if fmt in ("csv", "tsv"):
                return _header(url, "," if fmt == "csv" else "\t")
            if fmt == "jsonl":
                return _json_keys(url)
            if fmt == "webdataset":
                return _tar_extensions(url)
        raise Problem(field, f"{url}: no reader for the format {fmt!r}")

    def require(self, field: str, url: str, fmt: str, wanted: dict[str, str | None]) -> list[str]:
        """The file's columns (`field` names the file), with a Problem naming each wanted one it lacks
        (`wanted`: the field that names a column -> the column; None: nothing wanted)."""
        have = self.columns(field, url, fmt)
        what = "member extension" if fmt == "webdataset" else "column"
        for key, column in wanted.items():
            if column is not None and column not in have:
                self.problem(key, f"{url} has no {what} {column!r}; it has {', '.join(have) or 'none'}")
        return have

    # ---- shared checks of stage settings ----------------------------------------------------------------------

    def eval_set(self, field: str, s: EvalSet) -> None:
        """One evaluation set from files: they exist and have the columns its tasks read."""
        from pipelines import pairs

        if s.path is None:  # a built-in: nothing to read
            return
        for url in self.files(f"{field}.path", s.path):
            try:
                fmt = pairs.file_format(s.name, url, s.format)
            except ValueError as exc:
                raise Problem(f"{field}.format", str(exc)) from None
            wanted: dict[str, str | None] = {f"{field}.image_column": s.image_column}
            if "zeroshot" in s.tasks:
                wanted[f"{field}.label_column"] = s.label_column
            if "retrieval" in s.tasks:
                wanted[f"{field}.caption_column"] = s.caption_column
            self.require(f"{field}.path", url, fmt, wanted)

    def model(self, field: str, ref: ModelRef) -> None:
        """The architecture exists (a name open_clip or clipline knows, or a readable JSON config) and the
        checkpoint, when given, is a readable state dict that fits it. An MLflow `model_uri` is left to the
        stage (it needs the tracking server)."""
        if ref.model_uri:
            return
        arch_json = ref.arch.endswith(".json")
        if arch_json:
            _arch_file(f"{field}.arch", ref.arch)
        elif ref.arch not in known_archs():
            raise Problem(f"{field}.arch", f"{ref.arch!r} is not an open_clip architecture nor one of clipline's "
                                           f"(clip-tiny, clip-small, clip-rn-tiny), nor a path to a JSON config")
        if not ref.checkpoint or self.produced_upstream(ref.checkpoint):
            return
        from pipelines import storage

        with self.reading(f"{field}.checkpoint", ref.checkpoint):
            if not storage.is_file(ref.checkpoint):
                raise FileNotFoundError(ref.checkpoint)
            shapes = checkpoint_shapes(ref.checkpoint)
        fits = fit(ref.arch, shapes)
        if fits:
            raise Problem(f"{field}.checkpoint", f"{ref.checkpoint}: {fits}")


def known_archs() -> set[str]:
    """Every architecture name `pipelines.models.arch_name` accepts, read from the config files' names (open_clip's
    `model_configs/` and clipline's) without importing open_clip."""
    from pipelines.models import CONFIG_DIR

    names = {p.stem for p in CONFIG_DIR.glob("*.json")}
    spec = importlib.util.find_spec("open_clip")
    for root in (spec.submodule_search_locations or []) if spec else []:
        names |= {p.stem for p in Path(root, "model_configs").glob("*.json")}
    return names


def _arch_file(field: str, arch: str) -> None:
    path = Path(arch)
    if not path.is_file():
        raise Problem(field, f"{arch}: no such file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise Problem(field, f"{arch}: not a readable JSON model config ({exc})") from None
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise Problem(field, f"{arch}: expected an open_clip config with embed_dim, vision_cfg and text_cfg")


def checkpoint_shapes(url: str) -> dict[str, tuple[int, ...]]:
    """Each tensor's name and shape in a checkpoint: a safetensors header (read alone), or a torch state dict
    loaded with `weights_only=True` (memory-mapped when local), nested under `state_dict` or `model` and with
    DDP's `module.` prefix as `pipelines.models.load_state_dict` reads it."""
    from pipelines import storage

    fs, path = storage.filesystem(url)
    if url.endswith(".safetensors"):
        with fs.open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            if not 0 < n <= _SAFETENSORS_HEADER_MAX:
                raise ValueError("not a safetensors file (its header length is out of range)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeError, json.JSONDecodeError):
                raise ValueError("not a safetensors file (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise ValueError("not a safetensors file (its header is not a mapping)")
        return {k: tuple(v.get("shape", ())) for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict)}
    import torch

    try:
        if storage.is_local(url) and zipfile.is_zipfile(path):  # torch.save's format: mapped, not read
            sd: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:  # remote, or torch's legacy format (which cannot be mapped)
            with fs.open(path, "rb") as f:
                sd = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle's errors name the global it refused
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"not a plain tensor checkpoint ({type(exc).__name__}: {first})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    return {str(k).removeprefix("module."): tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def fit(arch: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """Why a checkpoint's tensors do not load into the architecture (strictly, as the stages load them), or ''.
    The model is built on the meta device: its parameters have shapes and no memory."""
    import open_clip

    from pipelines.models import arch_name

    name = arch_name(arch)
    kwargs = {"init_logit_bias": 0.0} if "logit_bias" in shapes else {}  # SigLIP-trained, as models.create
    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that a model built without pretrained weights is random
    try:
        model = open_clip.create_model(name, pretrained=None, device="meta", **kwargs)
    finally:
        logging.disable(quiet)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = [f"{k} is {list(shapes[k])} in the file, {list(want[k])} in the model"
             for k in sorted(set(want) & set(shapes)) if shapes[k] != want[k]]
    reasons = []
    if missing:
        reasons.append(f"{len(missing)} weight(s) missing ({_some(missing)})")
    if extra:
        reasons.append(f"{len(extra)} weight(s) it does not have ({_some(extra)})")
    if wrong:
        reasons.append(f"{len(wrong)} of another shape ({_some(wrong)})")
    return f"does not fit architecture {name}: {'; '.join(reasons)}" if reasons else ""


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _open(url: str, mode: str = "rb", **kwargs: Any) -> Any:
    import fsspec

    return fsspec.open(url, mode, **kwargs)


def _parquet_columns(url: str) -> list[str]:
    import pyarrow.parquet as pq

    from pipelines import storage

    fs, path = storage.filesystem(url)
    # small blocks: the footer is read from the end, not the whole object
    with fs.open(path, "rb", **({} if storage.is_local(url) else {"block_size": 1 << 16})) as f:
        try:
            return list(pq.ParquetFile(f).schema_arrow.names)
        except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid and kin: not a Parquet file
            raise ValueError(f"not a readable Parquet file ({exc})") from None


def _header(url: str, sep: str) -> list[str]:
    with _open(url, "rt", compression="infer", encoding="utf-8", errors="replace", newline="") as f:
        line = f.readline()
    return next(csv.reader([line], delimiter=sep), []) if line else []


def _json_keys(url: str) -> list[str]:
    with _open(url, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"its first line is not JSON ({exc})") from None
                return list(row) if isinstance(row, dict) else []
    return []


def _tar_extensions(url: str) -> list[str]:
    """The extensions of the first sample's members, as webdataset names its columns (`a/b.jpg` -> `jpg`)."""
    with _open(url, "rb") as f:
        try:
            return _first_sample(tarfile.open(fileobj=f, mode="r|*"))
        except tarfile.TarError as exc:
            raise ValueError(f"not a readable tar file ({exc})") from None


def _first_sample(tar: Any) -> list[str]:
    with tar:
        key, exts = None, []
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)
            stem, _, ext = base[-1].partition(".")
            sample = (base[0] if len(base) > 1 else "", stem)
            if key is not None and sample != key:
                break
            key = sample
            exts.append(ext)
        return exts


def check(job: JobSpec, stages: Callable[[str], bool] | None = None) -> None:
    """Raise `SpecError` listing every problem found in the job's inputs, each as `file: field: what`.

    `stages`: which stages to check (default: all of them), for a run that selects some."""
    from pipelines.spec import SpecError

    lines: list[str] = []
    for name, st in job.stages.items():
        hook = getattr(st.config, "preflight", None)
        if hook is None or (stages is not None and not stages(name)):
            continue
        checker = Check(job, name)
        checker.attempt(hook, checker)
        lines += [f"{job.source}: stages.{name}.with.{p.field}: {p.message}" for p in checker.problems]
    if len(lines) == 1:
        raise SpecError(lines[0])
    if lines:
        raise SpecError("the job's inputs are not ready:\n  " + "\n  ".join(lines))
