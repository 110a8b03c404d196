"""`clipline takedown`: new versions of a job's datasets without the listed rows, and the runs and models tagged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines import cli, manifest, spec, takedown
from pipelines.demo.server import url_list
from pipelines.runner import SUPERSEDED, Selection, plan, read_current, run_job
from tests.conftest import crawl_stage, mlflow_runs, read_output, write_job


def _ledger(m: manifest.Manifest) -> pd.DataFrame:
    return pd.concat([pq.read_table(Path(m.location, s["path"])).to_pandas() for s in m.extra["ledger"]],
                     ignore_index=True)


def test_the_list_takes_urls_sha256s_and_phashes_and_a_bad_line_names_file_and_line(tmp_path, capsys):
    good = tmp_path / "list.txt"
    good.write_text("# takedown request 17\n\nhttps://example.com/a.jpg\n" + "AB" * 32 + "\n" + "0f" * 8 + "\n")
    tl = takedown.read_list(str(good))
    assert tl.urls == {"https://example.com/a.jpg"} and tl.sha256s == {"ab" * 32} and tl.phashes == {"0f" * 8}
    assert tl.sha256 == hashlib.sha256(good.read_bytes()).hexdigest() and tl.entries == 3

    bad = tmp_path / "bad.txt"
    bad.write_text("https://example.com/a.jpg\n# fine\nnot a url\n")
    job = write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "none.parquet"))})
    assert cli.main(["takedown", str(job), "--list", str(bad)]) == cli.EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert f"{bad}:3: 'not a url' is neither a URL" in err and "sha256 (64 hex digits)" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(takedown.TakedownError, match="no entries"):
        takedown.read_list(str(empty))


@pytest.mark.slow
def test_a_takedown_writes_new_versions_without_the_rows_and_tags_the_train_run_and_its_model(
        tmp_path, web, ray_local, capsys):
    url_list(web.base_url, 40).to_parquet(tmp_path / "urls.parquet")
    path = write_job(tmp_path, {
        "crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=20),
        "curate": {"uses": "curate", "needs": ["crawl"],
                   "with": {"rules": ["basic"], "basic": {"min_side": 32}, "shard_rows": 16}},
        "train": {"uses": "train", "needs": ["curate"],
                  "with": {"batch_size": 8, "steps": 2, "warmup": 1, "system_metrics": False, "augment": False}},
    })
    job = spec.load(path)
    crawl, curate, train = (o.manifest for o in run_job(job, progress=False))
    assert crawl and curate and train
    crawled, ledger = read_output(crawl), _ledger(curate)
    unique = ledger[ledger["kept"] & ~ledger["sha256"].duplicated(keep=False) & ~ledger["phash"].duplicated(keep=False)]
    by_url, by_sha, by_phash = unique.iloc[0], unique.iloc[1], unique.iloc[2]
    url = crawled.loc[crawled["uid"] == by_url["uid"], "url"].iloc[0]
    gone = {by_url["uid"], by_sha["uid"], by_phash["uid"]}
    assert len(gone) == 3
    listing = tmp_path / "takedown.txt"
    listing.write_text(f"# three rows\n{url}\n\n{by_sha['sha256']}\n{by_phash['phash']}\n")
    sha = hashlib.sha256(listing.read_bytes()).hexdigest()
    old_files = {p: p.read_bytes() for m in (crawl, curate) for p in Path(m.location).rglob("*") if p.is_file()}

    assert cli.main(["takedown", str(path), "--list", str(listing), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "dry run: nothing written or tagged" in dry and "model   t-train version 1" in dry
    assert read_current(crawl.location) == crawl and read_current(curate.location) == curate
    assert [len(list(Path(m.location).parent.iterdir())) for m in (crawl, curate)] == [1, 1]  # no new directory
    assert cli.main(["takedown", str(path), "--list", str(listing)]) == 0
    out = capsys.readouterr().out

    # nothing changed in place: the old versions' files are as they were, beside a pointer to the new version
    assert dry.splitlines()[1:] == out.splitlines()[1:]  # the dry run said what the takedown did
    for p, data in old_files.items():
        assert p.read_bytes() == data, p
    new_crawl, new_curate = read_current(crawl.location), read_current(curate.location)
    assert new_crawl and new_curate
    assert new_crawl.location != crawl.location and new_curate.location != curate.location
    assert Path(crawl.location, SUPERSEDED).exists()
    for old, new in ((crawl, new_crawl), (curate, new_curate)):
        td = new.extra["takedown"]
        assert td["list_sha256"] == sha and td["rows"] == 3
        assert td["previous"] == {"fingerprint": old.fingerprint, "digest": old.digest, "path": old.location}

    # the crawl keeps every row in place; the three keep only their identity, as permanent opt-outs
    after = read_output(new_crawl)
    assert len(after) == len(crawled) == 40 and list(after["uid"]) == list(crawled["uid"])
    taken = after["uid"].isin(gone)
    assert taken.sum() == 3
    assert set(after.loc[taken, "status"]) == {"opted_out"} and set(after.loc[taken, "error_class"]) == {"takedown"}
    assert after.loc[taken, ["url", "caption", "image", "sha256"]].isna().all().all()
    pd.testing.assert_frame_equal(after[~taken].reset_index(drop=True), crawled[~taken].reset_index(drop=True),
                                  check_dtype=False)  # int columns with nulls read back as float
    c = new_crawl.counts
    assert c["taken_down"] == 3 and c["opted_out"] == crawl.counts.get("opted_out", 0) + 3
    assert c["success"] == crawl.counts["success"] - 3 and new_crawl.extra["version"] == 2
    assert sum(c[s] for s in ("success", "failed_to_download", "failed_to_resize", "opted_out", "blocked",
                              "invalid", "duplicate") if s in c) == c["input_rows"] == 40

    # curate: the ledger marks them `takedown`, the curated shards lack exactly them, and the funnel adds up
    new_ledger = _ledger(new_curate)
    assert len(new_ledger) == len(ledger) == 40
    assert set(new_ledger.loc[new_ledger["reason"] == "takedown", "uid"]) == gone
    assert not new_ledger.loc[new_ledger["uid"].isin(gone), "kept"].any()
    assert new_ledger["sha256"][new_ledger["uid"].isin(gone)].isna().all()
    curated_before, curated_after = read_output(curate), read_output(new_curate)
    assert set(curated_before["uid"]) - set(curated_after["uid"]) == gone
    assert len(curated_after) == len(curated_before) - 3 == new_curate.counts["rows_out"] == new_ledger["kept"].sum()
    n = new_curate.counts
    assert n["dropped_takedown"] == 3 and n["rows_in"] == n["rows_out"] + sum(
        v for k, v in n.items() if k.startswith("dropped_"))
    assert new_curate.inputs["crawl"]["digest"] == new_crawl.digest

    # a later run reads the new versions as cache hits and trains again on them
    states = {r["stage"]: (r["state"], r["path"]) for r in plan(job)}
    assert states["crawl"] == ("cached", new_crawl.location) and states["curate"] == ("cached", new_curate.location)
    assert states["train"][0] == "missing"
    assert [(o.stage, o.state) for o in run_job(job, Selection(until="curate"), progress=False)] == [
        ("crawl", "cached"), ("curate", "cached"), ("train", "not selected")]

    # lineage: the train run that read the old curated version, and the model version it registered
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    run = client.get_run(train.mlflow_run_id)
    assert run.data.tags[takedown.TAG] == sha and run.data.tags[takedown.TAG_ROWS] == "3"
    (mv,) = client.search_model_versions(f"run_id = '{train.mlflow_run_id}'")
    assert mv.tags[takedown.TAG] == sha and mv.tags[takedown.TAG_ROWS] == "3"
    assert f"run     {train.mlflow_run_id}" in out and f"model   {mv.name} version {mv.version}" in out
    assert f"dataset curate       3 rows taken down: {curate.location} -> {new_curate.location}" in out
    assert f"stale   train        {train.location}" in out
    assert "matched 1 URLs, 1 sha256, 1 pHash: 3 rows" in out
    # the curate run read the old crawl: tagged too; the crawl's own runs read no dataset and are not
    tagged = {r.data.tags.get("clipline.stage") for r in mlflow_runs(tmp_path / "store")
              if takedown.TAG in r.data.tags}
    assert tagged == {"curate", "train"}

    # the same list again finds nothing left to take down
    assert cli.main(["takedown", str(path), "--list", str(listing)]) == 0
    assert "nothing to take down" in capsys.readouterr().out
