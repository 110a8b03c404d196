"""Embedding heads (pipelines/heads.py) and the curate `head` rule that scores images with one.

The real test: demo-like images (a colored shape on a dark or a light background) embedded by a tiny,
seeded, randomly initialised open_clip model; a "dark background" head trained on those embeddings here;
then curate with the `head` rule keeps exactly the rows the head scores within [min, max].
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipelines import heads

CONFIG = {"layers": [8, 4, 1], "activation": "relu", "output": "dark_background", "sigmoid": True}


def random_state(config: dict, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = heads.head_config(config)
    return {k: torch.randn(shape, generator=g) for k, shape in cfg.shapes().items()}


def test_round_trip_through_safetensors(tmp_path):
    import torch

    state = random_state(CONFIG)
    heads.save_head(str(tmp_path / "h"), CONFIG, state)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json", "head.safetensors"]
    module, config = heads.load_head(str(tmp_path / "h"))
    assert config == heads.head_config(CONFIG) and config.output == "dark_background" and config.input_dim == 8
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    expected = torch.sigmoid(torch.relu(x @ state["layers.0.weight"].T + state["layers.0.bias"])
                             @ state["layers.1.weight"].T + state["layers.1.bias"]).squeeze(-1)
    np.testing.assert_allclose(heads.score(module, x), expected.numpy(), rtol=1e-6)
    scores = heads.score(module, x.numpy())
    assert scores.shape == (5,) and scores.dtype == np.float32 and ((scores > 0) & (scores < 1)).all()


def test_normalize_and_linear_heads():
    """`normalize` L2-normalises the embedding first (scale-free); `activation: none` is a stack of linear maps."""
    import torch

    cfg = {"layers": [8, 3, 1], "activation": "none", "output": "aesthetic", "normalize": True}
    state = random_state(cfg, seed=2)
    module = heads.build_head(cfg, state)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(heads.score(module, x), heads.score(module, 7 * x), rtol=1e-5)
    xn = torch.nn.functional.normalize(x, dim=-1)
    w = state["layers.1.weight"] @ state["layers.0.weight"]
    b = state["layers.1.weight"] @ state["layers.0.bias"] + state["layers.1.bias"]
    np.testing.assert_allclose(heads.score(module, x), (xn @ w.T + b).squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_shape_mismatch_names_the_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    state = random_state({**CONFIG, "layers": [8, 5, 1]})
    with pytest.raises(ValueError, match=r"tensor layers\.0\.weight has shape \(5, 8\), but layers \[8, 4, 1\] "
                                         r"make it \(4, 8\)"):
        heads.save_head(str(tmp_path / "h"), CONFIG, state)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "head.json").write_text(json.dumps(CONFIG))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "h" / "head.safetensors"))
    weights = tmp_path / "h" / "head.safetensors"
    with pytest.raises(ValueError, match=rf"head {weights}: tensor layers\.0\.weight has shape \(5, 8\)"):
        heads.load_head(str(tmp_path / "h"))
    good = random_state(CONFIG)
    save_file({k: v for k, v in good.items() if k != "layers.1.bias"}, str(weights))
    with pytest.raises(ValueError, match=rf"head {weights}: tensor layers\.1\.bias missing"):
        heads.load_head(str(tmp_path / "h"))
    save_file({**good, "layers.2.weight": good["layers.1.weight"].clone()}, str(weights))
    with pytest.raises(ValueError, match=rf"head {weights}: unexpected tensor layers\.2\.weight"):
        heads.load_head(str(tmp_path / "h"))


class _Payload:
    """Unpickling this opens (creates) a file: the proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_weights_are_never_unpickled(tmp_path):
    import torch

    marker = tmp_path / "unpickled"
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "head.json").write_text(json.dumps(CONFIG))
    (tmp_path / "h" / "head.safetensors").write_bytes(pickle.dumps({"layers.0.weight": _Payload(str(marker))}))
    with pytest.raises(ValueError, match="not a safetensors file"):
        heads.load_head(str(tmp_path / "h"))
    buf = io.BytesIO()
    torch.save({"state_dict": random_state(CONFIG), "x": _Payload(str(marker))}, buf)
    (tmp_path / "h" / "head.safetensors").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a safetensors file"):
        heads.load_head(str(tmp_path / "h"))
    assert not marker.exists()
    # a torch checkpoint beside the config is not a head's weights: only head.safetensors is read
    (tmp_path / "h" / "head.safetensors").unlink()
    (tmp_path / "h" / "head.pt").write_bytes(buf.getvalue())
    with pytest.raises(FileNotFoundError, match="no head.safetensors"):
        heads.load_head(str(tmp_path / "h"))
    assert not marker.exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"layers": [8, 4, 2]}, r"layers must end with 1"),
    ({"layers": [8]}, r"layers must be a list of at least 2 positive integer widths"),
    ({"layers": [8, 0, 1]}, r"layers must be a list"),
    ({"activation": "tanh"}, r"activation must be one of relu, gelu, none, got 'tanh'"),
    ({"output": "Dark Background"}, r"output must be a score name"),
    ({"sigmoid": "yes"}, r"sigmoid must be true or false"),
    ({"dropout": 0.1}, r"unknown key\(s\) dropout"),
])
def test_config_errors_name_the_file_and_key(tmp_path, change, message):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "head.json").write_text(json.dumps({**CONFIG, **change}))
    with pytest.raises(ValueError, match=rf"head {tmp_path / 'h' / 'head.json'}: {message}"):
        heads.read_config(str(tmp_path / "h"))


def test_missing_head_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"head {tmp_path}: no head.json"):
        heads.load_head(str(tmp_path))
    (tmp_path / "head.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        heads.read_config(str(tmp_path))


def test_import_is_light():
    code = "import sys, pipelines.heads; print(sorted(m for m in ('torch', 'safetensors', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- demo-like images on dark and light backgrounds, a tiny CLIP model, a trained head --------------------

ARCH, SEED = "clip-tiny", 5


def shape_image(index: int, dark: bool) -> bytes:
    """The demo web's image for `index` (a colored shape, jittered), on a black or a white background."""
    from pipelines.demo import web

    s = dataclasses.replace(web.sample(11, index), background="black" if dark else "white")
    buf = io.BytesIO()
    web.render(s, 64).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def labelled(n: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    dark = np.random.default_rng(seed).integers(0, 2, n).astype(bool)
    return [shape_image(seed * 1000 + i, bool(d)) for i, d in enumerate(dark)], dark


def embed(images: list[bytes]) -> np.ndarray:
    """Image embeddings (not normalised) as the rule's actors compute them: the model's own preprocessing."""
    import torch
    from PIL import Image

    from pipelines import models

    model, preprocess, _ = models.create(models.ModelRef(arch=ARCH, seed=SEED))
    with torch.inference_mode():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        return model.encode_image(pixels).float().numpy()


HEAD = {"layers": [64, 16, 1], "activation": "relu", "output": "dark_background", "sigmoid": True, "normalize": True}


@pytest.fixture(scope="module")
def dark_head(tmp_path_factory):
    """A dark-background head trained on 60 embedded images, with its accuracy on 40 held-out ones."""
    images, dark = labelled(100, seed=1)
    emb = embed(images)
    state = heads.train_head(emb[:60], dark[:60], HEAD, steps=300, seed=0)
    path = tmp_path_factory.mktemp("head") / "dark"
    heads.save_head(str(path), HEAD, state)
    module, _ = heads.load_head(str(path))
    held_out = heads.score(module, emb[60:]) > 0.5
    return path, module, float((held_out == dark[60:]).mean())


def test_trained_head_separates_dark_from_light(dark_head):
    _, _, accuracy = dark_head
    assert accuracy >= 0.9


# ---- the curate rule -------------------------------------------------------------------------------------

def rule(**config):
    from pipelines.stages.curate.rules.head import HeadRule, HeadRuleConfig

    return HeadRule(HeadRuleConfig(**config), 1)


def test_rule_names_its_score_and_reason_after_the_head(dark_head):
    path, _, _ = dark_head
    r = rule(path=str(path), max=0.5)
    assert [f.name for f in r.score_fields()] == ["dark_background"]
    assert r.reasons() == ("head:dark_background",)
    assert rule().reasons() == ("head",) and rule().score_fields() == ()  # unlisted, with the default settings


@pytest.mark.parametrize(("config", "message"), [
    ({"max": 0.5}, r"head\.path: the rule is listed but names no head directory"),
    ({"path": "x"}, r"head: give min, max or both"),
    ({"path": "x", "min": 0.6, "max": 0.4}, r"head: min \(0\.6\) is above max \(0\.4\)"),
    ({"path": "x", "min": float("nan")}, r"head\.min: must be a finite number"),
])
def test_spec_time_checks(config, message):
    from pipelines import configschema
    from pipelines.stages.curate.config import CurateConfig

    with pytest.raises(ValueError, match=message):
        configschema.build(CurateConfig, {"rules": ["head"], "head": config})


def test_prepare_checks_the_head_against_the_model(tmp_path):
    import logging

    narrow = {**HEAD, "layers": [32, 1]}
    heads.save_head(str(tmp_path / "narrow"), narrow, random_state(narrow))
    with pytest.raises(ValueError, match=r"reads 32-dim embeddings \(layers \[32, 1\]\), but model clip-tiny embeds "
                                         r"images in 64"):
        rule(path=str(tmp_path / "narrow"), max=0.5, model={"arch": ARCH}).prepare(logging.getLogger("t"))
    taken = {**HEAD, "output": "clip_score"}
    heads.save_head(str(tmp_path / "taken"), taken, random_state(taken))
    with pytest.raises(ValueError, match=r"output 'clip_score' is already a column of the curate working table"):
        rule(path=str(tmp_path / "taken"), max=0.5).score_fields()
    with pytest.raises(FileNotFoundError, match=rf"head {tmp_path / 'none'}: no head.json"):
        rule(path=str(tmp_path / "none"), max=0.5).prepare(logging.getLogger("t"))


@pytest.mark.slow
def test_curate_keeps_the_light_background_rows(tmp_path, ray_local, dark_head):
    from tests.test_curate import GOOD, row, run_curate, write_crawl

    path, module, _ = dark_head
    images, dark = labelled(24, seed=2)
    rows = [row(f"{GOOD} {i}", image=b) for i, b in enumerate(images)]
    rows.insert(5, row(f"{GOOD} broken", image=b"not an image"))  # unscorable: NaN, dropped
    rows.insert(9, row(status="failed_to_download"))
    crawl = write_crawl(tmp_path, [rows[:13], rows[13:]])
    result, ledger, curated, _ = run_curate(
        tmp_path, crawl, rules=["head"], shard_rows=100,
        head={"path": str(path), "model": {"arch": ARCH, "seed": SEED}, "max": 0.5, "batch_size": 8, "actors": 1})

    shapes = ledger.drop(index=[5, 9]).reset_index(drop=True)
    expected = heads.score(module, embed(images))  # what the head itself says of each image
    np.testing.assert_allclose(shapes["dark_background"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    # the rule keeps exactly the rows its head scores within [min, max], and those are the light ones
    assert shapes["kept"].tolist() == (expected <= 0.5).tolist()
    assert (shapes["kept"] == ~dark).mean() >= 0.9
    assert set(shapes.loc[~shapes["kept"], "reason"]) == {"head:dark_background"}
    assert pd.isna(ledger.loc[5, "dark_background"]) and ledger.loc[5, "reason"] == "head:dark_background"
    assert ledger.loc[9, "reason"] == "not_downloaded"
    assert result.counts["dropped_head:dark_background"] == int((expected > 0.5).sum()) + 1
    assert curated["uid"].tolist() == ledger.loc[ledger["kept"], "uid"].tolist()
    assert "dark_background" in curated.columns and (curated["dark_background"] <= 0.5).all()


@pytest.mark.slow
def test_model_rules_in_sequence_score_only_their_candidates(tmp_path, ray_local, dark_head):
    """head, then clip_score, then basic: a row the head drops is never CLIP-scored, a row only a later rule
    (basic) drops is scored by both, and each row's reason is the first rule in the list that dropped it."""
    from tests.test_curate import GOOD, row, run_curate, write_crawl

    path, module, _ = dark_head
    images, _ = labelled(16, seed=3)
    captions = [("two words" if i % 4 == 0 else f"{GOOD} {i}") for i in range(len(images))]
    crawl = write_crawl(tmp_path, [[row(c, image=b) for c, b in zip(captions, images, strict=True)]])
    _, ledger, _, _ = run_curate(
        tmp_path, crawl, rules=["head", "clip_score", "basic"], shard_rows=100,
        head={"path": str(path), "model": {"arch": ARCH, "seed": SEED}, "max": 0.5, "batch_size": 8},
        clip_score={"model": {"arch": "clip-tiny"}, "batch_size": 8})

    dropped_by_head = heads.score(module, embed(images)) > 0.5
    assert 0 < dropped_by_head.sum() < len(images)
    assert ledger["dark_background"].notna().all()
    assert ledger["clip_score"].isna().tolist() == dropped_by_head.tolist()
    expected = ["head:dark_background" if d else ("caption_words" if c == "two words" else None)
                for d, c in zip(dropped_by_head, captions, strict=True)]
    assert ledger["reason"].tolist() == expected
