"""Pipeline metrics for Prometheus, through Ray's metrics API (`ray.util.metrics`).

Every metric the stages export is defined here, once, and `dashboards/clipline.json` queries exactly these
names (a test checks both ways).  A stage records through `StageMetrics`, which carries the job and stage
labels; the process that records is the one that exports: the driver for per-shard and end-of-stage
numbers, crawl tasks for rows as they are fetched, the training loop's rank 0 for steps.

How Ray exports them (ray 2.60, OpenTelemetry recorder): each process sends its points to the node's
metrics agent every `metrics_report_interval_ms`; the agent serves them on `http://NODE:metrics_export_port
/metrics` as `ray_<name>`, counters with a `_total` suffix, with Ray's own labels added (SessionName,
WorkerId, NodeAddress, Component, Version).  Counters stay in the agent for its lifetime; a gauge stops
being served two report intervals after the process that set it stops reporting it (a finished training
worker), so dashboards read finished values with `last_over_time`.

The label is `clipline_job`, not `job`: Prometheus sets `job` on every target itself (Ray's service
discovery file names the target job `ray`) and would rename ours to `exported_job`.

Without Ray (unit code paths, a driver before `ray.init`) recording is a no-op: metric objects are created
lazily, per process, the first time something is recorded while Ray is initialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

PREFIX = "ray_"  # what Ray's exporter puts before every metric name (its OpenTelemetry namespace `ray`)
COMMON_LABELS = ("clipline_job", "stage")


@dataclass(frozen=True)
class Metric:
    kind: Literal["counter", "gauge"]
    name: str  # the name given to Ray; Prometheus sees `prometheus_name`
    help: str
    labels: tuple[str, ...] = ()  # besides COMMON_LABELS

    @property
    def prometheus_name(self) -> str:
        return PREFIX + self.name + ("_total" if self.kind == "counter" else "")

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return COMMON_LABELS + self.labels


CRAWL_FETCHED = Metric("counter", "clipline_crawl_fetched",
                       "crawl rows fetched by shard tasks, by outcome (rate of status=success: images/s)", ("status",))
CRAWL_ROWS = Metric("counter", "clipline_crawl_rows",
                    "crawl rows written to the output by this run, by status, counted as each shard completes",
                    ("status",))
CURATE_ROWS_IN = Metric("counter", "clipline_curate_rows_in", "crawled rows the curate stage read")
CURATE_DROPPED = Metric("counter", "clipline_curate_dropped", "rows curate dropped, by the first rule's reason",
                        ("reason",))
CURATE_ROWS_OUT = Metric("counter", "clipline_curate_rows_out", "rows curate kept and wrote")
TRAIN_SAMPLES = Metric("counter", "clipline_train_samples", "training samples consumed, all workers (rate: samples/s)")
TRAIN_STEPS = Metric("counter", "clipline_train_steps", "optimizer steps taken (recomputed steps after a restart too)")
TRAIN_LOSS = Metric("gauge", "clipline_train_loss", "the last step's loss (mean of the ranks' local losses)")
TRAIN_DATA_WAIT = Metric("gauge", "clipline_train_data_wait_fraction",
                         "fraction of the last step's time the workers waited for data (mean over ranks)")
EVAL_METRIC = Metric("gauge", "clipline_eval_metric", "evaluation results, CLIP_benchmark metric names",
                     ("dataset", "task", "metric"))
EVAL_AVERAGE = Metric("gauge", "clipline_eval_average", "the average of each dataset's main metric")

METRICS = (CRAWL_FETCHED, CRAWL_ROWS, CURATE_ROWS_IN, CURATE_DROPPED, CURATE_ROWS_OUT, TRAIN_SAMPLES, TRAIN_STEPS,
           TRAIN_LOSS, TRAIN_DATA_WAIT, EVAL_METRIC, EVAL_AVERAGE)

_made: dict[str, Any] = {}  # name -> ray.util.metrics object, in this process


def prometheus_names() -> set[str]:
    """The names Prometheus sees (histogram-free, so one name per metric)."""
    return {m.prometheus_name for m in METRICS}


def _ray_metric(m: Metric) -> Any | None:
    """This process's Ray metric object for `m`, made on first use; None while Ray is not initialised."""
    got = _made.get(m.name)
    if got is not None:
        return got
    try:
        import ray
    except ImportError:  # the metrics are Ray's; without it there is nothing to export to
        return None
    if not ray.is_initialized():
        return None
    from ray.util import metrics as ray_metrics

    cls = ray_metrics.Counter if m.kind == "counter" else ray_metrics.Gauge
    # kept across ray.shutdown/ray.init in one process: Ray's metric objects record into whichever
    # session the process is connected to
    got = _made[m.name] = cls(m.name, description=m.help, tag_keys=m.tag_keys)
    return got


@dataclass(frozen=True)
class StageMetrics:
    """A stage run's handle on the metrics: the job and stage labels, fixed.  Small and picklable, so a
    driver passes it to its Ray tasks."""

    job: str
    stage: str

    @classmethod
    def of(cls, ctx: Any) -> StageMetrics:
        """From a StageContext (anything with `job` and `stage`)."""
        return cls(str(ctx.job), str(ctx.stage))

    def _tags(self, m: Metric, labels: dict[str, Any]) -> dict[str, str]:
        if set(labels) != set(m.labels):
            raise ValueError(f"metric {m.name}: labels {sorted(labels)} given, expected {sorted(m.labels)}")
        return {"clipline_job": self.job, "stage": self.stage, **{k: str(v) for k, v in labels.items()}}

    def inc(self, m: Metric, value: float = 1, **labels: Any) -> None:
        """Add `value` to counter `m`.  Zero is skipped (Ray refuses it; a missing series reads as 0)."""
        if m.kind != "counter":
            raise TypeError(f"metric {m.name} is a {m.kind}, not a counter")
        tags = self._tags(m, labels)
        if value <= 0:
            return
        metric = _ray_metric(m)
        if metric is not None:
            metric.inc(float(value), tags=tags)

    def set(self, m: Metric, value: float | None, **labels: Any) -> None:
        """Set gauge `m`.  None, NaN and infinities are skipped (e.g. acc5 on fewer than 5 classes)."""
        if m.kind != "gauge":
            raise TypeError(f"metric {m.name} is a {m.kind}, not a gauge")
        tags = self._tags(m, labels)
        if value is None or not math.isfinite(value):
            return
        metric = _ray_metric(m)
        if metric is not None:
            metric.set(float(value), tags=tags)

    def inc_each(self, m: Metric, counts: dict[str, int], label: str) -> None:
        """Counter `m` increased by each value of `counts`, its key as the label `label` (statuses, reasons)."""
        for key, n in counts.items():
            self.inc(m, n, **{label: key})
