"""`clipline report`: one self-contained HTML page per job run, also logged as `report.html` on the job's run.

Everything comes from what the job run left behind: its MLflow parent run and stage runs (states, tags,
metric histories) and, through each stage run's fingerprint, the stage's manifest in storage (counts, the
curate ledger, the crawled shards). Thumbnails and plots are embedded as data URIs, so the page is one file
that opens anywhere. Captions, URLs and reasons come from the web: every one of them is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipelines import manifest, storage
from pipelines.manifest import Manifest
from pipelines.spec import JobSpec
from pipelines.tracking import resolve_uri

log = logging.getLogger("clipline.report")

REPORT_ARTIFACT = "report.html"
CURVES_FIRST = ("train/loss", "train/lr", "train/logit_scale", "train/samples_per_s", "train/data_wait_fraction")
MAX_CURVES = 9


class ReportError(ValueError):
    """No job run to report on, or a run id that is not one of this job's runs."""


@dataclass
class StageRun:
    """A stage of the job, its MLflow run in the reported job run (if any) and the manifest that run used."""

    name: str
    uses: str
    run: Any | None
    manifest: Manifest | None

    @property
    def state(self) -> str:
        if self.run is None:
            return "not run in this job run"
        status, cache = self.run.info.status, self.run.data.tags.get("clipline.cache")
        if status == "FINISHED":
            return "cached" if cache == "hit" else "ran"
        return status.lower()

    @property
    def output(self) -> Manifest:
        """The manifest, for the sections, which get only stages that have one (_absent picks them)."""
        assert self.manifest is not None, f"{self.name}: no output in this job run"
        return self.manifest


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


def _num(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


# ---- finding the job run ------------------------------------------------------------------------------------


def find_job_run(client: Any, job: JobSpec, run_id: str | None = None) -> Any:
    """The job's parent run `run_id`, or its latest one."""
    exp = client.get_experiment_by_name(job.experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment {job.experiment!r} at {client.tracking_uri}: run the job first "
                          f"(clipline run {job.source})")
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise ReportError(f"--run-id {run_id}: no such run at {client.tracking_uri} ({exc.error_code})") from None
        tags = run.data.tags
        if run.info.experiment_id != exp.experiment_id or tags.get("clipline.job") != job.name \
                or "mlflow.parentRunId" in tags:
            raise ReportError(f"--run-id {run_id}: not a job run of {job.name!r} in experiment {job.experiment!r}"
                              + (" (it is a stage run)" if "mlflow.parentRunId" in tags else ""))
        return run
    token = None
    while True:  # stage runs carry the job tag too: the newest run without a parent is the job run
        page = client.search_runs([exp.experiment_id], f"tags.`clipline.job` = '{job.name}'",
                                  order_by=["attributes.start_time DESC"], max_results=200, page_token=token)
        for run in page:
            if "mlflow.parentRunId" not in run.data.tags:
                return run
        token = page.token
        if not token:
            raise ReportError(f"no run of job {job.name!r} in experiment {job.experiment!r} at {client.tracking_uri}")


def stage_runs(client: Any, job: JobSpec, parent: Any) -> list[StageRun]:
    """The job's stages in order, each with its run under `parent` and the manifest of its fingerprint."""
    from pipelines.runner import read_current, stage_dir  # read_current: a taken-down version's replacement

    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    by_stage = {r.data.tags.get("clipline.stage"): r for r in children}
    out = []
    for name, st in job.stages.items():
        run = by_stage.get(name)
        fp = run.data.tags.get("clipline.fingerprint") if run else None
        m = read_current(stage_dir(job, name, fp)) if run and fp and run.info.status == "FINISHED" else None
        out.append(StageRun(name, st.uses, run, m))
    return out


def _source_run(client: Any, s: StageRun) -> Any:
    """The run that computed the stage's output: for a cache hit, the earlier run named in its manifest."""
    from mlflow.exceptions import MlflowException

    if s.manifest and s.manifest.mlflow_run_id and s.run and s.manifest.mlflow_run_id != s.run.info.run_id:
        try:
            return client.get_run(s.manifest.mlflow_run_id)
        except MlflowException:  # that run was deleted, or the store moved: this run's own metrics remain
            log.warning("%s: run %s of its manifest is gone; using this job run's stage run", s.name,
                        s.manifest.mlflow_run_id)
    return s.run


# ---- sections -----------------------------------------------------------------------------------------------


def _absent(stages: list[StageRun], uses: str, what: str) -> tuple[list[StageRun], str | None]:
    """The stages of kind `uses` with output in this job run, or the line that says why the section is empty."""
    of_kind = [s for s in stages if s.uses == uses]
    done = [s for s in of_kind if s.manifest is not None]
    if not of_kind:
        return [], f"<p class=note>This job has no {_e(uses)} stage: no {_e(what)}.</p>"
    if not done:
        states = ", ".join(f"{s.name}: {s.state}" for s in of_kind)
        return [], f"<p class=note>No {_e(uses)} stage has output in this job run ({_e(states)}): no {_e(what)}.</p>"
    return done, None


def section_stages(stages: list[StageRun]) -> str:
    rows = []
    for s in stages:
        m, run = s.manifest, s.run
        err = run.data.tags.get("clipline.error") if run else None
        state = f"<span class='state {_e(s.state.split()[0])}'>{_e(s.state)}</span>"
        cells = [
            _e(s.name), _e(s.uses), state + (f"<div class=err>{_e(err)}</div>" if err else ""),
            f"<code>{_e(run.data.tags.get('clipline.fingerprint', '-'))}</code>" if run else "-",
            _num(m.rows) if m else "-",
            _e(", ".join(f"{k} {_num(v)}" for k, v in m.counts.items() if v) or "-") if m else "-",
            f"{_num(m.metrics.get('seconds', 0))} s" if m else "-",
            f"<code>{_e(run.info.run_id)}</code>" if run else "-",
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("stage", "uses", "state", "fingerprint", "rows", "counts", "time",
                                            "MLflow run"))
    return f"<table class=stages><tr>{head}</tr>{''.join(rows)}</table>"


def _reasons(m: Manifest) -> list[str]:
    """The funnel's reasons in rule order (each rule's, from the registry), then any others the counts have."""
    from pipelines import configschema
    from pipelines.stages.curate.config import CurateConfig
    from pipelines.stages.curate.stage import funnel_reasons

    try:
        order = funnel_reasons(configschema.build(CurateConfig, m.params).instances())
    except Exception:  # noqa: BLE001 - rules this installation lacks, a head file gone: the counts' own order
        order = ["not_downloaded"]
    extra = sorted(k.removeprefix("dropped_") for k in m.counts if k.startswith("dropped_"))
    return list(dict.fromkeys([*order, *extra]))


def section_funnel(s: StageRun) -> str:
    c = s.output.counts
    rows_in, left = c.get("rows_in", 0), c.get("rows_in", 0)
    bar = lambda n: f"<div class=bar style='width:{100 * n / max(rows_in, 1):.1f}%'></div>"  # noqa: E731
    out = [f"<tr class=total><td>rows in</td><td class=n data-count=rows_in>{rows_in}</td><td>{bar(rows_in)}</td></tr>"]
    for r in _reasons(s.output):
        n = c.get(f"dropped_{r}", 0)
        left -= n
        out.append(f"<tr><td>&minus; {_e(r)}</td><td class=n data-count='dropped_{_e(r)}'>{n}</td>"
                   f"<td>{bar(left)}<span class=left>{left} left</span></td></tr>")
    rows_out = c.get("rows_out", 0)
    out.append(f"<tr class=total><td>rows out</td><td class=n data-count=rows_out>{rows_out}</td>"
               f"<td>{bar(rows_out)}</td></tr>")
    check = "" if left == rows_out else (f"<p class=err>The counts do not add up: {rows_in} in minus the drops "
                                         f"leaves {left}, but {rows_out} were written.</p>")
    return f"<table class=funnel>{''.join(out)}</table>{check}"


def _read(url: str, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _sample(m: Manifest, cap: int) -> list[dict[str, Any]]:
    """Up to `cap` ledger rows: kept rows and each drop reason in turn, in ledger order, so every reason shows."""
    wanted = {"kept"} | {k.removeprefix("dropped_") for k, v in m.counts.items() if k.startswith("dropped_") and v}
    pools: dict[str, list[dict[str, Any]]] = {k: [] for k in wanted}
    for entry in m.extra.get("ledger", []):
        table = _read(storage.join(m.location, entry["path"]), ["uid", "shard", "row", "kept", "reason", "status"])
        for rec in table.to_pylist():
            pool = pools.setdefault("kept" if rec["kept"] else rec["reason"] or "?", [])
            if len(pool) < cap:
                pool.append(rec)
        if all(len(pools[k]) >= cap for k in wanted):
            break  # enough of every kind: the rest of a large ledger is not read
    picked: list[dict[str, Any]] = []
    order = ["kept", *sorted(k for k in pools if k != "kept")]
    while len(picked) < cap and any(pools.values()):
        for k in order:
            if pools.get(k) and len(picked) < cap:
                picked.append(pools[k].pop(0))
    return picked


def jpeg_thumbnail(data: bytes | None, size: int = 128, max_pixels: int = 64_000_000) -> bytes | None:
    """A JPEG of at most `size` pixels a side re-encoded from image bytes (never the bytes as served), or None
    for no bytes, bytes PIL cannot read, or an image of more than `max_pixels` pixels."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                return None
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a row the curate stage kept may still hold bytes this PIL cannot read
        return None
    return buf.getvalue()


def _thumb(data: bytes | None) -> str | None:
    jpeg = jpeg_thumbnail(data)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else None


def _link(url: str | None) -> str:
    """A link to the image's URL, only for http(s): a `javascript:` URL from an input list stays text."""
    if url and url.lower().startswith(("http://", "https://")):
        return f" <a href='{_e(url)}' rel='noreferrer nofollow'>url</a>"
    return f" <code>{_e(url)}</code>" if url else ""


def section_grid(s: StageRun, cap: int) -> str:
    m = s.output
    picked = _sample(m, cap)
    # the crawl it curated: its input that is not an embed stage's output (semantic_dedup.embeddings), or None if gone
    read = (manifest.read(i["path"]) for i in m.inputs.values() if isinstance(i, dict) and "path" in i)
    crawl = next((u for u in read if u is None or u.uses != "embed"), None)
    note = ""
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for rec in picked:
        by_shard.setdefault(rec["shard"], []).append(rec)
    if crawl is None:
        note = "<p class=err>The crawled shards this curate stage read are gone: no images or captions.</p>"
    else:
        urls = crawl.shard_urls()
        for shard, recs in by_shard.items():
            table = _read(urls[shard], ["uid", "url", "caption", "image"])
            for rec in recs:
                row = {k: table.column(k)[rec["row"]].as_py() for k in table.column_names}
                if row["uid"] != rec["uid"]:
                    raise RuntimeError(f"report: ledger row {rec['uid']} is not row {rec['row']} of {urls[shard]}")
                rec.update(row)
    cards = []
    for rec in picked:
        src = _thumb(rec.get("image"))
        img = f"<img src='{src}' alt=''>" if src else f"<div class=noimg>{_e(rec['status'])}</div>"
        label = "kept" if rec["kept"] else rec["reason"]
        caption = rec.get("caption") or ""
        cards.append(f"<figure class='{'kept' if rec['kept'] else 'dropped'}' data-uid='{_e(rec['uid'])}' "
                     f"data-reason='{_e(label)}'>{img}<figcaption><b>{_e(label)}</b> "
                     f"<span class=cap title='{_e(caption)}'>{_e(caption[:140])}</span>"
                     f"{_link(rec.get('url'))}</figcaption></figure>")
    shown = Counter("kept" if rec["kept"] else rec["reason"] for rec in picked)
    return (f"<p>{len(picked)} of {m.counts.get('rows_in', '?')} rows shown "
            f"({_e(', '.join(f'{k} {v}' for k, v in shown.items()))}), in ledger order; "
            f"at most {cap} (<code>--images</code>).</p>{note}<div class=grid>{''.join(cards)}</div>")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def section_curves(client: Any, s: StageRun) -> str:
    run = _source_run(client, s)
    keys = [k for k in run.data.metrics if (k.startswith("train/") and "/worker_" not in k) or k.startswith("eval/")]
    keys = sorted(keys, key=lambda k: (CURVES_FIRST.index(k) if k in CURVES_FIRST else len(CURVES_FIRST), k))
    series = {}
    for k in keys:
        hist = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, k))
        if len(hist) >= 2:
            series[k] = hist
        if len(series) == MAX_CURVES:
            break
    if not series:
        return f"<p class=note>Run {_e(run.info.run_id)} has no metric with more than one step.</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (k, hist) in zip(axes.flat, series.items(), strict=False):  # the grid may have spare cells
        ax.plot([h[0] for h in hist], [h[1] for h in hist], marker="." if len(hist) < 40 else None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    src = _png(fig)
    plt.close(fig)
    counts = s.output.counts
    return (f"<p>{_num(counts.get('steps', 0))} steps, {_num(counts.get('samples', 0))} samples; metric histories of "
            f"run <code>{_e(run.info.run_id)}</code>: {_e(', '.join(series))}.</p>"
            f"<img class=curves alt='training curves' src='{src}'>")


def section_eval(client: Any, s: StageRun) -> str:
    run = _source_run(client, s)
    table: dict[str, dict[str, float]] = {}
    for k, v in run.data.metrics.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            table.setdefault(parts[1], {})[parts[2]] = v
    if not table:
        return f"<p class=note>Run {_e(run.info.run_id)} has no eval/&lt;dataset&gt;/&lt;metric&gt; metric.</p>"
    names = sorted({n for ms in table.values() for n in ms},  # natural order: recall_at_5 before _at_10
                   key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    sets = sorted(table)  # metrics down, datasets across: a few datasets, many metrics
    head = "".join(f"<th>{_e(ds)}</th>" for ds in sets)
    body = "".join(
        f"<tr><td>{_e(n)}</td>" + "".join(
            f"<td class=n data-metric='eval/{_e(ds)}/{_e(n)}' data-value='{table[ds][n]!r}'>{table[ds][n]:.4f}</td>"
            if n in table[ds] else "<td class=n>-</td>" for ds in sets) + "</tr>" for n in names)
    avg = run.data.metrics.get("eval/average")
    model = s.output.extra.get("model", {})
    return (f"<p>Model {_e(model.get('arch', '?'))} "
            f"({_e(model.get('checkpoint') or model.get('model_uri') or 'random weights')}); metrics of run "
            f"<code>{_e(run.info.run_id)}</code>.</p><table class=eval><tr><th>metric</th>{head}</tr>{body}</table>"
            + (f"<p>Average of the main metrics: <b data-metric='eval/average' data-value='{avg!r}'>{avg:.4f}</b></p>"
               if avg is not None else ""))


# What users of the public lists report, with where; no threshold of our own (the issues are dated: rates fall
# as a list ages).
HEALTHY = ("What success rate is healthy? There is no fixed number: links die as a list ages. Users report about "
           "91-94% of DataComp's small pool downloaded in May 2023 (mlfoundations/datacomp#3) and about 86% in "
           "August 2023 (datacomp#39). A rate that falls during one crawl (datacomp#68: from 0.8 to 0.2) points "
           "at the crawler rather than the list - img2dataset's author first asks about the DNS resolver there: "
           "look for dns, timeout, http_429 and http_5xx rows concentrated on a few hosts.")


def _availability(client: Any, s: StageRun, top: int) -> dict[str, Any]:
    """The crawl's availability table: the JSON its run logged (if it has the same number of top hosts), else
    (an output from before it was logged, or the run gone) computed from its shards."""
    import json

    from pipelines import availability

    run = _source_run(client, s)
    if run is not None:
        name = f"{s.name}_availability.json"
        if name in {a.path for a in client.list_artifacts(run.info.run_id)}:
            with tempfile.TemporaryDirectory() as tmp:
                with open(client.download_artifacts(run.info.run_id, name, tmp)) as f:
                    logged = dict(json.load(f))
            if logged.get("hosts", {}).get("top_n") == top:
                return logged
    return availability.of_manifest(s.output, top=top)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def section_availability(client: Any, s: StageRun, top: int = 20) -> str:
    """A crawl stage's availability: status, error class and top-host tables, versions, link rot, the plot."""
    from pipelines import availability

    rep = _availability(client, s, top)
    cell = lambda v: f"<td class=n>{v}</td>"  # noqa: E731

    def shares(kind: str, table: dict[str, dict[str, Any]]) -> str:
        return "".join(f"<tr data-{kind}='{_e(k)}'><td>{_e(k)}</td>{cell(_num(v['rows']))}{cell(_pct(v['share']))}"
                       "</tr>" for k, v in table.items())

    outcome, errors = shares("status", rep["by_status"]), shares("error", rep["by_error_class"])
    h = rep["hosts"]
    hosts = []
    for x in [*h["top"], *([h["other"]] if h["other"]["hosts"] else [])]:
        name = _e(x["host"]) + (f" ({_num(x['hosts'])} hosts)" if "hosts" in x else "")
        main = _e(x["main_error_class"] or "-") + (f" ({_num(x['main_error_rows'])})" if x["main_error_class"] else "")
        hosts.append(f"<tr data-host='{_e(x['host'])}'><td>{name}</td>{cell(_num(x['rows']))}"
                     f"{cell(_pct(x['success_rate']))}<td>{main}</td></tr>")
    versions = "".join(
        f"<tr><td>{_e(v['version'])}</td><td><code>{_e(v['location'])}</code></td>"
        + (f"{cell(_num(v['rows']))}{cell(_pct(v['success_rate']))}" if v["present"] else "<td colspan=2>gone</td>")
        + "</tr>" for v in rep["versions"])
    rot = "".join(
        f"<tr data-rot='{_e(r['from_version'])}-{_e(r['to_version'])}'><td>v{_e(r['from_version'])} &rarr; "
        f"v{_e(r['to_version'])}</td>{cell(_num(r['succeeded_before']))}{cell(_num(r['rows_reused']))}"
        f"{cell(_num(r['rows_refetched']))}{cell(_num(r['refetched_now_failing']))}{cell(_pct(r['link_rot_rate']))}"
        f"<td>{_e(', '.join(f'{k} {v}' for k, v in r['now_failing_by_error_class'].items()) or '-')}</td>"
        f"{cell(_num(r['dropped_from_list']))}</tr>" for r in rep["link_rot"])
    rot_table = (f"<table class=rot><tr><th>versions</th><th>earlier successes</th><th>reused (copied, not "
                 f"re-checked)</th><th>re-fetched</th><th>re-fetched, now failing</th><th>link rot</th><th>now "
                 f"failing by error class</th><th>dropped from the list</th></tr>{rot}</table>"
                 "<p class=note>A refresh copies earlier successes instead of fetching them again, so only rows "
                 "with a new fetch time are re-checked; link rot is the share of those that now fail.</p>"
                 if rot else "")
    src = "data:image/png;base64," + base64.b64encode(
        availability.png(rep, f"{s.name}: availability of version {rep['version']}")).decode()
    error_table = (f"<table class=avail><tr><th>error class</th><th>rows</th><th>share</th></tr>{errors}</table>"
                   if errors else "<p>No row failed.</p>")
    note = f"<p class=note>{_e(rep['note'])}</p>" if rep.get("note") else ""
    return (f"<p>Version {_e(rep['version'])}: {_num(rep['rows'])} rows, "
            f"<b data-success-rate='{rep['success_rate']!r}'>{_pct(rep['success_rate'])}</b> success; "
            f"{_num(h['distinct'])} hosts.</p>{note}"
            f"<table class=avail><tr><th>status</th><th>rows</th><th>share</th></tr>{outcome}</table>{error_table}"
            f"<table class=hosts><tr><th>host (top {_e(h['top_n'])} by rows)</th><th>rows</th><th>success rate</th>"
            f"<th>main error class</th></tr>{''.join(hosts)}</table>"
            f"<table class=versions><tr><th>version</th><th>output</th><th>rows</th><th>success rate</th></tr>"
            f"{versions}</table>{rot_table}<img class=availability alt='availability' src='{src}'>"
            f"<p class=note>{_e(HEALTHY)}</p>")


# ---- the page -----------------------------------------------------------------------------------------------

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}code{font-size:12px}.meta td:first-child{color:#666}
.note{color:#666;font-style:italic}.err{color:#b00020}.state{padding:0 .4em;border-radius:3px;background:#eee}
.state.ran{background:#d4edda}.state.cached{background:#d6e4f0}.state.failed{background:#f8d7da}
.funnel td:last-child{width:420px}.bar{display:inline-block;height:12px;background:#55a868;vertical-align:middle}
.funnel .left{color:#666;font-size:12px;margin-left:.5em}.funnel tr.total td{font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:8px}
figure{margin:0;border:3px solid #ccc;border-radius:4px;padding:4px;font-size:11px;overflow-wrap:anywhere}
figure.kept{border-color:#55a868}figure.dropped{border-color:#c44e52}
figure img,.noimg{width:128px;height:128px;object-fit:contain;display:block;margin:auto;background:#f4f4f4}
.noimg{display:flex;align-items:center;justify-content:center;color:#888}figcaption a{margin-left:.3em}
img.curves,img.availability{max-width:100%}"""


def render(client: Any, job: JobSpec, parent: Any, stages: list[StageRun], images: int = 48, hosts: int = 20) -> str:
    """The page for one job run."""
    info, t = parent.info, parent.data.tags
    meta = [("job", job.name), ("job run", info.run_id), ("status", info.status),
            ("started", _when(info.start_time)), ("ended", _when(info.end_time)), ("spec", t.get("clipline.spec", "-")),
            ("clipline", f"{t.get('clipline.version', '?')} (git {t.get('clipline.git_sha', '?')[:12]})"),
            ("tracking", client.tracking_uri), ("experiment", job.experiment), ("storage", job.storage)]
    parts = [f"<h1>clipline report: {_e(job.name)}</h1>",
             "<table class=meta>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meta) + "</table>"]
    if t.get("clipline.error"):
        parts.append(f"<p class=err>{_e(t['clipline.error'])}</p>")
    parts += ["<h2 id=stages>Stages</h2>", section_stages(stages)]

    crawled, missing = _absent(stages, "crawl", "availability report")
    parts.append("<h2 id=availability>Availability</h2>")
    parts += [missing] if missing else [f"<h3>{_e(s.name)}</h3>{section_availability(client, s, hosts)}" for s in crawled]
    curated, missing = _absent(stages, "curate", "curate funnel or image grid")
    parts.append("<h2 id=funnel>Curate funnel</h2>")
    parts += [missing] if missing else [f"<h3>{_e(s.name)}</h3>{section_funnel(s)}" for s in curated]
    parts.append("<h2 id=images>Kept and dropped images</h2>")
    parts += [missing] if missing else [f"<h3>{_e(s.name)}</h3>{section_grid(s, images)}" for s in curated]
    trained, missing = _absent(stages, "train", "training curves")
    parts.append("<h2 id=training>Training</h2>")
    parts += [missing] if missing else [f"<h3>{_e(s.name)}</h3>{section_curves(client, s)}" for s in trained]
    evaluated, missing = _absent(stages, "evaluate", "evaluation table")
    parts.append("<h2 id=evaluation>Evaluation</h2>")
    parts += [missing] if missing else [f"<h3>{_e(s.name)}</h3>{section_eval(client, s)}" for s in evaluated]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>clipline report: {_e(job.name)} "
            f"{_e(parent.info.run_id[:8])}</title><style>{CSS}</style></head><body>{''.join(parts)}"
            f"<p class=note>Written {_e(_when(int(dt.datetime.now().timestamp() * 1000)))} by "
            f"<code>clipline report</code>.</p></body></html>\n")


def build_report(job: JobSpec, run_id: str | None = None, out_dir: str | None = None,
                 images: int = 48, hosts: int = 20) -> tuple[str, str]:
    """Write the report of a job run (default: the latest) and log it on that run; (where it went, run id)."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow import MlflowClient

    if images < 0:
        raise ReportError(f"--images {images}: expected 0 or more")
    if hosts < 1:
        raise ReportError(f"--hosts {hosts}: expected 1 or more")
    client = MlflowClient(tracking_uri=resolve_uri(job.tracking_uri, job.storage))
    parent = find_job_run(client, job, run_id)
    page = render(client, job, parent, stage_runs(client, job, parent), images, hosts).encode()
    out = storage.join(out_dir or storage.join(job.storage, job.name, "_reports"), f"report-{parent.info.run_id}.html")
    storage.atomic_write(out, page)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, REPORT_ARTIFACT)
        with open(local, "wb") as f:
            f.write(page)
        client.log_artifact(parent.info.run_id, local)
    log.info("report of job run %s: %s (%d KB), logged as %s", parent.info.run_id, out, len(page) // 1024,
             REPORT_ARTIFACT)
    return out, parent.info.run_id
