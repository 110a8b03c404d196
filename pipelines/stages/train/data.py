"""Ray Data side of training: curated shards -> decoded, augmented, tokenised numpy batches, in an order fixed
by the plan, so a resumed run trains exactly the rows an uninterrupted one would.

Which rows a rank trains, and in what order, is decided up front (`rank_stream`): each pass (epoch) orders
the shard files (`pass_order`), and rank r of `world` takes rows [r x per, (r+1) x per) of the files
concatenated in that order (per = rows // world; the rest of a pass is left out, as an equal split does).
Each rank's rows are cut into windows of `window` rows, and each window's rows are permuted by a generator
seeded with (data seed, pass, file, window start): the shuffle is part of the plan, not of a buffer whose
state a restart loses.  A rank that has trained s steps has consumed s x batch x accum rows of its stream;
a resumed rank starts its stream there (`skip`), mid-window if need be.

Decoding and the model's preprocessing run either in Ray Data tasks on CPU (anywhere in the cluster): each rank
iterates its own dataset (built on the rank, `rank_dataset`), in order (`preserve_order`), every epoch as one
stream; or, for CPU workers by default, in a thread of the training worker itself (`LocalBatches`): the same
items read and preprocessed by the same functions, in the same order, without Ray Data's processes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

COLUMNS = ["uid", "image", "caption"]
MAX_BLOCKS = 10_000  # blocks of the item list: more items share a block and its task reads them in turn


@lru_cache(maxsize=4)
def _transforms(arch: str, augment: bool) -> tuple[Any, Any]:
    """(image transform, tokenizer) for an architecture, built once per Ray worker process."""
    from pipelines.models import transforms

    return transforms(arch, augment)


def preprocess(batch: dict[str, np.ndarray], arch: str, augment: bool) -> dict[str, np.ndarray]:
    """Decode, transform and tokenise a batch (random augmentation: a new crop every epoch)."""
    import torch
    from PIL import Image

    transform, tokenizer = _transforms(arch, augment)
    captions = [str(c) for c in batch["caption"]]
    images = []
    for i, data in enumerate(batch["image"]):
        try:
            with Image.open(io.BytesIO(data)) as im:
                images.append(transform(im.convert("RGB")))
        except Exception as exc:  # noqa: BLE001 - curated rows decoded once already; name the row
            raise ValueError(f"train data: cannot decode image of row {batch['uid'][i]!r}: {exc}") from None
    return {"image": torch.stack(images).numpy(), "text": tokenizer(captions).numpy()}


def pass_order(files: int, p: int, seed: int, fixed: bool) -> list[int]:
    """The shard files' order in pass `p`: the same every pass when `fixed` (a seed was given), else a new one
    each pass; both from `seed`, so the plan is the same on every rank and after a restart."""
    return [int(i) for i in np.random.default_rng([seed] if fixed else [seed, p]).permutation(files)]


def passes_needed(planned_steps: int, steps_per_epoch: int) -> int:
    return -(-planned_steps // steps_per_epoch)


@dataclass(frozen=True)
class Stream:
    """What a rank's stream is made from (the same on every rank; all of it goes in the checkpoint's plan)."""

    urls: list[str]  # the curated shards, in the manifest's order
    rows: list[int]  # rows of each shard (the manifest's)
    passes: int
    seed: int  # the data seed: the stage's `seed`, or one drawn at the start of the run
    fixed_order: bool  # `seed` was given: the same file order every pass
    window: int  # rows shuffled together; 0: none

    def offsets(self) -> list[int]:
        """Each shard's first global row id (row ids number the rows of the shards in the manifest's order)."""
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.rows)[:-1]])] if self.rows else []


def rank_spans(stream: Stream, rank: int, world: int) -> list[dict[str, int]]:
    """Rank `rank`'s rows, every pass in turn, as spans {"pass", "file", "start", "stop"} of shard rows."""
    per = sum(stream.rows) // world
    lo, hi = rank * per, (rank + 1) * per
    spans = []
    for p in range(stream.passes):
        pos = 0
        for f in pass_order(len(stream.urls), p, stream.seed, stream.fixed_order):
            n = stream.rows[f]
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                spans.append({"pass": p, "file": f, "start": a - pos, "stop": b - pos})
            pos += n
            if pos >= hi:
                break
    return spans


def rank_stream(stream: Stream, rank: int, world: int, skip: int = 0) -> list[dict[str, Any]]:
    """The items a rank's dataset reads: its spans, the first `skip` rows of the stream left out.  A span that
    starts mid-window begins at that window's start and drops the window's first `drop` rows once permuted,
    so the rows that follow are exactly those an uninterrupted stream gives after `skip` rows."""
    items, pos, offsets = [], 0, stream.offsets()
    for s in rank_spans(stream, rank, world):
        n = s["stop"] - s["start"]
        if pos + n <= skip:
            pos += n
            continue
        into = max(0, skip - pos)
        w = stream.window
        start, drop = (s["start"] + into // w * w, into % w) if w else (s["start"] + into, 0)
        items.append({**s, "start": start, "drop": drop, "url": stream.urls[s["file"]],
                      "first_id": offsets[s["file"]]})
        pos += n
    return items


def _rows(url: str, start: int, stop: int, chunk: int) -> Iterator[Any]:
    """Rows [start, stop) of a Parquet shard as record batches, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    from pipelines import storage

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        groups: list[int] = []
        pos, first = 0, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if pos + n > start and pos < stop:
                first = first if groups else pos
                groups.append(g)
            pos += n
        if not groups:
            return
        pos = first
        for rb in pf.iter_batches(batch_size=chunk, row_groups=groups, columns=COLUMNS):
            a, b = max(start - pos, 0), min(stop - pos, rb.num_rows)
            if a < b:
                yield rb.slice(a, b - a)
            pos += rb.num_rows
            if pos >= stop:
                return


def windows(item: dict[str, Any], seed: int, window: int, chunk: int) -> Iterator[tuple[Any, np.ndarray]]:
    """(table, global row ids) of each window of a span item, its rows permuted; the first window without its
    first `drop` rows.  A window is [span start + k x window, ...) within the span, permuted by a generator seeded
    with (seed, pass, file, its start), whichever row the read began at."""
    import pyarrow as pa

    size = window or chunk
    buf: list[Any] = []
    held, w_start, drop = 0, int(item["start"]), int(item["drop"])
    stop = int(item["stop"])

    def emit(rows: Any, at: int) -> tuple[Any, np.ndarray]:
        ids = np.arange(at, at + rows.num_rows, dtype=np.int64)
        if window:
            perm = np.random.default_rng([seed, int(item["pass"]), int(item["file"]), at]).permutation(rows.num_rows)
            rows, ids = rows.take(pa.array(perm)), ids[perm]
        return rows, ids + int(item["first_id"])

    for rb in _rows(str(item["url"]), w_start, stop, chunk):
        buf.append(pa.Table.from_batches([rb]))
        held += rb.num_rows
        while held >= size or (held and w_start + held >= stop):
            table = pa.concat_tables(buf).combine_chunks()
            n = min(size, table.num_rows)
            rows, ids = emit(table.slice(0, n), w_start)
            if drop:
                rows, ids, drop = rows.slice(drop), ids[drop:], 0
            yield rows, ids
            rest = table.slice(n)
            buf, held, w_start = ([rest] if rest.num_rows else []), rest.num_rows, w_start + n
    if w_start < stop:
        raise ValueError(f"train data: {item['url']} ended at row {w_start + held}; the curated manifest lists rows up to "
                         f"{stop} (was the shard rewritten after curation?)")


def read_items(items: dict[str, np.ndarray], arch: str, augment: bool, seed: int, window: int,
               batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data's map over a rank's items: each span's windows, decoded and preprocessed `batch_rows` rows at a
    time, with each row's global id in `row` (Ray Data sends each yielded block on as it is made)."""
    keys = ("pass", "file", "start", "stop", "drop", "url", "first_id")
    for i in range(len(items["url"])):
        item = {k: items[k][i] for k in keys}
        for rows, ids in windows(item, seed, window, batch_rows):
            for a in range(0, rows.num_rows, batch_rows):
                part = rows.slice(a, batch_rows)
                out = preprocess({c: part.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}, arch, augment)
                yield {**out, "row": ids[a:a + batch_rows]}


def rank_dataset(stream: Stream, rank: int, world: int, skip: int, arch: str, augment: bool, data_cpus: float,
                 tasks: int | None = None, batch_rows: int = 64) -> Any:
    """A lazy Ray Dataset of a rank's preprocessed rows, in plan order (`rank_stream`): every pass as one stream,
    so the rank's iterator runs through every epoch without the pipeline stopping at each boundary; None when
    `skip` leaves nothing."""
    import ray.data

    items = rank_stream(stream, rank, world, skip)
    if not items:
        return None
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    ds = ds.map_batches(read_items, batch_size=1, batch_format="numpy", num_cpus=data_cpus, concurrency=tasks,
                        fn_kwargs={"arch": arch, "augment": augment, "seed": stream.seed,
                                   "window": stream.window, "batch_rows": batch_rows})
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.execution_options.preserve_order = True  # the plan's order, whichever task finishes first
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False  # a worker's bars would only reach the log
    return ds


class LocalBatches:
    """A rank's batches of the plan (`rank_stream`), read, decoded and preprocessed by `read_items` in a thread of
    this process, `prefetch` batches ahead: what `rank_dataset(...).iter_torch_batches(batch_size, drop_last=True)`
    yields, the same rows in the same order, without a Ray Data task process (each imports torch and open_clip,
    about 5 s of CPU) or Ray Data's coordinating actors. For CPU workers, whose steps are compute-bound.

    The thread starts at once; an error it meets is raised by the `next` that would have returned its batch.
    `close()` (or dropping the iterator) stops it."""

    def __init__(self, stream: Stream, rank: int, world: int, skip: int, arch: str, augment: bool,
                 batch_size: int, device: Any = "cpu", batch_rows: int = 64, prefetch: int = 2) -> None:
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._done = False
        self._device = device
        items = rank_stream(stream, rank, world, skip)
        self._thread = threading.Thread(
            target=self._produce, name=f"clipline-data-rank-{rank}", daemon=True,
            args=(items, arch, augment, stream.seed, stream.window, batch_size, batch_rows))
        self._thread.start()

    def _put(self, item: Any) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: list[dict[str, Any]], arch: str, augment: bool, seed: int, window: int,
                 batch_size: int, batch_rows: int) -> None:
        keys = ("image", "text", "row")
        held: list[dict[str, np.ndarray]] = []
        count = 0
        try:
            for item in items:
                one = {k: np.array([v]) for k, v in item.items()}
                for block in read_items(one, arch, augment, seed, window, batch_rows):
                    held.append(block)
                    count += len(block["row"])
                    while count >= batch_size:
                        joined = {k: np.concatenate([b[k] for b in held]) for k in keys}
                        batch = {k: v[:batch_size] for k, v in joined.items()}
                        rest = {k: v[batch_size:] for k, v in joined.items()}
                        held, count = ([rest] if len(rest["row"]) else []), len(rest["row"])
                        if not self._put(("batch", batch)):
                            return
            self._put(("end", None))  # drop_last: fewer than batch_size rows left are not a batch
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer, by the next() it belongs to
            self._put(("error", exc))

    def __iter__(self) -> LocalBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        import torch

        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "end":
            self._done = True
            raise StopIteration
        if kind == "error":
            self._done = True
            raise value
        dtypes = {"image": torch.float32, "text": torch.long, "row": torch.long}
        return {k: torch.from_numpy(v).to(device=self._device, dtype=dtypes[k]) for k, v in value.items()}

    def close(self) -> None:
        self._stop.set()
        self._done = True

    def __del__(self) -> None:
        self._stop.set()


def trained_rows(rows_dir: str) -> Any:
    """The rows log a `log_rows` run wrote: a DataFrame (rank, step, row), by rank and step, each step's rows in
    the order its batch held them."""
    import pandas as pd

    from pipelines import storage

    frames = []
    for url in sorted(storage.expand(storage.join(rows_dir, "rank-*", "steps-*.parquet"))):
        frame = storage.read_parquet(url).to_pandas()
        frame.insert(0, "rank", int(url.rsplit("rank-", 1)[1].split("/", 1)[0]))
        frames.append(frame)
    if not frames:
        return pd.DataFrame({"rank": [], "step": [], "row": []}, dtype="int64")
    return pd.concat(frames, ignore_index=True).sort_values(["rank", "step"], kind="stable", ignore_index=True)
