"""Resize throughput: the crawl's Resizer against img2dataset's, side by side in one process and one thread.

Both resize the same encoded images in memory (no network, no threads), with the same target size,
mode (border), encoding (jpg, quality 95) and options, alternating the order each round so drift on the
machine hits both. Printed: images/s of each (median over rounds) and the ratio (clipline / img2dataset),
plus the crawl's Resizer with the reduced decode turned off, to tell its share from the rest (no
albumentations, no per-call stderr redirection), on
  - large JPEGs: 200 distinct photo-like images, 1024 px on the long side, to 224 (the reduced decode's case);
  - demo web JPEGs: 200 of the synthetic web's flat-shaded 1024 px JPEGs (what the crawl benchmark serves), to 224;
  - small images: 200 of the synthetic web's 96 px images (3/4 JPEG, 1/4 PNG), to 64 (full decode on both sides).
Written to bench-out/resize_vs_img2dataset.json.

    .venv/bin/python -m tests.benchmarks.resize_vs_img2dataset [--images N] [--rounds N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
from img2dataset.resizer import Resizer as Img2datasetResizer

from pipelines.stages.crawl.resize import Resizer

SHAPES = ((768, 1024), (1024, 768), (1024, 1024), (683, 1024))  # (height, width): 1024 px on the long side


def photo_like(index: int) -> bytes:
    """A distinct JPEG (quality 90): gradients, a smooth pattern, shapes and blurred noise, like a photo's texture."""
    rng = np.random.default_rng(index)
    height, width = SHAPES[index % len(SHAPES)]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(15, 60), rng.uniform(15, 60), rng.uniform(0, 6)
    img = np.stack([x * rng.uniform(0.1, 0.3), y * rng.uniform(0.1, 0.3),
                    128 + 60 * np.sin(x / fx + phase) * np.cos(y / fy)], axis=-1)
    img += cv2.GaussianBlur(rng.normal(0, 6, img.shape).astype(np.float32), (0, 0), 1.0)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.circle(img, center, int(rng.integers(30, 250)), color, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(img, center, (center[0] + int(rng.integers(30, 300)), center[1] + int(rng.integers(30, 300))),
                          color, -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def demo_web(count: int, size: int, jpeg_only: bool) -> list[bytes]:
    from pipelines.demo import web

    index = [i * 4 for i in range(count)] if jpeg_only else list(range(count))  # i % 4 == 3 is a PNG
    return [web.encoded(0, i, size)[0] for i in index]


class FullDecode(Resizer):
    """The crawl's Resizer with the reduced JPEG decode turned off."""

    def reduction(self, width: int, height: int) -> int:
        return 1


def time_pass(fn: Callable[[bytes], tuple], images: list[bytes]) -> float:
    t0 = time.perf_counter()
    for data in images:
        if (err := fn(data)[5]) is not None:
            raise RuntimeError(f"resize failed: {err}")
    return time.perf_counter() - t0


def compare(images: list[bytes], image_size: int, rounds: int) -> dict[str, object]:
    opts = {"image_size": image_size, "resize_mode": "border", "resize_only_if_bigger": False,
            "encode_format": "jpg", "encode_quality": 95}
    theirs, ours = Img2datasetResizer(**opts), Resizer(**opts)
    tools: dict[str, Callable[[bytes], tuple]] = {"img2dataset": lambda d: theirs(io.BytesIO(d)), "clipline": ours,
                                                  "clipline_full_decode": FullDecode(**opts)}
    for fn in tools.values():  # warm-up: imports, codec tables, caches
        time_pass(fn, images[:20])
    rates: dict[str, list[float]] = {name: [] for name in tools}
    for r in range(rounds):
        for name in (list(tools) if r % 2 == 0 else list(tools)[::-1]):
            rates[name].append(len(images) / time_pass(tools[name], images))
    med = {name: statistics.median(v) for name, v in rates.items()}
    factors = [ours.reduction_for(d) for d in images]
    return {"img2dataset_per_s": round(med["img2dataset"], 1), "clipline_per_s": round(med["clipline"], 1),
            "ratio": round(med["clipline"] / med["img2dataset"], 2),
            "clipline_full_decode_per_s": round(med["clipline_full_decode"], 1),
            "ratio_full_decode": round(med["clipline_full_decode"] / med["img2dataset"], 2),
            "images": len(images), "rounds": rounds,
            "image_size": image_size, "mean_input_kb": round(sum(map(len, images)) / len(images) / 1024, 1),
            "reductions": {str(f): factors.count(f) for f in sorted(set(factors))},
            "per_round": {name: [round(v, 1) for v in vs] for name, vs in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cases = {
        "large jpeg 1024px->224": ([photo_like(i) for i in range(args.images)], 224),
        "demo web jpeg 1024px->224": (demo_web(args.images, 1024, jpeg_only=True), 224),
        "small 96px->64": (demo_web(args.images, 96, jpeg_only=False), 64),
    }
    results = {}
    for name, (images, image_size) in cases.items():
        results[name] = r = compare(images, image_size, args.rounds)
        print(f"{name:<26} img2dataset {r['img2dataset_per_s']:7.1f}/s  clipline {r['clipline_per_s']:7.1f}/s  "
              f"ratio {r['ratio']:.2f}x | without reduced decode {r['clipline_full_decode_per_s']:7.1f}/s "
              f"{r['ratio_full_decode']:.2f}x  (reductions {r['reductions']}, {r['mean_input_kb']} KB/image)",
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "resize_vs_img2dataset.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
