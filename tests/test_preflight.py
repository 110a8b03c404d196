"""Preflight (`pipelines/preflight.py`): what a job's files make wrong is found before Ray starts, through the CLI a
user runs: exit 2, the file and the field named, no stage directory and no MLflow run left behind."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cli, preflight, spec
from tests.conftest import mlflow_runs, write_job
from tests.support.cli import run_cli


def parquet(path: Path, **columns: list) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def nothing_started(store: Path, job: str, stages: list[str]) -> None:
    """No stage directory under the job's storage, and no MLflow run in its store."""
    assert not [s for s in stages if (store / job / s).exists()], sorted(p.name for p in (store / job).iterdir())
    assert not (store / "mlflow.db").exists() or mlflow_runs(store) == []


def test_every_missing_file_and_column_is_named_before_anything_starts(tmp_path):
    urls = parquet(tmp_path / "urls.parquet", link=["http://127.0.0.1:9/a.png"], caption=["a red circle"])
    (tmp_path / "urls.csv").write_text("URL,TEXT\nhttp://127.0.0.1:9/a.png,a red circle\n")
    pairs = parquet(tmp_path / "pairs.parquet", image=[b"x"], text=["a red circle"])
    evalset = parquet(tmp_path / "eval.parquet", image=[b"x"], cls=[0])
    stages = {
        "crawl_missing": {"uses": "crawl", "with": {"input": str(tmp_path / "nope.parquet")}},
        "crawl_columns": {"uses": "crawl", "with": {"input": [urls, str(tmp_path / "urls.csv"),
                                                              str(tmp_path / "none-*.parquet")],
                                                    "passthrough": ["WIDTH"]}},
        "ingest": {"uses": "ingest", "with": {"path": pairs}},
        "train": {"uses": "train", "needs": ["ingest"], "with": {"model": {"arch": str(tmp_path / "nope.json")}}},
        "evaluate": {"uses": "evaluate", "with": {
            "model": {"arch": "clip-tiny", "checkpoint": str(tmp_path / "y.pt")},
            "datasets": [{"name": "a", "path": evalset, "classnames": ["x"], "tasks": ["zeroshot"]},
                         {"name": "b", "path": str(tmp_path / "sets" / "*.parquet"), "classnames": ["x"],
                          "tasks": ["zeroshot"]}]}},
    }
    job = write_job(tmp_path, stages)
    store = tmp_path / "store"
    done = run_cli("run", job, "--no-progress")
    assert done.returncode == cli.EXIT_BAD_SPEC, done.stdout + done.stderr
    expected = [
        f"stages.crawl_missing.with.input: {tmp_path}/nope.parquet: no such file",
        f"stages.crawl_columns.with.input[0]: {urls} has no URL column: expected one of url, URL (or set url_col); "
        "its columns: link, caption",
        f"stages.crawl_columns.with.passthrough: {urls} has no column 'WIDTH'; its columns: link, caption",
        f"stages.crawl_columns.with.passthrough: {tmp_path}/urls.csv has no column 'WIDTH'; its columns: URL, TEXT",
        f"stages.crawl_columns.with.input[2]: {tmp_path}/none-*.parquet: the glob matches no file",
        f"stages.ingest.with.caption_column: {pairs} has no column 'caption'; it has image, text",
        f"stages.train.with.model.arch: {tmp_path}/nope.json: no such file",
        f"stages.evaluate.with.model.checkpoint: {tmp_path}/y.pt: no such file",
        f"stages.evaluate.with.datasets[0].label_column: {evalset} has no column 'label'; it has image, cls",
        f"stages.evaluate.with.datasets[1].path: {tmp_path}/sets/*.parquet: the glob matches no file",
    ]
    for line in expected:
        assert f"{job}: {line}\n" in done.stderr, f"{line}\n---\n{done.stderr}"
    assert "Traceback" not in done.stderr and "run the same command again" not in done.stderr
    nothing_started(store, "t", list(stages))
    # validate says the same
    checked = run_cli("validate", job)
    assert checked.returncode == cli.EXIT_BAD_SPEC and checked.stderr == done.stderr[-len(checked.stderr):]
    # a run of some stages checks only those: the others' inputs may be gone once their outputs are cached
    only = run_cli("run", job, "--no-progress", "--only", "crawl_missing")
    assert only.returncode == cli.EXIT_BAD_SPEC
    assert "stages.crawl_missing.with.input" in only.stderr and "stages.evaluate" not in only.stderr, only.stderr
    unknown = run_cli("run", job, "--only", "nosuch")
    assert unknown.returncode == cli.EXIT_BAD_SPEC and "--only nosuch: no such stage" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_checkpoints_must_be_readable_state_dicts_that_fit_the_architecture(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    from pipelines.models import register_configs

    register_configs()
    sd = open_clip.create_model("clip-tiny", pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "good.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "good.pt")
    small = open_clip.create_model("clip-rn-tiny", pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in small.items()}, tmp_path / "other.safetensors")
    marker = tmp_path / "unpickled"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Unpickles(str(marker))))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")

    def evaluate(checkpoint: str) -> dict:
        return {"uses": "evaluate", "with": {"model": {"arch": "clip-tiny", "checkpoint": str(tmp_path / checkpoint)},
                                             "datasets": [{"name": "d", "builtin": "digits"}]}}

    good = write_job(tmp_path, {"a": evaluate("good.safetensors"), "b": evaluate("good.pt")}, name="good")
    preflight.check(spec.load(good))  # passes (in this process, which has built the models already)

    bad = write_job(tmp_path, {"other": evaluate("other.safetensors"), "evil": evaluate("evil.pt"),
                               "junk": evaluate("junk.safetensors")}, name="bad")
    done = run_cli("run", bad, "--no-progress")
    assert done.returncode == cli.EXIT_BAD_SPEC, done.stderr
    assert (f"{bad}: stages.other.with.model.checkpoint: {tmp_path}/other.safetensors: does not fit architecture "
            "clip-tiny: ") in done.stderr
    assert f"{bad}: stages.evil.with.model.checkpoint: {tmp_path}/evil.pt: cannot read it: not a plain tensor " \
           "checkpoint (UnpicklingError: " in done.stderr
    assert (f"{bad}: stages.junk.with.model.checkpoint: {tmp_path}/junk.safetensors: cannot read it: not a "
            "safetensors file (its header is not JSON)") in done.stderr
    assert not marker.exists()  # refused, never unpickled
    nothing_started(tmp_path / "store", "bad", ["other", "evil", "junk"])


class Unpickles:
    """A pickle whose loading would write a file: preflight must refuse it without running it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_an_upstream_stages_output_is_not_checked(tmp_path):
    """What a stage this one needs writes does not exist before the run: its paths are left to the stage."""
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.png,a red circle\n")
    store = tmp_path / "store"
    job = write_job(tmp_path, {
        "crawl": {"uses": "crawl", "with": {"input": str(tmp_path / "urls.csv")}},
        "again": {"uses": "crawl", "needs": ["crawl"], "with": {"input": f"{store}/t/crawl/*/urls.csv"}},
        "evaluate": {"uses": "evaluate", "needs": ["crawl"], "with": {
            "model": {"arch": "clip-tiny", "checkpoint": f"{store}/t/crawl/x/model.safetensors"},
            "datasets": [{"name": "d", "builtin": "digits"}]}},
        # not upstream of this one: checked
        "other": {"uses": "crawl", "with": {"input": f"{store}/t/again/x/urls.csv"}},
    })
    done = run_cli("validate", job)
    assert done.returncode == cli.EXIT_BAD_SPEC
    assert done.stderr == f"clipline: {job}: stages.other.with.input: {store}/t/again/x/urls.csv: no such file\n"


def test_webdataset_members_and_json_lines_keys_are_checked(tmp_path):
    with tarfile.open(tmp_path / "set-0.tar", "w") as tar:
        for key, member, data in (("000", "jpg", b"x"), ("000", "cls", b"0"), ("001", "jpg", b"x")):
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "urls.jsonl").write_text(json.dumps({"url": "http://127.0.0.1:9/a.png", "alt": "x"}) + "\n")
    job = write_job(tmp_path, {
        "crawl": {"uses": "crawl", "with": {"input": str(tmp_path / "urls.jsonl"), "caption_col": "alt"}},
        "evaluate": {"uses": "evaluate", "with": {"model": {"arch": "clip-tiny"}, "datasets": [
            {"name": "w", "path": str(tmp_path / "set-*.tar"), "image_column": "jpg", "label_column": "cls",
             "caption_column": "txt", "classnames": ["zero"]}]}},
    })
    done = run_cli("validate", job)
    assert done.returncode == cli.EXIT_BAD_SPEC
    assert done.stderr == (f"clipline: {job}: stages.evaluate.with.datasets[0].caption_column: {tmp_path}/set-0.tar "
                           "has no member extension 'txt'; it has jpg, cls\n")


def test_inputs_on_s3_are_checked_there(s3, tmp_path):
    bucket = s3.bucket("preflight")
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a red circle"]}), buf)
    s3.client().put_object(Bucket="preflight", Key="lists/urls.parquet", Body=buf.getvalue())
    good = write_job(tmp_path, {"crawl": {"uses": "crawl", "with": {"input": f"{bucket}/lists/*.parquet"}}},
                     name="good")
    assert run_cli("validate", good, check=True).returncode == 0
    bad = write_job(tmp_path, {"crawl": {"uses": "crawl", "with": {"input": [f"{bucket}/lists/urls.parquet",
                                                                             f"{bucket}/lists/nope.parquet"],
                                                                   "passthrough": ["WIDTH"]}}}, name="bad")
    done = run_cli("run", bad, "--no-progress", "--storage", f"{bucket}/store",
                   "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    assert done.returncode == cli.EXIT_BAD_SPEC, done.stderr
    assert (f"{bad}: stages.crawl.with.passthrough: {bucket}/lists/urls.parquet has no column 'WIDTH'; its "
            "columns: url, caption") in done.stderr
    assert f"{bad}: stages.crawl.with.input[1]: {bucket}/lists/nope.parquet: no such file" in done.stderr
    assert s3.keys("preflight", "store/") == []
    assert not (tmp_path / "mlflow.db").exists()


def test_classnames_and_templates_from_json_files(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "templates.json").write_text(json.dumps({"cat": ["a {c}"], "dog": ["a {c}", "one {c}"]}))
    (tmp_path / "plain.json").write_text(json.dumps(["a photo of a {c}", "a {c}"]))
    evalset = parquet(tmp_path / "eval.parquet", image=[b"x"], label=[0])

    def job(**dataset) -> Path:
        return write_job(tmp_path, {"evaluate": {"uses": "evaluate", "with": {"model": {"arch": "clip-tiny"},
                         "datasets": [{"name": "a", "path": evalset, "tasks": ["zeroshot"], **dataset}]}}})

    loaded = spec.load(job(classnames_file=str(tmp_path / "names.json"),
                           templates_file=str(tmp_path / "templates.json")))
    d = loaded.stages["evaluate"].config.datasets[0]
    assert d.classnames == ["cat", "dog"] and d.templates == {"cat": ["a {c}"], "dog": ["a {c}", "one {c}"]}
    assert loaded.stages["evaluate"].params["datasets"][0]["classnames"] == ["cat", "dog"]  # in the fingerprint
    preflight.check(loaded)
    from pipelines.evaluation import datasets

    assert datasets.load(d, 32).prompts() == (["a cat", "a dog", "one dog"], [1, 2])
    lists = spec.load(job(classnames=["cat", "dog"], templates_file=str(tmp_path / "plain.json")))
    assert lists.stages["evaluate"].config.datasets[0].templates == ["a photo of a {c}", "a {c}"]

    path = job(classnames=["cat", "dog"], templates_file=str(tmp_path / "missing.json"))
    done = run_cli("validate", path)
    assert done.returncode == cli.EXIT_BAD_SPEC
    assert done.stderr == (f"clipline: {path}: stages.evaluate.with: dataset a: templates_file "
                           f"{tmp_path}/missing.json: no such file\n")
    for kwargs, message in [
        ({"classnames_file": str(tmp_path / "templates.json")}, "classnames_file .*: expected a JSON list of "
                                                                 "non-empty strings, got dict"),
        ({"classnames_file": str(tmp_path / "names.json"), "classnames": ["x"]}, "give classnames or "
                                                                                  "classnames_file, not both"),
        ({"classnames": ["cat", "bird"], "templates_file": str(tmp_path / "templates.json")},
         "templates_file .*templates.json: no templates for the class\\(es\\) 'bird'"),
        ({"classnames": ["cat"], "templates": ["a {c} in {place}"]}, "templates: the template 'a {c} in {place}' "
                                                                      "does not format with {c} alone"),
    ]:
        with pytest.raises(spec.SpecError, match=f"stages.evaluate.with: dataset a: {message}"):
            spec.load(job(**kwargs))
