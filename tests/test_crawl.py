"""The crawl stage end to end on a local Ray instance against the loopback web."""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import spec, storage
from pipelines.contracts import CRAWLED, uid
from pipelines.demo.server import url_list
from pipelines.runner import Selection, run_job
from tests.conftest import crawl_stage, mlflow_runs, read_output, write_job

pytestmark = pytest.mark.slow

FAULTS = {"missing": 0.1, "error": 0.05, "html": 0.05, "optout": 0.05, "slow": 0.05}
EXPECTED = {  # route kind -> (status, error_class)
    "img": ("success", None),
    "missing": ("failed_to_download", "http_4xx"),
    "error": ("failed_to_download", "http_5xx"),
    "html": ("failed_to_resize", "decode"),
    "optout": ("opted_out", "x_robots_tag"),
    "slow": ("failed_to_download", "timeout"),
    "ftp": ("invalid", "invalid_url"),
    "nourl": ("invalid", "invalid_url"),
    "nocaption": ("invalid", "missing_caption"),
}


def test_crawl_accounts_for_every_input_row(tmp_path, web, ray_local):
    rows = url_list(web.base_url, 180, faults=FAULTS)
    extra = pd.DataFrame({"url": ["ftp://127.0.0.1/a.jpg", None, web.url("img", 5)],
                          "caption": ["ftp", "no url", None], "kind": ["ftp", "nourl", "nocaption"]})
    rows = pd.concat([rows, extra], ignore_index=True)
    rows.to_parquet(tmp_path / "urls.parquet")
    job = spec.load(write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"), timeout=1)}))
    (outcome,) = run_job(job, progress=False)
    m = outcome.manifest
    out = read_output(m)

    assert sorted(out["source_row"]) == list(range(len(rows)))  # every row exactly once
    assert list(out.columns[: len(CRAWLED)]) == CRAWLED.names
    merged = rows.reset_index(names="source_row").merge(out, on="source_row", suffixes=("_in", ""))
    for kind, (status, error_class) in EXPECTED.items():
        part = merged[merged["kind"] == kind]
        assert len(part) > 0, kind
        assert set(part["status"]) == {status}, kind
        assert set(part["error_class"].fillna("-")) == {error_class or "-"}, kind
    assert (merged["url"].fillna("") == merged["url_in"].fillna("")).all()
    assert all(u == uid(url, cap) for u, url, cap in zip(out["uid"], out["url"], out["caption"], strict=True))

    ok = out[out["status"] == "success"]
    for _, r in ok.head(20).iterrows():
        im = Image.open(io.BytesIO(r["image"]))
        assert im.size == (32, 32) and (r["width"], r["height"]) == (32, 32)
        assert (r["original_width"], r["original_height"]) == (96, 96)
        assert r["sha256"] == storage.sha256_bytes(r["image"])
    assert out.loc[out["status"] != "success", "image"].isna().all()

    counts = out["status"].value_counts().to_dict()
    assert {k: m.counts[k] for k in counts} == counts
    assert m.counts["input_rows"] == len(rows) == m.rows
    assert m.counts["opted_out_x_robots_tag"] == counts["opted_out"] > 0  # the only opt-out kind this web serves
    assert m.counts["opted_out_robots_txt"] == m.counts["opted_out_tdm_reservation"] == 0
    for shard in m.shards:
        assert storage.sha256_file(storage.join(m.location, shard["path"])) == shard["sha256"]
        assert pq.ParquetFile(storage.join(m.location, shard["path"])).metadata.num_rows == shard["rows"]
    assert not storage.exists(storage.join(m.location, "_inputs"))  # staging removed once complete
    # the loopback web's URLs are IP literals, which need no lookup (test_dns: the counts of named hosts)
    assert {k: m.metrics[k] for k in ("dns_cache_hits", "dns_cache_misses", "dns_timeouts")} == dict.fromkeys(
        ("dns_cache_hits", "dns_cache_misses", "dns_timeouts"), 0)

    parent, child = mlflow_runs(tmp_path / "store")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["clipline.cache"] == "miss" and child.data.tags["clipline.fingerprint"] == m.fingerprint
    assert child.data.params["image_size"] == "32" and child.data.params["allow_networks"] == '["127.0.0.0/8"]'
    assert child.data.metrics["crawl/success"] == counts["success"]
    assert child.data.metrics["crawl/success_rate"] == pytest.approx(counts["success"] / len(rows))
    assert child.data.metrics["crawl/images_per_sec"] > 0
    assert parent.data.params["stages.crawl.with.image_size"] == "32"
    assert parent.info.status == child.info.status == "FINISHED"
    assert [d.dataset.digest for d in child.inputs.dataset_inputs] == [m.digest[:36]]


def test_input_formats_with_laion_columns(tmp_path, web, ray_local):
    frame = url_list(web.base_url, 24)
    laion = pd.DataFrame({"URL": frame["url"], "TEXT": frame["caption"], "WIDTH": 96.0, "similarity": 0.3})
    halves = (laion.iloc[:12], laion.iloc[12:])
    for i, half in enumerate(halves):
        half.to_parquet(tmp_path / f"laion-{i}.parquet", index=False)
        half.to_csv(tmp_path / f"laion-{i}.csv", index=False)
        half.to_csv(tmp_path / f"laion-{i}.tsv", index=False, sep="\t")
        half.to_json(tmp_path / f"laion-{i}.jsonl", orient="records", lines=True)
    stages = {fmt: crawl_stage(str(tmp_path / f"laion-*.{fmt}"), passthrough=["WIDTH", "similarity"],
                               samples_per_shard=10)
              for fmt in ("parquet", "csv", "tsv", "jsonl")}
    job = spec.load(write_job(tmp_path, stages))
    outcomes = run_job(job, progress=False)
    for o in outcomes:
        out = read_output(o.manifest)
        assert len(out) == 24 and o.manifest.counts["success"] == 24, o.stage
        assert sorted(out["caption"]) == sorted(laion["TEXT"]), o.stage
        assert sorted(out["source"].unique()) == [str(tmp_path / f"laion-{i}.{o.stage}") for i in (0, 1)]
        assert sorted(out.groupby("source")["source_row"].apply(list).sum()) == sorted(list(range(12)) * 2)
        assert [float(x) for x in out["WIDTH"]] == [96.0] * 24 and [float(x) for x in out["similarity"]] == [0.3] * 24
        assert [len(pq.read_table(u)) for u in o.manifest.shard_urls()] == [10, 10, 4]


def test_missing_input_and_column_errors_name_the_file(tmp_path, web, ray_local):
    from pipelines.runner import StageFailed

    (tmp_path / "a.csv").write_text("link,caption\nhttp://127.0.0.1/x,hi\n")
    job = spec.load(write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "a.csv"))}))
    with pytest.raises(StageFailed, match=r"a.csv: no URL column; expected one of url, URL \(or set url_col\)"):
        run_job(job, progress=False)
    job = spec.load(write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "nothing-*.parquet"))}))
    with pytest.raises(StageFailed, match=r"nothing-\*.parquet'?: the glob matches no file"):
        run_job(job, progress=False)


def test_second_run_is_a_cache_hit_and_a_param_change_is_a_miss(tmp_path, web, ray_local):
    url_list(web.base_url, 30).to_parquet(tmp_path / "urls.parquet")
    path = write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"))})
    (first,) = run_job(spec.load(path), progress=False)
    files = {p: (tmp_path / p).stat().st_mtime_ns for p in map(str, (tmp_path / "store" / "t").rglob("*"))}

    (second,) = run_job(spec.load(path), progress=False)
    assert (first.state, second.state) == ("ran", "cached")
    assert second.manifest.digest == first.manifest.digest
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in map(str, (tmp_path / "store" / "t").rglob("*"))} == files

    (third,) = run_job(spec.load(path, ["stages.crawl.with.image_size=48"]), progress=False)
    assert third.state == "ran" and third.fingerprint != first.fingerprint
    assert Image.open(io.BytesIO(read_output(third.manifest)["image"].dropna().iloc[0])).size == (48, 48)
    assert storage.exists(first.manifest.location)  # the earlier version stays

    (forced,) = run_job(spec.load(path), Selection(force=True), progress=False)
    assert forced.state == "ran" and forced.fingerprint == first.fingerprint

    runs = mlflow_runs(tmp_path / "store")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.data.tags["clipline.cache"] for r in children] == ["miss", "hit", "miss", "miss"]
    assert children[1].data.metrics["crawl/success"] == first.manifest.counts["success"]
    manifest_json = json.loads((tmp_path / "store" / "t" / "crawl" / first.fingerprint / "_manifest.json").read_text())
    assert manifest_json["mlflow_run_id"] == children[3].info.run_id  # the forced rerun wrote the manifest
