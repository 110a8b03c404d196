"""open_clip models for every stage: by name, from a JSON config, a checkpoint file or an MLflow model URI.

Architectures are data, as in open_clip: the tiny configs beside this file (`clip-tiny`, `clip-small`) are
registered with open_clip's registry on import, and so is any JSON config a job names by path.  Weights are
never unpickled: checkpoints load with `torch.load(weights_only=True)` or from safetensors, and a model
logged by clipline to MLflow carries its config and a safetensors state dict as extra files, which is what
`models:/name@alias` loads here (the pickled copy MLflow also keeps is never read).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent
CONFIG_FILE = "open_clip_config.json"  # names inside a logged MLflow model's extra files
WEIGHTS_FILE = "model.safetensors"


@dataclass(kw_only=True)
class ModelRef:
    """Which open_clip model to use and where its weights come from."""

    arch: str = field(default="clip-tiny", metadata={
        "help": "open_clip architecture name (ViT-B-32, ...), one of clipline's tiny configs (clip-tiny, clip-small, clip-rn-tiny) "
                "or a path to an open_clip JSON model config"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "weights: a .safetensors file or a torch state dict (loaded with weights_only=True)"})
    model_uri: str | None = field(default=None, metadata={
        "help": "an MLflow model logged by clipline's train stage, e.g. models:/clip@latest or runs:/<id>/model; "
                "overrides arch and checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed of the random initialisation when no weights are given"})

    def __post_init__(self) -> None:
        if self.model_uri and self.checkpoint:
            raise ValueError("model: give either model_uri or checkpoint, not both")


def trained(m: Any) -> ModelRef:
    """The model a train stage's output (its Manifest) holds: the architecture and the weights file beside it."""
    from pipelines import storage

    info = m.extra["model"]
    return ModelRef(arch=info["arch"], checkpoint=storage.join(m.location, info["weights"]))


def register_configs() -> None:
    """Register clipline's JSON model configs with open_clip (idempotent)."""
    import open_clip

    for f in sorted(CONFIG_DIR.glob("*.json")):
        if open_clip.get_model_config(f.stem) is None:
            open_clip.add_model_config(f)


def arch_name(arch: str) -> str:
    """The open_clip model name for `arch`, registering it first when it is a path to a JSON config."""
    import open_clip

    register_configs()
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"model config {arch}: no such file")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config {arch}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise ValueError(f"model config {arch}: expected an open_clip config with embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"model arch {arch!r}: not an open_clip architecture; known: clip-tiny, clip-small, clip-rn-tiny, "
                         f"{', '.join(n for n in open_clip.list_models() if n.startswith('ViT-B'))}, ... "
                         "or a path to a JSON config")
    return arch


def model_config(arch: str) -> dict[str, Any]:
    import open_clip

    return open_clip.get_model_config(arch_name(arch))


def preprocess_cfg(arch: str) -> dict[str, Any]:
    """open_clip's preprocessing parameters for an architecture (size from the vision tower), without a model."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = model_config(arch)
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), cfg.get("preprocess_cfg", {}))
    pp["size"] = cfg["vision_cfg"].get("image_size", pp["size"])
    return pp


def transforms(arch: str, augment: bool = False) -> tuple[Any, Any]:
    """(image transform, tokenizer) for an architecture, from its preprocessing config, without a model:
    training's (random crops when `augment`) and evaluation's."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    pp = PreprocessCfg(**preprocess_cfg(arch))
    transform = open_clip.image_transform(pp.size, is_train=augment, mean=pp.mean, std=pp.std,
                                          interpolation=pp.interpolation, resize_mode=pp.resize_mode)
    return transform, open_clip.get_tokenizer(arch_name(arch))


def load_state_dict(path: str) -> dict[str, Any]:
    """A state dict from a checkpoint file, without unpickling arbitrary objects."""
    import torch

    from pipelines import storage

    if not storage.is_file(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    # any fsspec URL (a train stage's output on s3://, say): read whole, the weights are loaded whole anyway
    fs, fpath = storage.filesystem(path)
    with fs.open(fpath, "rb") as f:
        blob = f.read()
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_bytes

        sd: Any = load_bytes(blob)
    else:
        try:
            sd = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (pickle errors name the refused global)
            raise ValueError(f"checkpoint {path}: not a plain tensor checkpoint ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]})") from None
    for key in ("state_dict", "model"):  # open_clip and clipline checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@contextmanager
def _tracking_uri(uri: str | None) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block, then put back (None: left as it is).

    Needed even where a call takes a tracking_uri: MLflow resolves `models:/name@alias` against the global
    registry URI (which follows the tracking URI unless MLFLOW_REGISTRY_URI is set), whatever it is passed."""
    import mlflow

    if not uri:
        yield
        return
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def _from_mlflow(uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """Download a clipline-logged MLflow model from `tracking_uri` (default: MLflow's own, MLFLOW_TRACKING_URI);
    return (config path, weights path). On a tracking server the files come through its artifact proxy."""
    import mlflow

    dest = tempfile.mkdtemp(prefix="clipline-model-")
    with _tracking_uri(tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dest))
    found = {p.name: p for p in local.rglob("*") if p.name in (CONFIG_FILE, WEIGHTS_FILE)}
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in found]
    if missing:
        raise ValueError(f"MLflow model {uri}: has no {' or '.join(missing)}; only models logged by clipline "
                         "(pipelines.models.log_model) can be loaded without unpickling")
    cfg = json.loads(found[CONFIG_FILE].read_text())
    # open_clip names a registered config after its file: give each logged model its own name
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(dest, f"{cfg.pop('arch', 'model')}-mlflow-{digest}.json")
    path.write_text(json.dumps(cfg))
    return str(path), str(found[WEIGHTS_FILE])


def create(ref: ModelRef, device: str = "cpu", tracking_uri: str | None = None,
           **model_kwargs: Any) -> tuple[Any, Any, Any]:
    """(model in eval mode, image preprocessing, tokenizer) for a model reference.

    `tracking_uri` is where a `model_uri` is looked up (a job's tracking.uri; default MLFLOW_TRACKING_URI).
    `model_kwargs` go to open_clip's model class (e.g. `init_logit_bias` for SigLIP training)."""
    import open_clip
    import torch

    arch, checkpoint = ref.arch, ref.checkpoint
    if ref.model_uri:
        arch, checkpoint = _from_mlflow(ref.model_uri, tracking_uri)
    name = arch_name(arch)
    sd = load_state_dict(checkpoint) if checkpoint else None
    if sd is not None and "logit_bias" in sd:  # a SigLIP-trained model: the config alone does not say so
        model_kwargs.setdefault("init_logit_bias", 0.0)
    torch.manual_seed(ref.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device, **model_kwargs)
    if sd is not None:
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {checkpoint} does not fit architecture {name}: "
                             f"{str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else exc}") from None
    else:
        log.warning("model %s has random weights (no checkpoint or model_uri given): its scores carry no meaning", name)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def model_requirements() -> list[str]:
    """What loading a logged model needs, at the versions installed here (the pickled model is open_clip's)."""
    from importlib.metadata import version

    return [f"{dist}=={version(dist)}" for dist in ("torch", "torchvision", "open_clip_torch", "safetensors")]


def log_model(model: Any, arch: str, name: str = "model", registered_model_name: str | None = None,
              run_id: str | None = None, tracking_uri: str | None = None, **kwargs: Any) -> Any:
    """Log an open_clip model with its config and safetensors weights to the active MLflow run, or to
    `run_id` in `tracking_uri` (the run is left RUNNING, as it was)."""
    import mlflow.pytorch

    if run_id is not None:
        with _tracking_uri(tracking_uri):
            with mlflow.start_run(run_id=run_id, log_system_metrics=False):
                info = log_model(model, arch, name, registered_model_name, **kwargs)
            mlflow.MlflowClient().update_run(run_id, status="RUNNING")  # the runner ends the run
            return info
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp, CONFIG_FILE)
        cfg.write_text(json.dumps({"arch": arch_name(arch), **model_config(arch)}, indent=2))
        weights = Path(tmp, WEIGHTS_FILE)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(weights))
        # the pickled copy is what MLflow serves to mlflow.pytorch.load_model users; clipline reads the extra files.
        # The requirements are named: MLflow would otherwise infer them by loading the model in a subprocess that
        # records its imports (15 s of a train stage on clip-tiny, 0.2 s named)
        if "pip_requirements" not in kwargs and "extra_pip_requirements" not in kwargs:
            kwargs["pip_requirements"] = model_requirements()
        return mlflow.pytorch.log_model(model, name=name, extra_files=[str(cfg), str(weights)], serialization_format="pickle",
                                        registered_model_name=registered_model_name, **kwargs)
