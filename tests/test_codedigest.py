"""A stage's cache key covers every project module it runs, not only its own folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.codedigest import digest_files, module_closure
from pipelines.stage import stage_class
from tests.support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _digest(root: Path) -> tuple[list[str], str]:
    stage_dir = root / "pkg" / "stages" / "a"
    files = module_closure(stage_dir.glob("*.py"), root, "pkg")
    return [str(f.relative_to(root)) for f in files], digest_files(files, root)


def test_the_closure_follows_lazy_and_relative_imports_but_not_type_checking_or_parent_packages(tmp_path):
    _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/stages/__init__.py": "from pkg.stages.b import stage\n",  # a registry: not code stage a runs
        "pkg/stages/a/__init__.py": "",
        "pkg/stages/a/stage.py": (
            "from typing import TYPE_CHECKING\n"
            "from . import helper\n"
            "if TYPE_CHECKING:\n    from pkg import typing_only\n"
            "def run():\n    from pkg.shared import f\n    return f()\n"),
        "pkg/stages/a/helper.py": "from ...util import g\n",
        "pkg/stages/b/__init__.py": "", "pkg/stages/b/stage.py": "X = 1\n",
        "pkg/shared.py": "def f():\n    return 1\n",
        "pkg/util.py": "def g():\n    return 2\n",
        "pkg/typing_only.py": "", "pkg/unrelated.py": "",
        "pkg/shared_config.json": "{}",
    })
    files, before = _digest(tmp_path)
    assert files == ["pkg/shared.py", "pkg/stages/a/__init__.py", "pkg/stages/a/helper.py", "pkg/stages/a/stage.py",
                     "pkg/util.py"]
    (tmp_path / "pkg/unrelated.py").write_text("Y = 2\n")
    (tmp_path / "pkg/typing_only.py").write_text("Z = 3\n")
    (tmp_path / "pkg/stages/b/stage.py").write_text("X = 2\n")
    assert _digest(tmp_path)[1] == before
    (tmp_path / "pkg/util.py").write_text("def g():\n    return 3\n")  # reached through a relative import
    after_util = _digest(tmp_path)[1]
    assert after_util != before
    (tmp_path / "pkg/shared.py").write_text("def f():\n    return 2\n")  # imported inside a function
    assert _digest(tmp_path)[1] != after_util
    (tmp_path / "pkg/shared_config.json").write_text('{"width": 2}')  # data beside a module it runs
    assert _digest(tmp_path)[1] != after_util


def test_each_builtin_stage_covers_the_shared_code_it_runs():
    def files(kind: str) -> set[str]:
        return {str(f.relative_to(REPO)) for f in stage_class(kind).code_files()}

    train = files("train")
    # train scores its live model with the evaluation library and builds it with pipelines.models
    assert {"pipelines/evaluation/live.py", "pipelines/evaluation/embed.py", "pipelines/evaluation/tasks.py",
            "pipelines/evaluation/metrics.py", "pipelines/models/__init__.py", "pipelines/storage.py",
            "pipelines/stages/train/loop.py"} <= train
    assert "pipelines/contracts.py" in files("curate") and "pipelines/pairs.py" in files("ingest")
    crawl = files("crawl")
    assert "pipelines/stages/crawl/fetch.py" in crawl and not any("/train/" in f for f in crawl)


def _clipline(copy: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, timeout=300)


@pytest.mark.slow
def test_editing_a_shared_module_reruns_the_stage_that_imports_it(tmp_path):
    """In a copy of the package: an edit to `pipelines/pairs.py` (ingest reads its files through it) makes
    ingest run again; an edit to a module ingest never imports keeps the cache hit."""
    copy = tmp_path / "src"
    shutil.copytree(REPO / "pipelines", copy / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    job = tmp_path / "job.yaml"
    store = tmp_path / "store"
    job.write_text(yaml.safe_dump({"name": "t", "storage": str(store), "ray": {"num_cpus": 1}, "stages": {
        "pairs": {"uses": "ingest", "with": {"builtin": "digits_train", "image_size": 16}}}}))

    def outputs() -> list[str]:
        return sorted(p.parent.name for p in (store / "t" / "pairs").glob("*/_manifest.json"))

    def state() -> str:
        r = _clipline(copy, "status", str(job))
        assert r.returncode == 0, r.stderr
        return next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("pairs"))

    first = _clipline(copy, "run", str(job), "--no-progress")
    assert first.returncode == 0, first.stderr
    assert len(outputs()) == 1 and state() == "cached"

    with (copy / "pipelines" / "report.py").open("a") as f:
        f.write("\n# an edit to a module ingest does not import\n")
    assert state() == "cached"

    with (copy / "pipelines" / "pairs.py").open("a") as f:
        f.write("\n# an edit to a module ingest runs\n")
    assert state() == "missing"
    second = _clipline(copy, "run", str(job), "--no-progress")
    assert second.returncode == 0, second.stderr
    assert len(outputs()) == 2 and state() == "cached"
