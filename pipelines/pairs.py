"""Image-text datasets at rest: Parquet files or webdataset tars with named columns, read on any fsspec path.

The evaluate stage reads its datasets with this module, and the ingest stage turns such a dataset (or a
built-in one) into shards the train stage reads.  Parquet columns are named as they are; a webdataset's
columns are its members' extensions (`jpg`, `txt`, `cls`, ...), read with Ray Data's `read_webdataset`
without decoding, so images stay encoded bytes.
"""

from __future__ import annotations

from typing import Any, Literal

from pipelines import storage

Format = Literal["auto", "parquet", "webdataset"]


def list_files(name: str, path: str) -> list[str]:
    """The files of a path or glob; an error naming the dataset when nothing matches."""
    files = storage.expand(path)
    if not files:
        raise FileNotFoundError(f"dataset {name}: no file matches {path}")
    return files


def file_format(name: str, path: str, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    raise ValueError(f"dataset {name}: cannot tell the format of {path} from its extension; "
                     "set format: parquet or webdataset")


def read_columns(name: str, path: str, fmt: Format, columns: dict[str, str]) -> dict[str, list[Any]]:
    """Columns of every file under `path`, keyed by role (`image`, `caption`, `label`, ...): {role: values}.

    `columns` maps a role to the column (or webdataset extension) holding it; `where` is added: each row's
    origin, `<file>#<row>` (Parquet) or `<tar>#<key>` (webdataset).  A missing column is an error naming the
    file and the columns it has.  Webdataset values are bytes: captions are decoded as UTF-8 and
    labels parsed as integers by `as_captions` / `as_labels`."""
    files = list_files(name, path)
    kind = file_format(name, files[0], fmt)
    if kind == "parquet":
        return _parquet(name, files, columns)
    return _webdataset(name, files, columns)


def _parquet(name: str, files: list[str], columns: dict[str, str]) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    out: dict[str, list[Any]] = {role: [] for role in columns}
    out["where"] = []
    for f in files:
        fs, p = storage.filesystem(f)
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            have = pf.schema_arrow.names
            missing = [c for c in columns.values() if c not in have]
            if missing:
                raise ValueError(f"dataset {name}: {f} has no column {', '.join(missing)}; it has {', '.join(have)}")
            table = pf.read(columns=list(dict.fromkeys(columns.values())))
        for role, col in columns.items():
            out[role] += table.column(col).to_pylist()
        out["where"] += [f"{f}#{i}" for i in range(table.num_rows)]
    return out


def _webdataset(name: str, files: list[str], columns: dict[str, str]) -> dict[str, list[Any]]:
    import ray.data

    rows = ray.data.read_webdataset(files, decoder=None).take_all()
    rows.sort(key=lambda r: (r["__url__"], r["__key__"]))  # blocks may arrive in any order
    for r in rows:
        missing = [c for c in columns.values() if r.get(c) is None]
        if missing:
            raise ValueError(f"dataset {name}: {r['__url__']} sample {r['__key__']} has no {', '.join(missing)} "
                             f"member; it has {', '.join(k for k in r if not k.startswith('__'))}")
    out = {role: [r[col] for r in rows] for role, col in columns.items()}
    out["where"] = [f"{r['__url__']}#{r['__key__']}" for r in rows]
    return out


def as_captions(name: str, values: list[Any]) -> list[list[str]]:
    """One or more captions per row: a string, a list of strings, or UTF-8 bytes (a webdataset `txt`)."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"dataset {name}: the caption of row {i} is not UTF-8 text") from None
        if isinstance(v, str):
            out.append([v])
        elif isinstance(v, (list, tuple)) and v and all(isinstance(c, str) for c in v):
            out.append(list(v))
        else:
            raise ValueError(f"dataset {name}: the caption of row {i} is {type(v).__name__} {v!r:.60}; expected a "
                             "string or a non-empty list of strings")
    return out


def as_labels(name: str, values: list[Any], classes: int) -> list[int]:
    """Integer class indices in [0, classes): ints, or ASCII digits as bytes (a webdataset `cls`)."""
    out = []
    for i, v in enumerate(values):
        try:
            y = int(v.decode("ascii").strip()) if isinstance(v, bytes) else int(v)
        except (TypeError, ValueError, UnicodeDecodeError):
            raise ValueError(f"dataset {name}: the label of row {i} is {v!r:.40}; expected an integer") from None
        if not 0 <= y < classes:
            raise ValueError(f"dataset {name}: label {y} is not an index into the {classes} classnames (row {i})")
        out.append(y)
    return out
