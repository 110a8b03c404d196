"""A new sqlite tracking store, made from an empty one instead of by MLflow's schema migrations.

MLflow makes a new sqlite store by creating its first tables and then running every schema migration since
(alembic, one after another): about 2.4 s on the 2-core machine, paid by every job run that starts on a new
storage (each demo, each test's job). Here MLflow does that once per MLflow version, into an empty store kept
in clipline's cache, and a new store is a copy of it: the same tables at the same schema revision, which MLflow
verifies when it opens the store as it verifies any other. The empty store holds no experiment: MLflow adds its
Default experiment when it first opens the copy, at the artifact location it would have given it anyway.

Anything unusual (a store that exists, a cache that cannot be written, a template of another revision) falls
back to MLflow's own way, never to an error: this only makes a start faster.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

log = logging.getLogger("clipline.tracking")


def _path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI (None for any other store, an in-memory database included)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/clipline, else ~/.cache/clipline (where the log files go too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipline"


def _revision(db: Path) -> str | None:
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            return row[0] if row else None
    except sqlite3.Error:
        return None


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return str(_get_latest_schema_revision())


def template() -> Path | None:
    """The empty store of this MLflow version, made by MLflow once (None where the cache cannot hold it)."""
    import mlflow

    head = _head()
    path = cache_dir() / f"mlflow-{mlflow.__version__}-{head}-empty.db"
    if _revision(path) == head:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".empty-store-") as tmp:
            made = Path(tmp) / "mlflow.db"
            _migrate(f"sqlite:///{made}")
            with closing(sqlite3.connect(made)) as conn, conn:
                conn.execute("DELETE FROM experiments")  # MLflow adds its Default experiment to each copy itself
            if _revision(made) != head:
                return None
            os.replace(made, path)  # whole or not at all, also when two processes make it at once
    except OSError as exc:
        log.debug("no empty tracking store in %s (%s): MLflow makes each new store itself", path.parent, exc)
        return None
    return path


def _migrate(uri: str) -> None:
    """MLflow's own making of a store: its tables, then every migration."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, tempfile.gettempdir())
    store.engine.dispose()


def seed(uri: str) -> bool:
    """Make the sqlite store at `uri` from the empty template if it does not exist yet; True if it did so.

    The copy is written beside the store and linked into place, so a store another process made meanwhile is
    never replaced, and a reader never sees half a file."""
    path = _path(uri)
    if path is None or path.exists():
        return False
    empty = template()
    if empty is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
            copy = Path(tmp) / path.name
            with closing(sqlite3.connect(f"file:{empty}?mode=ro", uri=True)) as src, \
                    closing(sqlite3.connect(copy)) as dst:
                src.backup(dst)
            os.link(copy, path)
    except FileExistsError:
        return False
    except OSError as exc:
        log.debug("could not seed %s (%s): MLflow makes it", path, exc)
        return False
    return True
