"""`clipline demo`: write the synthetic web's URL list, serve the web on 127.0.0.1, run jobs/demo.yaml."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.demo.server import DemoServer, url_list

DEMO_JOB = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"
DEMO_SEED = 0
# a few of the faults a real crawl meets, so the demo's status counts show them
DEMO_FAULTS = {"missing": 0.02, "html": 0.01, "optout": 0.01}


def write_url_list(path: str, base_url: str, images: int) -> bool:
    """Write the URL list unless an identical one is there (keeps the crawl's cache key); True if written."""
    frame = url_list(base_url, images, DEMO_SEED, DEMO_FAULTS)[["url", "caption"]]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    data = buf.getvalue()
    if storage.exists(path):
        fs, p = storage.filesystem(path)
        if fs.cat_file(p) == data:
            return False
    storage.atomic_write(path, data)
    return True


def run_demo(storage: str, port: int, images: int, overrides: list[str], progress: bool = True) -> int:
    from pipelines import spec
    from pipelines.runner import StageFailed, run_job

    store = os.path.abspath(storage)
    try:
        server = DemoServer(port=port)
    except OSError as exc:
        print(f"clipline: cannot serve the demo web on 127.0.0.1:{port}: {exc.strerror}; pick another --port",
              file=sys.stderr)
        return 2
    with server:
        urls = f"{store}/demo-web/urls.parquet"
        written = write_url_list(urls, server.base_url, images)
        print(f"clipline: synthetic web of {images} images at {server.base_url} "
              f"({'new URL list' if written else 'URL list unchanged'}: {urls})", file=sys.stderr)
        job = spec.load(DEMO_JOB, overrides, store)
        try:
            outcomes = run_job(job, progress=progress)
        except StageFailed as exc:
            print(f"clipline: {exc}", file=sys.stderr)
            return 1
    for o in outcomes:
        m = o.manifest
        size = f"{m.counts['steps']} steps" if "steps" in m.counts else f"{m.rows} rows"
        print(f"{o.stage:<10} {o.state:<8} {size}  {m.location}")
        if "weights" in m.extra.get("model", {}):  # a trained model
            print(f"{'':<19} model: {m.extra['model'].get('registry_uri') or m.extra['model']['model_uri'] or 'not logged (MLflow was offline)'}")
        for row in m.extra.get("summary", []):  # evaluation results
            print(f"{'':<19} {row['dataset']} {row['task']}: {row['main_metric']} {row['value']:.3f}")
    print(f"\nOutputs under {store}/{job.name}/. Browse the runs with:  clipline ui --storage {store}\n"
          f"(or: mlflow ui --backend-store-uri sqlite:///{store}/mlflow.db)")
    return 0
