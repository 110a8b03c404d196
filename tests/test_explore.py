"""`clipline explore`: a page over one curated dataset version, checked against the ledger, the model's own
ranking and MLflow, through its JSON API, its server-rendered pages and headless Chromium.

The job run is test_report's (tests/support/report_job.py: 50 rows of the demo web with a failed download, an
opt-out, a too-short caption, a duplicated image and a caption with markup; curate; one epoch of clip-tiny;
evaluate). Its curate rules score with no model, so the explorer embeds with the model the train stage trained.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipelines import spec, storage
from pipelines.explore import ExploreError, Explorer, cache_dir, open_version, resolve_model
from pipelines.models import ModelRef, create, trained
from pipelines.runner import run_job
from tests.conftest import REPO
from tests.support.browser import artifacts_dir, chromium
from tests.support.cli import cli_env, run_cli
from tests.support.net import free_port, http_ok, wait_until
from tests.support.report_job import SCRIPT

pytestmark = pytest.mark.slow

QUERY = "a red circle"


def _get(base: str, path: str, **query: Any) -> tuple[int, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            body, status, ctype = resp.read(), resp.status, resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        body, status, ctype = exc.read(), exc.code, exc.headers["Content-Type"]
    return status, json.loads(body) if ctype == "application/json" else body


@pytest.fixture(scope="module")
def job(report_job: dict[str, Any]) -> dict[str, Any]:
    """The job run, its ledger (with the crawled url and caption) and the model its train stage wrote."""
    curate = report_job["outcomes"]["curate"].manifest
    ledger = pd.concat([pq.read_table(Path(curate.location) / e["path"]).to_pandas() for e in curate.extra["ledger"]])
    crawl = report_job["outcomes"]["crawl"].manifest
    crawled = pd.concat([pq.read_table(u).to_pandas() for u in crawl.shard_urls()])
    ledger = ledger.merge(crawled[["uid", "url", "caption", "image"]], on="uid").sort_values(["shard", "row"])
    return {**report_job, "ledger": ledger.reset_index(drop=True), "curate": curate,
            "model": trained(report_job["outcomes"]["train"].manifest)}


@pytest.fixture(scope="module")
def explorer(job: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`clipline explore JOB --port P` as a user starts it; yields its base URL and what it printed."""
    port = free_port()
    log = tmp_path_factory.mktemp("explore-log") / "explore.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "explore", str(job["path"]), "--port",
                                 str(port), "--no-progress"], cwd=REPO, env=cli_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{base}/health"), 180, f"clipline explore on {base}/health", interval=0.3,
                   alive=lambda: proc.poll() is None, detail=log.read_text)
        yield {"base": base, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0, log.read_text()  # SIGTERM is a clean stop
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def oracle(job: dict[str, Any]) -> dict[str, float]:
    """Each crawled image's cosine similarity to QUERY under the trained model, computed here in float32 with
    open_clip's own encoders: the ranking the explorer's search must reproduce."""
    from PIL import Image

    net, preprocess, tokenizer = create(job["model"])
    ok = job["ledger"][job["ledger"]["status"] == "success"]
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in ok["image"]])
        images = torch.nn.functional.normalize(net.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(net.encode_text(tokenizer([QUERY])), dim=-1)[0]
    return dict(zip(ok["uid"], (images @ text).tolist(), strict=True))


def test_the_page_says_what_it_explores_and_a_query_returns_the_models_nearest_rows(job, explorer, oracle):
    printed = explorer["log"].read_text()
    assert "queries and images embedded by the model stage 'train' trained on this version" in printed
    ledger = job["ledger"]
    success = int((ledger["status"] == "success").sum())
    assert f"exploring 50 rows ({int(ledger['kept'].sum())} kept, {success} embedded)" in printed

    status, info = _get(explorer["base"], "/api/info")
    assert status == 200
    assert (info["job"], info["stage"], info["rows"], info["kept"], info["embedded"]) == (
        "rep", "curate", 50, int(ledger["kept"].sum()), success)
    assert info["fingerprint"] == job["curate"].fingerprint and info["digest"] == job["curate"].digest
    dropped = ledger[~ledger["kept"]]["reason"].value_counts()
    assert {r["reason"]: r["rows"] for r in info["reasons"]} == dropped.to_dict()
    assert {"caption_words", "min_side", "aspect_ratio"} <= set(info["scores"])
    assert info["clusters"].startswith("faiss k-means, k=")

    # the nearest rows by the model's own similarity: float16 storage moves a similarity by ~1e-3, so a row may
    # swap with one that close to it, never with one farther
    status, found = _get(explorer["base"], "/api/search", q=QUERY, k=5)
    assert status == 200 and found["query"] == QUERY and found["matching"] == success
    got = [(r["uid"], r["similarity"]) for r in found["rows"]]
    assert len(got) == 5
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    for uid, sim in got:
        assert abs(sim - oracle[uid]) < 3e-3, (uid, sim, oracle[uid])
    fifth = sorted(oracle.values(), reverse=True)[4]
    assert all(oracle[uid] >= fifth - 3e-3 for uid, _ in got)
    top = found["rows"][0]
    row = ledger.set_index("uid").loc[top["uid"]]
    assert (top["caption"], top["url"], top["kept"]) == (row["caption"], row["url"], bool(row["kept"]))
    assert top["scores"]["caption_words"] == row["caption_words"]


def test_filters_narrow_search_and_browse_to_what_the_ledger_says(job, explorer):
    ledger, base = job["ledger"], explorer["base"]
    embedded = ledger["status"] == "success"
    # a query over dropped rows only: every dropped row with an image, none kept
    want = ledger[embedded & ~ledger["kept"]]
    status, found = _get(base, "/api/search", q=QUERY, status="dropped", k=200)
    assert status == 200 and found["matching"] == len(want) > 0
    assert sorted(r["uid"] for r in found["rows"]) == sorted(want["uid"])
    assert all(not r["kept"] and r["reason"] for r in found["rows"])

    # browsing (no query): ledger order, paged; a reason; a score range
    dropped = ledger[~ledger["kept"]]
    status, page1 = _get(base, "/api/search", status="dropped", k=3)
    status, page2 = _get(base, "/api/search", status="dropped", k=3, offset=3)
    assert page1["matching"] == len(dropped)
    assert [r["uid"] for r in page1["rows"] + page2["rows"]] == dropped["uid"].tolist()[:6]
    status, dup = _get(base, "/api/search", reason="duplicate_image", k=200)
    assert [r["uid"] for r in dup["rows"]] == ledger[ledger["reason"] == "duplicate_image"]["uid"].tolist()
    assert dup["matching"] == 1  # build_job planted one duplicated image
    status, wordy = _get(base, "/api/search", score="caption_words", low=9, high=11, k=200)
    want = ledger[(ledger["caption_words"] >= 9) & (ledger["caption_words"] <= 11)]
    assert wordy["matching"] == len(want) > 0
    assert sorted(r["uid"] for r in wordy["rows"]) == sorted(want["uid"])

    # bad requests name the field and what was expected; a uid that is not a row is a 404
    status, bad = _get(base, "/api/search", status="maybe")
    assert status == 400 and bad["error"] == "status: expected all, kept or dropped, got 'maybe'"
    status, bad = _get(base, "/api/search", score="image", low="1")
    assert status == 400 and bad["error"].startswith("score: expected one of image_bytes, caption_words, ")
    assert bad["error"].endswith(", got 'image'")
    status, bad = _get(base, "/api/search", q="x" * 501)
    assert status == 400 and bad["error"] == "q: at most 500 characters, got 501"
    status, bad = _get(base, "/api/search", k=0)
    assert status == 400 and bad["error"] == "k: expected 1 to 200, got 0"
    status, bad = _get(base, "/api/row/nope")
    assert status == 404 and bad["error"].startswith("no row with uid 'nope' in curate@")
    status, page = _get(base, "/row/%3Cscript%3E")
    assert status == 404 and b"<script>" not in page  # not a uid: refused, and never echoed as markup

    # the headers that keep injected markup inert, and a Host that is not this server's: refused (DNS rebinding)
    with urllib.request.urlopen(base + "/", timeout=30) as resp:
        csp, sniff = resp.headers["Content-Security-Policy"], resp.headers["X-Content-Type-Options"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert sniff == "nosniff"
    rebound = urllib.request.Request(base + "/api/info", headers={"Host": f"evil.example:{base.rsplit(':', 1)[1]}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=30)
    assert refused.value.code == 421


def test_a_rows_page_has_its_ledger_record_duplicates_and_the_runs_that_trained_on_it(job, explorer):
    ledger, base = job["ledger"], explorer["base"]
    (copy,) = ledger[ledger["reason"] == "duplicate_image"].itertuples()
    (original,) = ledger[(ledger["sha256"] == copy.sha256) & ledger["kept"]].itertuples()
    status, rec = _get(base, f"/api/row/{copy.uid}")
    assert status == 200
    expected = ledger.set_index("uid").loc[copy.uid].drop(["url", "caption", "image"])
    assert rec["ledger"]["uid"] == copy.uid
    for field, value in expected.items():
        got = rec["ledger"][field]
        if got is None:
            assert pd.isna(value), field
        else:
            assert got == (pytest.approx(value) if isinstance(got, float) else value), field
    assert rec["card"]["reason"] == "duplicate_image" and not rec["card"]["kept"]
    assert {"uid": original.uid, "distance": 0}.items() <= rec["near"][0].items()
    assert rec["near_distance"] == 4  # no near_duplicate rule: the explorer's default
    assert rec["neighbours"][0]["uid"] == original.uid and rec["neighbours"][0]["similarity"] > 0.999
    assert len(rec["neighbours"]) == 8 and rec["semantic_eps"] is None
    # the runs that read this version: the train run, and the evaluate run that read its model
    runs = {r["stage"]: r["run_id"] for r in rec["runs"]}
    outcomes = job["outcomes"]
    assert runs == {"train": outcomes["train"].manifest.mlflow_run_id,
                    "evaluate": outcomes["evaluate"].manifest.mlflow_run_id}

    status, page = _get(base, f"/row/{urllib.parse.quote(copy.uid)}")
    text = page.decode()
    assert status == 200 and "<p class=decision data-kept='false'>dropped: duplicate_image</p>" in text
    assert "<td data-field='reason'>duplicate_image</td>" in text
    # the copy's caption is the web's markup: escaped, never markup
    assert copy.caption == SCRIPT and SCRIPT not in text
    assert html.escape(SCRIPT, quote=True) in text
    assert f"data-run='{outcomes['train'].manifest.mlflow_run_id}'" in text
    status, page = _get(base, f"/row/{urllib.parse.quote(original.uid)}")
    assert status == 200 and "<p class=decision data-kept='true'>kept</p>" in page.decode()


def test_clusters_count_every_embedded_row_and_its_drops(job, explorer):
    status, clusters = _get(explorer["base"], "/api/clusters")
    ledger = job["ledger"].set_index("uid")
    assert status == 200 and len(clusters) >= 2
    assert sum(c["size"] for c in clusters) == int((ledger["status"] == "success").sum())
    members: dict[int, list[str]] = {}
    for c in clusters:
        sample = [s["uid"] for s in c["sample"]]
        assert 1 <= len(sample) <= min(8, c["size"])
        members[c["cluster"]] = sample
        status, rec = _get(explorer["base"], f"/api/row/{sample[0]}")
        assert rec["cluster"] == c["cluster"]
    # each cluster's size and dropped rows are its members' ledger rows: every embedded row's record names its
    # cluster
    sizes: dict[int, int] = {}
    drops: dict[int, int] = {}
    for uid in ledger.index[ledger["status"] == "success"]:
        status, rec = _get(explorer["base"], f"/api/row/{uid}")
        sizes[rec["cluster"]] = sizes.get(rec["cluster"], 0) + 1
        drops[rec["cluster"]] = drops.get(rec["cluster"], 0) + int(not ledger.loc[uid, "kept"])
    assert {c["cluster"]: c["size"] for c in clusters} == sizes
    assert {c["cluster"]: c["dropped"] for c in clusters} == drops
    for c in clusters:
        assert c["drop_rate"] == round(c["dropped"] / c["size"], 4)
    status, page = _get(explorer["base"], "/clusters")
    assert page.decode().count("<section class=cluster") == len(clusters)


def test_a_second_start_reads_the_cached_index_and_an_embed_stage_is_reused(job, explorer, tmp_path):
    version = open_version(spec.load(job["path"]))
    ref, _ = resolve_model(version)
    where = Path(cache_dir(version, ref))
    files = {p.name: p.stat().st_mtime_ns for p in where.iterdir()}
    assert set(files) == {"meta.json", "vectors.parquet", "index.faiss"}
    first = Explorer(version, ref, "test", progress=False)
    assert first.index.cached and first.index.computed == len(first.index.positions)
    assert {p.name: p.stat().st_mtime_ns for p in where.iterdir()} == files
    # had semantic_dedup (with this model) decided with eps 0.5: a neighbour in the row's cluster above 0.5 is
    # marked, one in another cluster is not; the record stays JSON
    first.semantic_eps = 0.5
    uid = first.rows["uid"].iloc[int(first.index.positions[0])]
    rec = json.loads(json.dumps(first.record(uid)))
    assert len(rec["neighbours"]) == 8 and uid not in {n["uid"] for n in rec["neighbours"]}
    cluster_of = dict(zip(first.rows["uid"].iloc[first.index.positions], first.index.clusters.tolist(), strict=True))
    for n in rec["neighbours"]:
        assert n["semantic_duplicate"] == (cluster_of[n["uid"]] == rec["cluster"] and n["similarity"] > 0.5), n

    # an embed stage over the same crawl with the same model: its embeddings are read, none computed (the job
    # with the stage logs to another experiment, so the report's "latest job run" stays test_report's, and has no
    # train stage, so no other run reads the curated version)
    lean = spec.load(job["path"])
    doc = dict(lean.raw, tracking={"experiment": "explore-embed"})
    doc["stages"] = {"crawl": lean.raw["stages"]["crawl"], "curate": lean.raw["stages"]["curate"], "embed": {"uses": "embed", "needs": ["crawl"], "with": {
        "model": {"arch": ref.arch, "checkpoint": ref.checkpoint}, "embeddings": ["image"]}}}
    path = tmp_path / "with-embed.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    outcomes = {o.stage: o.state for o in run_job(spec.load(path), progress=False)}
    assert outcomes == {"crawl": "cached", "curate": "cached", "embed": "ran"}
    shutil.rmtree(where)
    version = open_version(spec.load(path))
    again = Explorer(version, ref, "test", progress=False)
    assert not again.index.cached and again.index.computed == 0
    assert again.index.reused == len(first.index.positions)
    order = np.argsort(first.index.positions)
    assert np.array_equal(np.sort(again.index.positions), first.index.positions[order])
    assert np.allclose(again.index.vectors[np.argsort(again.index.positions)], first.index.vectors[order], atol=2e-3)
    assert storage.exists(str(where / "meta.json"))


def test_what_cannot_be_explored_is_named(job, tmp_path):
    job_spec = spec.load(job["path"])
    with pytest.raises(ExploreError, match="--stage crawl: explore reads a curate stage's ledger .* 'crawl' uses crawl"):
        open_version(job_spec, "crawl")
    with pytest.raises(ExploreError, match=r"job 'rep' has no stage 'nope' \(its stages: crawl, curate, train"):
        open_version(job_spec, "nope")
    version = open_version(job_spec)
    assert resolve_model(version, "clip-tiny")[0] == ModelRef(arch="clip-tiny")
    assert resolve_model(version, "models:/clip@prod")[0] == ModelRef(model_uri="models:/clip@prod")
    assert resolve_model(version, "train")[0] == job["model"]
    with pytest.raises(ExploreError, match="--model evaluate: stage 'evaluate' uses evaluate; name a train or embed"):
        resolve_model(version, "evaluate")
    with pytest.raises(ExploreError, match=r"--checkpoint needs --model ARCH"):
        resolve_model(version, None, "w.safetensors")

    # the same job on an empty storage: nothing to explore yet, and the command to run
    done = run_cli("explore", job["path"], "--storage", str(tmp_path / "empty"), "--port", str(free_port()))
    assert done.returncode == 2
    assert (f"stage 'curate' of job 'rep' has no output for this spec yet: run `clipline run {job['path']} "
            "--until curate` first") in done.stderr
    # a port in use is refused before any work (a listener on it: this test's socket)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        done = run_cli("explore", job["path"], "--port", str(s.getsockname()[1]))
    assert done.returncode == 3 and "the port is in use; pick another --port" in done.stderr


def test_chromium_searches_filters_and_opens_a_row(job, explorer, request, tmp_path):
    ledger = job["ledger"]
    embedded = int((ledger["status"] == "success").sum())
    dropped_embedded = int(((ledger["status"] == "success") & ~ledger["kept"]).sum())
    shots = artifacts_dir(request, tmp_path)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(explorer["base"] + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#title").text_content() == "rep / curate"
        assert int(page.locator("#summary").get_attribute("data-matching")) == 50  # browse: every row

        page.fill("#q", QUERY)
        page.press("#q", "Enter")
        # (the page's Content-Security-Policy forbids eval, so waits are on attributes the page sets, not
        # wait_for_function)
        page.wait_for_selector(f"#summary[data-query='{QUERY}'] ~ #grid[data-loaded='1']")
        cards = page.locator("figure.card")
        assert cards.count() == min(48, embedded)
        broken = page.evaluate("[...document.images].filter(i => i.naturalWidth === 0).length")
        assert broken == 0 and page.evaluate("document.images.length") == cards.count()
        first_uid = cards.first.get_attribute("data-uid")
        status, api = _get(explorer["base"], "/api/search", q=QUERY, k=48)
        assert first_uid == api["rows"][0]["uid"]
        page.screenshot(path=shots / "explore-query.png", full_page=True)

        page.select_option("#status", "dropped")
        page.wait_for_selector(f"#summary[data-matching='{dropped_embedded}'] ~ #grid[data-loaded='1']")
        assert cards.count() == dropped_embedded
        assert set(cards.evaluate_all("cs => cs.map(c => c.dataset.kept)")) == {"false"}
        reason = cards.first.get_attribute("data-reason")
        uid = cards.first.get_attribute("data-uid")
        assert reason == ledger.set_index("uid").loc[uid, "reason"]

        cards.first.locator("a").first.click()
        page.wait_for_url(f"**/row/{urllib.parse.quote(uid)}")
        assert page.locator("p.decision").text_content() == f"dropped: {reason}"
        page.screenshot(path=shots / "explore-row.png", full_page=True)
        # "more" pages what the grid shows, not what the form was edited to since
        page.goto(explorer["base"] + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#k", "20")
        page.press("#q", "Enter")
        page.wait_for_selector("#summary[data-shown='20'] ~ #grid[data-loaded='1']")
        page.fill("#q", QUERY)  # typed, not submitted
        page.click("#more")
        page.wait_for_selector("#summary[data-shown='40'][data-query=''] ~ #grid[data-loaded='1']")
        assert cards.evaluate_all("cs => cs.map(c => c.dataset.uid)") == ledger["uid"].tolist()[:40]
        page.fill("#q", "")

        # the markup caption shows as text in the grid, and ran nothing
        page.fill("#k", "200")
        page.press("#q", "Enter")
        page.wait_for_selector("#summary[data-shown='50'] ~ #grid[data-loaded='1']")
        assert page.locator(".cap", has_text="<script>alert('owned')</script>").count() == 1
    assert dialogs == []
    assert (shots / "explore-query.png").stat().st_size > 20_000


def test_past_the_exact_size_the_index_is_hnsw_and_finds_what_exact_search_finds(monkeypatch):
    import faiss

    from pipelines.explore import index as explore

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = explore._faiss_index(x)
    monkeypatch.setattr(explore, "EXACT_ROWS", 1000)
    approx = explore._faiss_index(x)
    assert isinstance(exact, faiss.IndexFlatIP) and isinstance(approx, faiss.IndexHNSWFlat)
    queries = x[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    _, want = exact.search(queries, 10)
    _, got = approx.search(queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall > 0.95, recall
    # it survives the cache's serialisation
    again = faiss.deserialize_index(faiss.serialize_index(approx))
    assert np.array_equal(again.search(queries, 10)[1], got)


def test_semantic_dedup_clusters_are_used_where_it_made_them():
    from pipelines.explore import index as explore

    rows = pd.DataFrame({"semantic_cluster": pd.array([3, None, 5, 3], dtype="Int32")})
    x = np.eye(4, dtype=np.float32)
    clusters, source = explore._clusters(rows, np.arange(4), x)
    assert clusters.tolist() == [3, explore.UNCLUSTERED, 5, 3] and source.startswith("semantic_dedup's k-means")
    rows = pd.DataFrame({"semantic_cluster": pd.array([None] * 4, dtype="Int32")})
    clusters, source = explore._clusters(rows, np.arange(4), x)
    assert source == "faiss k-means, k=2" and sorted(set(clusters.tolist())) == [0, 1]
