"""The crawl's Resizer against img2dataset's on the same bytes: sizes, pixels, errors, reduced JPEG decode.

Where both take the full decode (non-JPEG inputs, upscales, resize_mode "no") the output pixels must be
identical; where ours decodes a JPEG at 1/2, 1/4 or 1/8 scale they must be close: mean absolute difference
under MAX_MAD levels of 255. Measured on these 96 cases: median 0.84, at most 2.4 (jpg/webp encoding noise
included). The largest are 1/8 decodes of sides that are no multiple of 8 (the 900x700 grayscale JPEG to
64 px): the reduced image then spans the original only to within half a reduced pixel, a scale error of
up to ~0.4 output pixels across the picture, which the gradients here show; multiples of 8 stay under ~1.7.
"""

from __future__ import annotations

import io
import itertools
import struct

import cv2
import numpy as np
import pytest
from img2dataset.resizer import Resizer as Img2datasetResizer
from PIL import Image

from pipelines.stages.crawl import resize
from pipelines.stages.crawl.resize import Resizer, jpeg_header

MAX_MAD = 3.0
MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
FORMATS = ("jpg", "png", "webp")


def natural(height: int, width: int, seed: int = 0) -> np.ndarray:
    """BGR uint8: gradients, a smooth pattern, filled shapes and blurred noise, so resampling differs realistically."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x * 255 / width, y * 255 / height, 128 + 60 * np.sin(x / 37) * np.cos(y / 23)], axis=-1)
    img += cv2.GaussianBlur(rng.normal(0, 6, img.shape).astype(np.float32), (0, 0), 1.0)
    img = np.clip(img, 0, 255).astype(np.uint8)
    cv2.circle(img, (width // 3, height // 2), min(height, width) // 4, (20, 200, 90), -1)
    cv2.rectangle(img, (width // 2, height // 5), (width * 4 // 5, height // 2), (200, 30, 160), -1)
    cv2.line(img, (0, height - 1), (width - 1, 0), (10, 10, 10), max(1, width // 100))
    return img


def encode(img: np.ndarray, ext: str = ".jpg", *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params) or ([cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else []))
    assert ok
    return buf.tobytes()


def pillow_jpeg(img: np.ndarray, **save: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., ::-1])).save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display; img2dataset's decode ignores it
    return pillow_jpeg(natural(768, 1024, seed=3), exif=exif.tobytes())


def png_with_alpha() -> bytes:
    bgra = cv2.cvtColor(natural(300, 400, seed=4), cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = np.linspace(0, 255, 400, dtype=np.uint8)[None, :]  # transparent left edge to opaque right
    bgra[:50, :50, 3] = 0
    return encode(bgra, ".png")


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """jpeg with an extra APP1 segment right after SOI (where an EXIF thumbnail would sit)."""
    segment = b"Exif\x00\x00" + payload
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


IMAGES = {
    "large_jpeg": lambda: encode(natural(768, 1024)),
    "small_jpeg": lambda: encode(natural(60, 80, seed=1)),  # needs an upscale
    "portrait_jpeg": lambda: encode(natural(1000, 601, seed=2)),  # width no multiple of 8
    "gray_jpeg": lambda: encode(cv2.cvtColor(natural(700, 900, seed=5), cv2.COLOR_BGR2GRAY)),
    "exif_rotated_jpeg": exif_rotated_jpeg,
    "progressive_jpeg": lambda: pillow_jpeg(natural(640, 960, seed=6), progressive=True),
    "thumbnail_in_exif_jpeg": lambda: with_app1(encode(natural(768, 1024, seed=7)), encode(natural(16, 16))),
    "png_alpha": png_with_alpha,
    # odd padding (224 - 175, 224 - 163) and odd crop offsets, where placement rounding shows
    "png_16bit": lambda: encode(natural(250, 320, seed=8).astype(np.uint16) * 257, ".png"),
    "webp": lambda: encode(natural(510, 700, seed=9), ".webp", cv2.IMWRITE_WEBP_QUALITY, 90),
}
_cache: dict[str, bytes] = {}


def image(name: str) -> bytes:
    if name not in _cache:
        _cache[name] = IMAGES[name]()
    return _cache[name]


def both(data: bytes, **kw: object) -> tuple[tuple, tuple]:
    args = {"resize_only_if_bigger": False, "encode_format": "jpg", "encode_quality": 95} | kw
    if args["encode_format"] == "png":
        args["encode_quality"] = 1  # png's compression level: fast, lossless either way
    return Img2datasetResizer(**args)(io.BytesIO(data)), Resizer(**args)(data)  # type: ignore[arg-type]


def decoded(img: bytes) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out is not None
    return out


CASES = [(name, mode, fmt, size) for name in IMAGES for mode, fmt in itertools.product(MODES, FORMATS)
         for size in ((224, 64) if name in ("large_jpeg", "gray_jpeg") and mode != "no" else (224,))]


@pytest.mark.parametrize(("name", "mode", "fmt", "size"), CASES)
def test_matches_img2dataset(name, mode, fmt, size):
    data = image(name)
    theirs, ours = both(data, image_size=size, resize_mode=mode, encode_format=fmt)
    assert theirs[5] is None and ours[5] is None, (theirs[5], ours[5])
    assert ours[1:5] == theirs[1:5]  # width, height, original_width, original_height
    a, b = decoded(theirs[0]), decoded(ours[0])
    assert (a.shape, a.dtype) == (b.shape, b.dtype)  # channel layout too: grayscale stays grayscale
    mad = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()
    if Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False).reduction_for(data) == 1:
        assert mad == 0  # the same full decode and the same cv2 calls as img2dataset
    else:
        assert mad < MAX_MAD, f"mean abs difference {mad:.2f}"


def test_exif_orientation_is_ignored_like_img2dataset():
    data = exif_rotated_jpeg()
    ours = Resizer(image_size=224, resize_mode="keep_ratio_largest", resize_only_if_bigger=False)
    assert ours.reduction_for(data) == 4
    img, w, h, ow, oh, err = ours(data)
    assert err is None and (w, h, ow, oh) == (224, 168, 1024, 768)  # landscape, as stored, not as displayed
    expected = cv2.resize(natural(768, 1024, seed=3), (224, 168), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded(img).astype(float) - expected).mean() < MAX_MAD


@pytest.mark.parametrize(("name", "mode", "size", "factor"), [
    ("large_jpeg", "border", 224, 4),  # 1024 / 4 = 256 >= 224, 1024 / 8 = 128 < 224
    ("large_jpeg", "keep_ratio_largest", 224, 4),
    ("large_jpeg", "keep_ratio", 224, 2),  # short side: 768 / 2 = 384 >= 224, 768 / 4 = 192 < 224
    ("large_jpeg", "center_crop", 224, 2),
    ("large_jpeg", "border", 64, 8),
    ("large_jpeg", "border", 513, 1),  # 1024 / 2 = 512 < 513: the target needs the full size
    ("large_jpeg", "no", 64, 1),
    ("small_jpeg", "border", 224, 1),  # an upscale
    ("gray_jpeg", "center_crop", 224, 2),
    ("portrait_jpeg", "center_crop", 150, 4),  # 601 / 4 = 150.25
    ("portrait_jpeg", "center_crop", 151, 2),
    ("thumbnail_in_exif_jpeg", "border", 224, 4),  # the 16 px thumbnail's header is not the image's
    ("png_alpha", "border", 32, 1),  # not a JPEG
    ("webp", "border", 32, 1),
])
def test_reduction_factor(name, mode, size, factor):
    assert Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False).reduction_for(image(name)) == factor


def test_large_jpeg_is_decoded_reduced(monkeypatch):
    flags: list[int] = []
    imdecode = cv2.imdecode

    def spy(buf, flag):
        flags.append(flag)
        return imdecode(buf, flag)

    monkeypatch.setattr(resize.cv2, "imdecode", spy)
    border = Resizer(image_size=224, resize_mode="border", resize_only_if_bigger=False)
    _, w, h, ow, oh, err = border(image("large_jpeg"))
    assert err is None and (w, h, ow, oh) == (224, 224, 1024, 768)
    assert flags == [cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION]
    flags.clear()
    Resizer(image_size=224, resize_mode="center_crop", resize_only_if_bigger=False)(image("gray_jpeg"))
    assert flags == [cv2.IMREAD_REDUCED_GRAYSCALE_2 | cv2.IMREAD_IGNORE_ORIENTATION]
    flags.clear()
    border(image("small_jpeg"))
    assert flags == [cv2.IMREAD_UNCHANGED]


def test_jpeg_header():
    assert jpeg_header(image("large_jpeg")) == (1024, 768, 3)
    assert jpeg_header(image("gray_jpeg")) == (900, 700, 1)
    assert jpeg_header(image("progressive_jpeg")) == (960, 640, 3)
    assert jpeg_header(image("thumbnail_in_exif_jpeg")) == (1024, 768, 3)
    assert jpeg_header(image("png_alpha")) is None
    assert jpeg_header(image("large_jpeg")[:20]) is None
    assert jpeg_header(b"") is None


@pytest.mark.parametrize("width", [601, 605, 1001])
def test_partial_edge_pixel_does_not_stretch_the_picture(width):
    """A side that is no multiple of 8 decodes at 1/8 to ceil(side / 8) pixels, the last one part padding.
    Kept only when at least half image, the picture spans the original to within half a reduced pixel
    (4 source pixels), so an edge at 5/6 of the width lands where img2dataset puts it to within that much."""
    img = np.full((1000, width, 3), 255, np.uint8)
    img[:, : width * 5 // 6] = 0
    data = encode(img, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    theirs, ours = both(data, image_size=64, resize_mode="keep_ratio", encode_format="png")
    assert Resizer(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=False).reduction_for(data) == 8
    assert ours[1:5] == theirs[1:5]

    def edge(png: bytes) -> float:  # sub-pixel position of the black/white edge: the mean dark width of a row
        return float((255 - decoded(png)[..., 1].astype(float)).sum(axis=1).mean() / 255)

    expected = edge(theirs[0])
    assert abs(edge(ours[0]) - expected) < expected * 4 / width + 0.05


def test_cmyk_jpeg_matches_img2dataset():
    out = io.BytesIO()
    Image.fromarray(natural(640, 960, seed=10)[..., ::-1].copy()).convert("CMYK").save(out, format="JPEG", quality=90)
    theirs, ours = both(out.getvalue(), image_size=224, resize_mode="border")
    assert ours[5] is None and ours[1:5] == theirs[1:5] == (224, 224, 960, 640)
    assert np.abs(decoded(theirs[0]).astype(float) - decoded(ours[0])).mean() < MAX_MAD


def test_alpha_is_matted_on_white():
    img, *_, err = Resizer(image_size=200, resize_mode="keep_ratio_largest", resize_only_if_bigger=False,
                           encode_format="png", encode_quality=3)(image("png_alpha"))
    assert err is None
    out = decoded(img)
    assert out.shape == (150, 200, 3)
    assert (out[:20, :20] == 255).all()  # fully transparent corner


def test_matting_in_bands_is_the_formula_to_the_bit_with_bounded_temporaries():
    import tracemalloc

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2048, 1500, 4), dtype=np.uint8)  # 3 Mpx: one go would take ~200 MB
    alpha = img[:, :, 3, np.newaxis]
    whole = np.rint((alpha / 255 * img[..., :3] + 255 - alpha).clip(min=0, max=255)).astype(np.uint8)
    tracemalloc.start()
    try:
        banded = resize.matte(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(banded, whole)
    # the 9 MB output plus one band's float64 temporaries (~2.6e5 pixels x ~70 bytes)
    assert peak < banded.nbytes + 24 * (1 << 20), peak
    assert np.array_equal(resize.matte(img[:1, :1]), whole[:1, :1])  # a band larger than the image
    wide = rng.integers(0, 256, (3, resize.MATTE_BAND + 7, 4), dtype=np.uint8)  # rows wider than a band
    a = wide[:, :, 3, np.newaxis]
    assert np.array_equal(resize.matte(wide),
                          np.rint((a / 255 * wide[..., :3] + 255 - a).clip(min=0, max=255)).astype(np.uint8))


def test_border_pads_white_and_centered():
    img, w, h, *_, err = Resizer(image_size=224, resize_mode="border", resize_only_if_bigger=False,
                                 encode_format="png", encode_quality=3)(image("large_jpeg"))
    assert err is None and (w, h) == (224, 224)
    out = decoded(img)
    assert (out[:28] == 255).all() and (out[-28:] == 255).all()  # 224 - 168 = 56 rows: 28 above, 28 below
    assert (out[28] != 255).any() and (out[-29] != 255).any()


@pytest.mark.parametrize(("name", "mode", "expected"), [
    ("small_jpeg", "border", (80, 60)),  # smaller than the target: left alone
    ("small_jpeg", "center_crop", (80, 60)),
    ("large_jpeg", "keep_ratio", (299, 224)),  # bigger: resized all the same
])
def test_resize_only_if_bigger(name, mode, expected):
    theirs, ours = both(image(name), image_size=224, resize_mode=mode, resize_only_if_bigger=True)
    assert ours[5] is None and ours[1:3] == theirs[1:3] == expected


@pytest.mark.parametrize("name", ["large_jpeg", "png_alpha"])
def test_image_area_limit(name):
    theirs, ours = both(image(name), image_size=64, resize_mode="border", max_image_area=100 * 100)
    assert ours == theirs == (None, None, None, None, None, "image area too large")


@pytest.mark.parametrize("data", [
    b"",
    b"not an image at all",
    bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
    b"\xff\xd8\xff" + bytes(500),  # JPEG magic, then nothing readable
], ids=["empty", "text", "random", "jpeg_magic_only"])
def test_garbage_is_an_error_not_an_exception(data):
    theirs, ours = both(data, image_size=224, resize_mode="border")
    assert ours[:5] == (None,) * 5 and isinstance(ours[5], str) and ours[5]
    assert theirs[5] is not None
    if data:
        assert ours[5] == theirs[5] == "Image decoding error"


@pytest.mark.parametrize("name", ["large_jpeg", "gray_jpeg", "png_alpha", "webp"])
@pytest.mark.parametrize("keep", [0.05, 0.5])
def test_truncated_is_an_error_not_an_exception(name, keep):
    data = image(name)
    truncated = data[:int(len(data) * keep)]
    theirs, ours = both(truncated, image_size=224, resize_mode="border")
    assert (ours[5] is None) == (theirs[5] is None)  # decodable or not, both agree
    if ours[5] is not None:
        assert ours[:5] == (None,) * 5 and isinstance(ours[5], str)


@pytest.mark.parametrize("kw", [{"encode_format": "gif"}, {"encode_format": "png", "encode_quality": 95},
                                {"resize_mode": "stretch"}])
def test_invalid_options_are_refused(kw):
    with pytest.raises(ValueError):
        Resizer(**{"image_size": 64, "resize_mode": "border", "resize_only_if_bigger": False} | kw)
