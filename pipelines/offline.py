"""Nothing leaves the machine unasked: the switches that stop Ray, MLflow and the libraries clipline runs
from phoning home. Call `keep_local()` before `ray` or `mlflow` is imported (both read some of these at
import); every process they start inherits the environment, so the switches reach Ray's GCS, raylet,
dashboard and workers, and an MLflow server, as well.

Each is a default (os.environ.setdefault): a user who wants one of these reports sets the variable.

What each library sends, read from the installed versions:
- Ray 2.60: its dashboard process (started by every head node, even with include_dashboard=False, then
  with the UsageStatsHead module alone) asks the cloud metadata address 169.254.169.254 (Azure, then AWS)
  and metadata.google.internal (a DNS lookup) which cloud it runs on, at every start, whether usage stats
  are enabled or not; then, unless disabled, it posts usage stats to usage-stats.ray.io after 60 s and
  hourly; disabled, a cluster that `ray start` or `ray.cluster_utils` started (not ray.init) still posts
  one "disabled" report. The cloud question has no switch: it is skipped only when
  ~/ray_bootstrap_config.yaml exists (the file `ray up` puts on a head node, read for its provider type),
  so `keep_local(ray_head=True)` writes one saying `provider: {type: local}` where there is none.
- MLflow 3.x: usage telemetry (config from config.mlflow-telemetry.io, records posted to its ingestion
  URL), from clients and `mlflow server` alike.
- albumentations (imported by img2dataset): a PyPI version check at import.
- huggingface_hub (imported by open_clip): telemetry on downloads; clipline downloads no weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("clipline")

SWITCHES: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # where a disabled cluster posts its "disabled" report: a URL requests has no adapter for fails before it
    # opens a socket (Ray logs the failure at debug level); Ray reads this variable for tests only
    "RAY_USAGE_STATS_REPORT_URL": "file:///dev/null",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # clipline builds models with pretrained=None: a hub request would be one no job asked for
    "HF_HUB_OFFLINE": "1",
}

RAY_BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
_BOOTSTRAP_TEXT = """\
# Written by clipline (pipelines/offline.py) because none was here. Ray's dashboard reads this file at the
# start of every head node for the cloud provider it reports; without it, it asks the cloud metadata
# address 169.254.169.254 (even with RAY_USAGE_STATS_ENABLED=0). `local`: no cloud, nothing to ask.
# Ray's `ray up` writes its own on the head nodes it creates; delete this one to let Ray ask again.
provider:
  type: local
"""


def keep_local(ray_head: bool = False) -> None:
    """Set the switches (where the environment has no value of its own); with `ray_head`, for a process
    about to start a Ray head node, also make sure Ray's dashboard finds a bootstrap config."""
    for name, value in SWITCHES.items():
        os.environ.setdefault(name, value)
    if ray_head:
        _ensure_bootstrap_config()


def _ensure_bootstrap_config() -> Path | None:
    """~/ray_bootstrap_config.yaml with `provider: {type: local}` unless one exists; the path if written."""
    if os.environ.get("RAY_USAGE_STATS_ENABLED") == "1":
        return None  # a user who opted into Ray's usage stats gets Ray's own cloud detection with them
    path = Path(os.path.expanduser(RAY_BOOTSTRAP_CONFIG))
    try:
        # "x": a concurrent writer, or `ray up`'s own file, is never overwritten
        with open(path, "x", encoding="utf-8") as f:
            f.write(_BOOTSTRAP_TEXT)
    except FileExistsError:
        return None
    except OSError as exc:
        log.warning("cannot write %s (%s): Ray's dashboard will ask the cloud metadata address "
                    "169.254.169.254 which cloud this is", path, exc)
        return None
    log.info("wrote %s so that Ray does not ask the cloud metadata address which cloud this is", path)
    return path
