"""Checking and normalising encoded images with Pillow (no TensorFlow, so process pools start fast).

`inspect` opens an image once and says whether training can use it; `prepare` gives the bytes a
shard stores: the original file when it is already an RGB or grayscale JPEG or PNG that fits, else
the image converted to RGB (grayscale, CMYK, palette, alpha and 16-bit inputs) and re-encoded, and
shrunk first when its shorter side exceeds a cap. The format is read from the content, never the
file name: a PNG named `.jpg` is a PNG.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

# formats and modes that TensorFlow's decode_image reads as they are
_NATIVE = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


class Inspection(NamedTuple):
    width: int
    height: int
    format: str  # Pillow's name of the content's format ("JPEG", "PNG", ...), "" if unreadable
    mode: str
    status: str  # "ok" or why the image is excluded


def inspect(data: bytes, min_side: int = 1) -> Inspection:
    """Decode `data` fully once; the status names what is wrong with it."""
    if not data:
        return Inspection(0, 0, "", "", "empty file")
    fmt = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (width, height) = img.format or "", img.mode, img.size
                img.load()
    except UnidentifiedImageError:
        return Inspection(0, 0, "", "", "not an image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return Inspection(0, 0, "", "", f"too large: {err}")
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err) else "undecodable"
        return Inspection(0, 0, fmt, "", f"{reason}: {err}")
    if min(width, height) < min_side:
        return Inspection(width, height, fmt, mode, f"too small: {width}x{height}, below the minimum side of {min_side}")
    return Inspection(width, height, fmt, mode, "ok")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB (or L) pixels of any mode: 16-bit and 32-bit integers scale to 8 bits, alpha is dropped
    (as Keras' `load_img` does), palette and CMYK convert through Pillow."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np  # only here: the shard workers start faster without it

        array = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
        high = 65535 if img.mode != "I" or array.max() > 255 else 255
        return Image.fromarray((array.astype(np.float64) * 255.0 / high).round().astype(np.uint8), mode="L")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode == "LA":
        return img.convert("L")
    return img.convert("RGB")


class Prepared(NamedTuple):
    data: bytes
    format: str  # "jpeg" or "png", as stored in image/format
    width: int
    height: int


def prepare(data: bytes, max_shorter_side: int = 0, jpeg_quality: int = 90) -> Prepared:
    """The bytes to store for one checked image (see the module doc); deterministic for given input."""
    with Image.open(io.BytesIO(data)) as img:
        fmt, size = img.format, img.size
        too_big = max_shorter_side and min(size) > max_shorter_side
        if fmt is not None and (fmt, img.mode) in _NATIVE and not too_big:
            return Prepared(data, fmt.lower(), *size)
        img.load()
        out = _to_rgb(img)
        if too_big:
            scale = max_shorter_side / min(size)
            new = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            out = out.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
        buf = io.BytesIO()
        if fmt == "JPEG":  # a lossy source stays lossy: smaller shards, faster decoding
            out.save(buf, format="JPEG", quality=jpeg_quality, optimize=False)
            return Prepared(buf.getvalue(), "jpeg", *out.size)
        out.save(buf, format="PNG", optimize=False, compress_level=1)
        return Prepared(buf.getvalue(), "png", *out.size)
