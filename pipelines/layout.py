"""What a stage's output directory holds and how the manifest records it: the one owner of those names.

A stage's output is `{storage}/{job}/{stage}/{fingerprint}/`. Its data files are shards named
`part-NNNNN.parquet` by their index (a crawl shard written by the driver after its task failed is
`part-NNNNN-failed.parquet`, one written by a speculative copy of its task that finished first
`part-NNNNN-copy.parquet`); curate's ledger keeps one `ledger/part-NNNNN.parquet` per crawled shard;
export's webdataset shards are `part-NNNNN.tar`, with open_clip's `sizes.json` (shard name -> samples) beside them.
The manifest lists each shard as a record `{"path", "rows", "bytes", "sha256"}`: its path within the stage
directory, its rows, and the size and sha256 of the bytes written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

SHARD_FIELDS = ("path", "rows", "bytes", "sha256")  # a manifest's shard record (manifest.schema.json)
LEDGER_DIR = "ledger"
WDS_SIZES = "sizes.json"  # open_clip_train reads the sample count of webdataset shards from this file beside them


def stage_dir(root: str, job: str, stage: str, fingerprint: str) -> str:
    """The output directory of one stage of a job for one fingerprint, under the job's storage URL."""
    return "/".join([root.rstrip("/"), job, stage, fingerprint])  # names match spec's pattern: no "/"


def shard_name(index: int, failed: bool = False, copy: bool = False) -> str:
    """A data shard's file name (and path within the stage directory); `copy`: a crawl shard's speculative copy."""
    return f"part-{index:05d}{'-failed' if failed else ''}{'-copy' if copy else ''}.parquet"


def tar_name(index: int) -> str:
    """A webdataset (tar) shard's file name, numbered like the Parquet shards."""
    return f"part-{index:05d}.tar"


def ledger_name(index: int) -> str:
    """The path of curate's ledger file for crawled shard `index`, within the stage directory."""
    return f"{LEDGER_DIR}/{shard_name(index)}"


def file_record(rows: int, data: bytes) -> dict[str, Any]:
    """What the manifest says of a file from the bytes written: rows, size and sha256 (its path aside)."""
    return {"rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def shard_record(path: str, rows: int, data: bytes) -> dict[str, Any]:
    """The manifest's record of a shard written as `data` at `path` within the stage directory."""
    return {"path": path, **file_record(rows, data)}


def shard_entry(path: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of shard `path` from a record holding (at least) its rows, bytes and sha256."""
    return {"path": path, **{k: record[k] for k in SHARD_FIELDS[1:]}}
