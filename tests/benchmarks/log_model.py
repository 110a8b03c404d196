"""Logging a trained model to MLflow: clipline's `log_model` (requirements named) against the anchor, the same
call with MLflow inferring the requirements (what `mlflow.pytorch.log_model` does when given none: it loads the
model again in a subprocess and records its imports). Same model, same sqlite store, alternating rounds.

    .venv/bin/python -m tests.benchmarks.log_model [--arch A] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipelines.models import ModelRef, create, log_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="clip-tiny")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix="bench-log-model-"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri()))
    model, _, _ = create(ModelRef(arch=args.arch))
    times: dict[str, list[float]] = {"inferred (anchor)": [], "named (clipline)": []}
    for _ in range(args.rounds):
        for label, kwargs in (("inferred (anchor)", {"extra_pip_requirements": []}), ("named (clipline)", {})):
            with mlflow.start_run():
                t = time.perf_counter()
                log_model(model, args.arch, **kwargs)  # extra_pip_requirements=[]: MLflow infers the rest
                times[label].append(time.perf_counter() - t)
    anchor = statistics.median(times["inferred (anchor)"])
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:<18} median {med:6.2f} s over {len(ts)} rounds   {anchor / med:6.1f}x the anchor")


if __name__ == "__main__":
    main()
