"""Resize crawled images like img2dataset's Resizer, but decode large JPEGs at a reduced scale.

Resizing a large JPEG to a small target (a 1024 px photo to 224) spends most of its time in the
full-size decode. libjpeg can decode at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients,
skipping most of the inverse DCT, upsampling and color conversion work, so a JPEG is decoded at the
largest such reduction that still leaves the side the resize mode measures (the short side for
keep_ratio and center_crop, the long side for border and keep_ratio_largest) at least image_size
pixels, and INTER_AREA takes it the rest of the way. The original size comes from the JPEG frame
header, so original_width/height stay exact.

Everything else follows img2dataset's Resizer (albumentations 1.4 transforms), re-done with cv2 calls
directly: output size and rounding, interpolation (INTER_AREA down, LANCZOS4 up), resize_only_if_bigger,
crop and padding placement, white alpha matting, encoding and error strings. Non-JPEG inputs,
resize_mode "no" and JPEGs whose target needs every pixel take img2dataset's own path: a full decode
with IMREAD_UNCHANGED. Unlike img2dataset, the decoders' stderr is not silenced: its trick (dup2 over
fds 1 and 2) is process-wide and races between the crawl's threads, so a libpng warning may show in logs.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")

# (img_bytes, width, height, original_width, original_height, err), as img2dataset's Resizer returns it
Resized = tuple[bytes | None, int | None, int | None, int | None, int | None, str | None]

_QUALITY_PARAM = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION,
                  "webp": cv2.IMWRITE_WEBP_QUALITY}
# (factor, grayscale) -> flag; used with IMREAD_IGNORE_ORIENTATION, as the reduced flags would otherwise apply
# EXIF orientation, which IMREAD_UNCHANGED (img2dataset's decode) does not
_REDUCED_FLAG = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
# frame headers of the 8-bit DCT processes libjpeg decodes scaled: baseline, extended and progressive,
# Huffman or arithmetic coded; lossless and hierarchical JPEGs take the full path
_DCT_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
_SHORT_SIDE_MODES = ("keep_ratio", "center_crop")
_WHITE = [255, 255, 255]  # the border value albumentations' PadIfNeeded gets from img2dataset
MATTE_BAND = 1 << 18  # pixels matte() works on at once: its float64 temporaries stay under ~20 MB


def matte(img: np.ndarray) -> np.ndarray:
    """BGRA on a white background, img2dataset's formula to the bit, a band of pixels at a time.

    The formula in one go takes ~70 bytes a pixel of float64 temporaries: 6 GB for an image at the default
    max_pixels, in each of a worker's threads. Per band the same arithmetic gives the same bytes.
    """
    pixels = img.reshape(-1, 4)  # imdecode's array is contiguous: a view
    out = np.empty((len(pixels), 3), np.uint8)
    for start in range(0, len(pixels), MATTE_BAND):
        band = pixels[start:start + MATTE_BAND]
        alpha = band[:, 3, np.newaxis]
        out[start:start + MATTE_BAND] = np.rint((alpha / 255 * band[:, :3] + 255 - alpha).clip(min=0, max=255))
    return out.reshape(*img.shape[:2], 3)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the frame header of an 8-bit DCT JPEG; None for anything else.

    Walks the marker segments up to the first SOFn, so it costs microseconds and decodes nothing
    (EXIF thumbnails sit inside APP1 segments, which are skipped whole).
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length (RSTn, SOI, TEM)
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (C4/C8/CC are DHT/JPG/DAC)
            if marker not in _DCT_FRAMES or i + 10 > n:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", data, i + 4)
            return (width, height, components) if precision == 8 and width and height else None
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        i += 2 + length
    return None


class Resizer:
    """img2dataset's Resizer for the crawl's options, called on bytes; see the module docstring.

    Holds no per-call state, so one instance serves all of a shard's fetch threads.
    """

    def __init__(self, image_size: int, resize_mode: str, resize_only_if_bigger: bool, encode_format: str = "jpg",
                 encode_quality: int = 95, max_image_area: float = float("inf")) -> None:
        if encode_format not in ENCODE_FORMATS:
            raise ValueError(f"Invalid encode format {encode_format}")
        if encode_format == "png" and not 0 <= encode_quality <= 9:
            raise ValueError("For png, encode quality represents compression which"
                             f"must be between 0 and 9, got {encode_quality}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"Invalid option for resize_mode: {resize_mode}")
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.resize_only_if_bigger = resize_only_if_bigger
        self.encode_format = encode_format
        self.max_image_area = max_image_area
        self._ext = f".{encode_format}"
        self._params = [int(_QUALITY_PARAM[encode_format]), encode_quality]
        cv2.setNumThreads(1)  # the crawl runs many resizes in threads: no nested thread pools

    def __call__(self, data: bytes) -> Resized:
        """Decode, resize and re-encode one image; any failure comes back as err, never raised."""
        try:
            cv2.setNumThreads(1)  # as img2dataset does on every call
            img, original_width, original_height = self._decode(data)
            img = self._fit(img, original_width, original_height)
            ok, encoded = cv2.imencode(self._ext, img, params=self._params)
            if not ok:
                raise ValueError("Image encoding error")
            height, width = img.shape[:2]
            return encoded.tobytes(), width, height, original_width, original_height, None
        except Exception as err:  # noqa: BLE001 - like img2dataset: every failure becomes the row's error
            return None, None, None, None, None, str(err)

    def reduction(self, width: int, height: int) -> int:
        """The libjpeg scale denominator (1, 2, 4 or 8) to decode a width x height JPEG at.

        The largest one that still leaves the side the resize mode measures at least image_size whole
        pixels, so what is left is a downscale; 1 when no resize would happen or the target needs the full size.
        """
        if self.resize_mode == "no":
            return 1
        side = min(width, height) if self.resize_mode in _SHORT_SIDE_MODES else max(width, height)
        return next((f for f in (8, 4, 2) if side >= self.image_size * f), 1)

    def reduction_for(self, data: bytes) -> int:
        """The scale denominator __call__ decodes these bytes at (1 for anything but an 8-bit DCT JPEG)."""
        header = jpeg_header(data)
        return 1 if header is None else self.reduction(header[0], header[1])

    def _check_area(self, width: int, height: int) -> None:
        if width * height > self.max_image_area:
            raise ValueError("image area too large")

    def _decode(self, data: bytes) -> tuple[np.ndarray, int, int]:
        """The decoded image, maybe at a reduced scale, and the original (width, height)."""
        buf = np.frombuffer(data, np.uint8)
        header = jpeg_header(data) if self.resize_mode != "no" else None
        if header is not None:
            width, height, components = header
            self._check_area(width, height)  # from the header: a huge image is refused before any decode
            f = self.reduction(width, height)
            if f > 1:
                # grayscale stays 2-D, as IMREAD_UNCHANGED leaves it; CMYK comes out BGR either way
                img = cv2.imdecode(buf, _REDUCED_FLAG[f, components == 1] | cv2.IMREAD_IGNORE_ORIENTATION)
                if img is not None and img.shape[:2] == (-(-height // f), -(-width // f)):
                    # libjpeg rounds a side that is no multiple of f up: its last pixel is part edge padding.
                    # Keep it only if it is at least half image, so the pixels kept span the original to
                    # within f/2 of its pixels (keeping it always stretches the picture by up to f-1)
                    return img[:(height + f // 2) // f, :(width + f // 2) // f], width, height
                # not the size libjpeg gives for this header: trust only the full decode below
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError("Image decoding error")
        if img.ndim == 3 and img.shape[2] == 4:
            img = matte(img)
        height, width = img.shape[:2]
        self._check_area(width, height)
        return img, width, height

    def _fit(self, img: np.ndarray, original_width: int, original_height: int) -> np.ndarray:
        """Resize (and crop or pad) img, perhaps a reduced decode of the original, to what the mode asks for."""
        if self.resize_mode == "no":
            return img
        s = self.image_size
        side = (min if self.resize_mode in _SHORT_SIDE_MODES else max)(original_width, original_height)
        downscale = side > s
        if self.resize_only_if_bigger and not downscale:
            return img
        # albumentations' Smallest/LongestMaxSize: one scale for both sides, each rounded, from the original size
        scale = s / side
        width, height = max(1, round(original_width * scale)), max(1, round(original_height * scale))
        if img.shape[:2] != (height, width):
            img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if downscale else cv2.INTER_LANCZOS4)
        if self.resize_mode == "center_crop":  # A.CenterCrop: the odd pixel goes to the bottom/right
            top, left = (height - s) // 2, (width - s) // 2
            img = img[top:top + s, left:left + s]
        elif self.resize_mode == "border" and (height < s or width < s):  # A.PadIfNeeded, centered, white
            top, left = max(s - height, 0) // 2, max(s - width, 0) // 2
            img = cv2.copyMakeBorder(img, top, max(s - height, 0) - top, left, max(s - width, 0) - left,
                                     cv2.BORDER_CONSTANT, value=_WHITE)
        return img
