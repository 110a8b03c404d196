"""The train stage's data plan: which rows each rank trains, in what order, and where a resumed rank starts.

The plan is pure (no Ray): these tests read the planned rows straight from Parquet files on disk and check
the stream a rank's Ray Dataset yields against them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.stages.train import data


def _shards(tmp_path: Path, rows: list[int], group: int | None = None, images: bool = False) -> list[str]:
    """Parquet shards of the given row counts (uid = the global row id), row groups of `group` rows."""
    from pipelines.demo import web

    urls, first = [], 0
    for f, n in enumerate(rows):
        idx = range(first, first + n)
        cols = {"uid": [str(j) for j in idx], "caption": [web.sample(0, j).caption for j in idx],
                "image": [web.encoded(0, j, 32)[0] if images else b"" for j in idx]}
        pq.write_table(pa.table(cols), tmp_path / f"part-{f}.parquet", row_group_size=group)
        urls.append(str(tmp_path / f"part-{f}.parquet"))
        first += n
    return urls


def _ids(stream: data.Stream, rank: int, world: int, skip: int = 0) -> list[int]:
    """The global row ids a rank's stream gives, read with the stage's own window reader (no decoding)."""
    out: list[int] = []
    for item in data.rank_stream(stream, rank, world, skip):
        for rows, ids in data.windows(item, stream.seed, stream.window, 5):
            assert [int(u) for u in rows.column("uid").to_pylist()] == ids.tolist()  # ids name the rows read
            out.extend(ids.tolist())
    return out


def _stream(urls: list[str], rows: list[int], **kw) -> data.Stream:
    return data.Stream(**{"urls": urls, "rows": rows, "passes": 3, "seed": 11, "fixed_order": False, "window": 8,
                          **kw})


ROWS = [13, 7, 20, 9, 11]  # 60 rows; uneven files so rank slices cut through files and windows through spans


def test_each_pass_gives_every_rank_its_equal_share_of_distinct_rows(tmp_path):
    urls = _shards(tmp_path, ROWS, group=6)
    stream = _stream(urls, ROWS)
    per = sum(ROWS) // 4  # 15 rows a rank a pass
    ranks = [_ids(stream, r, 4) for r in range(4)]
    assert [len(x) for x in ranks] == [3 * per] * 4
    for p in range(3):
        seen = [x[p * per:(p + 1) * per] for x in ranks]
        flat = [i for s in seen for i in s]
        assert sorted(flat) == list(range(60))  # 4 x 15 = all 60 rows, each once, in each pass
    orders = [tuple(data.pass_order(5, p, 11, False)) for p in range(3)]
    assert len(set(orders)) == 3 and all(sorted(o) == list(range(5)) for o in orders)
    # uneven split: 60 rows over 7 ranks leave 4 rows out of each pass, never a rank short
    assert {len(_ids(stream, r, 7)) for r in range(7)} == {3 * 8}


def test_a_fixed_seed_keeps_the_file_order_and_each_pass_shuffles_its_windows_anew(tmp_path):
    urls = _shards(tmp_path, ROWS)
    fixed = _stream(urls, ROWS, fixed_order=True)
    assert data.pass_order(5, 0, 11, True) == data.pass_order(5, 2, 11, True) != data.pass_order(5, 0, 12, True)
    one = _ids(fixed, 0, 1)
    passes = [one[i * 60:(i + 1) * 60] for i in range(3)]
    assert all(sorted(p) == list(range(60)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3  # the windows are permuted with the pass in their seed
    # windows are within files and the file order is fixed: every position draws from the same file each pass
    firsts = np.cumsum([0, *ROWS])
    files = [[int(np.searchsorted(firsts, i, side="right")) - 1 for i in p] for p in passes]
    assert files[0] == files[1] == files[2] != sorted(files[0])
    plain = _ids(_stream(urls, ROWS, fixed_order=True, window=0), 0, 1)
    order = data.pass_order(5, 0, 11, True)
    assert plain[:60] == [j for f in order for j in range(firsts[f], firsts[f + 1])]  # window 0: file order


@pytest.mark.parametrize("world", [1, 3])
def test_a_resumed_stream_is_the_rest_of_the_uninterrupted_one(tmp_path, world):
    """Skipping k rows (what a restored rank has consumed) gives exactly the uninterrupted stream after row k,
    mid-window, at a span's edge, at a pass boundary and in a later pass; row groups of 6 rows make the
    reader start inside files."""
    urls = _shards(tmp_path, ROWS, group=6)
    stream = _stream(urls, ROWS)
    for rank in range(world):
        full = _ids(stream, rank, world)
        for k in sorted({0, 1, 7, 8, 9, 13, 19, 20, 21, len(full) // 3, len(full) // 3 + 5, len(full) - 1}):
            assert _ids(stream, rank, world, k) == full[k:], (rank, k)
        assert data.rank_stream(stream, rank, world, len(full)) == []


def test_a_shard_shorter_than_its_manifest_is_named(tmp_path):
    urls = _shards(tmp_path, [10, 10])
    with pytest.raises(ValueError, match=r"part-1\.parquet ended at row 10; the curated manifest lists rows up to 14"):
        _ids(_stream(urls, [10, 14], passes=1, fixed_order=True), 0, 1)


@pytest.mark.slow
def test_each_ranks_ray_dataset_streams_its_planned_rows_decoded_every_epoch(tmp_path, ray_local):
    """What a rank's one iterator over the run sees: its planned rows in plan order (whichever Ray Data task
    finishes first), each pass in full, the images decoded as the stage preprocesses them."""
    rows = [20, 20, 20]
    urls = _shards(tmp_path, rows, images=True)
    stream = _stream(urls, rows, window=6)
    once = {}
    for url in urls:
        t = pq.read_table(url).to_pydict()
        out = data.preprocess({k: np.array(v, dtype=object) for k, v in t.items()}, "clip-tiny", False)
        once.update({int(u): img.tobytes() for u, img in zip(t["uid"], out["image"], strict=True)})
    counts: Counter = Counter()
    for rank in range(2):
        ds = data.rank_dataset(stream, rank, 2, 0, "clip-tiny", augment=False, data_cpus=0.5, batch_rows=4)
        ids, images = [], []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ids.extend(batch["row"].tolist())
            images.extend(img.tobytes() for img in batch["image"])
        assert ids == _ids(stream, rank, 2)  # 3 passes x 30 rows, in the plan's order
        assert images == [once[i] for i in ids]
        counts.update(ids)
        resumed = data.rank_dataset(stream, rank, 2, 37, "clip-tiny", augment=False, data_cpus=0.5, batch_rows=4)
        assert [i for b in resumed.iter_batches(batch_size=None, batch_format="numpy") for i in b["row"]] == ids[37:]

        # a CPU worker's default (data_tasks 0): the same batches from a thread of the worker, no Ray Data
        for skip in (0, 37):
            local = list(data.LocalBatches(stream, rank, 2, skip, "clip-tiny", augment=False, batch_size=7,
                                           batch_rows=4))
            whole = (len(ids) - skip) // 7 * 7  # drop_last, as iter_torch_batches(drop_last=True)
            assert [len(b["row"]) for b in local] == [7] * (whole // 7)
            assert [int(i) for b in local for i in b["row"]] == ids[skip:skip + whole], (rank, skip)
            assert [img.numpy().tobytes() for b in local for img in b["image"]] == images[skip:skip + whole]
            assert all(b["image"].dtype == torch.float32 and b["text"].dtype == torch.long for b in local)
    assert counts == Counter({i: 3 for i in range(60)})


def test_the_worker_thread_loader_raises_a_bad_shard_at_the_batch_and_stops_when_closed(tmp_path):
    urls = _shards(tmp_path, [10, 10], images=True)
    short = data.LocalBatches(_stream(urls, [10, 14], passes=1, fixed_order=True), 0, 1, 0, "clip-tiny",
                              augment=False, batch_size=4, batch_rows=4)
    got = []
    with pytest.raises(ValueError, match=r"part-1\.parquet ended at row 10; the curated manifest lists rows up to 14"):
        for _ in range(10):
            got.append(next(short))
    # the batches before it were whole and each row once: whatever was read before the shard ran short
    rows = [int(i) for b in got for i in b["row"]]
    assert got and len(rows) == 4 * len(got) and len(set(rows)) == len(rows)
    with pytest.raises(StopIteration):
        next(short)
    # a consumer that stops early (a finished run) stops the thread, which held a full queue
    many = data.LocalBatches(_stream(urls, [10, 10], passes=50, fixed_order=True), 0, 1, 0, "clip-tiny",
                             augment=False, batch_size=2, batch_rows=2, prefetch=1)
    next(many)
    many.close()
    many._thread.join(timeout=10)
    assert not many._thread.is_alive()
