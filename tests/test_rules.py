"""The curate rule protocol and registry: built-in rules are one module each, and what the ledger, the funnel
and MLflow see is derived from the rules (no Ray here: the featurize task is called directly)."""

from __future__ import annotations

import dataclasses
import json
import os
import pkgutil

import mlflow
import numpy as np
import pytest

from pipelines import configschema
from pipelines.stages.curate import rules
from pipelines.stages.curate.config import CurateConfig
from pipelines.stages.curate.features import KEPT, Featurizer
from pipelines.stages.curate.rules import Rule, ScoreField, Work, apply_decisions, register_rule
from pipelines.stages.curate.stage import funnel_reasons
from pipelines.tracking import metric_key
from tests.support.cli import REPO
from tests.test_curate import row, write_crawl


def test_each_builtin_rule_is_one_module_of_the_rules_package():
    modules = {m.name for m in pkgutil.iter_modules(rules.__path__)}
    builtin = rules.builtin()
    assert set(builtin) == modules  # adding a rule is adding a module: nothing else lists them
    for name, cls in builtin.items():
        assert cls.__module__ == f"{rules.__name__}.{name}"
        assert dataclasses.is_dataclass(cls.Config)
    # each rule's settings sit under its name in a curate stage's `with:`, typed by its Config
    fields = {f.name: f.type for f in dataclasses.fields(CurateConfig)}
    assert all(fields[name] is cls.Config for name, cls in builtin.items())


def test_the_ledger_contract_comes_from_the_rules():
    ledger = json.loads((REPO / "schemas" / "ledger.schema.json").read_text())
    names = [f["name"] for f in ledger["fields"]]
    reason_doc = next(f["doc"] for f in ledger["fields"] if f["name"] == "reason")
    for name, cls in rules.builtin().items():
        assert all(f.name in names for f in cls.scores), name
        assert all(r in reason_doc for r in cls.reason_doc()), name
    assert "head:<output>" in reason_doc and "metadata: <the predicate>" in reason_doc
    assert "takedown" in reason_doc


def test_the_ledger_keeps_its_column_order():
    """Rules as objects must not reorder the contract: files written before and after line up."""
    ledger = [f["name"] for f in json.loads((REPO / "schemas" / "ledger.schema.json").read_text())["fields"]]
    assert ledger == ["uid", "source", "source_row", "shard", "row", "status", "kept", "reason", "sha256",
                      "image_bytes", "caption_words", "caption_chars", "min_side", "max_side", "aspect_ratio",
                      "language", "language_score", "phash", "eval_distance", "contaminated_by", "clip_score",
                      "semantic_cluster", "semantic_similarity", "query_match", "query_similarity"]  # new ones last


def test_a_rule_cannot_write_a_column_that_is_taken():
    @dataclasses.dataclass(kw_only=True)
    class Empty:
        pass

    def rule(column: str) -> Rule:
        cls = type("Cols", (Rule,), {"name": "cols", "Config": Empty, "scores": (ScoreField(column, "int32", "d"),)})
        return cls(Empty(), 1)

    with pytest.raises(ValueError, match="rule cols: its score column 'phash' is a column every row already has"):
        rules.job_scores([rule("phash")])
    with pytest.raises(ValueError, match="rule cols: its score column 'clip_score' is also rule clip_score's"):
        rules.job_scores([rule("clip_score")])
    assert rules.job_scores([rule("mine")])[-1].name == "mine"


def test_a_rule_plugin_that_does_not_load_is_an_error_every_time(tmp_path):
    """A broken entry point must not fail once and then leave its rule silently missing."""
    import subprocess
    import sys

    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[clipline.rules]\nbroken = no_such_module.rules:Broken\n")
    code = ("from pipelines.stages.curate import rules\n"
            "for attempt in range(2):\n"
            "    try:\n        rules.registry()\n    except ImportError as exc:\n        print('error:', exc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout + r.stderr
    assert all("rule plugin 'broken' (no_such_module.rules:Broken, entry point group clipline.rules): cannot load "
               "it: ModuleNotFoundError" in line for line in lines)


def test_a_plugins_code_digest_does_not_depend_on_where_it_is_installed(tmp_path):
    import shutil

    from pipelines.codedigest import digest_files

    digests = []
    for where in ("a/site-packages", "b/deeper/lib"):
        pkg = tmp_path / where / "clipline_example_plugin"
        shutil.copytree(REPO / "tests" / "fixtures" / "plugin" / "clipline_example_plugin", pkg)
        digests.append(digest_files(sorted(pkg.glob("*.py")) + [REPO / "pipelines" / "storage.py"], REPO))
    assert digests[0] == digests[1]
    (pkg / "rules.py").write_text((pkg / "rules.py").read_text() + "\n# changed\n")
    assert digest_files(sorted(pkg.glob("*.py")) + [REPO / "pipelines" / "storage.py"], REPO) != digests[0]


def test_the_funnel_lists_each_rules_reasons_in_rule_order():
    cfg = configschema.build(CurateConfig, {"rules": ["dedup_text", "basic", "language"]})
    assert funnel_reasons(cfg.instances()) == [
        "not_downloaded", "duplicate_text", "caption_words", "caption_chars", "min_side", "max_side", "aspect_ratio",
        "language"]


def featurize(tmp_path, shard, **config):
    crawl = write_crawl(tmp_path, [shard])
    cfg = configschema.build(CurateConfig, config)
    found = cfg.instances()
    work = Work(rules.job_scores(found))
    for r in found:
        r.work = work
    return Featurizer(found, work).featurize(0, crawl.shard_urls()[0])


def test_a_row_failing_several_checks_gets_the_first_rule_and_check(tmp_path):
    shard = [row("two words", seed=1, size=(100, 300)),   # caption_words and min_side: caption_words
             row("a b c", seed=2, size=(900, 100)),      # caption_chars, min_side, aspect_ratio: caption_chars
             row(seed=3, size=(100, 100)),                # min_side only
             row("ceci n'est pas une pipe du tout", seed=4, size=(100, 100)),  # min_side (basic is first), language
             row("ceci n'est pas une pipe du tout", seed=6),  # language
             row(seed=5)]                                 # kept
    out = featurize(tmp_path, shard, rules=["basic", "language"], language={"keep": ["en"]})
    assert out["reason"].tolist() == ["caption_words", "caption_chars", "min_side", "min_side", "language", None]
    assert out["drop_at"].tolist() == [1, 1, 1, 1, 2, KEPT]
    assert out["language"].tolist()[4:] == ["fr", "en"]
    # rules not listed still have their ledger columns, empty
    assert out["clip_score"].isna().all() and out["eval_distance"].isna().all()


def test_a_rule_may_only_give_the_reasons_it_declares():
    class Odd(Rule):
        name = "odd_rows"
        Config = dataclasses.make_dataclass("OddConfig", [], kw_only=True)

    import pandas as pd

    df = pd.DataFrame({"drop_at": np.full(3, KEPT, np.int32), "reason": [None] * 3})
    rule = Odd(Odd.Config(), 1)
    marked = apply_decisions(df, rule, [("odd_rows", np.array([False, True, False]))])
    assert marked["reason"].tolist() == [None, "odd_rows", None] and marked["drop_at"].tolist() == [KEPT, 1, KEPT]
    with pytest.raises(ValueError, match=r"rule odd_rows: decided reason 'surprise', which is not one of its "
                                         r"reasons\(\) \(odd_rows\)"):
        apply_decisions(df, rule, [("surprise", np.ones(3, bool))])


def test_registering_checks_the_rule():
    @dataclasses.dataclass(kw_only=True)
    class Empty:
        pass

    bad_name = type("Bad", (Rule,), {"name": "has-dash", "Config": Empty})
    with pytest.raises(TypeError, match="`name` must be an identifier"):
        register_rule(bad_name)
    reserved = type("Reserved", (Rule,), {"name": "shard_rows", "Config": Empty})
    with pytest.raises(ValueError, match="the name is a curate setting"):
        register_rule(reserved)
    clash = type("Clash", (Rule,), {"name": "basic", "Config": Empty})
    with pytest.raises(ValueError, match="a rule named 'basic' is already registered"):
        register_rule(clash)
    from pipelines.stages.curate.config import CurateSettings

    assert rules.RESERVED == ({n for n in dir(CurateSettings) if not n.startswith("_")}
                              | {f.name for f in dataclasses.fields(CurateSettings)})
    method = type("Method", (Rule,), {"name": "instances", "Config": Empty})
    with pytest.raises(ValueError, match="the name is a curate setting"):
        register_rule(method)
    for bad in ("class", "_private"):
        with pytest.raises(TypeError, match="not a Python keyword"):
            register_rule(type("K", (Rule,), {"name": bad, "Config": Empty}))
    no_config = type("NoConfig", (Rule,), {"name": "no_config"})
    with pytest.raises(TypeError, match="rule no_config: needs a Config dataclass"):
        register_rule(no_config)
    assert ScoreField("x", "float32", "doc").arrow().type == "float"


def test_reasons_that_name_a_predicate_become_metric_keys_mlflow_accepts(tmp_path):
    key = metric_key("curate/dropped_metadata: punsafe < 0.1 and \"WIDTH\" >= 256")
    assert key == "curate/dropped_metadata: punsafe _ 0.1 and _WIDTH_ __ 256"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, key, 3)  # the unsanitised name is refused by MLflow
    assert client.get_run(run.info.run_id).data.metrics[key] == 3


def test_files_a_rule_reads_are_part_of_the_stage_fingerprint(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.stages.curate.stage import CurateStage

    evalset = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"image": [b"x"]}), evalset)
    cfg = configschema.build(CurateConfig, {"rules": ["basic", "decontaminate"], "decontaminate": {
        "sets": [{"name": "e", "path": str(evalset)}]}})
    before = CurateStage(cfg).input_identity()
    assert list(before) == ["decontaminate"] and str(evalset) in json.dumps(before)
    pq.write_table(pa.table({"image": [b"x", b"a second image"]}), evalset)  # another size: another key
    assert CurateStage(cfg).input_identity() != before
    assert CurateStage(configschema.build(CurateConfig, {"rules": ["basic"]})).input_identity() == {}
