"""Cluster configs, KubeRay manifests and `clipline render kuberay`, checked against the schemas the real
components use: Ray's cluster-launcher schema and config preparation, KubeRay's CRD schemas (see
tests/fixtures/kuberay/README.md), and a real multi-node cluster, on loopback, from cluster/local.sh."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipelines import cli, kuberay, spec
from tests.support.net import free_ports

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kuberay"
LOCK = dict(line.strip().split("==", 1) for line in (REPO / "requirements.lock").read_text().splitlines()
            if "==" in line and not line.startswith("#"))


# ---------------------------------------------------------------- KubeRay CRD schemas as JSON Schema

def crd_schema(kind: str) -> dict[str, Any]:
    """The v1 openAPIV3Schema of a KubeRay kind, the RayCronJob's jobTemplate resolved to the RayJob spec."""
    schema = json.loads((FIXTURES / f"ray.io_{kind}.v1.json").read_text())
    if kind == "raycronjobs":
        template = schema["properties"]["spec"]["properties"]
        assert template["jobTemplate"] == {"$ref": "ray.io_rayjobs.v1.json#/properties/spec"}
        template["jobTemplate"] = crd_schema("rayjobs")["properties"]["spec"]
    return schema


def structural_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 structural schema as the API server applies it, in JSON Schema terms:

    - an object with `properties` and no `additionalProperties` gets `additionalProperties: false`. The
      schema itself allows unknown fields, but the API server prunes them (silently, or rejects them
      under kubectl's strict field validation): a misspelled field must fail here, not vanish there;
    - `x-kubernetes-preserve-unknown-fields: true` keeps an object open (none in these CRDs today);
    - `nullable: true` admits null; a `required` field that has a `default` is filled in by the server
      before it validates, so it is not required of the manifest;
    - `x-kubernetes-int-or-string` comes with its own `anyOf` of integer and string, kept as it is;
    - `x-kubernetes-list-type: map` (keys unique by `x-kubernetes-list-map-keys`) and `set` are checked by
      the validator below; `x-kubernetes-validations` (CEL rules) are not evaluated.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: structural_to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = structural_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_jsonschema(v) for v in value]
        elif key == "required":
            props = node.get("properties", {})
            out[key] = [r for r in value if "default" not in props.get(r, {})]
        elif key != "x-kubernetes-validations":
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
        for dup in {s for s in seen if seen.count(s) > 1}:
            yield jsonschema.ValidationError(f"duplicate entries with {dict(zip(keys, dup, strict=True))}")
    elif list_type == "set" and len({json.dumps(i, sort_keys=True) for i in instance}) != len(instance):
        yield jsonschema.ValidationError("duplicate entries in a set")


def _int_format(bits: int):
    return lambda v: not isinstance(v, int) or -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("int32")(_int_format(32))
_FORMATS.checks("int64")(_int_format(64))
KubeValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})
_VALIDATORS: dict[str, Any] = {}


def crd_errors(manifest: dict[str, Any], kind: str) -> list[str]:
    """Every violation of the CRD schema, as `field.path: message`."""
    if kind not in _VALIDATORS:
        _VALIDATORS[kind] = KubeValidator(structural_to_jsonschema(crd_schema(kind)), format_checker=_FORMATS)
    errors = _VALIDATORS[kind].iter_errors(manifest)
    return sorted(f"{spec.dotted(e.absolute_path)}: {e.message}" for e in errors)


KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def check_ray_manifest(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc, KINDS[doc["kind"]]) == []
    # what the schema leaves to the API server and KubeRay's webhook: the name
    name = doc["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= kuberay.MAX_RAYJOB_NAME, name


def manifest(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def cluster_specs(doc: dict[str, Any]) -> dict[str, Any]:
    s = doc["spec"]
    return {"RayCluster": lambda: s, "RayJob": lambda: s["rayClusterSpec"],
            "RayCronJob": lambda: s["jobTemplate"]["rayClusterSpec"]}[doc["kind"]]()


# ---------------------------------------------------------------- the validation bites

def test_crd_validation_rejects_what_the_api_server_would():
    job = manifest("rayjob.yaml")[0]
    assert crd_errors(job, "rayjobs") == []
    # a misspelled field: the raw openAPIV3Schema lets it through (the API server would prune it) ...
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True
    raw = jsonschema.Draft7Validator(crd_schema("rayjobs"))
    assert list(raw.iter_errors(bad)) == []
    assert crd_errors(bad, "rayjobs") == [
        "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"]
    # ... deep inside the embedded Pod template as well
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    assert [e.split(":")[0] for e in crd_errors(bad, "rayjobs")] == [
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0]"]
    # a wrong type, an int-or-string quantity that is neither, an int32 out of range, a duplicate map key
    bad = copy.deepcopy(job)
    group = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["maxReplicas"] = "4"
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "eight"
    bad["spec"]["ttlSecondsAfterFinished"] = 2 ** 31
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    head.append(copy.deepcopy(head[0]))
    errors = crd_errors(bad, "rayjobs")
    assert any(e.startswith("spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas: '4' is not of type 'integer'")
               for e in errors), errors
    assert any(e.startswith("spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu")
               for e in errors), errors
    assert any(e.startswith("spec.ttlSecondsAfterFinished: 2147483648 is not a 'int32'") for e in errors), errors
    assert any("headGroupSpec.template.spec.containers: duplicate entries with {'name': 'ray-head'}" in e
               for e in errors), errors
    # a required field without a default (the RayCronJob's schedule)
    cron = manifest("raycronjob.yaml")[0]
    del cron["spec"]["schedule"]
    assert crd_errors(cron, "raycronjobs") == ["spec: 'schedule' is a required property"]


# ---------------------------------------------------------------- the shipped manifests

@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"),
                                       ("raycronjob.yaml", "RayCronJob")])
def test_kuberay_manifests_match_the_crds(name, kind):
    docs = manifest(name)
    assert [d["kind"] for d in docs] == [kind]
    check_ray_manifest(docs[0])
    cs = cluster_specs(docs[0])
    assert cs["rayVersion"] == LOCK["ray"]
    assert cs["authOptions"] == {"mode": "token"}  # the dashboard is reachable in the cluster: a token guards it
    assert cs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cs["workerGroupSpecs"]}
    assert groups["cpu"]["minReplicas"] == 0 and groups["cpu"]["maxReplicas"] >= 4
    if kind != "RayCronJob":  # the refresh crawls and curates: no GPUs
        limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml"])
def test_manifest_entrypoints_run_a_valid_job_spec(name):
    """The entrypoint is `clipline run <a job in the image> --set ...`: the job exists in jobs/ and is valid
    with those overrides, and its driver joins the RayCluster instead of starting a Ray of its own."""
    doc = manifest(name)[0]
    entry = (doc["spec"].get("jobTemplate") or doc["spec"])["entrypoint"]
    argv = shlex.split(entry)
    assert argv[:2] == ["clipline", "run"]
    args = cli.build_parser().parse_args(argv[1:])
    job_path = REPO / Path(args.job).relative_to("/home/ray/clipline")
    job = spec.load(job_path, args.overrides, args.storage)
    assert job.ray_address == "auto"
    assert not job.storage.startswith("/")  # an object store, shared by every pod
    if name == "rayjob.yaml":
        train = job.stages["train"].params
        gpu = {g["groupName"]: g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]}["gpu"]
        assert train["use_gpu"] and gpu["maxReplicas"] == train["workers"]
    else:
        assert job.name == "laion-refresh" and doc["spec"]["schedule"] == "0 3 * * *"


def test_dockerfile_installs_what_the_lock_pins():
    text = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{LOCK['ray']}-py311" in text
    assert f"torch=={LOCK['torch']}" in text and f"torchvision=={LOCK['torchvision']}" in text
    assert f"s3fs=={LOCK['fsspec']}" in text  # s3fs releases in step with fsspec


# ---------------------------------------------------------------- clipline render kuberay

@pytest.mark.parametrize("job", ["jobs/demo.yaml", "jobs/laion-refresh.yaml"])
def test_render_writes_a_valid_rayjob(job, tmp_path, capsys):
    out = tmp_path / "job.yaml"
    assert cli.main(["render", "kuberay", str(REPO / job), "-o", str(out), "--image", "reg.example/clipline:1"]) == 0
    configmap, rayjob = [d for d in yaml.safe_load_all(out.read_text()) if d]
    check_ray_manifest(rayjob)
    name = yaml.safe_load((REPO / job).read_text())["name"]
    assert rayjob["metadata"]["name"] == f"clipline-{name}"
    # the ConfigMap carries the spec, mounted where the entrypoint reads it
    assert configmap["kind"] == "ConfigMap" and list(configmap["data"]) == [f"{name}.yaml"]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"] == [{"name": "clipline-job", "configMap": {"name": configmap["metadata"]["name"]}}]
    mount = head["containers"][0]["volumeMounts"][0]["mountPath"]
    assert rayjob["spec"]["entrypoint"] == f"clipline run {mount}/{name}.yaml --no-progress"
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert {c["image"] for g in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]]
            + rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]} == {"reg.example/clipline:1"}
    # the embedded spec is the job, valid, joining the cluster
    embedded = tmp_path / f"{name}.yaml"
    embedded.write_text(configmap["data"][f"{name}.yaml"])
    loaded, original = spec.load(embedded), spec.load(REPO / job)
    assert loaded.ray_address == "auto"
    assert {n: s.params for n, s in loaded.stages.items()} == {n: s.params for n, s in original.stages.items()}
    # neither job asks for GPUs, so there is no GPU group; the demo's local storage earns a warning
    assert [g["groupName"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]] == ["cpu"]
    err = capsys.readouterr().err
    assert ("storage './clipline-data' is a local path" in err) == (job == "jobs/demo.yaml")


def test_render_follows_overrides_and_sizes_the_gpu_group(capsys):
    r = kuberay.render(str(REPO / "jobs/digits.yaml"),
                       ["stages.train.with.use_gpu=true", "stages.train.with.workers=4"], "s3://b/clipline")
    check_ray_manifest(r.rayjob)
    groups = {g["groupName"]: g for g in r.rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["gpu"]["maxReplicas"] == 4
    embedded = yaml.safe_load(r.configmap["data"]["digits.yaml"])
    assert embedded["storage"] == "s3://b/clipline" and embedded["stages"]["train"]["with"]["workers"] == 4
    assert r.warnings == []


def test_render_names_are_dns_labels():
    assert kuberay.k8s_name("LAION_400m.refresh") == "clipline-laion-400m-refresh"
    long = kuberay.k8s_name("x" * 80)
    assert len(long) == kuberay.MAX_RAYJOB_NAME and DNS1035.match(long)
    assert long != kuberay.k8s_name("x" * 81)  # cut names keep a hash of the whole name


def test_render_bad_spec_is_a_spec_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  crawl:\n    uses: crawl\n    with: {input: x.parquet, image_sise: 64}\n")
    out = tmp_path / "never.yaml"
    assert cli.main(["render", "kuberay", str(bad), "-o", str(out)]) == cli.EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert f"{bad}: stages.crawl.with: unknown key(s) 'image_sise'" in err
    assert not out.exists()
    assert cli.main(["render", "kuberay", str(REPO / "jobs/demo.yaml"), "--set", "stages.train.with.workers=zero"]) == 2
    assert "stages.train.with.workers: expected integer" in capsys.readouterr().err


# ---------------------------------------------------------------- ray up configs

def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_cluster_launcher_config_is_what_ray_up_accepts(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / f"{cloud}.yaml").read_text())
    jsonschema.validate(config, ray_schema())
    # what `ray up` does before it talks to the cloud: defaults merged, then validated again
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud
    types = prepared["available_node_types"]
    assert set(types) == {"head", "cpu", "gpu"} and prepared["head_node_type"] == "head"
    assert types["head"]["max_workers"] == 0 and types["head"]["resources"] == {"CPU": 0}
    assert types["cpu"]["min_workers"] == 0 < types["cpu"]["max_workers"]
    assert types["gpu"]["min_workers"] == 0 < types["gpu"]["max_workers"] and types["gpu"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu"]["resources"]
    assert "gpu" in types["gpu"]["docker"]["worker_image"] and prepared["docker"]["image"].endswith("-cpu")
    assert f"rayproject/ray:{LOCK['ray']}-py311" in prepared["docker"]["image"]
    # the torch pins and clipline itself, on every node, as requirements.lock pins them
    setup = " && ".join(prepared["setup_commands"])
    assert f"torch=={LOCK['torch']}" in setup and f"torchvision=={LOCK['torchvision']}" in setup
    assert "-c /home/ray/clipline/requirements.lock -e /home/ray/clipline" in setup
    # Ray token auth on every node, with the operator's own token (the one `clipline submit` sends)
    assert prepared["file_mounts"] == {"/home/ray/clipline": ".", "/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    for cmd in prepared["head_start_ray_commands"][1:] + prepared["worker_start_ray_commands"][1:]:
        assert cmd.index("export RAY_AUTH_MODE=token;") < cmd.index("ray start"), cmd
    assert prepared["head_setup_commands"][:len(prepared["setup_commands"])] == prepared["setup_commands"]


def test_cluster_launcher_validation_bites():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["resources"]["GPU"] = "8"
    with pytest.raises(jsonschema.ValidationError, match="'8' is not of type 'integer'"):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["cpu"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        validate_config(prepare_config(bad))


# ---------------------------------------------------------------- cluster/local.sh

def _group(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies, exited but not yet reaped, left out)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def _listening(pids: list[int]) -> dict[tuple[str, int], str]:
    """(address, port) -> process name of every TCP/UDP socket the processes listen on."""
    import ray  # noqa: F401  # puts Ray's own copy of psutil on sys.path

    # isort: split
    import psutil

    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE):  # NONE: a bound UDP socket
                out[(c.laddr.ip, c.laddr.port)] = name
    return out


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
PROBE = """
import json, os, ray
from ray.job_submission import JobSubmissionClient
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as On

ray.init(address="auto", logging_level="ERROR")  # auto: RAY_ADDRESS, as `clipline run` with ray.address=auto
nodes = [n for n in ray.nodes() if n["Alive"]]
pg = ray.util.placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

ran = ray.get([where.options(scheduling_strategy=On(pg, i)).remote() for i in range(2)])
jobs = JobSubmissionClient().list_jobs()  # no address: RAY_API_SERVER_ADDRESS, the dashboard
print(json.dumps({"alive": len(nodes), "ips": sorted({n["NodeManagerAddress"] for n in nodes}),
                  "driver_ip": ray.util.get_node_ip_address(), "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes),
                  "ran_on": sorted(set(ran)), "nodes": sorted(n["NodeID"] for n in nodes),
                  "jobs": [j.job_id for j in jobs], "me": ray.get_runtime_context().get_job_id()}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_cluster_script_starts_two_loopback_nodes_and_stops_them():
    port, dashboard, client = free_ports(3)
    # short: Ray's Unix socket paths under the state directory may not pass 107 bytes
    state = Path(tempfile.mkdtemp(prefix="clc-", dir="/tmp"))
    script = [str(CLUSTER / "local.sh")]
    common = ["--state-dir", str(state)]
    # the driver gets only what `start` prints (conftest's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 taken away)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_MODE",
                                                                     "RAY_ENABLE_WINDOWS", "RAY_API_SERVER"))}
    start = subprocess.run(script + ["start", "--workers", "1", "--port", str(port), "--dashboard-port",
                                     str(dashboard), "--client-port", str(client)] + common,
                           capture_output=True, text=True, env=env, timeout=540)
    pgid = int((state / "local_cluster.pid").read_text()) if (state / "local_cluster.pid").exists() else None
    try:
        assert start.returncode == 0, start.stdout + start.stderr + (state / "local_cluster.log").read_text()[-3000:]
        exports = dict(shlex.split(line)[1].split("=", 1) for line in start.stdout.splitlines()
                       if line.startswith("export "))
        assert exports == {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token",
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
        assert f"# Ray client: ray://127.0.0.1:{client}" in start.stdout
        assert "2 nodes (1 CPU each) on 127.0.0.1" in start.stderr
        recorded = json.loads((state / "state.json").read_text())
        assert recorded["pid"] == pgid and recorded["nodes"] == 2 and recorded["address"] == f"127.0.0.1:{port}"
        # the Python of the nodes, which local.sh puts first on their PATH for the drivers of submitted jobs
        assert recorded["python"] == str(REPO / ".venv" / "bin" / "python")
        assert f"nodes and submitted jobs run {recorded['python']}" in start.stderr

        # a second start on the same state directory refuses, naming the running cluster
        again = subprocess.run(script + ["start"] + common, capture_output=True, text=True, env=env, timeout=60)
        assert again.returncode == 1 and f"a cluster from {state} is running (process group {pgid})" in again.stderr

        # a driver with the printed environment sees both nodes, on loopback, and a task runs on each
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env | exports,
                               timeout=300)
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        assert seen["alive"] == 2 and seen["cpus"] == 2
        assert seen["ips"] == ["127.0.0.1"] and seen["driver_ip"] == "127.0.0.1"
        assert seen["ran_on"] == seen["nodes"]  # STRICT_SPREAD: one bundle, and its task, on each node
        assert seen["me"] in seen["jobs"]  # the Jobs API on the dashboard lists this very driver

        # every socket any process of the cluster listens on is a loopback one, the GCS, the dashboard and
        # the Ray client server among them
        members = _group(pgid)
        listening = _listening(members)
        assert {p for _, p in listening} >= {port, dashboard, client}, listening
        assert {name for name in listening.values()} >= {"gcs_server", "raylet"}, listening
        assert [a for a in listening if a[0] not in LOOPBACK] == [], listening
    finally:
        stop = subprocess.run(script + ["stop"] + common, capture_output=True, text=True, env=env, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert f"stopped the cluster of {state} (process group {pgid})" in stop.stdout
    assert _group(pgid) == []  # the holder, Ray's processes and their workers: all gone
    assert not (state / "state.json").exists() and not (state / "local_cluster.pid").exists()
    assert "local_cluster: stopped 2 nodes" in (state / "local_cluster.log").read_text()
    # stopping again is harmless
    again = subprocess.run(script + ["stop"] + common, capture_output=True, text=True, env=env, timeout=30)
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slow
def test_local_cluster_script_refuses_bad_arguments(tmp_path):
    script = str(CLUSTER / "local.sh")
    state = ["--state-dir", str(tmp_path / "s")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, *args], capture_output=True, text=True, timeout=60)

    bad = run("start", "--workers", "two", *state)
    assert bad.returncode == 1 and "argument --workers: expects a whole number >= 0, got 'two'" in bad.stderr
    assert not (tmp_path / "s" / "local_cluster.pid").exists()  # nothing left that `stop` would signal
    bad = run("start", "--cpus-per-node", "0", *state)
    assert bad.returncode == 1 and "argument --cpus-per-node: expects a whole number >= 1, got '0'" in bad.stderr
    bad = run("start", "--state-dir", str(tmp_path / ("x" * 60)))
    assert bad.returncode == 1 and "is too long: Ray's socket paths" in bad.stderr
    bad = run("start", "--bogus")
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr and "local.sh stop" in bad.stderr
    bad = run("stop", "--workers", "2")
    assert bad.returncode == 1 and "'stop' takes only --state-dir" in bad.stderr
    bad = run("start", "--port")
    assert bad.returncode == 1 and "--port expects a value" in bad.stderr
    none = run("stop", "--state-dir", str(tmp_path / "none"))
    assert none.returncode == 0 and "nothing to stop" in none.stdout
