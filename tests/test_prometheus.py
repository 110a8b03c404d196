"""Prometheus metrics through Ray, the Grafana dashboard that reads them, and the Prometheus config.

The end-to-end test runs a whole job (crawl -> curate -> train -> evaluate) in a driver subprocess that starts
its own Ray with a metrics port and the dashboard on 127.0.0.1 (the dashboard writes Prometheus's service
discovery file and Ray's Grafana dashboards), and a real Prometheus scraping it through dashboards/prometheus.yml.
Every query of dashboards/clipline.json is then run against that Prometheus.

Run as a script (`python -m tests.test_prometheus JOB METRICS_PORT DASHBOARD_PORT`) this module is that driver.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import prometheus as metrics
from tests.conftest import REPO, crawl_stage, mlflow_runs, write_job
from tests.support.net import free_ports, wait_until

pytestmark = pytest.mark.slow

DASHBOARD = REPO / "dashboards" / "clipline.json"
PROM_CONFIG = REPO / "dashboards" / "prometheus.yml"
RAY_DASHBOARDS = REPO / "dashboards" / "ray"
INSTALL_HINT = "apt-get install prometheus (Debian's prometheus package ships prometheus and promtool)"

# PromQL words that are not metric names (functions and aggregations are recognised by their "(")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def tool(name: str) -> str:
    """The path of a Prometheus binary; a test that needs one fails, naming the package, when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers outside strings, label matchers, ranges and
    by/without/on label lists, that are neither a keyword nor a function or aggregation being called."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if m.group() not in _KEYWORDS and not e[m.end():].lstrip().startswith("("):
            names.add(m.group())
    return names


def dashboard_targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query in the dashboard, panels inside rows included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            out.extend((p["title"], t["expr"]) for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def concrete(expr: str, job: str, rate: str = "1m", range_: str = "1h") -> str:
    """A dashboard expression with Grafana's variables filled in, as Grafana sends it to Prometheus."""
    return (expr.replace("$__rate_interval", rate).replace("$__range", range_)
            .replace("$clipline_job", re.escape(job)))


# ---- the dashboard and the config, checked without Ray ---------------------------------------------------


def test_metric_names_are_parsed_out_of_promql():
    assert metric_names('sum by (status) (rate(a_total{x="b{c}", y=~"d.*"}[5m])) / on (k) b + 2 * c:d') == {
        "a_total", "b", "c:d"}
    assert metric_names("max without (WorkerId) (last_over_time(g[$__range])) and bool h offset 5m") == {"g", "h"}


def test_dashboard_queries_read_exactly_the_exported_metrics_through_a_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    targets = dashboard_targets(dash)
    assert len(targets) >= 12
    used: set[str] = set()
    for title, expr in targets:
        names = metric_names(expr)
        assert names and names <= metrics.prometheus_names(), (title, expr, names - metrics.prometheus_names())
        assert 'clipline_job=~"$clipline_job"' in expr, (title, expr)
        used |= names
    assert used == metrics.prometheus_names()  # and every exported metric has a panel
    for p in (p for p in dash["panels"] if p["type"] != "row"):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    # the job variable lists the clipline_job label of exactly these metrics
    query = variables["clipline_job"]["query"]["query"]
    selector = re.fullmatch(r'label_values\(\{__name__=~"(.+)"\}, clipline_job\)', query)
    assert selector and all(re.fullmatch(selector.group(1), n) for n in metrics.prometheus_names())
    # the labels the queries group by exist on the metrics they read
    labels = set(metrics.COMMON_LABELS).union(*(m.labels for m in metrics.METRICS))
    for title, expr in targets:
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= labels, (title, group)


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every query (variables filled in as Grafana does), as recording rules."""
    dash = json.loads(DASHBOARD.read_text())
    rules = [{"record": f"clipline:q{i}", "expr": concrete(expr, "demo")}
             for i, (_, expr) in enumerate(dashboard_targets(dash))]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([tool("promtool"), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


def test_prometheus_config_passes_promtool_and_reads_rays_service_discovery_file():
    out = subprocess.run([tool("promtool"), "check", "config", str(PROM_CONFIG)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    (job,) = yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]


def test_a_missing_promtool_fails_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"promtool not found on PATH: apt-get install prometheus"):
        tool("promtool")


def test_pinned_ray_dashboards_are_what_the_installed_ray_generates():
    import ray

    sys.path.insert(0, str(REPO / "dashboards"))
    try:
        from update_ray_dashboards import render
    finally:
        sys.path.pop(0)
    files = render()
    assert sorted(p.name for p in RAY_DASHBOARDS.glob("*.json")) == sorted(files)
    for name, text in files.items():
        assert (RAY_DASHBOARDS / name).read_text() == text, f"{name}: run dashboards/update_ray_dashboards.py"
        assert f"rayVersion:{ray.__version__}" in json.loads(text)["tags"], name
    assert f"ray {ray.__version__}" in (RAY_DASHBOARDS / "README.md").read_text()


def test_recording_without_ray_is_a_no_op_and_wrong_labels_are_refused():
    # in a fresh interpreter: this test process may hold the session's Ray
    code = """if True:
        import ray, pytest
        from pipelines import prometheus as metrics
        m = metrics.StageMetrics("j", "s")
        m.inc(metrics.CRAWL_FETCHED, 3, status="success")
        m.set(metrics.TRAIN_LOSS, 1.5)
        assert not ray.is_initialized() and metrics._made == {}
        with pytest.raises(ValueError, match=r"clipline_crawl_fetched: labels \\[\\] given, expected \\['status'\\]"):
            m.inc(metrics.CRAWL_FETCHED, 1)
        with pytest.raises(TypeError, match="clipline_train_loss is a gauge, not a counter"):
            m.inc(metrics.TRAIN_LOSS, 1)
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


# ---- end to end: a job on Ray, scraped by Prometheus ---------------------------------------------------------


def _get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only: 127.0.0.1 URLs
        return json.loads(r.read())


class Prom:
    """A Prometheus server on 127.0.0.1, queried through its HTTP API."""

    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, Any]]:
        got = _get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert got["status"] == "success", (expr, got)
        return got["data"]["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        got = _get(f"{self.base}/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": expr, "start": start, "end": end, "step": "1s"}))
        assert got["status"] == "success", (expr, got)
        return got["data"]["result"]

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}


def _wait(what: str, check: Any, deadline_s: float) -> Any:
    """Poll `check` until it returns something truthy (a server still starting may refuse or answer garbage)."""
    return wait_until(check, deadline_s, what, interval=0.5, errors=(OSError, ValueError))


def _lines(proc: subprocess.Popen) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _message(q: queue.Queue, key: str, timeout: float, log: Path) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            line = q.get(timeout=max(0.1, end - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            pytest.fail(f"the driver exited before {key!r}:\n{log.read_text()[-4000:]}")
        if line.startswith("{"):
            msg = json.loads(line)
            if key in msg:
                return msg[key]
    pytest.fail(f"no {key!r} from the driver within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _job(tmp_path: Path, web) -> Path:
    from pipelines.demo.server import url_list

    url_list(web.base_url, 120, faults={"missing": 0.1, "html": 0.05}).to_parquet(tmp_path / "urls.parquet")
    return write_job(tmp_path, {
        "crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=40),
        "curate": {"uses": "curate", "needs": ["crawl"],
                   "with": {"rules": ["basic", "dedup_image"], "basic": {"min_side": 32}, "shard_rows": 64}},
        "train": {"uses": "train", "needs": ["curate"],
                  "with": {"model": {"arch": "clip-tiny"}, "workers": 1, "cpus_per_worker": 1, "batch_size": 16,
                           "steps": 4, "warmup": 1, "system_metrics": False, "register": {"enabled": False}}},
        "evaluate": {"uses": "evaluate", "needs": ["train"],
                     "with": {"datasets": [{"name": "held", "builtin": "demo_heldout", "limit": 24}]}},
    }, ray={"address": "local"})


def test_a_job_exports_every_dashboard_metric_to_prometheus_through_ray(tmp_path, web):
    from mlflow import MlflowClient

    from pipelines.contracts import STATUSES

    metrics_port, dashboard_port, prom_port, dashboard_metric_port, autoscaler_metric_port = free_ports(5)
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.test_prometheus", str(_job(tmp_path, web)), str(metrics_port), str(dashboard_port)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
        # the dashboard's and autoscaler's own metrics ports are fixed by default: free ones, beside other Rays
        env={**os.environ, "DASHBOARD_METRIC_PORT": str(dashboard_metric_port),
             "AUTOSCALER_METRIC_PORT": str(autoscaler_metric_port)})
    prometheus = None
    try:
        lines = _lines(driver)
        session = Path(_message(lines, "session", 180, log))
        # the head's dashboard writes the discovery file Prometheus reads, naming this node's metrics port
        sd = session / "prom_metrics_service_discovery.json"
        _wait(f"Ray's service discovery file {sd} to list metrics port {metrics_port}", lambda: sd.exists() and any(
            t.endswith(f":{metrics_port}") for t in json.loads(sd.read_text())[0]["targets"]), 60)

        # Prometheus with our config, pointed at this session's file and scraping every second; Ray names the
        # node by its network address, and the test scrapes the same ports on loopback
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["file_sd_configs"][0] |= {"files": [str(sd)], "refresh_interval": "1s"}
        config["scrape_configs"][0]["relabel_configs"] = [{
            "source_labels": ["__address__"], "regex": r".*:(\d+)", "replacement": "127.0.0.1:$1",
            "target_label": "__address__"}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
        prom = Prom(f"http://127.0.0.1:{prom_port}")
        _wait("Prometheus to scrape Ray's metrics port", lambda: any(
            t["health"] == "up" and t["labels"]["instance"] == f"127.0.0.1:{metrics_port}"
            for t in _get(f"{prom.base}/api/v1/targets")["data"]["activeTargets"]), 60)

        start = time.time()
        driver.stdin.write("go\n")
        driver.stdin.flush()
        done = _message(lines, "done", 420, log)
        crawl, curate, train, evaluate = (done[s] for s in ("crawl", "curate", "train", "evaluate"))
        sel = '{clipline_job="t", stage="%s"}'

        # counters: exactly the manifests' counts, once the last report has been scraped
        statuses = {k: float(v) for k, v in crawl["counts"].items() if k in STATUSES and v}
        assert statuses.get("success", 0) > 50 and statuses.get("failed_to_download", 0) > 0
        _wait("the crawl's rows by status", lambda: prom.by(
            f"sum by (status) (ray_clipline_crawl_rows_total{sel % 'crawl'})", "status") == statuses, 30)
        fetched = prom.by(f"sum by (status) (ray_clipline_crawl_fetched_total{sel % 'crawl'})", "status")
        assert fetched == statuses  # a fresh crawl fetches every row it writes (no refresh, no duplicates)
        dropped = {k.removeprefix("dropped_"): float(v) for k, v in curate["counts"].items()
                   if k.startswith("dropped_") and v}
        assert dropped.get("not_downloaded") == sum(v for k, v in statuses.items() if k != "success")
        assert prom.by(f"sum by (reason) (ray_clipline_curate_dropped_total{sel % 'curate'})", "reason") == dropped
        assert prom.by(f"sum(ray_clipline_curate_rows_in_total{sel % 'curate'})", "") == {
            "": curate["counts"]["rows_in"]}
        assert prom.by(f"sum(ray_clipline_curate_rows_out_total{sel % 'curate'})", "") == {
            "": curate["counts"]["rows_out"]}
        assert prom.by(f"sum(ray_clipline_train_steps_total{sel % 'train'})", "") == {"": 4.0}
        assert prom.by(f"sum(ray_clipline_train_samples_total{sel % 'train'})", "") == {"": train["counts"]["samples"]}

        # gauges: every loss Prometheus saw is one rank 0 logged to MLflow; eval results equal the results JSON
        end = time.time() + 1
        losses = [float(v) for r in prom.query_range(f"ray_clipline_train_loss{sel % 'train'}", start, end)
                  for _, v in r["values"]]
        (run,) = [r for r in mlflow_runs(tmp_path / "store") if r.data.tags.get("clipline.stage") == "train"]
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store'}/mlflow.db")
        logged = {m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
        assert losses and set(losses) <= logged, (losses, logged)
        waits = [float(v) for r in prom.query_range(f"ray_clipline_train_data_wait_fraction{sel % 'train'}",
                                                    start, end) for _, v in r["values"]]
        assert waits and all(0 <= w <= 1 for w in waits)
        want = {}
        for f in Path(evaluate["location"]).glob("*.json"):
            if not f.name.startswith("_"):
                rec = json.loads(f.read_text())
                want |= {(rec["dataset"], rec["task"], k): v for k, v in rec["metrics"].items() if math.isfinite(v)}
        assert {k[2] for k in want} >= {"acc1", "mean_per_class_recall", "image_retrieval_recall@5"}

        def eval_gauges() -> dict[tuple[str, str, str], float] | None:
            got = {(r["metric"]["dataset"], r["metric"]["task"], r["metric"]["metric"]): float(r["value"][1])
                   for r in prom.query(f"last_over_time(ray_clipline_eval_metric{sel % 'evaluate'}[10m])")}
            return got if got.keys() == want.keys() else None

        # the evaluate driver sets them last, moments before the job ends: wait for Ray's next report
        got = _wait("every evaluation result", eval_gauges, 40)
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-9) for k in want)
        assert prom.by(f"last_over_time(ray_clipline_eval_average{sel % 'evaluate'}[10m])", "") == {
            "": pytest.approx(evaluate["metrics"]["average"], abs=1e-9)}

        # every name the dashboard reads was scraped, and each of its queries returns data for this job
        scraped = set(_get(f"{prom.base}/api/v1/label/__name__/values")["data"])
        assert metrics.prometheus_names() <= scraped, metrics.prometheus_names() - scraped
        window = f"{int(time.time() - start) + 30}s"
        # query steps fall on start + k seconds: a sample scraped in the last second before now lies after the
        # last step that is <= now, so the range runs a few seconds past now (as a Grafana panel refreshing does)
        end = time.time() + 5
        for title, expr in dashboard_targets(json.loads(DASHBOARD.read_text())):
            result = prom.query_range(concrete(expr, "t", rate="5s", range_=window), start, end)
            assert result and any(r["values"] for r in result), (title, expr)

        # the pinned Ray dashboards are the ones this Ray wrote into its session
        live = session / "metrics" / "grafana" / "dashboards"
        assert sorted(p.name for p in live.glob("*.json")) == sorted(p.name for p in RAY_DASHBOARDS.glob("*.json"))
        for p in live.glob("*.json"):
            assert p.read_text() == (RAY_DASHBOARDS / p.name).read_text(), p.name
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        if driver.poll() is None:
            driver.stdin.close()  # the driver shuts Ray down and exits
            try:
                driver.wait(timeout=90)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()


def _driver(job_path: str, metrics_port: int, dashboard_port: int) -> None:
    """Start Ray on 127.0.0.1 with a fixed metrics port and the dashboard, report the session directory, run
    the job on "go", report its manifests, and keep Ray up (its metrics agent serving) until stdin closes."""
    import ray

    from pipelines import spec
    from pipelines.runner import run_job

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, _node_ip_address="127.0.0.1", _metrics_export_port=metrics_port,
             log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    print(json.dumps({"session": session}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    outcomes = run_job(spec.load(job_path), progress=False)  # Ray is up: the runner joins it and leaves it up
    print(json.dumps({"done": {o.stage: {"counts": o.manifest.counts, "metrics": o.manifest.metrics,
                                         "location": o.manifest.location} for o in outcomes}}), flush=True)
    sys.stdin.read()
    ray.shutdown()


if __name__ == "__main__":
    _driver(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
