"""Checks that run before Ray starts: what can be known wrong about a job from its spec and files alone.

`clipline run` and `clipline validate` call `check(job)`; a problem raises `spec.SpecError` (exit 2) naming the
file and field, before any stage directory or MLflow run exists.
"""

from __future__ import annotations

from pipelines.spec import JobSpec


def check(job: JobSpec) -> None:
    """Raise `SpecError` for the first problem found in the job's inputs."""
    del job
