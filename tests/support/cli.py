"""The `clipline` command line in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipelines.offline import SWITCHES

REPO = Path(__file__).resolve().parents[2]
# `python -m pipelines.cli`: the interpreter running the tests, whatever its PATH
MODULE = (sys.executable, "-m", "pipelines.cli")
# the console script pip installed beside that interpreter: for tests of the command a user types
SCRIPT = (str(Path(sys.executable).parent / "clipline"),)


def cli_env(env: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment a CLI subprocess gets: `env` (default: this process's), plus `extra`, with the offline
    switches (`pipelines.offline.SWITCHES`) wherever it has no value of its own."""
    out = dict(os.environ if env is None else env) | extra
    for name, value in SWITCHES.items():
        out.setdefault(name, value)
    return out


def run_cli(*args: str | os.PathLike[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] = REPO,
            timeout: float = 600, check: bool = False,
            command: Sequence[str] = MODULE) -> subprocess.CompletedProcess[str]:
    """`clipline ARGS` (by default `python -m pipelines.cli ARGS`) in cwd, output captured as text. `env` is
    the whole environment (default: this process's), given the offline switches. `check`: fail, showing what
    it printed, unless it exits 0."""
    done = subprocess.run([*command, *map(str, args)], cwd=cwd, env=cli_env(env), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"clipline {' '.join(map(str, args))} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done
