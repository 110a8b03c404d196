"""What tests/test_readme_cluster.py checks while the README's cluster is still up.

The test runs the README's cluster block as written, with one line of its own before the block's teardown:
`python -m tests.support.readme_facts OUT`, in the block's shell, so with the exports of the services and of
the cluster. This collects what only a live cluster and its services can show (the submission's runtime env,
the runs on the tracking server, the crawl's rows in the bucket, the Jobs API's answers) into a JSON file; the
test asserts on it after the block has ended. One fresh cluster's first submission thus serves every check
that used to start a cluster (and a demo run) of its own: test_multinode's and test_submit's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SUBMISSION = "clipline-readme-demo"  # the README's --submission-id
SETS = ["stages.train.with.epochs=1"]  # the README's --set


def _cli(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run([str(Path(sys.executable).parent / "clipline"), *args], capture_output=True, text=True,
                          timeout=180, env=env)
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-3000:]}


def collect() -> dict[str, Any]:
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from pipelines import manifest, spec, storage
    from pipelines.demo.run import DEMO_JOB
    from pipelines.runner import plan
    from tests.support.net import free_port

    store, dashboard = os.environ["CLIPLINE_STORAGE"], os.environ["RAY_API_SERVER_ADDRESS"]
    facts: dict[str, Any] = {"storage": store, "dashboard": dashboard}

    # the job's stages, and every row of the URL list in the crawl's output once, with the manifest's counts
    rows = {row["stage"]: row for row in plan(spec.load(DEMO_JOB, SETS, store))}
    facts["states"] = {name: row["state"] for name, row in rows.items()}
    crawl = manifest.read(rows["crawl"]["path"])
    assert crawl is not None, f"no crawl manifest at {rows['crawl']['path']}"
    tables = [storage.read_parquet(url).select(["url", "status"]) for url in crawl.shard_urls()]
    facts["crawl"] = {"rows": crawl.rows, "shards": len(crawl.shards), "counts": crawl.counts,
                      "urls": sorted(u for t in tables for u in t.column("url").to_pylist()),
                      "statuses": [s for t in tables for s in t.column("status").to_pylist()]}
    facts["url_list"] = sorted(storage.read_parquet(f"{store}/demo-web/urls.parquet").column("url").to_pylist())

    # the job run and its stage runs on the tracking server
    client = MlflowClient()  # MLFLOW_TRACKING_URI: the services' server
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time ASC"])
    facts["runs"] = [{"id": r.info.run_id, "status": r.info.status, "parent": r.data.tags.get("mlflow.parentRunId"),
                      "stage": r.data.tags.get("clipline.stage"),
                      "metrics": {k: v for k, v in r.data.metrics.items() if k.startswith("eval/")}} for r in runs]

    # the submission: run from the uploaded package and working dir, in the cluster's Python
    env = JobSubmissionClient(dashboard).get_job_info(SUBMISSION).runtime_env
    facts["runtime_env"] = {"working_dir": env.get("working_dir"), "py_modules": env.get("py_modules")}
    facts["logs"] = _cli("logs", SUBMISSION, "--address", dashboard)

    # an explicit --address wins over the exported one, both ways
    wrong = f"http://127.0.0.1:{free_port()}"
    facts["status_exported_wrong"] = _cli("status", SUBMISSION, "--address", dashboard,
                                          env=dict(os.environ, RAY_API_SERVER_ADDRESS=wrong))
    facts["status_explicit_wrong"] = _cli("status", SUBMISSION, "--address", wrong) | {"address": wrong}
    return facts


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(collect(), indent=1))
