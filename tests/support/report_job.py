"""The small job run that `clipline report` (tests/test_report.py) and `clipline explore` (tests/test_explore.py)
both read: crawl (the demo web on loopback) -> curate -> train -> evaluate. The two files are one unit of work
(tests/conftest.py's SAME_UNIT), so the run happens once per test process, as a session fixture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipelines import spec
from pipelines.demo.server import url_list
from pipelines.runner import run_job
from tests.conftest import crawl_stage, mlflow_runs, write_job

SCRIPT = "a red circle <script>alert('owned')</script><img src=x onerror=alert('img')> & friends"


def build_job(tmp: Path, base_url: str) -> Path:
    """crawl (demo web on loopback) -> curate -> train (one epoch of clip-tiny, batches of 8) -> evaluate (two small sets).

    The URL list carries a failed download, an opt-out, a too-short caption, a duplicated image and a caption
    with markup, so the funnel has several reasons and the page must escape what the web wrote."""
    rows = url_list(base_url, 48, faults={"missing": 0.08, "optout": 0.05})[["url", "caption"]]
    extra = pd.DataFrame({"url": [f"{base_url}/img/1", f"{base_url}/img/100"], "caption": [SCRIPT, "tiny"]})
    pd.concat([rows, extra], ignore_index=True).to_parquet(tmp / "urls.parquet")
    return write_job(tmp, {
        "crawl": crawl_stage(str(tmp / "urls.parquet"), image_size=64),
        "curate": {"uses": "curate", "needs": ["crawl"], "with": {
            "rules": ["basic", "dedup_image", "dedup_text"],
            "basic": {"min_words": 3, "min_chars": 6, "min_side": 32, "max_aspect": 3.0}}},
        "train": {"uses": "train", "needs": ["curate"], "with": {
            "model": {"arch": "clip-tiny"}, "workers": 1, "cpus_per_worker": 0.5, "batch_size": 8,
            "warmup": 2, "lr": 2e-3, "system_metrics": False, "register": {"enabled": False}}},
        "evaluate": {"uses": "evaluate", "needs": ["train"], "with": {"examples": 0, "datasets": [
            {"name": "digits", "builtin": "digits", "limit": 30, "tasks": ["zeroshot"]},
            {"name": "shapes", "builtin": "demo_heldout", "limit": 18}]}},
    }, name="rep", ray={"address": "local"})


def run(tmp: Path, base_url: str) -> dict[str, Any]:
    path = build_job(tmp, base_url)
    outcomes = {o.stage: o for o in run_job(spec.load(path), progress=False)}
    assert [o.state for o in outcomes.values()] == ["ran"] * 4
    parent = [r for r in mlflow_runs(tmp / "store") if "mlflow.parentRunId" not in r.data.tags][-1]
    return {"tmp": tmp, "path": path, "outcomes": outcomes, "store": tmp / "store", "parent": parent.info.run_id}
