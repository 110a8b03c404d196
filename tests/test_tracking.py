"""Tracking helpers: params flattening and secret redaction, the tracking URI, and `clipline ui`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from pipelines.redact import REDACTED, scrub
from pipelines.tracking import flatten, resolve_uri
from tests.conftest import REPO
from tests.support.net import free_port, wait_until


def test_params_are_flattened_and_secrets_redacted():
    params = flatten({
        "stages": {"crawl": {"with": {"image_size": 32, "input": ["a", "b"], "api_key": "k-123"}}},
        "tracking": {"uri": "http://mlflow:5000", "password": "hunter2"},
        "ray": {"runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "AKIA", "REGION": "eu-west-1"}}},
        "storage": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    })
    assert params["stages.crawl.with.image_size"] == "32"
    assert params["stages.crawl.with.input"] == '["a", "b"]'
    assert params["tracking.uri"] == "http://mlflow:5000"
    for key in ("stages.crawl.with.api_key", "tracking.password", "ray.runtime_env.env_vars.AWS_ACCESS_KEY_ID",
                "ray.runtime_env.env_vars.REGION", "storage.AWS_SECRET_ACCESS_KEY"):
        assert params[key] == REDACTED, key
    assert not {"k-123", "hunter2", "AKIA", "s3cr3t"} & set(params.values())


def test_credentials_inside_urls_are_redacted():
    params = flatten({
        "tracking": {"uri": "https://ci:hunter2@mlflow.example.org/"},
        "input": ["s3://b/urls.parquet?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&part=2",
                  "https://acct.blob.core.windows.net/c/u.csv?sv=2024&sig=s1gn%3D", "https://h/x?token=t0k&page=1"],
        "storage": "gs://bucket/dir",
        "pip": ["git+https://ghp_tok3n@github.com/org/repo.git", "https://h/cb#access_token=a1&state=s",
                "https://h/p?client_secret=cs1&refresh_token=rt1&q=keep"],
    })
    assert params["tracking.uri"] == f"https://{REDACTED}@mlflow.example.org/"
    assert params["input"] == json.dumps([
        f"s3://b/urls.parquet?X-Amz-Credential={REDACTED}&X-Amz-Signature={REDACTED}&part=2",
        f"https://acct.blob.core.windows.net/c/u.csv?sv=2024&sig={REDACTED}", f"https://h/x?token={REDACTED}&page=1"])
    assert params["storage"] == "gs://bucket/dir"
    assert params["pip"] == json.dumps([
        f"git+https://{REDACTED}@github.com/org/repo.git", f"https://h/cb#access_token={REDACTED}&state=s",
        f"https://h/p?client_secret={REDACTED}&refresh_token={REDACTED}&q=keep"])
    # a password with an @ in it goes whole; a URL without user info, and an e-mail address, are left alone
    assert scrub("http://u:p@ss@host:5000/x?a=b") == f"http://{REDACTED}@host:5000/x?a=b"
    assert scrub("ftp://host/p and mailto:crawl@example.org") == "ftp://host/p and mailto:crawl@example.org"


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri("http://job:5000", str(tmp_path)) == "http://job:5000"
    assert resolve_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_uri(None, str(tmp_path)) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="storage 's3://b/x' is not local.*set tracking.uri"):
        resolve_uri(None, "s3://b/x")


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--storage", str(tmp_path), "--port",
                             str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # MLflow's UI spawns job consumers: stop the whole group

    def experiments() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5",
                                    timeout=2) as resp:
            return resp.read().decode()

    try:
        body = wait_until(experiments, 90, "MLflow UI", interval=0.5, alive=lambda: proc.poll() is None,
                          errors=(OSError,),  # its output once it has exited (a read before would block)
                          detail=lambda: proc.stdout.read().decode()[-2000:] if proc.poll() is not None else "")
        assert '"experiments"' in body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # consumers that ignored SIGTERM
        except ProcessLookupError:
            pass
    assert (tmp_path / "mlflow.db").exists()


def test_a_sqlite_store_keeps_artifacts_beside_its_database_whatever_the_storage(tmp_path):
    """With s3:// storage and `tracking.uri: sqlite:///...`, artifacts go beside the database, never into
    ./mlruns of the directory the job runs in (MLflow's default)."""
    from pipelines.tracking import sqlite_artifact_root

    db = tmp_path / "track" / "mlflow.db"
    assert sqlite_artifact_root(f"sqlite:///{db}") == (tmp_path / "track" / "mlartifacts").as_uri()
    assert sqlite_artifact_root("http://127.0.0.1:5000") is None
