"""Model loading shared by curate, train and evaluate: configs, checkpoints without pickle, MLflow models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines import models
from pipelines.models import ModelRef


def embed(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    with torch.inference_mode():
        return (model.encode_image(torch.rand(2, 3, 64, 64), normalize=True),
                model.encode_text(tokenizer(["a red circle", "a blue square"]), normalize=True))


def test_seeded_init_is_reproducible_and_checkpoints_round_trip(tmp_path):
    a, _, tok = models.create(ModelRef(arch="clip-tiny", seed=1))
    b, _, _ = models.create(ModelRef(arch="clip-tiny", seed=2))
    assert not torch.equal(embed(a, tok)[0], embed(b, tok)[0])

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}, "step": 3}, tmp_path / "w.pt")
    for ckpt in ("w.safetensors", "w.pt"):
        c, _, _ = models.create(ModelRef(arch="clip-tiny", seed=2, checkpoint=str(tmp_path / ckpt)))
        for x, y in zip(embed(a, tok), embed(c, tok), strict=True):
            assert torch.equal(x, y)


class Payload:  # an arbitrary object: unpickling it would run code of the file's choosing
    pass


def test_checkpoints_are_never_unpickled_and_mismatches_are_named(tmp_path):
    torch.save({"state_dict": {}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: not a plain tensor checkpoint"):
        models.create(ModelRef(arch="clip-tiny", checkpoint=str(tmp_path / "evil.pt")))
    small, _, _ = models.create(ModelRef(arch="clip-small"))
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"small.pt does not fit architecture clip-tiny"):
        models.create(ModelRef(arch="clip-tiny", checkpoint=str(tmp_path / "small.pt")))
    with pytest.raises(FileNotFoundError, match="nothere.pt: no such file"):
        models.create(ModelRef(arch="clip-tiny", checkpoint=str(tmp_path / "nothere.pt")))
    with pytest.raises(ValueError, match="'ViT-Nope': not an open_clip architecture"):
        models.create(ModelRef(arch="ViT-Nope"))


def test_json_config_by_path(tmp_path):
    cfg = json.loads((models.CONFIG_DIR / "clip-tiny.json").read_text())
    cfg["embed_dim"] = 32
    (tmp_path / "my-clip.json").write_text(json.dumps(cfg))
    m, _, tok = models.create(ModelRef(arch=str(tmp_path / "my-clip.json")))
    assert embed(m, tok)[0].shape == (2, 32)
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="broken.json: expected an open_clip config"):
        models.create(ModelRef(arch=str(tmp_path / "broken.json")))


def test_mlflow_model_loads_by_name_without_unpickling(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # also sets MLFLOW_TRACKING_URI
    try:
        # artifacts under tmp_path: the default location is ./mlruns in the working directory (the repo)
        mlflow.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
        mlflow.set_experiment("models")
        model, _, tok = models.create(ModelRef(arch="clip-tiny", seed=5))
        with mlflow.start_run():
            models.log_model(model, "clip-tiny", registered_model_name="tiny")
        mlflow.MlflowClient().set_registered_model_alias("tiny", "best", "1")
        loaded, _, _ = models.create(ModelRef(model_uri="models:/tiny@best"))
        # the requirements are named at the installed versions, not inferred by loading the model again
        reqs = Path(mlflow.artifacts.download_artifacts("models:/tiny@best", dst_path=str(tmp_path / "dl")),
                    "requirements.txt").read_text().split()
    finally:
        mlflow.set_tracking_uri(None)  # later tests resolve their own store
    for x, y in zip(embed(model, tok), embed(loaded, tok), strict=True):
        assert torch.equal(x, y)
    assert set(reqs) >= {f"torch=={torch.__version__.split('+')[0]}", *models.model_requirements()}, reqs
