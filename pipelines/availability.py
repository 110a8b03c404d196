"""How available a crawled dataset version's URLs were: success rate by status, error class and host, and
across the versions a refresh chain made (link rot).

One crawl output (a dataset version) is read shard by shard, only the columns each question needs (`uid`,
`url`, `status`, `error_class`, `fetched_at`; never the image bytes), so memory grows with the number of
distinct hosts, not with rows. Per-version success rates of the earlier versions come from their manifests
(free); link rot between two consecutive versions reads both and holds the earlier version's successful
uids (16 bytes) with their fetch time (8 bytes): 24 bytes per successful row of the earlier version.

What link rot measures, and what it cannot: a refresh copies an earlier success instead of fetching it again
(`plan.py`: successes are always reused), so a reused success says nothing about whether its URL still
works. A row counts as *re-fetched* only when the later version holds a different `fetched_at` for it;
link rot is the share of re-fetched earlier successes that now fail. Rows *reused* (copied, not re-checked)
and rows dropped from the later list are counted beside it, never as alive or dead.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import manifest, storage

log = logging.getLogger("clipline.availability")

ARTIFACT_PLOT = "crawl_availability.png"  # `{stage}_availability.png` in the crawl stage's run
ARTIFACT_JSON = "crawl_availability.json"
TOP_HOSTS = 20
NO_HOST = "(no host)"  # a null URL, or one without a scheme://host part
OTHER = "(other hosts)"
# scheme://[userinfo@]host: the host is an [IPv6] literal or runs to the first : / ? #
_HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/?#]*\]|[^:/?#]*)"


def hosts_of(urls: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The lower-cased host of each URL (vectorised; urlsplit per row is ~20x slower), NO_HOST where none."""
    found = pc.struct_field(pc.extract_regex(urls, _HOST), "host")
    host = pc.utf8_lower(found)
    return pc.if_else(pc.or_kleene(pc.is_null(host), pc.equal(host, "")), pa.scalar(NO_HOST), host)


def _columns(url: str, wanted: Sequence[str]) -> pa.Table:
    """Only these columns of one shard (those it has): never the image bytes."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        return pf.read(columns=[c for c in wanted if c in names])


@dataclass
class _HostRow:
    rows: int = 0
    success: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Tally:
    """Rows by status, error class and host over the shards added so far."""

    status: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    hosts: dict[str, _HostRow] = field(default_factory=dict)

    def add(self, table: pa.Table) -> None:
        """A shard's `url`, `status` and `error_class` columns; grouped in Arrow, so Python sees each
        (host, status, error class) once per shard, not each row."""
        t = pa.table({"host": hosts_of(table.column("url")), "status": table.column("status"),
                      "error_class": table.column("error_class").fill_null("")})
        groups = t.group_by(["host", "status", "error_class"]).aggregate([([], "count_all")])
        for host, status, err, n in zip(*(groups.column(c).to_pylist() for c in
                                          ("host", "status", "error_class", "count_all")), strict=True):
            self.status[status] += n
            h = self.hosts.setdefault(host, _HostRow())
            h.rows += n
            if status == "success":
                h.success += n
            if err:
                self.errors[err] += n
                h.errors[err] += n

    @property
    def rows(self) -> int:
        return sum(self.status.values())


def tally(shard_urls: Sequence[str]) -> Tally:
    """Stream a version's shards into a Tally, one shard in memory at a time (three columns of it)."""
    out = Tally()
    for url in shard_urls:
        out.add(_columns(url, ["url", "status", "error_class"]))
    return out


def _ranked(counts: Counter[str]) -> list[tuple[str, int]]:
    """Most rows first, ties by name: the same table for the same data, whatever order the shards came in."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _rate(n: int, d: int) -> float | None:
    return n / d if d else None


def summarise(t: Tally, top: int = TOP_HOSTS) -> dict[str, Any]:
    """The version's table: rows, success rate, rows and share by status and by error class, the `top` hosts
    by rows with their success rate and most common error class, and one line for all other hosts."""
    rows = t.rows
    by_rows = sorted(t.hosts.items(), key=lambda kv: (-kv[1].rows, kv[0]))  # ties: by name, so stable
    shown, rest = by_rows[:top], by_rows[top:]

    def host_line(name: str, h: _HostRow) -> dict[str, Any]:
        main = _ranked(h.errors)[0] if h.errors else (None, 0)
        return {"host": name, "rows": h.rows, "success": h.success, "success_rate": _rate(h.success, h.rows),
                "main_error_class": main[0], "main_error_rows": main[1]}

    other_rows, other_ok = sum(h.rows for _, h in rest), sum(h.success for _, h in rest)
    other_errors: Counter[str] = Counter()
    for _, h in rest:
        other_errors.update(h.errors)
    other = host_line(OTHER, _HostRow(other_rows, other_ok, other_errors)) | {"hosts": len(rest)}
    return {
        "rows": rows,
        "success": t.status.get("success", 0),
        "success_rate": _rate(t.status.get("success", 0), rows),
        "by_status": {k: {"rows": v, "share": _rate(v, rows)} for k, v in _ranked(t.status)},
        "by_error_class": {k: {"rows": v, "share": _rate(v, rows)} for k, v in _ranked(t.errors)},
        "hosts": {"distinct": len(t.hosts), "top_n": top, "top": [host_line(k, h) for k, h in shown],
                  "other": other},
    }


# ---- across refreshes ---------------------------------------------------------------------------------------


def chain(refreshed_from: dict[str, Any] | None, max_versions: int = 10) -> Iterator[tuple[dict[str, Any],
                                                                                          manifest.Manifest | None]]:
    """The versions this one was refreshed from, newest first: each as named by the later one's manifest
    (`extra.refreshed_from`: location, digest, version) with its manifest, or None where it is gone (and the
    chain stops there, since the rest is named only by it)."""
    seen: set[str] = set()
    link = refreshed_from
    while link and len(seen) < max_versions and link.get("location") not in seen:
        seen.add(link["location"])
        m = manifest.read(link["location"])
        yield link, m
        if m is None:
            return
        link = m.extra.get("refreshed_from")


def _success_index(shard_urls: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The earlier version's successful rows: uids (as 16 bytes) sorted, and their fetched_at (ms)."""
    uids, when = [], []
    for url in shard_urls:
        t = _columns(url, ["uid", "status", "fetched_at"])
        ok = t.filter(pc.equal(t.column("status"), "success"))
        uids.append(np.frombuffer(bytes.fromhex("".join(ok.column("uid").to_pylist())), dtype="S16"))
        when.append(_millis(ok))
    u = np.concatenate(uids) if uids else np.array([], dtype="S16")
    w = np.concatenate(when) if when else np.array([], dtype=np.int64)
    order = np.argsort(u, kind="stable")
    return u[order], w[order]


def _millis(t: pa.Table) -> np.ndarray:
    """fetched_at as int64 milliseconds, -1 where null (a row never fetched)."""
    if "fetched_at" not in t.column_names:
        return np.full(t.num_rows, -1, dtype=np.int64)
    ms = pc.cast(pc.cast(t.column("fetched_at"), pa.timestamp("ms", tz="UTC")), pa.int64())
    return ms.fill_null(-1).to_numpy().astype(np.int64)


def link_rot(earlier: Sequence[str], later: Sequence[str]) -> dict[str, Any]:
    """Of the rows that succeeded in `earlier` (shard URLs of one version), how many the later version
    re-fetched, and of those how many now fail and by which error class; the others reused (copied, not
    re-checked) or dropped from the later list."""
    uids, when = _success_index(earlier)
    matched = reused = refetched = still_ok = 0
    failing: Counter[str] = Counter()
    for url in later:
        t = _columns(url, ["uid", "status", "error_class", "fetched_at"])
        t = t.filter(pc.not_equal(t.column("status"), "duplicate"))  # a duplicate shares its first row's uid
        if not len(uids) or not t.num_rows:
            continue
        u = np.frombuffer(bytes.fromhex("".join(t.column("uid").to_pylist())), dtype="S16")
        pos = np.minimum(np.searchsorted(uids, u), len(uids) - 1)
        hit = uids[pos] == u
        now = _millis(t)
        again = hit & (now != -1) & (now != when[pos])  # another fetch than the one that succeeded
        matched += int(hit.sum())
        refetched += int(again.sum())
        reused += int((hit & ~again).sum())
        status = np.asarray(t.column("status").to_pylist(), dtype=object)
        err = np.asarray(t.column("error_class").to_pylist(), dtype=object)
        ok = again & (status == "success")
        still_ok += int(ok.sum())
        failing.update(str(e or s) for e, s in zip(err[again & ~ok], status[again & ~ok], strict=True))
    now_failing = sum(failing.values())
    return {"succeeded_before": len(uids), "rows_reused": reused, "rows_refetched": refetched,
            "refetched_still_success": still_ok, "refetched_now_failing": now_failing,
            "now_failing_by_error_class": dict(_ranked(failing)),
            "link_rot_rate": _rate(now_failing, refetched),
            "dropped_from_list": len(uids) - matched}


def report(shard_urls: Sequence[str], *, version: int, location: str, refreshed_from: dict[str, Any] | None,
           top: int = TOP_HOSTS, rot_pairs: int = 1, max_versions: int = 10) -> dict[str, Any]:
    """The availability table of one dataset version (its shards, version number, where it is, and the
    output it was refreshed from), with the versions before it and link rot between the newest `rot_pairs`
    pairs of consecutive versions still present."""
    out: dict[str, Any] = {"version": version, "location": location, **summarise(tally(shard_urls), top)}
    versions = [{"version": version, "location": location, "rows": out["rows"], "success": out["success"],
                 "success_rate": out["success_rate"], "present": True}]
    rot: list[dict[str, Any]] = []
    later_urls: list[str] | None = list(shard_urls)
    later_version = version
    for link, m in chain(refreshed_from, max_versions):
        v = int(link.get("version", 0))
        if m is None:
            versions.append({"version": v, "location": link["location"], "present": False})
            break
        ok, rows = m.counts.get("success", 0), m.rows
        versions.append({"version": v, "location": m.location, "rows": rows, "success": ok,
                         "success_rate": _rate(ok, rows), "present": True})
        if later_urls is not None and len(rot) < rot_pairs:
            rot.append({"from_version": v, "to_version": later_version,
                        **link_rot(m.shard_urls(), later_urls)})
        later_urls, later_version = m.shard_urls(), v
    out["versions"] = versions[::-1]  # oldest first
    out["link_rot"] = rot
    if len(versions) == 1:
        out["note"] = "only one version: this crawl was not refreshed from an earlier output, so no link rot"
    elif not versions[-1]["present"]:
        out["note"] = (f"version {versions[-1]['version']} ({versions[-1]['location']}) is gone: the chain "
                       "stops there")
    return out


def of_manifest(m: manifest.Manifest, top: int = TOP_HOSTS, rot_pairs: int = 1) -> dict[str, Any]:
    """`report` of a complete crawl output."""
    return report(m.shard_urls(), version=int(m.extra.get("version", 1)), location=m.location,
                  refreshed_from=m.extra.get("refreshed_from"), top=top, rot_pairs=rot_pairs)


# ---- the plot -----------------------------------------------------------------------------------------------


def figure(rep: dict[str, Any], title: str) -> Any:
    """Share of rows by outcome (success, then each error class), the top hosts' success rates and, with two
    or more versions, the success rate of each version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = [*rep["hosts"]["top"], *([rep["hosts"]["other"]] if rep["hosts"]["other"]["hosts"] else [])]
    versions = [v for v in rep["versions"] if v["present"]]
    panels = 3 if len(versions) >= 2 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, max(3.5, 0.3 * len(hosts) + 1.5)), squeeze=False)
    outcome = [("success", rep["success_rate"] or 0.0)] + [
        (k, v["share"] or 0.0) for k, v in rep["by_error_class"].items()]
    ax = axes[0][0]
    ax.bar([k for k, _ in outcome], [v for _, v in outcome],
           color=["#55a868"] + ["#c44e52"] * (len(outcome) - 1))
    for i, (_, v) in enumerate(outcome):
        ax.text(i, v, f"{v:.1%}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of rows")
    ax.set_title(f"{rep['rows']:,} rows: success and error classes", fontsize=10)
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax = axes[0][1]
    # hosts come from the web: a "$" would start matplotlib's math mode (and a parse error)
    names = [f"{h['host'][:40]} ({h['rows']:,})".replace("$", r"\$") for h in hosts][::-1]
    rates = [h["success_rate"] or 0.0 for h in hosts][::-1]
    ax.barh(names, rates, color="#4c72b0")
    for i, v in enumerate(rates):
        ax.text(v, i, f" {v:.0%}", va="center", fontsize=7)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("success rate")
    ax.set_title(f"top {len(rep['hosts']['top'])} of {rep['hosts']['distinct']:,} hosts by rows", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    if panels == 3:
        ax = axes[0][2]
        xs, ys = [v["version"] for v in versions], [v["success_rate"] or 0.0 for v in versions]
        ax.plot(xs, ys, marker="o")
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.1%}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.set_ylim(0, 1.08)
        ax.set_xticks([v["version"] for v in versions])
        ax.set_xlabel("dataset version")
        ax.set_ylabel("success rate")
        ax.set_title("success rate per version", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def png(rep: dict[str, Any], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig = figure(rep, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
