"""The way from the demo to a cluster, as a new user walks it: the demo web served by `clipline demo
--serve-only`, and how a failed driver attempt names a file-less OSError.

A fresh cluster's first submission used to fail its crawl with a FileNotFoundError naming no file: the nodes
share one session directory, and a worker node's runtime env agent, meeting the job's working_dir for the
first time, deleted and unpacked it again under the driver that ran in it on the head. The fresh 3-node
cluster, its first submission from a shell whose first `python` is not clipline's, and the explicit --address
are checked on the README's cluster steps (tests/test_readme_cluster.py), which start one such cluster for the
whole suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.runner import _cause
from tests.conftest import REPO
from tests.support.net import wait_until

VENV_BIN = Path(sys.executable).parent
IMAGES = 120


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
