"""KubeRay manifests for a job spec: what `clipline render kuberay JOB` writes.

The output is two documents for one `kubectl apply -f`: a ConfigMap that holds the job spec (after
`--set`/`--storage`) and a `ray.io/v1` RayJob whose head pod mounts it and whose entrypoint is
`clipline run <mounted spec>`. This is the shape of KubeRay's own samples (code in a ConfigMap mounted
into the head, where the Ray job's driver runs): the spec stays readable with `kubectl get configmap -o
yaml`, and changing the job is a new ConfigMap, not an image rebuild. The RayJob creates its own
autoscaling RayCluster (a CPU worker group for crawl and curate; a GPU group only when a stage asks for
GPUs) and deletes it when the job ends; the code comes from the image (`cluster/kuberay/Dockerfile`).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import yaml

from pipelines import __version__, spec, storage

RAY_VERSION = "2.60.0"  # what the image and requirements.lock carry; KubeRay checks it against rayVersion
DEFAULT_IMAGE = f"clipline:{__version__}"  # built from cluster/kuberay/Dockerfile; push it and pass --image
SPEC_DIR = "/home/ray/clipline-job"  # where the head pod mounts the ConfigMap
# KubeRay refuses RayJob names over 47 characters (it appends 6 to name the RayCluster, which may have 53)
MAX_RAYJOB_NAME = 47
CPU_WORKERS_MAX = 16  # autoscaling bound of the CPU group; the crawl's throughput grows with it
SECRET = "clipline-env"  # optional Secret: storage credentials, MLFLOW_TRACKING_URI, ...


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job spec inside the ConfigMap) as `|` blocks, so the output reads like YAML;
    no anchors and aliases, which kubectl accepts but people reading the manifest should not have to."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


@dataclass(frozen=True)
class Rendered:
    """The manifests for one job, and what the user should know before applying them."""

    configmap: dict[str, Any]
    rayjob: dict[str, Any]
    warnings: list[str]

    def to_yaml(self) -> str:
        head = (f"# Rendered by clipline {__version__} (`clipline render kuberay`): apply with `kubectl apply -f`.\n"
                f"# The RayJob runs `clipline run` on the spec in the ConfigMap, on an autoscaling RayCluster\n"
                f"# that it creates and deletes. Storage credentials and MLFLOW_TRACKING_URI come from the\n"
                f"# Secret {SECRET!r} if it exists (kubectl create secret generic {SECRET} --from-env-file=...).\n")
        docs = [yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in (self.configmap, self.rayjob)]
        return head + "---\n" + "---\n".join(docs)


def k8s_name(job_name: str, prefix: str = "clipline-", limit: int = MAX_RAYJOB_NAME) -> str:
    """A DNS-1035 label (lowercase letters, digits and '-', starting with a letter) for a job name: `prefix`
    plus the name lowercased, other characters as '-'; a name cut to `limit` ends in a hash of the whole."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", job_name.lower())).strip("-")
    name = f"{prefix}{slug}".strip("-") or "clipline"
    if not name[0].isalpha():
        name = f"c-{name}"
    if len(name) > limit:
        digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
        name = f"{name[:limit - 9].rstrip('-')}-{digest}"
    return name


def _gpu_workers(job: spec.JobSpec) -> int:
    """How many one-GPU pods the job's stages can use at once: the train workers of a `use_gpu` stage, one
    for any stage that asks for a fraction of a GPU; 0 when no stage wants one."""
    want = 0
    for st in job.stages.values():
        if st.params.get("use_gpu"):
            want = max(want, int(st.params.get("workers", 1)))
        elif st.params.get("num_gpus") or st.resources.get("num_gpus"):
            want = max(want, 1)
    return want


def _container(name: str, image: str, requests: dict[str, str], limits: dict[str, str],
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        # credentials and the tracking URI, when the user made the Secret; optional, so none is fine
        "envFrom": [{"secretRef": {"name": SECRET, "optional": True}}],
        "resources": {"requests": dict(requests), "limits": dict(limits)},
    }
    c.update(extra or {})
    return c


def ray_cluster_spec(image: str, gpu_workers: int, spec_configmap: str | None = None) -> dict[str, Any]:
    """A RayCluster spec: a head that runs the driver and no tasks, an autoscaled CPU group and, when
    `gpu_workers` > 0, an autoscaled group of one-GPU pods; `spec_configmap` is mounted into the head."""
    head_extra: dict[str, Any] = {
        "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}],
    }
    head_pod: dict[str, Any] = {}
    if spec_configmap:
        head_extra["volumeMounts"] = [{"name": "clipline-job", "mountPath": SPEC_DIR, "readOnly": True}]
        head_pod["volumes"] = [{"name": "clipline-job", "configMap": {"name": spec_configmap}}]
    groups = [{
        "groupName": "cpu",
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": CPU_WORKERS_MAX,
        "rayStartParams": {},
        "template": {"spec": {"containers": [
            _container("ray-worker", image, {"cpu": "8", "memory": "16Gi"}, {"cpu": "8", "memory": "16Gi"})]}},
    }]
    if gpu_workers:
        gpu = {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"}
        groups.append({
            "groupName": "gpu",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": gpu_workers,
            "rayStartParams": {},
            "template": {"spec": {
                "containers": [_container("ray-worker", image, gpu, gpu)],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }},
        })
    return {
        "rayVersion": RAY_VERSION,
        # Ray token auth (KubeRay >= 1.5.1): the operator creates a Secret with a random token and sets
        # RAY_AUTH_MODE and RAY_AUTH_TOKEN in every Ray container; the dashboard and Jobs API require it
        "authOptions": {"mode": "token"},
        # the in-tree autoscaler adds pods for pending tasks and removes idle ones
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": 300},
        "headGroupSpec": {
            # no tasks on the head: it runs the driver, which holds the crawl's plan (28 bytes a row)
            "rayStartParams": {"num-cpus": "0"},
            "template": {"spec": {
                "containers": [_container("ray-head", image, {"cpu": "2", "memory": "8Gi"},
                                          {"cpu": "4", "memory": "16Gi"}, head_extra)],
                **head_pod,
            }},
        },
        "workerGroupSpecs": groups,
    }


def render(path: str, overrides: list[str] | None = None, storage_url: str | None = None,
           image: str = DEFAULT_IMAGE, namespace: str | None = None) -> Rendered:
    """The ConfigMap and RayJob that run the job spec at `path` on KubeRay.

    The spec is loaded and validated exactly as `clipline run` would (a bad spec raises SpecError). In the
    cluster the driver must join the RayCluster, so `ray.address: local` (the default) becomes `auto`.
    """
    overrides = list(overrides or [])
    if storage_url:
        overrides.append(f"storage={storage_url}")
    job = spec.load(path, overrides)
    raw = copy.deepcopy(job.raw)
    warnings: list[str] = []
    if job.ray_address == "local":
        raw.setdefault("ray", {})["address"] = "auto"
        job = spec.resolve(raw, str(path))  # the spec in the ConfigMap is validated too
    elif job.ray_address != "auto":
        warnings.append(f"ray.address is {job.ray_address!r}: the driver will run on the RayJob's head pod but "
                        f"send its work to that address, not to the RayCluster the RayJob creates")
    raw_storage = raw.get("storage", "./clipline-data")
    if storage.is_local(raw_storage):
        warnings.append(f"storage {raw_storage!r} is a local path: every pod has its own disk, and the outputs "
                        f"go with the cluster; use an object store (--storage s3://BUCKET/clipline)")

    name = k8s_name(job.name)
    filename = f"{job.name}.yaml"
    labels = {"app.kubernetes.io/name": "clipline", "app.kubernetes.io/version": __version__,
              "clipline.dev/job": k8s_name(job.name, prefix="", limit=63)}
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**copy.deepcopy(meta), "name": f"{name}-spec"},
        "data": {filename: f"# {path}, as `clipline render kuberay` resolved it"
                           + (" (" + " ".join(f"--set {o}" for o in overrides) + ")" if overrides else "") + "\n"
                           + yaml.safe_dump(raw, sort_keys=False, width=120)},
    }
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": meta,
        "spec": {
            "entrypoint": f"clipline run {SPEC_DIR}/{filename} --no-progress",
            # the runner retries stages itself and resumes from completed shards: one submission is enough
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,  # keeps the finished cluster's logs and dashboard for 10 minutes
            "rayClusterSpec": ray_cluster_spec(image, _gpu_workers(job), spec_configmap=f"{name}-spec"),
        },
    }
    return Rendered(configmap=configmap, rayjob=rayjob, warnings=warnings)
