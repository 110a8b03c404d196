"""`_manifest.json`: the record, written last, that makes a stage's output directory complete.

A directory without a manifest is incomplete and is never read as output.  The manifest lists every
shard with its row count, size and sha256; its `digest` covers the fingerprint and the shard list, so
downstream fingerprints change exactly when the data they read changes.  Its JSON Schema
(`schemas/manifest.schema.json`) is generated from the `Manifest` dataclass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any, TypedDict

import jsonschema

from pipelines import storage
from pipelines.configschema import Keywords, document_schema, field

MANIFEST = "_manifest.json"
SCHEMA_VERSION = 1

_HEX64 = "^[0-9a-f]{64}$"


class Shard(TypedDict):
    """One output file of a stage, as the manifest lists it (a plain dict in the manifest's JSON)."""

    path: Annotated[str, Keywords(description="relative to the manifest's directory")]
    rows: Annotated[int, Keywords(minimum=0)]
    bytes: Annotated[int, Keywords(minimum=0)]
    sha256: Annotated[str, Keywords(pattern=_HEX64)]


@dataclass(kw_only=True)
class Manifest:
    """A stage output's record: what made it (fingerprint, code, params, inputs) and what it holds."""

    job: str
    stage: str
    uses: str
    fingerprint: str = field(help="the stage's cache key", pattern="^[0-9a-f]{16,64}$")
    code_version: str
    params: dict[str, Any]
    inputs: dict[str, Any] = field(
        help="upstream stage name -> its manifest's fingerprint, digest and path; or external input identity")
    # plain dicts (what stages return and readers index) of the shape Shard
    shards: list[Annotated[dict[str, Any], Shard]]
    counts: dict[str, int]
    metrics: dict[str, float]
    started_at: str
    finished_at: str
    clipline_version: str = ""
    git_sha: str | None = None
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field({})
    digest: str = field("", "sha256 of fingerprint and shards", required=True, pattern=_HEX64)
    schema_version: int = field(SCHEMA_VERSION, required=True, const=SCHEMA_VERSION)
    location: str = field("", "the directory it was read from", stored=False, compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = storage.canonical_digest({"fingerprint": self.fingerprint, "shards": self.shards})

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def size(self) -> str:
        """What the output holds, for a person: a training's steps (its shards are checkpoints), else rows."""
        return f"{self.counts['steps']} steps" if "steps" in self.counts else f"{self.rows} rows"

    def shard_urls(self) -> list[str]:
        return [storage.join(self.location, s["path"]) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("location")
        return out


MANIFEST_SCHEMA: dict[str, Any] = document_schema(
    Manifest, "https://clipline.dev/schemas/manifest.schema.json", "clipline stage manifest")


def parquet_schema(m: Manifest, reader: str) -> Any:
    """The Arrow schema of an upstream output's first shard, for a stage (`reader`, its kind) that reads a crawl's,
    ingest's or curate's Parquet shards; ValueError naming the upstream stage when they are not Parquet (a train
    stage's checkpoints, export's tars)."""
    import pyarrow.parquet as pq

    for shard in m.shards:
        if not shard["path"].endswith(".parquet"):
            raise ValueError(f"{reader}: the upstream stage {m.stage!r} (uses: {m.uses}) wrote {shard['path']}, not "
                             f"Parquet shards; {reader} reads a crawl, ingest or curate stage")
    fs, path = storage.filesystem(m.shard_urls()[0])
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


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
