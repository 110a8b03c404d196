"""The availability report: success rate by status, error class and host, and link rot across a refresh chain.

Crafted crawl outputs (Parquet shards and manifests written here) pin the numbers; one small crawl of the
loopback web checks what the crawl stage logs to MLflow and what `clipline report` shows."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipelines import availability, manifest, spec
from pipelines.contracts import CRAWLED, uid
from pipelines.demo.server import url_list
from pipelines.report import StageRun, build_report, section_availability
from pipelines.runner import run_job
from tests.conftest import crawl_stage, write_job

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# markup for the page, and "$^^$" that matplotlib would parse as (broken) math in the plot's host labels
HOSTILE = "http://x$^^$<script>alert(1)</script>.example/a.jpg"


def _row(url: str | None, status: str, error: str | None = None, caption: str = "c",
         at: dt.datetime | None = T0) -> dict[str, Any]:
    return {"uid": uid(url, caption), "url": url, "caption": caption, "status": status, "error_class": error,
            "fetched_at": at if status not in ("invalid", "duplicate") else None, "source": "urls.parquet",
            "source_row": 0, "image": b"\xff" * 10 if status == "success" else None}


def write_version(directory: Path, shards: list[list[dict[str, Any]]], version: int = 1,
                  refreshed_from: manifest.Manifest | None = None) -> manifest.Manifest:
    """A crawl output as the crawl stage writes it: crawled-schema shards and a manifest (counts as the stage's)."""
    directory.mkdir(parents=True)
    entries, status = [], pd.Series(dtype=int)
    for i, rows in enumerate(shards):
        table = pa.Table.from_pylist(rows, schema=CRAWLED)
        path = directory / f"part-{i:05d}.parquet"
        pq.write_table(table, path)
        entries.append({"path": path.name, "rows": len(rows), "bytes": path.stat().st_size, "sha256": "0" * 64})
        status = status.add(pd.Series([r["status"] for r in rows]).value_counts(), fill_value=0)
    link = ({"location": refreshed_from.location, "digest": refreshed_from.digest, "version": version - 1}
            if refreshed_from else None)
    m = manifest.Manifest(job="t", stage="crawl", uses="crawl", fingerprint=f"{version:016x}", code_version="x",
                          params={}, inputs={}, shards=entries, counts={k: int(v) for k, v in status.items()},
                          metrics={}, started_at="2026-01-01T00:00:00.000+00:00",
                          finished_at="2026-01-01T00:00:01.000+00:00",
                          extra={"version": version, "refreshed_from": link})
    manifest.write(str(directory), m)
    return m


def test_one_version_by_status_error_class_and_top_hosts_with_an_other_line(tmp_path):
    a = [_row(f"https://A.example/{i}", "success") for i in range(6)] + [
        _row("https://a.example/404", "failed_to_download", "http_4xx"),
        _row("https://user@a.example:8443/x?y", "failed_to_download", "http_4xx")]  # userinfo, port, case
    b = [_row(f"http://b.example/{i}", "failed_to_download", "timeout") for i in range(3)] + [
        _row("http://b.example/ok", "success"), _row("http://b.example/big", "failed_to_resize", "too_large")]
    rest = [_row("http://[2001:db8::1]/v6", "success"), _row("http://c.example/x", "failed_to_download", "http_5xx"),
            _row(None, "invalid", "invalid_url"), _row("ftp:/nohost", "invalid", "invalid_url"),
            _row("https://a.example/0", "duplicate", "duplicate", caption="c"),  # its host counts too
            _row(HOSTILE, "failed_to_download", "dns")]
    m = write_version(tmp_path / "v1", [a + b[:2], b[2:] + rest])

    rep = availability.of_manifest(m, top=2)
    assert rep["rows"] == 19 and rep["success"] == 8 and rep["success_rate"] == 8 / 19
    assert {k: v["rows"] for k, v in rep["by_status"].items()} == {
        "success": 8, "failed_to_download": 7, "invalid": 2, "failed_to_resize": 1, "duplicate": 1}
    assert list(rep["by_error_class"]) == ["timeout", "http_4xx", "invalid_url", "dns", "duplicate", "http_5xx",
                                           "too_large"]  # by rows, ties by name
    assert {k: v["rows"] for k, v in rep["by_error_class"].items()} == {
        "http_4xx": 2, "timeout": 3, "invalid_url": 2, "dns": 1, "duplicate": 1, "http_5xx": 1, "too_large": 1}
    assert rep["by_error_class"]["timeout"]["share"] == 3 / 19
    hosts = rep["hosts"]
    assert hosts["distinct"] == 6 and hosts["top_n"] == 2
    assert hosts["top"] == [
        {"host": "a.example", "rows": 9, "success": 6, "success_rate": 6 / 9, "main_error_class": "http_4xx",
         "main_error_rows": 2},
        {"host": "b.example", "rows": 5, "success": 1, "success_rate": 1 / 5, "main_error_class": "timeout",
         "main_error_rows": 3}]
    assert hosts["other"] == {"host": "(other hosts)", "hosts": 4, "rows": 5, "success": 1, "success_rate": 1 / 5,
                              "main_error_class": "invalid_url", "main_error_rows": 2}
    assert rep["versions"] == [{"version": 1, "location": str(tmp_path / "v1"), "rows": 19, "success": 8,
                                "success_rate": 8 / 19, "present": True}]
    assert rep["link_rot"] == [] and rep["note"].startswith("only one version")

    # every host with top=20, the no-host line among them; the default top is 20
    every = {h["host"]: h["rows"] for h in availability.of_manifest(m)["hosts"]["top"]}
    assert every == {"a.example": 9, "b.example": 5, "(no host)": 2, "[2001:db8::1]": 1, "c.example": 1,
                     "x$^^$<script>alert(1)<": 1}

    # the report's section: the same numbers, the web's hostnames escaped, the plot inline
    page = section_availability(None, StageRun("crawl", "crawl", None, m))
    assert "<script" not in page and "<tr data-host='x$^^$&lt;script&gt;alert(1)&lt;'>" in page
    page = section_availability(None, StageRun("crawl", "crawl", None, m), top=2)
    assert f"data-success-rate='{8 / 19!r}'" in page and "<tr data-error='timeout'><td>timeout</td>" in page
    assert re.search(r"<tr data-host='\(other hosts\)'><td>\(other hosts\) \(4 hosts\)</td><td class=n>5</td>", page)
    assert "only one version" in page and "<img class=availability alt='availability' src='data:image/png;base64," in page
    assert "(mlfoundations/datacomp#3)" in page  # the note on healthy rates names its sources


def test_link_rot_counts_only_re_fetched_successes(tmp_path):
    later = T0 + dt.timedelta(days=30)
    v1 = write_version(tmp_path / "v1", [
        [_row("http://h.example/kept", "success"), _row("http://h.example/rotted", "success"),
         _row("http://h.example/rechecked", "success"), _row("http://h.example/dropped", "success")],
        [_row("http://h.example/flaky", "failed_to_download", "timeout"),
         _row("http://g.example/gone", "success")]])
    v2 = write_version(tmp_path / "v2", [
        [_row("http://h.example/kept", "success"),  # copied: same fetched_at
         _row("http://h.example/rotted", "failed_to_download", "http_4xx", at=later),
         _row("http://h.example/rechecked", "success", at=later),
         _row("http://h.example/flaky", "success", at=later),  # a retried failure that now works: not rot
         _row("http://g.example/gone", "failed_to_download", "dns", at=later),
         _row("http://h.example/new", "success", at=later)]], version=2, refreshed_from=v1)
    rep = availability.of_manifest(v2)
    assert [(v["version"], v["success_rate"]) for v in rep["versions"]] == [(1, 5 / 6), (2, 4 / 6)]
    (rot,) = rep["link_rot"]
    assert rot == {"from_version": 1, "to_version": 2, "succeeded_before": 5, "rows_reused": 1,
                   "rows_refetched": 3, "refetched_still_success": 1, "refetched_now_failing": 2,
                   "now_failing_by_error_class": {"dns": 1, "http_4xx": 1}, "link_rot_rate": 2 / 3,
                   "dropped_from_list": 1}
    assert "note" not in rep
    page = section_availability(None, StageRun("crawl", "crawl", None, v2))
    assert "<tr data-rot='1-2'><td>v1 &rarr; v2</td>" in page and "dns 1, http_4xx 1" in page

    # a third version whose chain reaches v1; with v1 deleted the chain says so and stops
    v3 = write_version(tmp_path / "v3", [[_row("http://h.example/kept", "success")]], version=3, refreshed_from=v2)
    assert [r["from_version"] for r in availability.of_manifest(v3, rot_pairs=5)["link_rot"]] == [2, 1]
    (tmp_path / "v1" / "_manifest.json").unlink()
    rep = availability.of_manifest(v3, rot_pairs=5)
    assert [(v["version"], v["present"]) for v in rep["versions"]] == [(1, False), (2, True), (3, True)]
    assert [r["from_version"] for r in rep["link_rot"]] == [2] and rep["note"].startswith("version 1 (")


@pytest.mark.slow  # Ray and the loopback web
def test_the_crawl_logs_availability_to_mlflow_and_the_report_shows_it(tmp_path, web, ray_local):
    urls = tmp_path / "urls.parquet"
    first = url_list(web.base_url, 20, seed=0, faults={"missing": 0.1, "error": 0.1})
    first[["url", "caption"]].to_parquet(urls)
    path = write_job(tmp_path, {"crawl": crawl_stage(str(urls), samples_per_shard=10)}, name="avail")
    (o1,) = run_job(spec.load(path), progress=False)
    grown = url_list(web.base_url, 24, seed=0, faults={"missing": 0.1, "error": 0.1})
    grown[["url", "caption"]].to_parquet(urls)
    (o2,) = run_job(spec.load(path), progress=False)
    assert o2.manifest.extra["version"] == 2

    client = MlflowClient(f"sqlite:///{tmp_path}/store/mlflow.db")
    run_id = o2.manifest.mlflow_run_id
    assert {"crawl_availability.json", "crawl_availability.png", "crawl_status.png"} <= {
        a.path for a in client.list_artifacts(run_id)}
    with open(client.download_artifacts(run_id, "crawl_availability.json", str(tmp_path))) as f:
        rep = json.load(f)
    kinds = grown["kind"].value_counts()
    ok = int(kinds["img"])
    assert rep["rows"] == 24 and rep["success"] == ok and rep["success_rate"] == ok / 24
    assert {k: v["rows"] for k, v in rep["by_error_class"].items()} == {
        "http_4xx": int(kinds["missing"]), "http_5xx": int(kinds["error"])}
    (host,) = rep["hosts"]["top"]
    assert host["host"] == "127.0.0.1" and host["rows"] == 24 and host["success"] == ok
    # the refresh copied v1's successes: none re-fetched, so no link rot can be seen, and it says so
    (rot,) = rep["link_rot"]
    v1_ok = int(first["kind"].eq("img").sum())
    assert (rot["succeeded_before"], rot["rows_reused"], rot["rows_refetched"]) == (v1_ok, v1_ok, 0)
    assert rot["link_rot_rate"] is None
    metrics = client.get_run(run_id).data.metrics
    assert metrics["crawl/success_rate"] == ok / 24 and metrics["crawl/hosts"] == 1
    assert metrics["crawl/link_rot_rows_reused"] == v1_ok and metrics["crawl/link_rot_rows_refetched"] == 0

    out, _ = build_report(spec.load(path), out_dir=str(tmp_path / "reports"))
    page = Path(out).read_text()
    section = page[page.index("<h2 id=availability>"):page.index("<h2 id=funnel>")]
    assert f"data-success-rate='{ok / 24!r}'" in section and "<tr data-host='127.0.0.1'>" in section
    assert "<tr data-rot='1-2'>" in section and "src='data:image/png;base64," in section
    assert "host (top 20 by rows)" in section

    # another number of hosts than the run logged: computed again from the shards, the same numbers
    out, _ = build_report(spec.load(path), out_dir=str(tmp_path / "reports"), hosts=5)
    again = Path(out).read_text()
    again = again[again.index("<h2 id=availability>"):again.index("<h2 id=funnel>")]
    assert "host (top 5 by rows)" in again and f"data-success-rate='{ok / 24!r}'" in again
    assert "<tr data-rot='1-2'>" in again
