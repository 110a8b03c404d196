"""fsspec paths, atomic writes and JSON helpers.

Every file a stage produces goes through here so that a killed worker never leaves a half-written file
under its final name.  On a local disk bytes go to a temporary name in the same directory first, then are
renamed (atomic on POSIX).  An object store has no rename (fsspec's `mv` is a copy and a delete: twice the
I/O, and a killed mover leaves the temp key), but it needs none: one PUT, or one completed multipart upload,
makes an object appear whole or not at all.  So there the bytes go straight to the final key in one
`pipe_file`, never through a buffered file object, whose `__exit__` on an exception would commit whatever it
had buffered as a partial object.  A multipart upload cut short stays an uncompleted upload, which no
listing or read ever returns (a bucket lifecycle rule aborts those).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipelines import layout

TMP_MARK = ".tmp-"


def resolve(url: str) -> str:
    """An absolute form of a storage URL; local paths are made absolute against the working directory."""
    if "://" in url:
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url))


# object stores whose fsspec drivers cache directory listings; see filesystem()
_LISTING_CACHED = ("s3://", "s3a://", "gs://", "gcs://")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for a URL.

    Object stores are opened without fsspec's listings cache: shards are written by other processes (Ray
    workers), and a cached listing of their directory would answer "no such file" for an object that
    exists, or list one that a --force removed, for as long as the cache lives."""
    if url.startswith(_LISTING_CACHED):
        return url_to_fs(url, use_listings_cache=False)
    return url_to_fs(url)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def expand(pattern: str) -> list[str]:
    """The files a path or glob names, in a stable order (directories left out), as URLs of the pattern's
    filesystem (local paths stay paths); empty when nothing matches."""
    fs, path = filesystem(pattern)
    if any(c in pattern for c in "*?["):
        matches = [m for m in sorted(fs.glob(path)) if not fs.isdir(m)]
    else:
        matches = [path] if fs.exists(path) else []
    return [m if is_local(pattern) else fs.unstrip_protocol(m) for m in matches]


def file_keys(files: list[str]) -> dict[str, Any]:
    """Each file's fsspec key (size and modification time, or ETag): what changes when the file changes."""
    keys = {}
    for f in files:
        fs, path = filesystem(f)
        keys[f] = fs.ukey(path)
    return keys


class StorageError(OSError):
    """Storage refused a write (unwritable, full, gone); the message names the path."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    def __str__(self) -> str:
        return str(self.args[0])


def atomic_write(url: str, data: bytes) -> None:
    """Write bytes so that the final name appears only once the whole content is there (see the module doc)."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        try:
            fs.pipe_file(path, data)  # one PUT, or a multipart upload that s3fs aborts on an error
        except (OSError, ValueError) as exc:  # s3fs turns service errors into OSError; ValueError: a bad key
            raise StorageError(f"cannot write {url} ({len(data)} bytes): {getattr(exc, 'strerror', None) or exc}",
                               getattr(exc, "errno", None)) from exc
        return
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/{TMP_MARK}{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    try:
        fs.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic on POSIX, even over an existing file
    except OSError as exc:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)  # a partial temp file takes space a full disk needs; it was never visible as `url`
        except OSError:
            pass
        raise StorageError(f"cannot write {url} ({len(data)} bytes): {exc.strerror or exc}", exc.errno) from exc


def write_parquet(url: str, table: Any, compression: str = "zstd") -> dict[str, Any]:
    """Write an Arrow table as one Parquet file, atomically; the manifest's `rows`, `bytes` and `sha256` of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression=compression)
    data = buf.getvalue().to_pybytes()
    atomic_write(url, data)
    return layout.file_record(table.num_rows, data)


def write_shard(directory: str, path: str, table: Any, compression: str = "zstd") -> dict[str, Any]:
    """Write an Arrow table as the shard `path` of a stage directory (write_parquet); its manifest record."""
    return layout.shard_entry(path, write_parquet(join(directory, path), table, compression))


def read_parquet(url: str, columns: list[str] | None = None) -> Any:
    """One Parquet file from any fsspec URL, as an Arrow table: whole, or only `columns` (the others' pages are
    not read)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def write_json(url: str, obj: Any) -> None:
    atomic_write(url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def is_file(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isfile(path)


def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url: str, chunk: int = 1 << 20) -> str:
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_digest(obj: Any) -> str:
    """sha256 of the canonical JSON form of obj: the same content always gives the same digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
