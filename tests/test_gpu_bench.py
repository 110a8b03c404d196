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
def test_smoke_writes_every_figure_and_mfu_only_with_a_peak(tmp_path):
    r = smoke(tmp_path, "all", "--parts", PARTS)
    assert r["arch"] == "clip-tiny" and r["gpus"] == 0 and r["ranks"] == 2
    assert [(m["config"], m["ranks"], m["strategy"]) for m in r["model"]] == [
        ("1 rank", 1, "ddp"), ("DDP x2", 2, "ddp"), ("FSDP2 x2", 2, "fsdp")]
    for m in r["model"]:
        assert positive(m["step_samples_per_s"]) and positive(m["global_samples_per_s"]), m
        assert positive(m["flops_per_sample"]) and math.isfinite(m["loss_last"]), m
        assert m["mfu"] is None and m["peak_flops"] is None and m["peak_memory_bytes"] is None, m  # CPU: no peak
    inf = r["inference"]
    for key in ("embed_in_process", "embed_pool", "clip_score_in_process", "clip_score_pool", "clip_score_model_only"):
        assert positive(inf[f"{key}_images_per_s"]), (key, inf)

    # a given peak turns MFU on: flops_per_sample x global samples/s / (peak x ranks)
    (m,) = smoke(tmp_path, "peak", "--parts", "model", "--ranks", "1", "--peak-flops", "1e12")["model"]
    assert m["peak_flops"] == 1e12
    assert m["mfu"] == pytest.approx(m["flops_per_sample"] * m["global_samples_per_s"] / 1e12)
    assert 0 < m["mfu"] < 1
