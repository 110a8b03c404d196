"""A new sqlite tracking store made from the cached empty one is the store MLflow itself would have made."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import sqlite_store
from pipelines.tracking import Tracker


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # MLflow puts the Default experiment's artifacts under the working directory
    return tmp_path / "cache" / "clipline"


def _schema(db: Path) -> tuple[dict[str, list[str]], list[tuple]]:
    """Every table's and index's definition, its clauses sorted (MLflow's own migrations order a table's CHECK
    constraints differently from one run to the next), and the schema revision."""
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        tables = {name: sorted(sql.split(", \n")) for name, sql in rows}
        return tables, conn.execute("SELECT version_num FROM alembic_version").fetchall()


def test_a_seeded_store_is_the_one_mlflow_makes(tmp_path, cache):
    own, seeded = tmp_path / "own" / "mlflow.db", tmp_path / "seeded" / "mlflow.db"
    own.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{own}").search_experiments()  # MLflow's migrations, as without clipline

    assert sqlite_store.seed(f"sqlite:///{seeded}")
    (template,) = cache.glob("mlflow-*-empty.db")
    assert _schema(seeded) == _schema(own)  # every table and index, at the same revision
    with closing(sqlite3.connect(seeded)) as conn:
        assert conn.execute("SELECT count(*) FROM experiments").fetchone() == (0,)

    # MLflow opens it as its own: the Default experiment where it puts it, and a run logs
    client = MlflowClient(tracking_uri=f"sqlite:///{seeded}")
    default = {e.name: e.artifact_location for e in client.search_experiments()}
    assert default == {e.name: e.artifact_location for e in MlflowClient(f"sqlite:///{own}").search_experiments()}
    run = client.create_run("0").info.run_id
    client.log_metric(run, "m", 1.5)
    assert client.get_run(run).data.metrics == {"m": 1.5}

    # the template is made once: a second store is a copy of the same file
    stamp = template.stat().st_mtime_ns
    assert sqlite_store.seed(f"sqlite:///{tmp_path / 'third.db'}")
    assert template.stat().st_mtime_ns == stamp


def test_an_existing_store_is_never_replaced(tmp_path, cache):
    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}", "exp", str(tmp_path))
    run = tracker.start_job("j", {}, {})
    assert not sqlite_store.seed(f"sqlite:///{db}")
    assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run).info.run_name.startswith("j-")
    # and a tracker on it finds the experiment it made
    assert Tracker(f"sqlite:///{db}", "exp", str(tmp_path)).experiment_id == tracker.experiment_id


def test_a_template_of_another_revision_is_made_again(tmp_path, cache):
    cache.mkdir(parents=True)
    assert sqlite_store.seed(f"sqlite:///{tmp_path / 'a.db'}")
    (template,) = cache.glob("mlflow-*-empty.db")
    with closing(sqlite3.connect(template)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = 'stale'")
    assert sqlite_store.seed(f"sqlite:///{tmp_path / 'b.db'}")
    assert _schema(tmp_path / "b.db") == _schema(tmp_path / "a.db")


def test_without_a_writable_cache_mlflow_makes_the_store(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache directory would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert not sqlite_store.seed(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", str(tmp_path))
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment(tracker.experiment_id)


def test_only_local_sqlite_files_are_seeded(tmp_path, cache):
    for uri in ("http://127.0.0.1:1", "sqlite:///:memory:", "postgresql://u@127.0.0.1/db", str(tmp_path / "x.db")):
        assert not sqlite_store.seed(uri), uri
    assert not cache.exists()
