"""The runner: stage selection, failure and resume, retries, a killed crawl, and the CLI around it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tests.support.probe  # noqa: F401  (registers the test-only `probe` stage)
from pipelines import cli, manifest, spec, storage
from pipelines.demo.server import DemoServer, url_list
from pipelines.runner import Selection, StageFailed, plan, run_job
from tests.conftest import REPO, crawl_stage, mlflow_runs, read_output, run_label, write_job
from tests.support.cli import run_cli
from tests.support.net import free_port, wait_until

pytestmark = pytest.mark.slow


def two_stage_job(tmp_path, web, **probe_with):
    url_list(web.base_url, 20).to_parquet(tmp_path / "urls.parquet")
    return write_job(tmp_path, {
        "crawl": crawl_stage(str(tmp_path / "urls.parquet")),
        "probe": {"uses": "probe", "needs": ["crawl"], "with": probe_with},
    })


def test_selection_flags(tmp_path):
    job = spec.resolve({"name": "j", "stages": {
        "a": {"uses": "crawl", "with": {"input": "/x"}},
        "b": {"uses": "probe", "needs": ["a"]},
        "c": {"uses": "probe", "needs": ["b"]},
        "d": {"uses": "probe", "needs": ["a"]},
    }}, "j.yaml")
    assert Selection().stages(job) == list(job.stages)
    assert list(job.stages).index("a") < list(job.stages).index("b") < list(job.stages).index("c")
    assert Selection(from_="b").stages(job) == ["b", "c"]
    assert Selection(until="c").stages(job) == [n for n in job.stages if n in {"a", "b", "c"}]
    assert Selection(only=["d"]).stages(job) == ["d"]
    with pytest.raises(ValueError, match="--from zz: no such stage in j.yaml; stages: "):
        Selection(from_="zz").stages(job)


def test_failed_stage_keeps_earlier_stages_and_a_rerun_resumes(tmp_path, web, ray_local, capsys):
    marker = tmp_path / "fail"
    marker.write_text("")
    path = two_stage_job(tmp_path, web, fail_marker=str(marker))

    assert cli.main(["run", str(path), "--no-progress"]) == cli.EXIT_STAGE_FAILED
    err = capsys.readouterr().err
    assert f"stage 'probe' failed: RuntimeError: probe told to fail by {marker}" in err
    assert "run the same command again to resume" in err
    states = {r["stage"]: r["state"] for r in plan(spec.load(path))}
    assert states == {"crawl": "cached", "probe": "incomplete"}  # it started: its directory holds its run id

    runs = mlflow_runs(tmp_path / "store")
    assert [(run_label(r), r.info.status) for r in runs] == [("t", "FAILED"), ("crawl", "FINISHED"),
                                                               ("probe", "FAILED")]
    assert "probe told to fail" in runs[2].data.tags["clipline.error"]

    marker.unlink()
    outcomes = run_job(spec.load(path), progress=False)
    assert [(o.stage, o.state) for o in outcomes] == [("crawl", "cached"), ("probe", "ran")]
    assert outcomes[1].manifest.counts["rows_seen"] == 20
    assert outcomes[1].manifest.inputs["crawl"]["digest"] == outcomes[0].manifest.digest
    # one MLflow run per stage output: the re-run continued the failed probe run, now under the new job run
    runs = mlflow_runs(tmp_path / "store")
    probe = [r for r in runs if r.info.run_name == "probe"]
    assert len(probe) == 1 and probe[0].info.status == "FINISHED"
    assert probe[0].data.tags["clipline.attempts"] == "2" and probe[0].data.tags["clipline.resumed"] == "true"
    assert "clipline.error" not in probe[0].data.tags  # the first attempt's error left with it
    assert probe[0].data.tags["mlflow.parentRunId"] == [r for r in runs if run_label(r) == "t"][-1].info.run_id
    assert probe[0].info.run_id == outcomes[1].manifest.mlflow_run_id


def test_stage_retries_then_succeeds(tmp_path, web, ray_local):
    counter = tmp_path / "failures-left"
    counter.write_text("2")
    path = two_stage_job(tmp_path, web, fail_times_file=str(counter))
    with pytest.raises(StageFailed, match="transient probe failure, 1 left"):
        run_job(spec.load(path), progress=False)  # retries: 0
    counter.write_text("1")
    outcomes = run_job(spec.load(path, ["stages.probe.retries=1"]), progress=False)
    assert outcomes[-1].state == "ran" and counter.read_text() == "0"


def test_only_a_downstream_stage_needs_its_upstream_output(tmp_path, web, ray_local):
    path = two_stage_job(tmp_path, web)
    with pytest.raises(StageFailed, match="it needs stage 'crawl', which has no complete output"):
        run_job(spec.load(path), Selection(only=["probe"]), progress=False)
    outcomes = run_job(spec.load(path), Selection(until="crawl"), progress=False)
    assert [(o.stage, o.state) for o in outcomes] == [("crawl", "ran"), ("probe", "not selected")]
    outcomes = run_job(spec.load(path), Selection(from_="probe"), progress=False)
    assert [(o.stage, o.state) for o in outcomes] == [("crawl", "not selected"), ("probe", "ran")]


def test_killed_crawl_is_never_read_as_complete_and_resumes(tmp_path, ray_local):
    """SIGKILL the whole `clipline run` process group once one shard is written; then finish the job."""
    with DemoServer(port=0, slow_seconds=120) as web:
        rows = url_list(web.base_url, 40)
        rows.loc[20:, "url"] = [web.url("slow", i) for i in range(20, 40)]  # shard 1 hangs until released
        rows.to_parquet(tmp_path / "urls.parquet")
        path = write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=20,
                                                         timeout=60)}, ray={"num_cpus": 2})
        (row,) = plan(spec.load(path))
        out = row["path"]
        _run_killed_when(path, lambda: storage.exists(f"{out}/part-00000.parquet"), "shard written")
        first_shard = storage.sha256_file(f"{out}/part-00000.parquet")

        assert manifest.read(out) is None
        assert plan(spec.load(path))[0]["state"] == "incomplete"
        assert run_cli("status", path).stdout.split()[:2] == ["crawl", "incomplete"]

        web.release.set()  # the web recovers; the rerun finishes the interrupted shard only
        (outcome,) = run_job(spec.load(path), progress=False)
    m = outcome.manifest
    assert outcome.state == "ran" and m.location == out
    # >= 1: a worker of the killed driver may still finish shard 1 (atomically) before Ray reaps it
    assert m.metrics["shards_resumed"] >= 1
    assert m.shards[0]["sha256"] == first_shard
    data = read_output(m)
    assert sorted(data["source_row"]) == list(range(40))
    assert (data["status"] == "success").all()
    assert not [p for p in os.listdir(out) if p.startswith(storage.TMP_MARK)]


def _run_killed_when(path, ready, what: str) -> None:
    """`clipline run` in its own process group, SIGKILLed (driver, local Ray and workers) once ready() holds."""
    log = Path(path).with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(path), "--no-progress"],
                                cwd=REPO, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(ready, 300, what, interval=0.05, alive=lambda: proc.poll() is None,
                   detail=lambda: log.read_text()[-4000:])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _tree(directory) -> dict[str, str]:
    """Every data file under a stage's output, by relative path, with its content's digest."""
    root = Path(directory)
    return {str(p.relative_to(root)): storage.sha256_file(str(p)) for p in sorted(root.rglob("*.parquet"))}


def test_a_driver_killed_mid_curate_reruns_it_whole_and_keeps_the_crawl(tmp_path, web, ray_local):
    """SIGKILL the job's driver while curate writes its ledger; the re-run takes the crawl from cache and
    finishes curate with exactly the files an uninterrupted run writes."""
    url_list(web.base_url, 300).to_parquet(tmp_path / "urls.parquet")
    stages = {"crawl": crawl_stage(str(tmp_path / "urls.parquet"), samples_per_shard=20),
              "curate": {"uses": "curate", "needs": ["crawl"],
                         "with": {"rules": ["basic", "dedup_image", "dedup_text"], "basic": {"min_side": 32},
                                  "shard_rows": 40}}}
    path = write_job(tmp_path, stages, ray={"num_cpus": 2})
    job = spec.load(path)

    def curate_dir() -> str | None:  # known once the crawl is complete: its digest is part of the fingerprint
        return {r["stage"]: r["path"] for r in plan(job)}["curate"]

    known: list[str] = []

    def writing_ledger() -> bool:
        # the plan (code digests, input files) only until it names the directory: a poll is then one glob, so a
        # loaded machine does not let curate finish between two polls
        if not known and (d := curate_dir()) is not None:
            known.append(d)
        return bool(known) and bool(list(Path(known[0]).glob("ledger/part-*.parquet")))

    _run_killed_when(path, writing_ledger, "curate ledger file")
    crawl_dir, curate_dir = {r["stage"]: r["path"] for r in plan(job)}["crawl"], curate_dir()
    crawl_files = _tree(crawl_dir)
    partial = _tree(curate_dir)
    assert manifest.read(crawl_dir) is not None and manifest.read(curate_dir) is None
    assert partial and {r["stage"]: r["state"] for r in plan(spec.load(path))} == {"crawl": "cached",
                                                                                   "curate": "incomplete"}

    outcomes = run_job(spec.load(path), progress=False)
    assert [(o.stage, o.state) for o in outcomes] == [("crawl", "cached"), ("curate", "ran")]
    assert _tree(crawl_dir) == crawl_files  # the crawl was not redone
    m = outcomes[1].manifest
    assert m.counts["rows_in"] == 300 and m.inputs["crawl"]["digest"] == outcomes[0].manifest.digest
    assert not [p for p in Path(curate_dir).rglob("*") if p.name.startswith(storage.TMP_MARK)]

    # an uninterrupted curate of the same crawl output elsewhere writes the same bytes: nothing partial was kept
    clean = tmp_path / "clean"
    clean.mkdir()
    other = write_job(clean, stages, ray={"num_cpus": 2})
    shutil.copytree(crawl_dir, {r["stage"]: r["path"] for r in plan(spec.load(other))}["crawl"])
    crawled, fresh = run_job(spec.load(other), progress=False)
    assert crawled.state == "cached" and fresh.state == "ran"
    assert _tree(curate_dir) == _tree(fresh.manifest.location)
    listed = {s["path"] for s in m.shards} | {s["path"] for s in m.extra["ledger"]}
    assert set(_tree(curate_dir)) == listed  # no file of the killed attempt is left beside the listed ones
    runs = [r for r in mlflow_runs(tmp_path / "store") if r.info.run_name == "curate"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["clipline.attempts"] == "2"


def demo_storage(tmp_path: Path) -> str:
    """A storage holding the URL list `clipline demo` writes there (which preflight reads the columns of)."""
    (tmp_path / "demo-web").mkdir(exist_ok=True)
    url_list("http://127.0.0.1:9", 3).to_parquet(tmp_path / "demo-web" / "urls.parquet")
    return str(tmp_path)


def laion_parts_on_loopback_s3(request: pytest.FixtureRequest, path: Path) -> None:
    """Put a LAION-style metadata part at every s3:// crawl input the job names, on the loopback S3 server, so
    its preflight reads a real footer there and never looks for the bucket on AWS (and does not depend on
    whether an earlier test pointed the environment at moto)."""
    if "s3://" not in path.read_text():
        return
    s3 = request.getfixturevalue("s3")  # first: a filesystem opened before sees no endpoint and no credentials
    crawls = [s for s in spec.load(path).stages.values() if s.uses == "crawl"]
    inputs = [(st, url) for st in crawls for url in st.params["input"] if url.startswith("s3://")]
    assert inputs, f"{path} names s3:// but no crawl input there: put what it names on the loopback server"
    for stage, pattern in inputs:
        bucket, _, key = pattern[len("s3://"):].partition("/")
        s3.bucket(bucket)
        rows = url_list("http://127.0.0.1:9", 3).rename(columns={"url": "URL", "caption": "TEXT"})
        for col in stage.params.get("passthrough") or []:
            rows[col] = rows.get(col, 0)
        s3.client().put_object(Bucket=bucket, Key=key.replace("*", "00000"), Body=rows.to_parquet())


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_every_shipped_job_is_valid(job, capsys, tmp_path, request):
    laion_parts_on_loopback_s3(request, REPO / "jobs" / job)
    assert cli.main(["validate", str(REPO / "jobs" / job), "--storage", demo_storage(tmp_path)]) == 0
    out = capsys.readouterr()
    assert f"valid job {yaml.safe_load((REPO / 'jobs' / job).read_text())['name']!r}" in out.out
    assert "not checked before the run" not in out.err  # every file was read, none skipped


def test_cli_validate_and_bad_spec_exit_codes(tmp_path, capsys):
    assert cli.main(["validate", str(REPO / "jobs" / "demo.yaml"), "--storage", demo_storage(tmp_path)]) == 0
    assert "valid job 'demo': crawl (crawl)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\nstages:\n  crawl:\n    uses: crawl\n    with: {{input: {tmp_path}/demo-web/urls.parquet, "
                   "threads: many}\n")
    assert cli.main(["validate", str(bad)]) == cli.EXIT_BAD_SPEC
    assert f"{bad}: stages.crawl.with.threads: expected integer, got str 'many'" in capsys.readouterr().err
    assert cli.main(["run", str(bad), "--set", "stages.crawl.with.threads=4", "--until", "nope"]) == cli.EXIT_BAD_SPEC
    assert "--until nope: no such stage" in capsys.readouterr().err




def test_unreachable_ray_address_fails_fast_and_names_it(tmp_path, web):
    port = free_port()  # a loopback port that nothing listens on
    url_list(web.base_url, 5).to_parquet(tmp_path / "urls.parquet")
    path = write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"))})
    done = run_cli("run", path, "--set", f"ray.address=ray://127.0.0.1:{port}", timeout=120)
    assert done.returncode == cli.EXIT_STAGE_FAILED
    assert (f"stage 'crawl' failed: RuntimeError: ray.address 'ray://127.0.0.1:{port}' does not answer: "
            "[Errno 111] Connection refused") in done.stderr


def test_a_local_ray_instance_listens_on_loopback_only(tmp_path):
    """`ray.address: local` starts a Ray with no peers: none of its servers may listen beyond 127.0.0.1."""
    path = write_job(tmp_path, {"crawl": crawl_stage(str(tmp_path / "urls.parquet"))})
    script = (
        "import subprocess\n"
        "from pipelines import spec\nfrom pipelines.runner import init_ray\n"
        f"assert init_ray(spec.load({str(path)!r}))\n"
        "import psutil, ray  # psutil: the copy ray puts on sys.path\n"
        "ray.get(ray.remote(lambda: 1).remote())  # a worker process too\n"
        "me = psutil.Process()\n"
        "pids = {p.pid for p in me.children(recursive=True)} | {me.pid}\n"
        "rows = [l for l in subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout.splitlines()\n"
        "        if any(f'pid={p},' in l for p in pids)]\n"
        "print(len(rows)); print('\\n'.join(l for l in rows if l.split()[3].rsplit(':', 1)[0] not in\n"
        "                                    ('127.0.0.1', '[::ffff:127.0.0.1]')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    listening, *beyond_loopback = r.stdout.strip().splitlines()
    assert int(listening) >= 4 and beyond_loopback == []  # GCS, raylet, object manager, agents: all on loopback
