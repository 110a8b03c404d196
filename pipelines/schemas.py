"""The JSON documents in `schemas/`, generated from the code that defines each contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa


def arrow_schema_json(schema: pa.Schema, title: str, passthrough: bool = True) -> dict[str, Any]:
    doc = {
        "title": title,
        "format": "arrow",
        "fields": [
            {"name": f.name, "type": str(f.type), "nullable": f.nullable,
             **({"doc": f.metadata[b"doc"].decode()} if f.metadata and b"doc" in f.metadata else {})}
            for f in schema
        ],
        "passthrough": "input columns named in the stage's passthrough list follow these fields",
    }
    if not passthrough:
        del doc["passthrough"]
    return doc


def documents() -> dict[str, Any]:
    from pipelines.configschema import dataclass_schema
    from pipelines.contracts import CRAWLED, EMBEDDINGS
    from pipelines.manifest import MANIFEST_SCHEMA
    from pipelines.spec import job_schema
    from pipelines.stage import builtin_kinds
    from pipelines.stages.curate import config as curate_config
    from pipelines.stages.curate import rules

    curate = rules.schemas()
    job = job_schema(builtin_kinds())
    job["$defs"]["curate"] = dataclass_schema(curate_config.make(rules.builtin()))  # installed plugins left out

    return {
        "job.schema.json": job,
        "manifest.schema.json": MANIFEST_SCHEMA,
        "crawled.schema.json": arrow_schema_json(CRAWLED, "crawled shards (stage `crawl`)"),
        "curated.schema.json": arrow_schema_json(curate["curated"], "curated shards (stage `curate`); crawl passthrough "
                                                          "columns follow the crawled ones"),
        "ledger.schema.json": arrow_schema_json(curate["ledger"], "curate ledger: one row per crawled row"),
        "embeddings.schema.json": arrow_schema_json(
            EMBEDDINGS, "embeddings (stage `embed`): one row per successful row of the dataset embedded; only the "
                        "columns of the embeddings asked for", passthrough=False),
    }


def _text(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def write(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, doc in documents().items():
        (directory / name).write_text(_text(doc))
    return list(documents())


def check(directory: Path) -> list[str]:
    """Names of the files that are missing or differ from what the code generates."""
    return [n for n, d in documents().items() if not (directory / n).exists() or (directory / n).read_text() != _text(d)]
