"""A synthetic, seeded 'web' of captioned images: colored shapes on backgrounds at positions.

Captions are compositional ("a red circle at the left on a black background"), so a CLIP model trained
on them can later be evaluated zero-shot on color-shape classes (6 colors x 3 shapes = 18 classes).
Every sample is a pure function of (seed, index): the same seed always gives the same web.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 170), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
POSITIONS = {"left": (0.32, 0.5), "right": (0.68, 0.5), "top": (0.5, 0.32), "bottom": (0.5, 0.68),
             "center": (0.5, 0.5)}
TEMPLATES = (
    "a {color} {shape} at the {position} on a {background} background",
    "a photo of a {color} {shape} on {background}",
    "{color} {shape}, {position}, {background} backdrop",
    "there is a {shape} in {color} at the {position}",
)


@dataclass(frozen=True)
class Sample:
    index: int
    color: str
    shape: str
    background: str
    position: str
    scale: float
    caption: str
    fmt: str  # "jpg" or "png"
    template: int = 0  # index into TEMPLATES of the caption's template
    offset: tuple[float, float] = (0.0, 0.0)  # jitter around the named position, in image fractions
    angle: float = 0.0  # rotation of a square or triangle, degrees
    tint: tuple[int, int, int] = (0, 0, 0)  # the shape's color, shifted per channel
    shade: int = 0  # the background, lighter or darker

    def captioned(self, template: int) -> str:
        """This sample's caption under another template (a second caption for retrieval)."""
        return TEMPLATES[template % len(TEMPLATES)].format(color=self.color, shape=self.shape,
                                                          position=self.position, background=self.background)

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


def sample(seed: int, index: int) -> Sample:
    rng = random.Random(seed * 1_000_003 + index)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    background, position = rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))
    template = TEMPLATES.index(rng.choice(TEMPLATES))
    caption = TEMPLATES[template].format(color=color, shape=shape, position=position, background=background)
    # continuous variation within a caption: no two images alike, so a model must learn color and shape
    offset = (rng.uniform(-0.07, 0.07), rng.uniform(-0.07, 0.07))
    tint = (rng.randint(-20, 20), rng.randint(-20, 20), rng.randint(-20, 20))
    return Sample(index, color, shape, background, position, rng.uniform(0.36, 0.5), caption,
                  "png" if index % 4 == 3 else "jpg", template, offset, rng.uniform(-8, 8), tint,
                  rng.randint(-12, 12))


def render(s: Sample, size: int = 96) -> Image.Image:
    im = Image.new("RGB", (size, size), _shift(BACKGROUNDS[s.background], (s.shade,) * 3))
    draw = ImageDraw.Draw(im)
    cx, cy = POSITIONS[s.position]
    cx, cy, r = (cx + s.offset[0]) * size, (cy + s.offset[1]) * size, s.scale * size / 2
    fill = _shift(COLORS[s.color], s.tint)
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # a square or a triangle, turned by its angle
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)] if s.shape == "square" else [(0, -r), (r, r), (-r, r)]
        a = math.radians(s.angle)
        draw.polygon([(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a))
                      for x, y in corners], fill=fill)
    return im


def _shift(rgb: tuple[int, int, int], delta: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + d)) for c, d in zip(rgb, delta, strict=True))  # type: ignore[return-value]


@lru_cache(maxsize=8192)
def encoded(seed: int, index: int, size: int = 96) -> tuple[bytes, str]:
    """The encoded bytes and content type of one sample's image."""
    s = sample(seed, index)
    buf = io.BytesIO()
    if s.fmt == "png":
        render(s, size).save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    render(s, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"
