"""User plugins: a rule and a stage from a package outside clipline, found through its entry points (or, for the
stage, `uses: package.module:Class`), validated into the job schema like built-ins, and run on Ray workers.

The package is tests/fixtures/plugin, installed with pip into a folder that the CLI subprocess (and so the
local Ray instance it starts, and its workers) has on PYTHONPATH: this test process never imports it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import spec
from pipelines.demo import web
from tests.support.cli import REPO, run_cli

FIXTURE = REPO / "tests" / "fixtures" / "plugin"
CAPTIONS = ["a red circle on grey", "sale 2 for 10 dollars", "a blue square on white", "item 40213 in stock",
            "a green triangle at night", "the 1990s style photo", "a yellow star on black"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The plugin, installed by pip (from a copy: a build writes egg-info beside the sources)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(FIXTURE, src)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(src)], check=True, timeout=300)
    assert list(target.glob("clipline_example_plugin-*.dist-info/entry_points.txt"))
    return target


def job(tmp: Path, **overrides) -> Path:
    images = [web.encoded(0, i, 32)[0] for i in range(len(CAPTIONS))]
    pq.write_table(pa.table({"image": images, "caption": CAPTIONS}), tmp / "pairs.parquet")
    doc = {
        "name": "plug", "storage": str(tmp / "store"), "ray": {"address": "local", "num_cpus": 2},
        "stages": {
            "pairs": {"uses": "ingest", "with": {"path": str(tmp / "pairs.parquet"), "shard_rows": 4}},
            "curate": {"uses": "curate", "needs": ["pairs"],
                       "with": {"rules": ["caption_digits", "dedup_image"], "caption_digits": {"max_digits": 0},
                                "shard_rows": 3}},
            "stats": {"uses": "caption_stats", "needs": ["curate"], "with": {"top": 50}},
            "stats_by_path": {"uses": "clipline_example_plugin.stage:CaptionStats", "needs": ["curate"],
                              "with": {"top": 1}},
        },
    }
    for path, value in overrides.items():  # stages.curate.with.caption_digits = {...}
        node = doc
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (tmp / "job.yaml").write_text(yaml.safe_dump(doc))
    return tmp / "job.yaml"


def env(site: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


def outputs(tmp: Path, stage: str, pattern: str = "part-*.parquet") -> pd.DataFrame:
    files = sorted((tmp / "store" / "plug" / stage).glob(f"*/{pattern}"))
    assert files, f"no {pattern} under {stage}"
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def test_without_the_plugin_its_rule_and_stage_are_unknown(tmp_path):
    with pytest.raises(spec.SpecError) as err:
        spec.load(job(tmp_path))
    assert ("stages.stats_by_path.uses: stage clipline_example_plugin.stage:CaptionStats: cannot import it: "
            "ModuleNotFoundError: No module named 'clipline_example_plugin'") in str(err.value)

    doc = yaml.safe_load((tmp_path / "job.yaml").read_text())
    del doc["stages"]["stats_by_path"]
    with pytest.raises(spec.SpecError) as err:
        spec.resolve(doc, "job.yaml")
    text = str(err.value)
    assert "stages.curate.with: unknown key(s) 'caption_digits'" in text
    assert "stages.curate.with.rules[0]: expected one of 'basic'" in text
    assert "stages.stats.uses: expected one of" in text


def test_a_wrong_field_in_a_plugins_config_names_the_field(tmp_path, site):
    bad = job(tmp_path, **{"stages.curate.with.caption_digits": {"max_digit": 1},
                           "stages.stats.with": {"topp": 3},
                           "stages.stats_by_path.with": {"top": 0}})
    r = run_cli("validate", bad, env=env(site))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "stages.curate.with.caption_digits: unknown key(s) 'max_digit'; expected one of: max_digits" in r.stderr
    assert "stages.stats.with: unknown key(s) 'topp'; expected one of: top" in r.stderr
    assert "stages.stats_by_path.with.top: expected a number >= 1, got 0" in r.stderr

    missing = job(tmp_path, **{"stages.stats_by_path.uses": "clipline_example_plugin.stage:Nope"})
    r = run_cli("validate", missing, env=env(site))
    assert r.returncode == 2
    assert ("stages.stats_by_path.uses: stage clipline_example_plugin.stage:Nope: cannot import it: AttributeError"
            in r.stderr)

    r = run_cli("validate", job(tmp_path), env=env(site))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_a_job_runs_a_plugins_rule_and_stage_on_ray_workers(tmp_path, site):
    r = run_cli("run", job(tmp_path), env=env(site), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # the plugin rule: scored and decided in the curate stage's Ray tasks, its reason and column in the ledger
    ledger = outputs(tmp_path, "curate", "ledger/part-*.parquet").sort_values(["shard", "row"])
    digits = [sum(ch.isdigit() for ch in c) for c in CAPTIONS]
    assert ledger["caption_digit_count"].tolist() == digits
    assert ledger["reason"].tolist() == [None if d == 0 else "caption_has_digits" for d in digits]
    curated = outputs(tmp_path, "curate")
    kept = [c for c, d in zip(CAPTIONS, digits, strict=True) if d == 0]
    assert sorted(curated["caption"]) == sorted(kept)
    assert (curated["caption_digit_count"] == 0).all()

    # the plugin stage, by entry point and by module path: each shard counted by a Ray task, not the driver
    words = Counter(w for c in kept for w in c.split())
    stats = outputs(tmp_path, "stats")
    assert dict(zip(stats["word"], stats["count"], strict=True)) == dict(words)
    assert all(str(p) not in stats["task_pids"].iat[0].split(",") for p in stats["driver_pid"])
    by_path = outputs(tmp_path, "stats_by_path")
    assert len(by_path) == 1 and by_path["count"].iat[0] == max(words.values())

    st = run_cli("status", job(tmp_path), env=env(site))
    assert st.returncode == 0 and "stats_by_path" in st.stdout + st.stderr
