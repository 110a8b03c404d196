"""The ingest stage: Parquet, webdataset and built-in pairs as crawled shards that curate and train read."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import spec
from pipelines.contracts import CRAWLED
from pipelines.demo import web
from pipelines.evaluation import datasets
from pipelines.runner import StageFailed, run_job
from tests.conftest import read_output, write_job


def write_tar(path: Path, members: dict[str, dict[str, bytes]]) -> None:
    """A webdataset shard: each key's members as `<key>.<ext>` files."""
    with tarfile.open(path, "w") as tf:
        for key, files in members.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def samples(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    return [(web.encoded(seed, i, 32)[0], web.sample(seed, i).caption) for i in range(n)]


@pytest.mark.slow
def test_parquet_webdataset_and_builtin_pairs_become_crawled_shards_curate_reads(tmp_path, ray_local):
    pq_rows = samples(7)
    pq.write_table(pa.table({"jpg": [b for b, _ in pq_rows], "txt": [[c, "second"] for _, c in pq_rows]}),
                   tmp_path / "pairs.parquet")
    tar_rows = samples(5, seed=2)
    write_tar(tmp_path / "shard-0.tar", {f"s/{i:04d}": {"png": b, "txt": c.encode()} for i, (b, c) in enumerate(tar_rows)})
    write_tar(tmp_path / "shard-1.tar", {"t/0000": {"png": tar_rows[0][0], "txt": b"one more"}})
    job = write_job(tmp_path, {
        "pq": {"uses": "ingest", "with": {"path": str(tmp_path / "pairs.parquet"), "image_column": "jpg",
                                          "caption_column": "txt", "shard_rows": 4}},
        "wds": {"uses": "ingest", "with": {"path": str(tmp_path / "shard-*.tar"), "image_column": "png",
                                           "caption_column": "txt"}},
        "digits": {"uses": "ingest", "with": {"builtin": "digits_train", "image_size": 16}},
        "curate": {"uses": "curate", "needs": ["wds"], "with": {"rules": ["basic"], "basic": {"min_words": 2, "min_side": 16}}},
    }, ray={"address": "local"})
    out = {o.stage: o.manifest for o in run_job(spec.load(job), progress=False)}

    pq_out = read_output(out["pq"])
    assert len(out["pq"].shards) == 2 and out["pq"].rows == 7 and out["pq"].counts["success"] == 7
    assert pq.read_schema(out["pq"].shard_urls()[0]).remove_metadata() == CRAWLED.remove_metadata()
    assert pq_out["caption"].tolist() == [c for _, c in pq_rows]  # a list keeps its first caption
    assert pq_out["image"].tolist() == [b for b, _ in pq_rows]
    assert pq_out["url"].tolist() == [f"{tmp_path}/pairs.parquet#{i}" for i in range(7)]
    assert set(pq_out["status"]) == {"success"} and pq_out["uid"].is_unique
    assert (pq_out["width"] == 32).all() and set(pq_out["image_format"]) == {"jpg", "png"}

    wds_out = read_output(out["wds"])
    assert wds_out["url"].tolist() == [f"{tmp_path}/shard-0.tar#s/{i:04d}" for i in range(5)] + [
        f"{tmp_path}/shard-1.tar#t/0000"]
    assert wds_out["caption"].tolist() == [c for _, c in tar_rows] + ["one more"]
    assert wds_out["source"].tolist() == [f"{tmp_path}/shard-0.tar"] * 5 + [f"{tmp_path}/shard-1.tar"]
    assert wds_out["source_row"].tolist() == [0, 1, 2, 3, 4, 0]  # the row within its own file

    digits = read_output(out["digits"])
    assert len(digits) == 1797 - datasets.DIGITS_HELD_OUT and digits["uid"].is_unique
    assert digits["caption"].str.contains("|".join(datasets.DIGIT_NAMES)).all()
    assert (digits["width"] == 16).all()

    # curate reads ingested shards as it reads a crawl's: "one more" has two words, so it stays
    assert out["curate"].counts["rows_in"] == 6 and out["curate"].counts["rows_out"] == 6


@pytest.mark.slow
def test_an_unreadable_image_or_a_missing_member_fails_naming_the_sample(tmp_path, ray_local):
    write_tar(tmp_path / "bad.tar", {"a": {"jpg": samples(1)[0][0], "txt": b"fine"},
                                     "b": {"jpg": b"GIF89a but not really", "txt": b"broken"}})
    job = write_job(tmp_path, {"i": {"uses": "ingest", "with": {"path": str(tmp_path / "bad.tar"),
                                                                 "image_column": "jpg", "caption_column": "txt"}}},
                    ray={"address": "local"})
    with pytest.raises(StageFailed, match=r"ingest: .*bad.tar#b: not a readable image"):
        run_job(spec.load(job), progress=False)

    write_tar(tmp_path / "bad.tar", {"a": {"jpg": samples(1)[0][0]}})
    with pytest.raises(StageFailed, match=r"dataset ingest: .*bad.tar sample a has no txt member; it has jpg"):
        run_job(spec.load(job), progress=False)


def test_ingest_needs_exactly_one_source(tmp_path):
    from pipelines.stages.ingest.config import IngestConfig

    with pytest.raises(ValueError, match="ingest: give exactly one of builtin or path"):
        IngestConfig()
    with pytest.raises(FileNotFoundError, match=r"dataset ingest: no file matches .*nothing-\*.tar"):
        from pipelines.stages.ingest.stage import IngestStage

        IngestStage(IngestConfig(path=str(tmp_path / "nothing-*.tar"))).input_identity()
