"""A new sqlite tracking store: clipline's copy of the cached empty store (`pipelines/sqlite_store.py`) against the
anchor, MLflow making the store itself (its tables, then every schema migration), as every job run on a new storage
did. Each round opens a fresh store both ways, alternating, in one process, up to the first experiment listed (what
a job run needs before its first run); the cached empty store is made before the rounds, as the first new store
on a machine makes it.

    .venv/bin/python -m tests.benchmarks.mlflow_store [--rounds R]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from pipelines import sqlite_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables" each round
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlflow-store-"))
    t = time.perf_counter()
    sqlite_store.template()
    first = time.perf_counter() - t
    times: dict[str, list[float]] = {"MLflow makes it (anchor)": [], "copy of the empty store": []}
    for i in range(args.rounds):
        for label in times:
            uri = f"sqlite:///{tmp}/{i}-{len(times[label])}-{label[:4]}.db"
            t = time.perf_counter()
            if label.startswith("copy"):
                assert sqlite_store.seed(uri)
            MlflowClient(tracking_uri=uri).search_experiments()
            times[label].append(time.perf_counter() - t)
    anchor = statistics.median(times["MLflow makes it (anchor)"])
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:<26} median {med:6.3f} s over {len(ts)} rounds   {anchor / med:6.1f}x the anchor")
    print(f"first call in the process: {first:.2f} s (MLflow's migration scripts read; the empty store made once per "
          "MLflow version, if not cached yet)")


if __name__ == "__main__":
    main()
