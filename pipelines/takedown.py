"""`clipline takedown JOB --list FILE`: remove rows from a job's released datasets, and find what used them.

The list names what to take down, one entry a line: a URL, a sha256 of the image bytes (64 hex digits) or a
pHash (16 hex digits, the ledger's `phash` column; matched within `max_distance` bits). A match anywhere
(a crawled row's url or sha256, a ledger row's sha256 or phash) takes down every row with that row's uid.

Nothing is changed in place. Every complete output of the job's stages that holds a listed row (under
`{storage}/{job}/{stage}/`, whichever spec or code version made it) gets a new version, a new directory
with its own manifest (`extra.takedown`: the list's sha256, the previous version's fingerprint,
digest and path, the rows taken down):

- crawl and ingest outputs keep every row, in the same shard and position (curate's ledger points at them),
  but a taken-down row keeps only its uid, source, source row, fetch time and attempts: status `opted_out`,
  error class `takedown`, and no url, caption, image or passthrough values. The counts move those rows to
  `opted_out` and `error_takedown` and say `taken_down`; `extra.version` goes up by one, so a refresh
  (`refresh_from: auto`) starts from it and copies the rows as permanent failures instead of fetching them.
- curate outputs: the ledger keeps every row; a taken-down one gets `kept` false, reason `takedown`, and no
  sha256, phash or image size; curated shards lose those rows. `dropped_takedown` counts them and the
  counts they came from (`rows_out`, `dropped_<reason>`) go down by as much.

The old version's directory gets `_superseded.json` naming the new one (`pipelines.runner.read_current`),
so the runner reads the new version of a source stage as its cache hit; the new version of the spec's current
curate output is written at the fingerprint the runner computes from its new upstream, so it is a cache hit
too (any other curate version gets a fingerprint of its own and the pointer). Stages of other kinds
(train, evaluate, export) are not rewritten: their upstream's digest changed, so the next `clipline run`
recomputes them from the new versions.

Lineage: every MLflow run whose inputs include an affected version's digest (the runner logs each stage's
inputs and output), and transitively every run that consumed such a run's output, gets the tags
`clipline.takedown` (the list's sha256) and `clipline.takedown.rows`; so does every registered model version
created by one of those runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pipelines import __version__, layout, manifest, storage
from pipelines.contracts import TAKEDOWN
from pipelines.manifest import Manifest
from pipelines.spec import JobSpec

log = logging.getLogger("clipline.takedown")

REASON = TAKEDOWN  # the ledger reason of a taken-down row (and the crawled rows' error class)
STATUS = "opted_out"  # the crawled status of a taken-down row: a permanent failure, never fetched again
TAG, TAG_ROWS = "clipline.takedown", "clipline.takedown.rows"
SOURCE_KINDS = ("crawl", "ingest")
CURATE_KINDS = ("curate",)
# what a taken-down crawled row keeps: its identity and where it came from; everything else becomes null
_KEEP = ("uid", "source", "source_row", "status", "error_class", "error_message", "fetched_at", "attempts")
_LEDGER_CLEARED = ("sha256", "phash", "image_bytes")  # what identifies the image in a ledger row

_SHA256, _PHASH = re.compile(r"^[0-9a-fA-F]{64}$"), re.compile(r"^[0-9a-fA-F]{16}$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")


class TakedownError(ValueError):
    """A takedown list that cannot be read, or an output that cannot be taken down; the message names it."""


@dataclass
class TakedownList:
    path: str
    sha256: str  # of the file's bytes: the list's identity in manifests and tags
    urls: set[str] = field(default_factory=set)
    sha256s: set[str] = field(default_factory=set)
    phashes: set[str] = field(default_factory=set)  # 16 lowercase hex digits

    @property
    def entries(self) -> int:
        return len(self.urls) + len(self.sha256s) + len(self.phashes)


def read_list(path: str) -> TakedownList:
    """Parse a takedown list (any fsspec path); an entry of no known kind is an error naming FILE:LINE."""
    try:
        fs, p = storage.filesystem(path)
        data = fs.cat_file(p)
    except (OSError, ValueError) as exc:
        raise TakedownError(f"--list {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    out = TakedownList(path, hashlib.sha256(data).hexdigest())
    for n, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if _SHA256.match(line):
            out.sha256s.add(line.lower())
        elif _PHASH.match(line):
            out.phashes.add(line.lower())
        elif _URL.match(line):
            out.urls.add(line)
        else:
            raise TakedownError(f"{path}:{n}: {line[:200]!r} is neither a URL (scheme://...), a sha256 (64 hex "
                                "digits) nor a pHash (16 hex digits)")
    if not out.entries:
        raise TakedownError(f"{path}: no entries (only blank lines and # comments)")
    return out


@dataclass
class Version:
    """One stage output the takedown touched: the version it replaced and the new one (None: stale)."""

    stage: str
    uses: str
    old: Manifest
    new: Manifest | None
    rows: int  # rows taken down in it (for a stale output: in the data it was made from)


@dataclass
class Consumer:
    run_id: str
    run_name: str
    experiment: str
    stage: str
    inputs: list[str]  # the affected datasets it read, as `name@digest`
    rows: int
    models: list[tuple[str, str]] = field(default_factory=list)  # registered model versions it created


@dataclass
class Result:
    takedown: TakedownList
    versions: list[Version]
    consumers: list[Consumer]
    uids: int  # distinct uids taken down
    matched: dict[str, int]  # entries of each kind that matched a row
    dry_run: bool = False


# ---- matching ------------------------------------------------------------------------------------------------


def current_outputs(job: JobSpec) -> dict[str, Manifest | None]:
    """Each stage's output that `clipline run` of the job reads now (None: it has none yet)."""
    from pipelines.runner import StageFailed, _external, fingerprint, read_current, stage_dir

    out: dict[str, Manifest | None] = {}
    for name, st in job.stages.items():
        ups = {d: m for d in st.needs if (m := out.get(d)) is not None}
        if len(ups) < len(st.needs):
            out[name] = None
            continue
        try:
            fp = fingerprint(st, ups, _external(st))
        except StageFailed:  # its input list is gone: the stage has no current output, its versions remain
            out[name] = None
            continue
        out[name] = read_current(stage_dir(job, name, fp))
    return out


def _versions(job: JobSpec) -> dict[str, list[Manifest]]:
    """Every complete output of each stage of the job that no takedown replaced yet, whichever spec made it:
    an output of an earlier spec or code version holds the rows too, and a run may have read it."""
    from pipelines.runner import SUPERSEDED

    out: dict[str, list[Manifest]] = {}
    for name in job.stages:
        parent = storage.join(job.storage, job.name, name)
        fs, path = storage.filesystem(parent)
        found = []
        for f in sorted(fs.glob(f"{path}/*/{manifest.MANIFEST}")):
            directory = f.rsplit("/", 1)[0]
            directory = directory if storage.is_local(parent) else fs.unstrip_protocol(directory)
            m = manifest.read(directory)
            if m is not None and not storage.exists(storage.join(directory, SUPERSEDED)):
                found.append(m)
        out[name] = found
    return out


def _phash_hits(values: list[str | None], wanted: list[int], max_distance: int) -> tuple[Any, set[int]]:
    """Rows whose pHash is within max_distance bits of a wanted one, and which wanted ones matched."""
    import numpy as np

    present = np.array([v is not None for v in values], dtype=bool)
    hashes = np.array([int(v, 16) if v is not None else 0 for v in values], dtype=np.uint64)
    want = np.array(wanted, dtype=np.uint64)
    hit, matched = np.zeros(len(values), dtype=bool), set[int]()
    for i in range(0, len(hashes), 4096):  # bounded memory: 4096 x entries distances at a time
        d = np.bitwise_count(hashes[i:i + 4096, None] ^ want[None, :]) <= max_distance
        d &= present[i:i + 4096, None]
        hit[i:i + 4096] = d.any(axis=1)
        matched.update(int(j) for j in np.flatnonzero(d.any(axis=0)))
    return hit, matched


def _match(versions: dict[str, list[Manifest]], kinds: dict[str, str], tl: TakedownList,
           max_distance: int) -> tuple[set[str], dict[str, int]]:
    """The uids of every row any entry matches, and how many entries of each kind matched."""
    import pyarrow as pa
    import pyarrow.compute as pc

    uids: set[str] = set()
    urls, shas = pa.array(sorted(tl.urls), pa.string()), pa.array(sorted(tl.sha256s), pa.string())
    phashes = sorted(tl.phashes)
    seen: dict[str, set[Any]] = {"url": set(), "sha256": set(), "phash": set()}

    def scan(url: str, columns: tuple[str, ...]) -> None:
        t = storage.read_parquet(url)
        names = set(t.column_names)
        hit = pa.array([False] * t.num_rows)
        for col, wanted, kind in (("url", urls, "url"), ("sha256", shas, "sha256")):
            if col in columns and col in names and len(wanted):
                mask = pc.fill_null(pc.is_in(t.column(col), wanted), False)
                seen[kind].update(v for v in pc.filter(t.column(col), mask).to_pylist())
                hit = pc.or_(hit, mask)
        if "phash" in columns and "phash" in names and phashes:
            mask, which = _phash_hits(t.column("phash").to_pylist(), [int(h, 16) for h in phashes], max_distance)
            seen["phash"].update(which)
            hit = pc.or_(hit, pa.array(mask))
        uids.update(pc.filter(t.column("uid"), hit).to_pylist())

    for name, m in ((n, m) for n, ms in versions.items() for m in ms):
        if kinds[name] in SOURCE_KINDS:
            for u in m.shard_urls():
                scan(u, ("url", "sha256"))
        elif kinds[name] in CURATE_KINDS:
            for rec in m.extra.get("ledger", []):
                scan(storage.join(m.location, rec["path"]), ("sha256", "phash"))
            for u in m.shard_urls():
                scan(u, ("url", "sha256", "phash"))
    return uids, {k: len(v) for k, v in seen.items()}


# ---- new versions --------------------------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _copy(src: str, dst: str) -> None:
    fs, p = storage.filesystem(src)
    storage.atomic_write(dst, fs.cat_file(p))


def _write(out: str, path: str, table: Any, dry_run: bool) -> dict[str, Any]:
    """Write a shard of a new version (as storage.write_shard does); a dry run only computes its record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    if not dry_run:
        storage.atomic_write(storage.join(out, path), data)
    return layout.shard_record(path, table.num_rows, data)


def _taken(t: Any, uids: Any) -> Any:
    import pyarrow.compute as pc

    return pc.fill_null(pc.is_in(t.column("uid"), uids), False)


def _set_where(t: Any, mask: Any, values: dict[str, Any], cleared: Any) -> Any:
    """`t` with the masked rows' columns in `values` set to those values and those in `cleared` nulled."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = []
    for f in t.schema:
        col = t.column(f.name)
        if f.name in values:
            col = pc.if_else(mask, pa.scalar(values[f.name], f.type), col)
        elif f.name in cleared:
            col = pc.if_else(mask, pa.scalar(None, f.type), col)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=t.schema)


def _each_shard(entries: list[dict[str, Any]], urls: list[str], out: str, uids: Any, dry_run: bool,
             change: Any) -> list[dict[str, Any]]:
    """Each shard of a version into the new one: copied whole when no row of it is taken down, else written as
    `change(table, mask)` makes it (None: the shard is left out). The new version's shard entries."""
    import pyarrow.compute as pc

    new = []
    for entry, url in zip(entries, urls, strict=True):
        t = storage.read_parquet(url)
        mask = _taken(t, uids)
        if not pc.any(mask).as_py():
            if not dry_run:
                _copy(url, storage.join(out, entry["path"]))
            new.append(layout.shard_entry(entry["path"], entry))
        elif (changed := change(t, mask)) is not None:
            new.append(_write(out, entry["path"], changed, dry_run))
    return new


def _new_source(old: Manifest, out: str, uids: Any, tl: TakedownList, dry_run: bool) -> tuple[Manifest, int]:
    """Crawled shards: a taken-down row stays in place, reduced to its identity (see the module doc)."""
    counts, taken = dict(old.counts), 0
    note = f"taken down by list sha256 {tl.sha256[:16]}"

    def blank(t: Any, mask: Any) -> Any:
        nonlocal taken
        gone = t.filter(mask)
        for status in gone.column("status").to_pylist():
            counts[status] = counts.get(status, 0) - 1
        for cls in gone.column("error_class").to_pylist():
            if cls is not None and f"error_{cls}" in counts:
                counts[f"error_{cls}"] -= 1
            kind = "x_robots_tag" if cls == "opted_out" else cls  # a crawl's opted_out_<kind> counts (stage.py)
            if kind is not None and f"opted_out_{kind}" in counts:
                counts[f"opted_out_{kind}"] -= 1
            if cls == "robots_unavailable" and "robots_unavailable" in counts:
                counts["robots_unavailable"] -= 1
        counts[STATUS] = counts.get(STATUS, 0) + gone.num_rows
        counts[f"error_{REASON}"] = counts.get(f"error_{REASON}", 0) + gone.num_rows
        taken += gone.num_rows
        values = {"status": STATUS, "error_class": REASON, "error_message": note}
        return _set_where(t, mask, values, set(t.schema.names) - set(_KEEP))

    shards = _each_shard(old.shards, old.shard_urls(), out, uids, dry_run, blank)
    counts["taken_down"] = counts.get("taken_down", 0) + taken
    extra = {**old.extra, "version": int(old.extra.get("version", 1)) + 1}
    return _replace(old, out, shards, counts, extra, old.inputs, tl, taken), taken


def _new_curate(old: Manifest, out: str, inputs: dict[str, Any], uids: Any, tl: TakedownList,
                dry_run: bool) -> tuple[Manifest, int]:
    """A curate version: taken-down rows leave the curated shards; in the ledger they stay, reason takedown."""
    import pyarrow.compute as pc

    counts, taken = dict(old.counts), 0

    def mark(t: Any, mask: Any) -> Any:
        nonlocal taken
        gone = t.filter(mask)
        for kept, reason in zip(gone.column("kept").to_pylist(), gone.column("reason").to_pylist(), strict=True):
            key = "rows_out" if kept else f"dropped_{reason}"
            if key in counts:
                counts[key] -= 1
        taken += gone.num_rows
        return _set_where(t, mask, {"kept": False, "reason": REASON}, _LEDGER_CLEARED)

    def remove(t: Any, mask: Any) -> Any:
        left = t.filter(pc.invert(mask))
        return left if left.num_rows else None  # a shard left empty is dropped from the list

    entries = old.extra.get("ledger", [])
    ledger = _each_shard(entries, [storage.join(old.location, e["path"]) for e in entries], out, uids, dry_run, mark)
    shards = _each_shard(old.shards, old.shard_urls(), out, uids, dry_run, remove)
    counts[f"dropped_{REASON}"] = counts.get(f"dropped_{REASON}", 0) + taken
    if "rows_out" in counts and counts["rows_out"] != sum(s["rows"] for s in shards):
        raise TakedownError(f"{old.location}: takedown accounting: the ledger keeps {counts['rows_out']} rows but "
                            f"the curated shards hold {sum(s['rows'] for s in shards)}")
    metrics = dict(old.metrics)
    if counts.get("rows_in"):
        metrics["kept_fraction"] = counts.get("rows_out", 0) / counts["rows_in"]
    return _replace(old, out, shards, counts, {**old.extra, "ledger": ledger}, inputs, tl, taken, metrics), taken


def _replace(old: Manifest, out: str, shards: list[dict[str, Any]], counts: dict[str, int], extra: dict[str, Any],
             inputs: dict[str, Any], tl: TakedownList, taken: int, metrics: dict[str, float] | None = None
             ) -> Manifest:
    fingerprint = out.rstrip("/").rsplit("/", 1)[-1]
    takedown = {"list_sha256": tl.sha256, "rows": taken, "entries": tl.entries,
                "previous": {"fingerprint": old.fingerprint, "digest": old.digest, "path": old.location}}
    return dataclasses.replace(
        old, fingerprint=fingerprint, shards=shards, counts=counts, inputs=inputs,
        metrics=metrics if metrics is not None else dict(old.metrics), started_at=_now(), finished_at=_now(),
        clipline_version=__version__, extra={**extra, "takedown": takedown}, digest="", location=out)


def _publish(old: Manifest, new: Manifest, tl: TakedownList) -> None:
    """The new version's manifest (last, as for any stage output), then the old version's pointer to it."""
    from pipelines.runner import SUPERSEDED

    manifest.write(new.location, new)
    storage.write_json(storage.join(old.location, SUPERSEDED),
                       {"location": new.location, "digest": new.digest, "takedown_sha256": tl.sha256,
                        "at": _now()})


def _holds(m: Manifest, uses: str, uids: Any) -> bool:
    """Whether a crawl, ingest or curate output holds a row to take down (its uid column only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if uses in SOURCE_KINDS:
        urls = m.shard_urls()
    elif uses in CURATE_KINDS:
        urls = [storage.join(m.location, rec["path"]) for rec in m.extra.get("ledger", [])]
    else:
        return False
    for url in urls:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            if pc.any(pc.is_in(pq.read_table(f, columns=["uid"]).column("uid"), uids)).as_py():
                return True
    return False


def _rewrite(job: JobSpec, versions: dict[str, list[Manifest]], uids_: set[str], tl: TakedownList,
             dry_run: bool) -> list[Version]:
    """New versions of every output holding a listed row, and of every curate output of a replaced crawl; the
    other outputs made from a replaced or stale one are stale (reported, not rewritten)."""
    import pyarrow as pa

    from pipelines.runner import _external, fingerprint, read_current

    uids = pa.array(sorted(uids_), pa.string())
    current = current_outputs(job)
    affected: dict[str, int] = {}  # old digest -> rows taken down in it or in what it was made from
    replaced: dict[str, Manifest] = {}  # old digest -> its new version
    done: list[Version] = []
    for name, st in job.stages.items():
        for m in versions[name]:
            ups = {d: i["digest"] for d in st.needs if isinstance(i := m.inputs.get(d), dict) and "digest" in i}
            changed = [d for d, g in ups.items() if g in affected]
            hit = _holds(m, st.uses, uids)
            derived = storage.join(job.storage, job.name, name,
                                   storage.canonical_digest({"takedown": tl.sha256, "previous": m.digest})[:16])
            v: Version | None = None
            if st.uses in SOURCE_KINDS and hit:
                made, taken = _new_source(m, derived, uids, tl, dry_run)
                v = Version(name, st.uses, m, made, taken)
            elif (st.uses in CURATE_KINDS and (hit or changed) and all(ups[d] in replaced for d in changed)
                  and all(job.stages[d].uses in SOURCE_KINDS for d in st.needs)):
                out = derived
                cur = current.get(name)
                if cur is not None and cur.location == m.location and changed:
                    # the spec's current output: the new one goes where the runner looks for it, so the next
                    # run's fingerprint (from the new upstream digest) finds it as a cache hit
                    new_ups = {d: replaced.get(g) or read_current(m.inputs[d]["path"]) for d, g in ups.items()}
                    if all(u is not None for u in new_ups.values()):
                        fp = fingerprint(st, {d: u for d, u in new_ups.items() if u is not None}, _external(st))
                        out = storage.join(job.storage, job.name, name, fp)
                inputs = {**m.inputs, **{d: {"fingerprint": u.fingerprint, "digest": u.digest, "path": u.location}
                                         for d in changed if (u := replaced[ups[d]])}}
                made, taken = _new_curate(m, out, inputs, uids, tl, dry_run)
                v = Version(name, st.uses, m, made, taken)
            elif changed or hit:  # not rewritten: a later run recomputes it from the new versions
                v = Version(name, st.uses, m, None, max((affected[ups[d]] for d in changed), default=0))
            if v is not None:
                done.append(v)
                affected[m.digest] = max(v.rows, max((affected[ups[d]] for d in changed), default=0))
                if v.new is not None:
                    replaced[m.digest] = v.new
    if not dry_run:
        for v in done:
            if v.new is not None:
                _publish(v.old, v.new, tl)
    return done


# ---- lineage -------------------------------------------------------------------------------------------------


def consumers(client: Any, affected: dict[str, int]) -> list[Consumer]:
    """Every run that read an affected digest (a stage's input), and those that read what such a run made."""
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    runs, token = [], None
    while True:
        page = client.search_runs(list(exps), max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break

    def datasets(run: Any, context: str) -> list[Any]:
        out = []
        for di in run.inputs.dataset_inputs if run.inputs else []:
            tags = {t.key: t.value for t in di.tags}
            if tags.get("mlflow.data.context") == context:
                out.append(di.dataset)
        return out

    found: dict[str, Consumer] = {}
    grew = True
    while grew:  # to a fixed point: a run's outputs are affected once one of its inputs is
        grew = False
        for run in runs:
            hits = [d for d in datasets(run, "input") if d.digest in affected]
            if not hits or run.info.run_id in found:
                continue
            rows = max(affected[d.digest] for d in hits)
            found[run.info.run_id] = Consumer(
                run.info.run_id, run.info.run_name or "", exps.get(run.info.experiment_id, ""),
                run.data.tags.get("clipline.stage", ""), [f"{d.name}@{d.digest[:12]}" for d in hits], rows)
            for d in datasets(run, "output"):
                affected.setdefault(d.digest, rows)
            grew = True
    for c in found.values():
        for mv in client.search_model_versions(f"run_id = '{c.run_id}'"):
            c.models.append((mv.name, str(mv.version)))
    return sorted(found.values(), key=lambda c: (c.experiment, c.stage, c.run_id))


def _tag(client: Any, consumers: list[Consumer], sha: str) -> None:
    for c in consumers:
        client.set_tag(c.run_id, TAG, sha)
        client.set_tag(c.run_id, TAG_ROWS, str(c.rows))
        for name, version in c.models:
            client.set_model_version_tag(name, version, TAG, sha)
            client.set_model_version_tag(name, version, TAG_ROWS, str(c.rows))


# ---- the command ---------------------------------------------------------------------------------------------


def takedown(job: JobSpec, tl: TakedownList, max_distance: int = 0, dry_run: bool = False) -> Result:
    """Write new versions of the job's affected outputs without the listed rows, and tag the runs and model
    versions that used the old ones (see the module doc). With dry_run, only say what would be done."""
    from pipelines import spool
    from pipelines.tracking import resolve_uri

    if not 0 <= max_distance <= 64:
        raise TakedownError(f"--max-distance {max_distance}: expected 0 to 64 bits")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    uri = resolve_uri(job.tracking_uri, job.storage)
    spool.probe(uri)  # a tracking server that does not answer: stop before any write (TrackingUnavailable)
    found = _versions(job)
    kinds = {n: st.uses for n, st in job.stages.items()}
    uids, matched = _match(found, kinds, tl, max_distance)
    versions = _rewrite(job, found, uids, tl, dry_run) if uids else []
    affected = {v.old.digest[:36]: v.rows for v in versions}  # MLflow keeps a dataset digest's first 36
    used_by: list[Consumer] = []
    if affected:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        used_by = consumers(client, affected)
        if not dry_run:
            _tag(client, used_by, tl.sha256)
    return Result(tl, versions, used_by, len(uids), matched, dry_run)


def report_lines(r: Result) -> list[str]:
    """What `clipline takedown` prints: the list, each new or stale version, each run and model version."""
    tl = r.takedown
    lines = [f"takedown {tl.path} (sha256 {tl.sha256}): {tl.entries} entries ({len(tl.urls)} URLs, "
             f"{len(tl.sha256s)} sha256, {len(tl.phashes)} pHash); matched {r.matched.get('url', 0)} URLs, "
             f"{r.matched.get('sha256', 0)} sha256, {r.matched.get('phash', 0)} pHash: {r.uids} rows"
             + (" (dry run: nothing written or tagged)" if r.dry_run else "")]
    for v in r.versions:
        if v.new is not None:
            lines.append(f"dataset {v.stage:<12} {v.rows} rows taken down: {v.old.location} -> {v.new.location}")
        else:
            lines.append(f"stale   {v.stage:<12} {v.old.location}: made from taken-down rows; the next "
                         "`clipline run` recomputes it")
    for c in r.consumers:
        lines.append(f"run     {c.run_id} {c.run_name} (experiment {c.experiment}, stage {c.stage or '-'}) "
                     f"read {', '.join(c.inputs)}")
        lines.extend(f"model   {name} version {version} (run {c.run_id})" for name, version in c.models)
    if not r.versions:
        lines.append("nothing to take down: no row of the job's current outputs matches the list")
    return lines
