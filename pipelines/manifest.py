"""`_manifest.json`: the record, written last, that makes a stage's output directory complete.

A directory without a manifest is incomplete and is never read as output.  The manifest lists every
shard with its row count, size and sha256; its `digest` covers the fingerprint and the shard list, so
downstream fingerprints change exactly when the data they read changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import jsonschema

from pipelines import storage

MANIFEST = "_manifest.json"
SCHEMA_VERSION = 1

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://clipline.dev/schemas/manifest.schema.json",
    "title": "clipline stage manifest",
    "type": "object",
    "required": [
        "schema_version", "job", "stage", "uses", "fingerprint", "digest", "code_version", "params",
        "inputs", "shards", "counts", "metrics", "started_at", "finished_at",
    ],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "job": {"type": "string"},
        "stage": {"type": "string"},
        "uses": {"type": "string"},
        "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{16,64}$"},
        "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "sha256 of fingerprint and shards"},
        "code_version": {"type": "string"},
        "clipline_version": {"type": "string"},
        "git_sha": {"type": ["string", "null"]},
        "params": {"type": "object"},
        "inputs": {
            "type": "object",
            "description": "upstream stage name -> its manifest's fingerprint, digest and path; or external input identity",
        },
        "shards": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["path", "rows", "bytes", "sha256"],
                "additionalProperties": False,
                "properties": {
                    "path": {"type": "string", "description": "relative to the manifest's directory"},
                    "rows": {"type": "integer", "minimum": 0},
                    "bytes": {"type": "integer", "minimum": 0},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
            },
        },
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
        "extra": {"type": "object"},
        "mlflow_run_id": {"type": ["string", "null"]},
        "started_at": {"type": "string"},
        "finished_at": {"type": "string"},
    },
}


@dataclass
class Manifest:
    job: str
    stage: str
    uses: str
    fingerprint: str
    code_version: str
    params: dict[str, Any]
    inputs: dict[str, Any]
    shards: list[dict[str, Any]]
    counts: dict[str, int]
    metrics: dict[str, float]
    started_at: str
    finished_at: str
    clipline_version: str = ""
    git_sha: str | None = None
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    schema_version: int = SCHEMA_VERSION
    location: str = field(default="", compare=False)  # the directory it was read from; not stored

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = storage.canonical_digest({"fingerprint": self.fingerprint, "shards": self.shards})

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def shard_urls(self) -> list[str]:
        return [storage.join(self.location, s["path"]) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("location")
        return out


def write(directory: str, manifest: Manifest) -> None:
    doc = manifest.to_json()
    jsonschema.validate(doc, MANIFEST_SCHEMA)
    storage.write_json(storage.join(directory, MANIFEST), doc)
    manifest.location = directory


def read(directory: str) -> Manifest | None:
    """The manifest of a complete output directory, or None if the directory is incomplete or absent."""
    url = storage.join(directory, MANIFEST)
    if not storage.exists(url):
        return None
    doc = storage.read_json(url)
    try:
        jsonschema.validate(doc, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as exc:
        raise ValueError(f"{url}: not a valid clipline manifest: {exc.message}") from None
    return Manifest(**doc, location=directory)
