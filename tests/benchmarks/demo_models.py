"""Which tiny model learns the demo's color-shape classes: clip-tiny (ViT, 8 px patches) against clip-rn-tiny
(ResNet), in the same plain open_clip loop, side by side in one process.

Both train on the same rows (the demo generator's first `--rows` samples, rendered at 96 px, resized to
64 and stored as JPEG q90 as the demo's crawl does), batch 64, AdamW lr 2e-3, warmup 10 then cosine, the
open_clip training transform, one process with 2 torch threads, seed 0; every `--every` epochs both are
scored zero-shot on `demo_heldout` with the evaluate stage's own code (`embed.encode`, `stage.score`).
Printed: held-out top-1 against steps and seconds for each model, and the steps each needs to reach 0.9.
This is the measurement behind the demo's choice of `clip-rn-tiny`.

    .venv/bin/python -m tests.benchmarks.demo_models [--rows 2900] [--epochs 16] [--every 4]
"""

from __future__ import annotations

import argparse
import io
import math
import time

import torch
from PIL import Image

from pipelines.demo import web
from pipelines.evaluation import datasets
from pipelines.evaluation.embed import encode
from pipelines.evaluation.tasks import score, texts
from pipelines.models import ModelRef, arch_name, create, preprocess_cfg


def rows(n: int) -> tuple[list[Image.Image], list[str]]:
    images, captions = [], []
    for i in range(n):
        s = web.sample(0, i)
        buf = io.BytesIO()
        web.render(s, 96).resize((64, 64), Image.BICUBIC).save(buf, "JPEG", quality=90)
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        captions.append(s.caption)
    return images, captions


def run(arch: str, images: list[Image.Image], captions: list[str], epochs: int, every: int) -> list[tuple[int, float, float]]:
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model, preprocess, tok = create(ModelRef(arch=arch))
    pp = preprocess_cfg(arch)
    train_tf = open_clip.image_transform(pp["size"], is_train=True, mean=pp["mean"], std=pp["std"])
    held = datasets.builtin("demo_heldout", 64)
    prompts, _ = texts(held, ["zeroshot"])
    tokens = open_clip.get_tokenizer(arch_name(arch))(captions)
    per_epoch, batch = len(images) // 64, 64
    total = per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 10 if s < 10 else
                                              0.5 * (1 + math.cos(math.pi * (s - 10) / max(1, total - 10))))
    loss_fn, out, step, t0 = ClipLoss(), [], 0, time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(images))
        for k in range(per_epoch):
            idx = order[k * batch:(k + 1) * batch]
            x = torch.stack([train_tf(images[i]) for i in idx])
            f_img, f_txt, scale = model(x, tokens[idx])[:3]
            loss = loss_fn(f_img, f_txt, scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
        if epoch % every == 0 or epoch == epochs:
            model.eval()
            img, txt = encode(preprocess, tok, model.encode_image, model.encode_text, held.images, prompts, 128, "cpu")
            acc = score(held, ["zeroshot"], img, txt)["zeroshot"]["acc1"]
            model.train()
            out.append((step, time.perf_counter() - t0, acc))
            print(f"{arch:<13} epoch {epoch:>3} step {step:>5} {out[-1][1]:6.0f}s  held-out top-1 {acc:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2900)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    images, captions = rows(args.rows)
    results = {arch: run(arch, images, captions, args.epochs, args.every) for arch in ("clip-tiny", "clip-rn-tiny")}
    print(f"\n{'model':<13} {'final top-1':>11} {'seconds':>8} {'steps to 0.9':>13}")
    for arch, curve in results.items():
        reach = next((s for s, _, a in curve if a >= 0.9), None)
        print(f"{arch:<13} {curve[-1][2]:>11.3f} {curve[-1][1]:>8.0f} {reach if reach else 'not reached':>13}")


if __name__ == "__main__":
    main()
