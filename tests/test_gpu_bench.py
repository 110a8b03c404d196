"""The GPU benchmark's CPU smoke mode runs, and writes the figures a GPU run would: tests/benchmarks/gpu.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

PARTS = "model,inference"  # the train-stage part runs the stage, which test_train.py covers on CPU


def smoke(tmp_path, name: str, *flags: str) -> dict:
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.gpu", "--smoke", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def positive(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_smoke_writes_every_figure_and_mfu_from_the_given_peak(tmp_path):
    # one run with a given peak (on CPU there is none otherwise): MFU = flops_per_sample x global samples/s /
    # (peak x ranks); one smoke run, not two (a second process cost ~15 s of the suite)
    r = smoke(tmp_path, "all", "--parts", PARTS, "--peak-flops", "1e12")
    assert r["arch"] == "clip-tiny" and r["gpus"] == 0 and r["ranks"] == 2
    assert [(m["config"], m["ranks"], m["strategy"]) for m in r["model"]] == [
        ("1 rank", 1, "ddp"), ("DDP x2", 2, "ddp"), ("FSDP2 x2", 2, "fsdp")]
    for m in r["model"]:
        assert positive(m["step_samples_per_s"]) and positive(m["global_samples_per_s"]), m
        assert positive(m["flops_per_sample"]) and math.isfinite(m["loss_last"]), m
        assert m["peak_flops"] == 1e12 and m["peak_memory_bytes"] is None, m  # CPU: no CUDA memory figure
        assert m["mfu"] == pytest.approx(m["flops_per_sample"] * m["global_samples_per_s"] / (1e12 * m["ranks"]))
        assert 0 < m["mfu"] < 1
    inf = r["inference"]
    for key in ("embed_in_process", "embed_pool", "clip_score_in_process", "clip_score_pool", "clip_score_model_only"):
        assert positive(inf[f"{key}_images_per_s"]), (key, inf)


def test_without_a_given_peak_the_cpu_has_none_and_mfu_is_not_made_up():
    import torch

    from pipelines.stages.train.config import TrainConfig
    from pipelines.stages.train.loop import peak_flops

    assert peak_flops(TrainConfig(), torch.device("cpu"), bf16=False) is None
    assert peak_flops(TrainConfig(), torch.device("cpu"), bf16=True) is None
    assert peak_flops(TrainConfig(peak_flops=3e14), torch.device("cpu"), bf16=False) == 3e14
