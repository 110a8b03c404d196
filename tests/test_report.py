"""`clipline report`: one self-contained HTML page per job run, checked against the ledger and MLflow."""

from __future__ import annotations

import base64
import html
import io
import re
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from pipelines import manifest as manifests
from pipelines import spec
from pipelines.runner import run_job
from tests.support.browser import artifacts_dir, chromium
from tests.support.cli import run_cli
from tests.support.report_job import SCRIPT

pytestmark = pytest.mark.slow

class _Tags(HTMLParser):
    """Every start tag of a page with its attributes (unescaped, as a browser reads them)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def having(self, attr: str, tag: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags if attr in a and (tag is None or t == tag)]


@pytest.fixture(scope="module")
def job_run(report_job: dict[str, Any]) -> dict[str, Any]:
    return report_job


def _report(job_run: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    return run_cli("report", job_run["path"], *args, timeout=180)


@pytest.fixture(scope="module")
def report(job_run: dict[str, Any]) -> dict[str, Any]:
    done = _report(job_run, "-o", str(job_run["tmp"] / "reports"))
    assert done.returncode == 0, done.stderr
    out = Path(done.stdout.strip())
    assert out == job_run["tmp"] / "reports" / f"report-{job_run['parent']}.html"
    return {"file": out, "html": out.read_text(), "stderr": done.stderr}


def _ledger(m: manifests.Manifest) -> pd.DataFrame:
    return pd.concat([pq.read_table(Path(m.location, e["path"])).to_pandas() for e in m.extra["ledger"]],
                     ignore_index=True)


def test_the_report_shows_the_funnel_images_curves_and_evaluation_of_the_job_run(job_run, report):
    page, tags = report["html"], _Tags(report["html"])
    outcomes = job_run["outcomes"]

    # every stage with its state and fingerprint
    for name, o in outcomes.items():
        assert f"<td>{name}</td>" in page and f"<code>{o.fingerprint}</code>" in page
    assert page.count("<span class='state ran'>ran</span>") == 4

    # the funnel's numbers are the ledger's
    ledger = _ledger(outcomes["curate"].manifest)
    shown = dict(re.findall(r"data-count='?(\w+)'?>(\d+)<", page))
    assert set(shown) == {a["data-count"] for a in tags.having("data-count")}
    dropped = Counter(ledger.loc[~ledger["kept"], "reason"])
    assert int(shown["rows_in"]) == len(ledger) == outcomes["crawl"].manifest.rows == 50
    assert int(shown["rows_out"]) == int(ledger["kept"].sum()) == outcomes["curate"].manifest.rows
    for key, value in shown.items():
        if key.startswith("dropped_"):
            assert int(value) == dropped.get(key.removeprefix("dropped_"), 0), key
    # as build_job planted them; "tiny" fails both caption checks, and its reason is the first, caption_words
    assert {"not_downloaded", "caption_words", "duplicate_image"} <= set(dropped)

    # the grid: each shown row's reason is its ledger reason; every reason the ledger has is shown; thumbnails
    # of downloaded rows are real images
    figures = tags.having("data-uid", "figure")
    assert len(figures) == 48  # the default cap, of 50 rows
    by_uid = ledger.set_index("uid")
    for fig in figures:
        rec = by_uid.loc[fig["data-uid"]]
        assert fig["data-reason"] == ("kept" if rec["kept"] else rec["reason"])
    assert {f["data-reason"] for f in figures} == {"kept", *dropped}
    thumbs = [a["src"] for a in tags.having("src", "img") if a["src"].startswith("data:image/jpeg;base64,")]
    downloaded = sum(by_uid.loc[f["data-uid"], "status"] == "success" for f in figures)
    assert len(thumbs) == downloaded > 30
    assert Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1]))).size == (64, 64)

    # a caption from the web is text, never markup: the page has no script at all
    assert SCRIPT not in page and html.escape(SCRIPT) in page and "<script" not in page.lower()

    # the training curves: an embedded PNG of the train run's metric histories
    (curves,) = [a for t, a in tags.tags if t == "img" and a.get("class") == "curves"]
    png = Image.open(io.BytesIO(base64.b64decode(curves["src"].removeprefix("data:image/png;base64,"))))
    assert png.format == "PNG" and png.size[0] > 800
    assert "train/loss" in page and "train/lr" in page

    # the evaluation table: every eval/<dataset>/<metric> of the evaluate run, with MLflow's value
    client = MlflowClient(f"sqlite:///{job_run['store']}/mlflow.db")
    metrics = client.get_run(outcomes["evaluate"].manifest.mlflow_run_id).data.metrics
    cells = {a["data-metric"]: float(a["data-value"]) for a in tags.having("data-metric")}
    want = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    assert cells == want and "eval/shapes/image_retrieval_recall_at_5" in cells and "eval/digits/acc1" in cells

    # and the page is an artifact of the job's parent run, the same bytes
    assert "report.html" in {a.path for a in client.list_artifacts(job_run["parent"])}
    local = client.download_artifacts(job_run["parent"], "report.html", str(job_run["tmp"]))
    assert Path(local).read_bytes() == report["file"].read_bytes()
    assert f"report of job run {job_run['parent']}" in report["stderr"]


def test_chromium_renders_every_image_and_runs_no_script(job_run, report, request, tmp_path):
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(report["file"].as_uri())
        page.get_by_role("heading", name="Evaluation", exact=True).wait_for()
        broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
        total = page.evaluate("document.images.length")
        shot = artifacts_dir(request, tmp_path) / "report.png"
        page.screenshot(path=shot, full_page=True)
    assert broken == 0 and total > 30 and dialogs == []
    assert shot.stat().st_size > 50_000


def test_a_later_job_run_without_those_stages_says_so_and_bad_run_ids_are_named(job_run):
    # the same job, crawl and curate only: a new job run of cache hits (no Ray), with no train or evaluate stage
    lean = spec.load(job_run["path"])
    doc = dict(lean.raw, stages={k: v for k, v in lean.raw["stages"].items() if k in ("crawl", "curate")})
    lean_path = job_run["tmp"] / "lean.yaml"
    lean_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    outcomes = run_job(spec.load(lean_path), progress=False)
    assert [o.state for o in outcomes] == ["cached", "cached"]

    done = run_cli("report", lean_path, "--images", "5", timeout=180)
    assert done.returncode == 0, done.stderr
    out = Path(done.stdout.strip())
    assert out.parent == job_run["store"] / "rep" / "_reports"  # the default place
    page = out.read_text()
    assert "<span class='state cached'>cached</span>" in page
    assert "This job has no train stage: no training curves." in page
    assert "This job has no evaluate stage: no evaluation table." in page
    assert len(_Tags(page).having("data-uid", "figure")) == 5  # --images 5
    assert "data-count=rows_in>50<" in page  # the funnel of the cached curate output

    # the full job run is still there by id; a stage run's id or an unknown id is refused, naming it
    evaluate_run = job_run["outcomes"]["evaluate"].manifest.mlflow_run_id
    bad = _report(job_run, "--run-id", evaluate_run)
    assert bad.returncode == 2 and f"--run-id {evaluate_run}: not a job run of 'rep'" in bad.stderr
    assert "(it is a stage run)" in bad.stderr
    bad = _report(job_run, "--run-id", "0" * 32)
    assert bad.returncode == 2 and f"--run-id {'0' * 32}: no such run" in bad.stderr
