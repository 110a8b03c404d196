"""The crawl on the open web's terms: malformed and duplicate rows, incremental refresh, failing shards,
a worker killed mid-crawl. Local Ray, the loopback web, Parquet on disk."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipelines import spec, storage
from pipelines.cli import main
from pipelines.demo.server import DemoServer
from pipelines.runner import StageFailed, plan, run_job
from tests.conftest import crawl_stage, read_output, write_job
from tests.support.net import wait_until
from tests.support.optoutweb import OptoutWeb

pytestmark = pytest.mark.slow


def rows_of(web: DemoServer, kinds: list[tuple[str, int]]) -> pd.DataFrame:
    return pd.DataFrame({"url": [web.url(k, i) for k, i in kinds],
                         "caption": [f"item {i} of a list that grows" for _, i in kinds]})


def test_malformed_rows_are_kept_and_duplicates_crawled_once(tmp_path, web, ray_local):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    img = web.url("img", 30000)
    pd.DataFrame({"url": [img, img, img, None, "ftp://127.0.0.1/x.jpg", web.url("img", 30001), web.url("img", 30002)],
                  "caption": ["a red square", "a red square", "a blue circle", "no url", "ftp", "", "   "]}
                 ).to_json(a, orient="records", lines=True)
    pd.DataFrame({"url": [img, web.url("img", 30003), web.url("busy", 30004)],  # busy: one 429, Retry-After 1
                  "caption": ["a red square", "a green star", "a host that asks to wait"]}).to_csv(b, index=False)
    job = spec.load(write_job(tmp_path, {"crawl": crawl_stage([str(a), str(b)], samples_per_shard=4)}))
    (o,) = run_job(job, progress=False)
    out = read_output(o.manifest).sort_values(["source", "source_row"])
    got = list(zip(out["source"].str.rsplit("/", n=1).str[-1], out["source_row"], out["status"],
                   out["error_class"].fillna("-"), strict=True))
    assert got == [
        ("a.jsonl", 0, "success", "-"), ("a.jsonl", 1, "duplicate", "duplicate"), ("a.jsonl", 2, "success", "-"),
        ("a.jsonl", 3, "invalid", "invalid_url"), ("a.jsonl", 4, "invalid", "invalid_url"),
        ("a.jsonl", 5, "invalid", "missing_caption"), ("a.jsonl", 6, "invalid", "missing_caption"),
        ("b.csv", 0, "duplicate", "duplicate"), ("b.csv", 1, "success", "-"), ("b.csv", 2, "success", "-"),
    ]
    dups = out[out["status"] == "duplicate"]
    assert set(dups["error_message"]) == {f"same url and caption as row 0 of {a}"}
    assert dups["image"].isna().all() and (dups["attempts"] == 0).all()
    assert web.hits["/img/30000"] == 2  # once per distinct caption, not once per row
    assert "/img/30001" not in web.hits and "/img/30002" not in web.hits  # blank captions: not fetched
    assert o.manifest.counts["duplicate"] == 2 and o.manifest.counts["rows_new"] == 8
    assert o.manifest.metrics["http_retries"] == 1 and web.hits["/busy/30004"] == 2  # waited, then succeeded


def test_datacomp_and_laion5b_columns_pass_through(tmp_path, web, ray_local):
    frame = rows_of(web, [("img", 31000 + i) for i in range(6)])
    datacomp = pd.DataFrame({"uid": [f"{i:032x}" for i in range(6)], "url": frame["url"], "text": frame["caption"],
                             "original_width": 96, "clip_b32_similarity_score": 0.31})
    laion5b = pd.DataFrame({"URL": frame["url"], "TEXT": frame["caption"], "WIDTH": 96.0, "HEIGHT": 96.0,
                            "similarity": 0.3, "hash": range(6), "punsafe": 0.01, "pwatermark": 0.2})
    datacomp.to_parquet(tmp_path / "pool.parquet")
    laion5b.to_parquet(tmp_path / "laion5b.parquet")
    job = spec.load(write_job(tmp_path, {
        "datacomp": crawl_stage(str(tmp_path / "pool.parquet"), passthrough=["uid", "clip_b32_similarity_score"]),
        "laion5b": crawl_stage(str(tmp_path / "laion5b.parquet"), passthrough=["hash", "punsafe", "pwatermark"]),
    }))
    dc, l5 = (read_output(o.manifest).sort_values("source_row") for o in run_job(job, progress=False))
    assert list(dc["source_uid"]) == list(datacomp["uid"]) and (dc["uid"] != dc["source_uid"]).all()
    assert list(dc["clip_b32_similarity_score"]) == [0.31] * 6 and set(dc["status"]) == {"success"}
    assert list(l5["hash"]) == list(range(6)) and list(l5["pwatermark"]) == [0.2] * 6
    assert list(l5["caption"]) == list(frame["caption"]) and set(l5["status"]) == {"success"}


def test_refresh_fetches_only_new_and_transiently_failed_rows(tmp_path, web, ray_local, capsys):
    v1 = [("img", 32000 + i) for i in range(6)] + [("missing", 32010), ("missing", 32011), ("error", 32020),
                                                    ("error", 32021), ("optout", 32030)]
    urls = tmp_path / "urls.parquet"
    rows_of(web, v1).to_parquet(urls)
    path = write_job(tmp_path, {"crawl": crawl_stage(str(urls), samples_per_shard=5, max_attempts=2)})
    (o1,) = run_job(spec.load(path), progress=False)
    assert {k: o1.manifest.counts[k] for k in ("rows_new", "rows_retried", "rows_reused")} == {
        "rows_new": 11, "rows_retried": 0, "rows_reused": 0}
    assert o1.manifest.extra["version"] == 1 and o1.manifest.extra["refreshed_from"] is None

    v2 = v1 + [("img", 32040), ("img", 32041), ("img", 32042), ("error", 32022)]  # the list grows
    rows_of(web, v2).to_parquet(urls)
    (o2,) = run_job(spec.load(path), progress=False)
    assert o2.state == "ran" and o2.fingerprint != o1.fingerprint
    counts = o2.manifest.counts
    assert (counts["rows_new"], counts["rows_retried"], counts["rows_reused"]) == (4, 2, 9)
    hits = {f"/{k}/{i}": web.hits.get(f"/{k}/{i}") for k, i in v2}
    assert hits == {**{f"/{k}/{i}": 1 for k, i in v2}, "/error/32020": 2, "/error/32021": 2}
    before, after = (read_output(o.manifest).set_index("uid") for o in (o1, o2))
    assert len(after) == len(v2) and after.index.is_unique
    reused = before.index[before["error_class"] != "http_5xx"]
    assert (after.loc[reused, ["sha256", "fetched_at", "status"]].fillna("-")
            == before.loc[reused, ["sha256", "fetched_at", "status"]].fillna("-")).all().all()
    assert after.set_index("url").loc[web.url("error", 32020), "attempts"] == 2
    assert o2.manifest.extra["version"] == 2
    assert o2.manifest.extra["refreshed_from"]["location"] == o1.manifest.location

    assert main(["status", str(path)]) == 0
    assert "rows_new=4, rows_retried=2, rows_reused=9" in capsys.readouterr().out

    v3 = v2 + [("img", 32043)]
    rows_of(web, v3).to_parquet(urls)
    (o3,) = run_job(spec.load(path), progress=False)
    # 32020 and 32021 used their max_attempts (2); 32022 failed once and is retried
    assert (o3.manifest.counts["rows_new"], o3.manifest.counts["rows_retried"]) == (1, 1)
    assert (web.hits["/error/32020"], web.hits["/error/32022"], web.hits["/img/32000"]) == (2, 2, 1)

    (o4,) = run_job(spec.load(path, ["stages.crawl.with.image_size=40"]), progress=False)
    assert o4.manifest.counts["rows_reused"] == 0  # other image parameters: nothing reused
    assert web.hits["/img/32000"] == 2


def _block_part(job: Any, part: str) -> Path:
    """Put a directory where a shard's output file must go: that shard's task fails on every try."""
    (row,) = plan(job)
    blocker = Path(row["path"], part)
    blocker.mkdir(parents=True)
    (blocker / "x").write_text("in the way")
    return blocker


def test_a_failing_shard_is_named_and_the_rest_kept(tmp_path, web, ray_local):
    rows_of(web, [("img", 33000 + i) for i in range(15)]).to_parquet(tmp_path / "urls.parquet")
    path = write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=5,
                                                     shard_retries=1)})
    job = spec.load(path)
    blocker = _block_part(job, "part-00001.parquet")
    with pytest.raises(StageFailed, match=r"1 shard\(s\) failed after 1 retries each, more than max_failed_shards "
                                          r"0: shard 1 \(input rows 5-9\): \w*Error"):
        run_job(job, progress=False)
    assert sorted(p.name for p in blocker.parent.glob("part-*.parquet") if p.is_file()) == [
        "part-00000.parquet", "part-00002.parquet"]
    assert not (blocker.parent / "_manifest.json").exists()

    for f in blocker.iterdir():
        f.unlink()
    blocker.rmdir()
    (o,) = run_job(job, progress=False)  # resumes: only shard 1 is crawled
    assert o.manifest.metrics["shards_resumed"] == 2 and o.manifest.rows == 15
    # shard 1's rows: its first try, its one retry, and the resumed run; every other row once
    assert [web.hits[f"/img/{33000 + i}"] for i in range(15)] == [1] * 5 + [3] * 5 + [1] * 5

    lenient = spec.load(path, ["stages.crawl.with.max_failed_shards=1"])
    _block_part(lenient, "part-00001.parquet")
    (o,) = run_job(lenient, progress=False)
    out = read_output(o.manifest)
    assert len(out) == 15 and o.manifest.counts["shards_failed"] == 1 and o.manifest.extra["failed_shards"] == [1]
    failed = out[out["error_class"] == "shard_failed"]
    assert sorted(failed["source_row"]) == [5, 6, 7, 8, 9] and set(failed["status"]) == {"failed_to_download"}
    assert [s["path"] for s in o.manifest.shards] == ["part-00000.parquet", "part-00001-failed.parquet",
                                                      "part-00002.parquet"]


def _crawl_workers() -> list[int]:
    import psutil

    # this test process's own: Ray's processes descend from the driver that started them, and another test
    # process (the suite runs on two) has workers of its own
    return [p.pid for p in psutil.Process().children(recursive=True)
            if " ".join(_cmdline(p)).startswith("ray::crawl_shard")]


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except psutil.Error:  # gone, or a zombie, since the listing
        return []


def test_worker_killed_mid_crawl_loses_and_duplicates_nothing(tmp_path, ray_local):
    with DemoServer(port=0, seed=0, slow_seconds=60) as web:
        kinds = [("img", 34000 + i) for i in range(20)]
        kinds[7] = ("slow", 34007)  # holds its shard's task until the test has killed it
        rows_of(web, kinds).to_parquet(tmp_path / "urls.parquet")
        job = spec.load(write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"),
                                                                   samples_per_shard=10, timeout=30)}))
        outcome: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: outcome.update(result=run_job(job, progress=False)))
        runner.start()

        def kill_the_crawl_workers() -> list[int]:
            with web.lock:
                waiting = web.hits.get("/slow/34007", 0) >= 1
            workers = _crawl_workers() if waiting else []
            for pid in workers:  # the one holding the slow request is among them; kill them all
                os.kill(pid, signal.SIGKILL)
            return workers

        wait_until(kill_the_crawl_workers, 120, "the crawl reaching the slow row", interval=0.05,
                   alive=runner.is_alive)
        # Ray reruns the killed task: it asks for the slow row again; then let it answer
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and web.hits.get("/slow/34007", 0) < 2 and runner.is_alive():
            time.sleep(0.05)
        web.release.set()
        runner.join(180)
    assert not runner.is_alive()
    (o,) = outcome["result"]
    out = read_output(o.manifest)
    assert sorted(out["source_row"]) == list(range(20))  # every row exactly once
    assert out["uid"].is_unique and set(out["status"]) == {"success"}
    assert web.hits["/slow/34007"] >= 2  # the shard was redone
    assert json.loads(Path(o.manifest.location, "_manifest.json").read_text())["counts"]["success"] == 20
    assert storage.exists(o.manifest.location)


def test_refresh_starts_from_the_newest_version_when_outputs_finish_in_the_same_instant(tmp_path):
    """CI once saw two refreshes finish within one second: the choice must not fall to glob order."""
    import dataclasses
    import logging

    from pipelines import manifest
    from pipelines.stages.crawl.config import CrawlConfig
    from pipelines.stages.crawl.plan import find_prior

    cfg = CrawlConfig(input="urls.parquet", allow_networks=["127.0.0.0/8"])
    stage_dir = tmp_path / "job" / "crawl"
    # a-: the older version, listed first; b-: the newer; c-: newest but made with other image parameters
    for name, version in (("a000000000000000", 1), ("b000000000000000", 2), ("c000000000000000", 3)):
        params = dataclasses.asdict(cfg) | ({"image_size": 40} if name.startswith("c") else {})
        manifest.write(str(stage_dir / name), manifest.Manifest(
            job="job", stage="crawl", uses="crawl", fingerprint=name, code_version="x", params=params, inputs={},
            shards=[], counts={}, metrics={}, started_at="2026-01-01T00:00:00.000+00:00",
            finished_at="2026-01-01T00:00:01.000+00:00", extra={"version": version}))
    prior = find_prior(cfg, str(stage_dir / "d000000000000000"), logging.getLogger("test"))
    assert prior is not None and prior.location == str(stage_dir / "b000000000000000") and prior.version == 2


def test_the_crawl_counts_each_opt_out_kind_and_a_refresh_retries_only_an_unreadable_robots_txt(tmp_path, ray_local,
                                                                                                 capsys):
    with OptoutWeb("127.0.0.1") as site, OptoutWeb("127.0.0.2") as down:
        site.serve("User-agent: CCBot\nDisallow: /img/ccbot\n")
        down.serve("", status=503)
        urls = [site.img("ok-1"), site.img("ok-2"), site.img("ccbot-1"), site.img("tdm", tdm_reservation="1"),
                site.img("xrt", X_Robots_Tag="noml"), down.img("later-1"), down.img("later-2")]
        rows = pd.DataFrame({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))]})
        rows.to_csv(tmp_path / "urls.csv", index=False)
        # no error TTL: the second run's worker process must ask the recovered host again
        stage = crawl_stage(str(tmp_path / "urls.csv"), robots_error_ttl=0, samples_per_shard=10)
        path = write_job(tmp_path, {"crawl": stage})
        (first,) = run_job(spec.load(path), progress=False)
        m = first.manifest
        assert {k: m.counts[k] for k in ("success", "opted_out", "failed_to_download", "opted_out_robots_txt",
                                         "opted_out_tdm_reservation", "opted_out_x_robots_tag", "robots_unavailable",
                                         "error_robots_txt", "error_tdm_reservation", "error_x_robots_tag")} == {
            "success": 2, "opted_out": 3, "failed_to_download": 2, "opted_out_robots_txt": 1,
            "opted_out_tdm_reservation": 1, "opted_out_x_robots_tag": 1, "robots_unavailable": 2,
            "error_robots_txt": 1, "error_tdm_reservation": 1, "error_x_robots_tag": 1}
        assert m.metrics["robots_fetches"] >= 2 and site.hits["/robots.txt"] == m.metrics["robots_fetches"] - (
            down.hits["/robots.txt"])
        assert "/img/ccbot-1" not in site.hits and down.hits.keys() == {"/robots.txt"}
        assert main(["status", str(path)]) == 0
        shown = capsys.readouterr().out
        assert all(f"{k}={m.counts[k]}" in shown for k in ("opted_out_robots_txt", "opted_out_tdm_reservation",
                                                         "opted_out_x_robots_tag", "robots_unavailable"))

        # a refresh: the host whose robots.txt answered 503 is asked again; opt-outs are final, not fetched again
        down.serve("User-agent: *\nAllow: /\n")
        hits_before = Counter(site.hits)
        stage["with"]["refresh_from"] = m.location
        (second,) = run_job(spec.load(write_job(tmp_path, {"crawl": stage}, name="t2")), progress=False)
        out = read_output(second.manifest).set_index("url")
        assert (out.loc[[down.img("later-1"), down.img("later-2")], "status"] == "success").all()
        assert second.manifest.counts["rows_retried"] == 2 and second.manifest.counts["rows_reused"] == 5
        assert second.manifest.counts["opted_out_robots_txt"] == 1 and second.manifest.counts["robots_unavailable"] == 0
        assert Counter(site.hits) == hits_before  # nothing of the opted-out (or successful) rows asked again
