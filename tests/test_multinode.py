"""The way from the demo to a cluster, as a new user walks it: a fresh 3-node `cluster/local.sh` (head and two
workers on 127.0.0.1), the demo web served by `clipline demo --serve-only`, and `clipline submit --wait` at once,
from a shell whose first `python` is not the one clipline is installed in.

A fresh cluster's first submission used to fail its crawl with a FileNotFoundError naming no file: the nodes
share one session directory, and a worker node's runtime env agent, meeting the job's working_dir for the
first time, deleted and unpacked it again under the driver that ran in it on the head.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import manifest, spec
from pipelines.demo.run import DEMO_JOB
from pipelines.runner import _cause, plan
from tests.conftest import REPO
from tests.support.net import free_port, wait_until

VENV_BIN = Path(sys.executable).parent
LOCAL_SH = REPO / "cluster" / "local.sh"
IMAGES = 120
RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS", "RAY_API_SERVER")


def plain_env(tmp: Path) -> dict[str, str]:
    """A shell as a user has it: no Ray variables, and a `python` first on PATH without clipline's dependencies."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    assert system and subprocess.run([system, "-c", "import fsspec"], capture_output=True).returncode != 0, \
        "the test needs a system python3 without fsspec"
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(system)
    env = {k: v for k, v in os.environ.items() if not k.startswith(RAY_VARS)}
    return env | {"PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A freshly started head + 2 workers; yields the dashboard URL and the plain shell's env with local.sh's
    exports (RAY_API_SERVER_ADDRESS among them, as the README has users eval them)."""
    env = plain_env(tmp_path_factory.mktemp("shell"))
    # short: Ray's Unix socket paths under the state directory may not pass 107 bytes
    state = tempfile.mkdtemp(prefix="cl-m-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    try:
        start = subprocess.run([str(LOCAL_SH), "start", "--workers", "2", "--state-dir", state, "--port", str(port),
                                "--dashboard-port", str(dashboard)], capture_output=True, text=True, env=env,
                               timeout=400)
        log = Path(state, "local_cluster.log")
        assert start.returncode == 0, start.stderr + (log.read_text()[-3000:] if log.exists() else "")
        assert f"nodes and submitted jobs run {VENV_BIN / 'python'}" in start.stderr, start.stderr
        exports = dict(shlex.split(line)[1].split("=", 1) for line in start.stdout.splitlines()
                       if line.startswith("export "))
        yield f"http://127.0.0.1:{dashboard}", env | exports
    finally:
        stop = subprocess.run([str(LOCAL_SH), "stop", "--state-dir", state], capture_output=True, text=True,
                              env=env, timeout=120)
        assert stop.returncode == 0, stop.stderr
        shutil.rmtree(state, ignore_errors=True)


class DemoWeb:
    """`clipline demo --serve-only` in a subprocess: what it printed, and a stop that checks how it ended."""

    def __init__(self, store: str, env: dict[str, str], images: int = IMAGES, port: int = 0) -> None:
        self.proc = subprocess.Popen([str(VENV_BIN / "clipline"), "demo", "--serve-only", "--storage", store,
                                      "--port", str(port), "--images", str(images)], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        self.info: dict[str, str] = {}
        self.err: list[str] = []
        # drain both pipes in threads: a full pipe would block the server
        self.readers = [threading.Thread(target=self._read_out, daemon=True),
                        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for reader in self.readers:
            reader.start()
        wait_until(lambda: {"base_url", "url_list", "storage"} <= self.info.keys(), 60, "the demo web",
                   alive=lambda: self.proc.poll() is None)

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            key, _, value = line.strip().partition(" ")
            self.info[key] = value

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # a server the signal did not stop is not left behind the failing test
            self.proc.wait(30)
            raise
        for reader in self.readers:  # what it wrote last is read to the end of its pipes before a test looks
            reader.join(30)
        return code


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_fresh_three_node_cluster_runs_the_first_submission(cluster, tmp_path):
    dashboard, env = cluster
    store = str(tmp_path / "store")
    web = DemoWeb(store, env)
    try:
        assert web.info["url_list"] == f"{store}/demo-web/urls.parquet" and web.info["storage"] == store
        urls = pq.read_table(web.info["url_list"]).column("url").to_pylist()
        assert len(urls) == IMAGES and all(u.startswith(web.info["base_url"] + "/") for u in urls)

        # the first job this cluster sees, submitted the moment it is up; RAY_API_SERVER_ADDRESS names a port
        # where nothing listens, so this reaches the cluster only if the explicit --address wins
        wrong = env | {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{free_port()}"}
        sets = ["stages.crawl.with.samples_per_shard=40", "stages.crawl.with.threads=4"]
        r = subprocess.run([str(VENV_BIN / "clipline"), "-v", "submit", str(DEMO_JOB), "--address", dashboard,
                            "--storage", store, *[w for s in sets for w in ("--set", s)], "--until", "curate",
                            "--wait"], env=wrong, capture_output=True, text=True, timeout=300, cwd=REPO)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-5000:]
        assert "attempt 1/2 failed" not in out and "Traceback" not in out, out[-5000:]
        sid = r.stdout.splitlines()[0]
        # the driver ran in the cluster's Python (local.sh's interpreter), not the shell's first `python`
        assert f"driver of submission {sid}: Python 3.11" in out and f"at {VENV_BIN / 'python'} " in out, out[-3000:]
        assert f"submitted 'demo' to {dashboard} as {sid}" in r.stderr
    finally:
        assert web.stop() == 0
    assert "clipline: demo web stopped" in "".join(web.err)

    # every row of the URL list is in the crawl's output exactly once, spread over the shards of three nodes
    job = spec.load(DEMO_JOB, sets, store)
    rows = {row["stage"]: row for row in plan(job)}
    assert rows["crawl"]["state"] == "cached" and rows["curate"]["state"] == "cached"
    assert rows["train"]["state"] == "missing"  # --until curate
    crawl = manifest.read(rows["crawl"]["path"])
    assert crawl.rows == IMAGES and len(crawl.shards) == IMAGES // 40
    crawled = [pq.read_table(f"{crawl.location}/{s['path']}", columns=["url", "status"]) for s in crawl.shards]
    assert sum(t.num_rows for t in crawled) == IMAGES
    assert sorted(u for t in crawled for u in t.column("url").to_pylist()) == sorted(urls)
    statuses = [s for t in crawled for s in t.column("status").to_pylist()]
    assert crawl.counts["input_rows"] == IMAGES and statuses.count("success") >= IMAGES * 0.9
    assert {k: statuses.count(k) for k in set(statuses)} == {k: crawl.counts[k] for k in set(statuses)}

    # the submission by its id: status with --address, logs through the exported RAY_API_SERVER_ADDRESS
    st = subprocess.run([str(VENV_BIN / "clipline"), "status", sid, "--address", dashboard], env=env,
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout and "driver_exit_code  0" in st.stdout, st.stderr
    logs = subprocess.run([str(VENV_BIN / "clipline"), "logs", sid], env=env, capture_output=True, text=True,
                          timeout=120)
    assert logs.returncode == 0 and "crawl: done" in logs.stdout and "curate: done" in logs.stdout, logs.stderr


@pytest.mark.slow
def test_an_explicit_address_wins_over_the_exported_one(cluster):
    dashboard, env = cluster
    assert env["RAY_API_SERVER_ADDRESS"] == dashboard  # local.sh's export: a cluster that answers
    closed = f"http://127.0.0.1:{free_port()}"
    for cmd in (["status", "clipline-x", "--address", closed], ["logs", "clipline-x", "--address", closed]):
        r = subprocess.run([str(VENV_BIN / "clipline"), *cmd], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"no Ray Jobs API at {closed}" in r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_demo_serve_only_serves_until_signalled_and_refuses_set(tmp_path):
    import urllib.request

    env = dict(os.environ)
    web = DemoWeb(str(tmp_path / "store"), env, images=30)
    try:
        first = pq.read_table(web.info["url_list"]).to_pylist()[0]
        assert len(pq.read_table(web.info["url_list"])) == 30 and first["caption"]
        with urllib.request.urlopen(f"{web.info['base_url']}/img/0", timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
    finally:
        assert web.stop(signal.SIGINT) == 0  # Ctrl-C
    # the same web again (same port): the URL list is left as it is, so a crawl of it stays a cache hit
    port = int(web.info["base_url"].rsplit(":", 1)[1])
    again = DemoWeb(str(tmp_path / "store"), env, images=30, port=port)
    assert again.stop() == 0  # SIGTERM
    assert any("URL list unchanged" in line for line in again.err), again.err
    r = subprocess.run([str(VENV_BIN / "clipline"), "demo", "--serve-only", "--set", "x=1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--serve-only runs no job" in r.stderr


def test_a_failed_attempt_names_where_a_fileless_oserror_came_from(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    here = os.getcwd()
    os.chdir(gone)
    try:
        gone.rmdir()
        with pytest.raises(FileNotFoundError) as info:
            os.getcwd()  # what the driver met once its working dir had been unpacked again under it
    finally:
        os.chdir(here)
    text = _cause(info.value)
    assert text.startswith("FileNotFoundError: [Errno 2] No such file or directory, raised at ")
    assert f"{Path(__file__).name}:" in text and "test_a_failed_attempt_names_where" in text
    named = FileNotFoundError(2, "No such file or directory", "/data/urls.parquet")
    assert _cause(named) == "FileNotFoundError: [Errno 2] No such file or directory: '/data/urls.parquet'"
