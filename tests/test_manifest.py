"""The stage manifest: its schema is generated from the Manifest dataclass, and a manifest reads back as written."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipelines import manifest
from pipelines.manifest import MANIFEST, MANIFEST_SCHEMA, Manifest

SHARD = {"path": "part-00000.parquet", "rows": 3, "bytes": 10, "sha256": "a" * 64}


def make(**changes) -> Manifest:
    fields = dict(job="j", stage="s", uses="crawl", fingerprint="0" * 16, code_version="x", params={"a": 1},
                  inputs={}, shards=[SHARD], counts={"success": 3}, metrics={"seconds": 1.5}, started_at="t0",
                  finished_at="t1")
    return Manifest(**(fields | changes))


def test_a_manifest_reads_back_as_written(tmp_path):
    m = make()
    manifest.write(str(tmp_path), m)
    back = manifest.read(str(tmp_path))
    assert back == m and back.location == str(tmp_path) and back.rows == 3
    assert back.shards == [SHARD] and isinstance(back.shards[0], dict)  # shard entries stay plain dicts
    assert "location" not in json.loads((tmp_path / MANIFEST).read_text())


def test_a_training_is_sized_in_steps_and_a_dataset_in_rows():
    # the runner's done line and the closing summary say this; a training's shards are checkpoints (0 rows)
    assert make().size == "3 rows"
    ckpt = SHARD | {"path": "checkpoints/step-40/model.safetensors", "rows": 0}
    assert make(uses="train", shards=[ckpt, ckpt], counts={"steps": 40, "samples": 2560}).size == "40 steps"


def test_the_schema_is_the_dataclass():
    stored = {f.name for f in dataclasses.fields(Manifest)} - {"location"}
    assert set(MANIFEST_SCHEMA["properties"]) == stored
    # digest and schema_version have Python defaults (computed, current) but every stored manifest has them
    assert {"digest", "schema_version"} <= set(MANIFEST_SCHEMA["required"])
    assert not {"clipline_version", "git_sha", "mlflow_run_id", "extra"} & set(MANIFEST_SCHEMA["required"])
    assert MANIFEST_SCHEMA["properties"]["shards"]["items"]["required"] == ["path", "rows", "bytes", "sha256"]


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d.pop("digest"), "'digest' is a required property"),
    (lambda d: d.update(schema_version=2), "1 was expected"),
    (lambda d: d.update(fingerprint="XYZ"), "does not match"),
    (lambda d: d["shards"][0].update(rows=-1), "less than the minimum"),
    (lambda d: d["shards"][0].update(extra=1), "Additional properties"),
    (lambda d: d.update(location="/x"), "Additional properties"),
    (lambda d: d["counts"].update(success=1.5), "is not of type 'integer'"),
])
def test_a_manifest_that_breaks_the_schema_is_refused_naming_its_file(tmp_path, change, expected):
    doc = make().to_json()
    change(doc)
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not a valid clipline manifest") as info:
        manifest.read(str(tmp_path))
    assert str(tmp_path / MANIFEST) in str(info.value) and expected in str(info.value)
