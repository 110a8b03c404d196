"""Job specs: schema errors name the file and field path; --set overrides are typed; schemas match code."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pipelines import spec
from pipelines.schemas import check
from pipelines.spec import SpecError
from pipelines.stages.crawl.config import CrawlConfig
from tests.conftest import REPO

GOOD = {"name": "j", "stages": {"crawl": {"uses": "crawl", "with": {"input": "/data/urls.parquet"}}}}


def load_raw(tmp_path, raw, overrides=()):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return spec.load(path, list(overrides))


def error_of(tmp_path, raw, overrides=()) -> str:
    with pytest.raises(SpecError) as info:
        load_raw(tmp_path, raw, overrides)
    return str(info.value)


def with_crawl(**with_):
    return {"name": "j", "stages": {"crawl": {"uses": "crawl", "with": {"input": "/x.parquet", **with_}}}}


def test_demo_job_is_valid():
    job = spec.load(REPO / "jobs" / "demo.yaml")
    assert list(job.stages) == ["crawl", "curate", "train", "evaluate"]
    assert job.stages["evaluate"].needs == ["train"]
    assert [d.builtin for d in job.stages["evaluate"].config.datasets] == ["demo_heldout", "digits"]
    digits = spec.load(REPO / "jobs" / "digits.yaml")
    assert list(digits.stages) == ["ingest", "train", "evaluate"]
    assert digits.stages["train"].config.eval_datasets[0].builtin == "digits"
    assert job.stages["train"].needs == ["curate"] and job.stages["train"].config.workers == 2
    curate = job.stages["curate"].config  # nested blocks become their dataclasses, defaults filled in
    assert curate.basic.min_side == 32 and curate.basic.max_aspect == 3.0 and curate.near_duplicate.max_distance == 2
    assert curate.clip_score.model.arch == "clip-tiny"
    assert job.stages["crawl"].config.allow_networks == ["127.0.0.0/8"]
    assert job.stages["crawl"].config.input[0].endswith("/demo-web/urls.parquet")  # ${storage} interpolated


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({**GOOD, "colour": "red"}, "job.yaml: (top level): unknown key(s) 'colour'"),
        (with_crawl(image_sise=3), "job.yaml: stages.crawl.with: unknown key(s) 'image_sise'; expected one of"),
        (with_crawl(image_size="big"), "job.yaml: stages.crawl.with.image_size: expected integer, got str 'big'"),
        (with_crawl(image_size=4), "job.yaml: stages.crawl.with.image_size: expected a number >= 8, got 4"),
        (with_crawl(resize_mode="stretch"), "job.yaml: stages.crawl.with.resize_mode: expected one of 'no',"),
        (with_crawl(allow_networks="127.0.0.0/8"), "stages.crawl.with.allow_networks: expected array"),
        ({"name": "j", "stages": {"crawl": {"uses": "crawl", "with": {}}}},
         "job.yaml: stages.crawl.with: 'input' is required but missing"),
        ({"name": "j", "stages": {"c": {"uses": "crowl"}}}, "job.yaml: stages.c.uses: expected one of 'crawl'"),
        ({"stages": GOOD["stages"]}, "job.yaml: (top level): 'name' is required but missing"),
        ({**GOOD, "ray": {"adress": "auto"}}, "job.yaml: ray: unknown key(s) 'adress'; expected one of: address, num_cpus"),
        ({**GOOD, "stages": {"crawl": {**GOOD["stages"]["crawl"], "retries": -1}}},
         "job.yaml: stages.crawl.retries: expected a number >= 0, got -1"),
        ({**GOOD, "stages": {"crawl": {**GOOD["stages"]["crawl"], "needs": ["nope"]}}},
         "job.yaml: stages.crawl.needs: unknown stage 'nope'"),
        (with_crawl(allow_networks=["10.0.0.0/99"]),
         "job.yaml: stages.crawl.with: allow_networks: '10.0.0.0/99' is not a CIDR network"),
        (with_crawl(encode_format="png", encode_quality=50), "stages.crawl.with: encode_quality: 50 is out of range"),
        (with_crawl(passthrough=["uid", "source_uid"]),
         "stages.crawl.with: passthrough: source_uid would clash with the name a passthrough column named like a "
         "crawl column is written as"),
        # the top level, generated from spec.JobDocument: what the hand-written schema accepted and refused
        ({**GOOD, "stages": {}}, "job.yaml: stages: expected at least one entry"),
        ({**GOOD, "name": "-j"}, "job.yaml: name: expected a string matching ^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
        ({**GOOD, "stages": {"-c": GOOD["stages"]["crawl"]}}, "job.yaml: stages: expected a string matching"),
        ({**GOOD, "stages": {"crawl": {**GOOD["stages"]["crawl"], "needs": ["a b"]}}},
         "job.yaml: stages.crawl.needs[0]: expected a string matching"),
        ({**GOOD, "stages": {"crawl": {**GOOD["stages"]["crawl"], "resources": {"num_cpus": None}}}},
         "job.yaml: stages.crawl.resources.num_cpus: expected number, got NoneType None"),
        ({**GOOD, "stages": {"crawl": {**GOOD["stages"]["crawl"], "resources": {"gpus": 1}}}},
         "job.yaml: stages.crawl.resources: unknown key(s) 'gpus'; expected one of: memory, num_cpus, num_gpus"),
        ({**GOOD, "stages": {"crawl": {**GOOD["stages"]["crawl"], "resources": {"memory": -1}}}},
         "job.yaml: stages.crawl.resources.memory: expected a number >= 0, got -1"),
        ({**GOOD, "stages": {"crawl": {**GOOD["stages"]["crawl"], "with": []}}},
         "job.yaml: stages.crawl.with: expected object, got list []"),
        ({**GOOD, "tracking": {"required": "yes"}}, "job.yaml: tracking.required: expected boolean, got str 'yes'"),
        ({**GOOD, "ray": {"num_cpus": 0}}, "job.yaml: ray.num_cpus: expected a number >= 1, got 0"),
        ({**GOOD, "ray": {"runtime_env": "x"}}, "job.yaml: ray.runtime_env: expected object, got str 'x'"),
        ({**GOOD, "storage": None}, "job.yaml: storage: expected string, got NoneType None"),
    ],
)
def test_schema_errors_name_file_and_field(tmp_path, raw, expected):
    assert expected in error_of(tmp_path, raw)


def test_every_error_is_reported_at_once(tmp_path):
    message = error_of(tmp_path, with_crawl(image_size="big", threads=0, resize_mode="x"))
    for path in ("stages.crawl.with.image_size", "stages.crawl.with.threads", "stages.crawl.with.resize_mode"):
        assert path in message


def test_cycle_is_named(tmp_path):
    raw = {"name": "j", "stages": {
        "a": {"uses": "crawl", "needs": ["b"], "with": {"input": "/x"}},
        "b": {"uses": "crawl", "needs": ["a"], "with": {"input": "/x"}},
    }}
    assert "the needs form a cycle" in error_of(tmp_path, raw)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="job.yaml: expected a mapping at the top level, got list"):
        spec.load(path)
    with pytest.raises(SpecError, match="nope.yaml: cannot read the job spec"):
        spec.load(tmp_path / "nope.yaml")


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    job = load_raw(tmp_path, GOOD, [
        "stages.crawl.with.image_size=32",
        "stages.crawl.with.timeout=2.5",
        "stages.crawl.with.resize_only_if_bigger=true",
        "stages.crawl.with.user_agent_token=12345",  # a string field keeps digits as text
        "stages.crawl.with.allow_networks=[127.0.0.0/8, 10.1.0.0/16]",
        "stages.crawl.retries=2",
        "tracking.experiment=2026",
        "storage=/elsewhere",
    ])
    cfg = job.stages["crawl"].config
    assert cfg.image_size == 32 and isinstance(cfg.image_size, int)
    assert cfg.timeout == 2.5
    assert cfg.resize_only_if_bigger is True
    assert cfg.user_agent_token == "12345"
    assert cfg.allow_networks == ["127.0.0.0/8", "10.1.0.0/16"]
    assert job.stages["crawl"].retries == 2
    assert job.experiment == "2026"
    assert job.storage == "/elsewhere"


def test_set_indexes_lists_and_types_the_items_field(tmp_path):
    ev = {"name": "j", "stages": {"e": {"uses": "evaluate", "with": {"model": {"arch": "clip-tiny"}, "datasets": [
        {"name": "a", "builtin": "digits"}, {"name": "b", "builtin": "demo_heldout"}]}}}}
    job = load_raw(tmp_path, ev, ["stages.e.with.datasets.1.limit=60", "stages.e.with.datasets.0.name=7"])
    sets = job.stages["e"].config.datasets
    assert (sets[1].limit, sets[0].limit, sets[0].name) == (60, None, "7")  # typed by the item's schema
    assert "'5' is not an index into the 2 items of the list" in error_of(tmp_path, ev, ["stages.e.with.datasets.5.limit=1"])


def test_set_errors_name_the_field(tmp_path):
    assert "stages.crawl.with.image_size: expected integer, got str 'huge'" in error_of(
        tmp_path, GOOD, ["stages.crawl.with.image_size=huge"])
    assert "stages.crawl.with: unknown key(s) 'imagesize'" in error_of(tmp_path, GOOD, ["stages.crawl.with.imagesize=3"])
    assert "expected KEY=VALUE" in error_of(tmp_path, GOOD, ["stages.crawl.with.image_size"])


def test_defaults_are_filled_from_the_config(tmp_path):
    job = load_raw(tmp_path, GOOD)
    assert job.stages["crawl"].params == dataclasses.asdict(CrawlConfig(input="/data/urls.parquet"))
    assert job.experiment == "j" and job.ray_address == "local"
    assert (job.tracking_uri, job.tracking_required, job.runtime_env, job.ray_num_cpus) == (None, True, {}, None)
    assert (job.stages["crawl"].needs, job.stages["crawl"].resources, job.stages["crawl"].retries) == ([], {}, 0)


def test_the_top_level_is_built_into_its_dataclasses(tmp_path):
    raw = {**GOOD, "tracking": {"uri": "http://127.0.0.1:1", "experiment": None, "required": False},
           "ray": {"address": "auto", "runtime_env": {"env_vars": {"A": "1"}}, "num_cpus": 2},
           "stages": {"crawl": {**GOOD["stages"]["crawl"], "resources": {"num_cpus": 2, "memory": 1.5e9}, "retries": 1},
                      "b": {"uses": "crawl", "needs": ["crawl"], "with": {"input": "/y"}}}}
    job = load_raw(tmp_path, raw)
    assert isinstance(job.tracking, spec.Tracking) and isinstance(job.ray, spec.RaySettings)
    assert (job.tracking_uri, job.tracking_required, job.experiment) == ("http://127.0.0.1:1", False, "j")
    assert (job.ray_address, job.runtime_env, job.ray_num_cpus) == ("auto", {"env_vars": {"A": "1"}}, 2)
    assert job.stages["crawl"].resources == {"num_cpus": 2, "memory": 1.5e9} and job.stages["crawl"].retries == 1
    assert list(job.stages) == ["crawl", "b"] and job.stages["b"].needs == ["crawl"] and job.raw == raw


def test_the_job_schema_is_the_job_document():
    schema = spec.job_schema(["crawl"])
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(spec.JobDocument)}
    stage = schema["$defs"]["stage"]
    assert set(stage["properties"]) == {"uses", "needs", "with", "resources", "retries"}
    assert stage["properties"]["uses"]["enum"] == ["crawl"] and stage["required"] == ["uses"]
    assert schema["properties"]["stages"]["additionalProperties"] == {"$ref": "#/$defs/stage"}


def test_schema_files_match_the_code():
    assert check(REPO / "schemas") == [], "run `clipline schemas` to regenerate schemas/"


def test_job_schema_with_block_is_the_config_dataclass():
    schema = spec.job_schema(["crawl"])
    props = schema["$defs"]["crawl"]["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(CrawlConfig)}
    assert schema["$defs"]["crawl"]["required"] == ["input"]
    assert props["image_size"] == {"type": "integer", "description": "target side in pixels", "minimum": 8,
                                   "default": 256}


def test_validate_imports_no_stage_driver_torch_pandas_or_ray(tmp_path):
    """Validating reads the Config dataclasses only: the registry loads a stage's driver when it is built."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "demo-web").mkdir()  # the URL list `clipline demo` writes, which preflight reads the columns of
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.png"], "caption": ["a red circle"]}),
                   tmp_path / "demo-web" / "urls.parquet")
    code = (f"import sys; from pipelines import cli; rc = cli.main(['validate', 'jobs/demo.yaml', '--storage', "
            f"{str(tmp_path)!r}]); "
            "print(sorted(m for m in ('torch', 'pandas', 'ray', 'open_clip', 'mlflow', 'pipelines.stages.train.stage',"
            " 'pipelines.stages.crawl.stage') if m in sys.modules)); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "valid job 'demo'" in r.stderr + r.stdout
    assert r.stdout.strip().splitlines()[-1] == "[]"
