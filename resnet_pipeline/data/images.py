"""Checking and normalising encoded images with Pillow (no TensorFlow, so process pools start fast).

`inspect` decodes an image once and says whether training can use it: Pillow decodes every pixel
(`img.load()`), and a JPEG or PNG, which a shard stores as it is, must also be whole the way
TensorFlow's decoder wants it: a PNG's chunks all present with good CRCs up to its IEND, a JPEG's
last scan closed by its EOI marker (Pillow forgives a PNG cut after its pixel data; TensorFlow
does not). `prepare` gives the bytes a
shard stores: the original file when it is already an RGB or grayscale JPEG or PNG that fits, else
the image converted to RGB (grayscale, CMYK, palette, alpha and 16-bit inputs) and re-encoded, and
shrunk first when its shorter side exceeds a cap. The format is read from the content, never the
file name: a PNG named `.jpg` is a PNG.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError


def png_bytes(pixels) -> bytes:
    """A uint8 array (H x W gray, or H x W x 3 RGB) encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# formats and modes that TensorFlow's decode_image reads as they are
_NATIVE = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


# every status but "ok" starts with one of these, then ": details" (the shard stage checks them)
REASONS = (
    "empty file",
    "not an image",
    "too large",
    "truncated",
    "undecodable",
    "too small",
    "symbolic link",
    "not a regular file",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_problem(data: bytes) -> str | None:
    """Why a PNG is not whole (a chunk cut, a bad CRC, no IHDR, IDAT or IEND), or None."""
    pos, seen = len(PNG_SIGNATURE), []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if length > 2**31 - 1 or end > len(data):
            return f"truncated: PNG chunk {kind!r} at byte {pos} runs past the end of the file"
        crc = struct.unpack(">I", data[end - 4 : end])[0]
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            return f"undecodable: PNG chunk {kind!r} at byte {pos} has a bad CRC"
        seen.append(kind)
        if kind == b"IEND":
            break
        pos = end
    if not seen or seen[0] != b"IHDR":
        return "undecodable: PNG does not start with its IHDR chunk"
    if b"IDAT" not in seen:
        return "undecodable: PNG has no IDAT (pixel data) chunk"
    if seen[-1] != b"IEND":
        return "truncated: PNG ends before its IEND chunk"
    return None


def jpeg_problem(data: bytes) -> str | None:
    """Why a JPEG is not whole (its last scan not closed by an EOI marker), or None. Entropy-coded
    data cannot hold FF D9 or FF DA (an FF there is stuffed), so the last SOS and EOI are markers."""
    sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    if sos < 0:
        return "undecodable: JPEG has no scan (SOS marker)"
    if eoi < sos:
        return "truncated: JPEG ends before the EOI marker of its last scan"
    return None


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
    whole = {"PNG": png_problem, "JPEG": jpeg_problem}.get(fmt)
    problem = whole(data) if whole else None
    if problem:
        return Inspection(0, 0, fmt, "", problem)
    if min(width, height) < min_side:
        return Inspection(
            width, height, fmt, mode, f"too small: {width}x{height}, below the minimum side of {min_side}"
        )
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
