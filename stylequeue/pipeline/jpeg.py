"""Plain JPEGs straight to and from uint8 pixels with libjpeg-turbo (simplejpeg), 3-4x Pillow's speed.

Most inputs of a photo service are JPEGs, and on small images most of Pillow's time is Python around
the codec. A JPEG takes this path only when nothing in it needs Pillow's handling: no ICC profile
(colour conversion to sRGB), an EXIF orientation of 1 or none, YCbCr or greyscale data (not CMYK),
and intact data (libjpeg's warnings count as errors here). Anything else returns None and goes through
`images.decode_image`, which also writes the error messages. Without simplejpeg installed, nothing
changes but speed.
"""

from __future__ import annotations

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - an optional speed-up
    simplejpeg = None

_ICC = b"ICC_PROFILE\x00"
_EXIF = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


def available() -> bool:
    return simplejpeg is not None


def decode(data: bytes, *, max_pixels: int, target_side: int = 0) -> np.ndarray | None:
    """uint8 [H, W, 3] RGB pixels of a plain JPEG, or None where Pillow must decide.

    With `target_side`, libjpeg scales in the DCT while both sides stay >= target_side (as Pillow's
    draft mode does); the caller resizes to the working size.
    """
    size = plain_size(data, max_pixels=max_pixels)
    if size is None:
        return None
    width, height = size
    side = min(target_side, width, height) if target_side else 0
    try:
        pixels: np.ndarray = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=side, min_height=side,
                                                    strict=True)
        return pixels
    except ValueError:  # truncated or corrupt: Pillow's path names the problem
        return None


def plain_size(data: bytes, *, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a plain JPEG (see the module docstring) within `max_pixels`, else None."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff" or _needs_pillow(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray") or width < 1 or height < 1 or width * height > max_pixels:
        return None
    return width, height


def encode(pixels: np.ndarray, quality: int) -> bytes | None:
    """JPEG bytes (4:2:0, no metadata) of uint8 [H, W, 3] RGB pixels; None without simplejpeg."""
    if simplejpeg is None:
        return None
    encoded: bytes = simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB",
                                            colorsubsampling="420")
    return encoded


def _needs_pillow(data: bytes) -> bool:
    """True when a header segment before the image data asks for Pillow (ICC, rotation, oddities)."""
    position, size = 2, len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            return True  # not where a marker should be: let Pillow judge
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xDA:  # start of scan: every header segment was fine
            return False
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if length < 2:
            return True
        segment = data[position + 4:position + 2 + length]
        if marker == 0xE2 and segment.startswith(_ICC):
            return True
        if marker == 0xE1 and segment.startswith(_EXIF) and _orientation(segment[len(_EXIF):]) not in (0, 1):
            return True
        position += 2 + length
    return True


def _orientation(tiff: bytes) -> int:
    """EXIF orientation from IFD0 (0: none); -1 when the EXIF block cannot be read."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return -1
    offset = int.from_bytes(tiff[4:8], order)  # type: ignore[arg-type]
    if offset + 2 > len(tiff):
        return -1
    for index in range(int.from_bytes(tiff[offset:offset + 2], order)):  # type: ignore[arg-type]
        entry = offset + 2 + 12 * index
        if entry + 12 > len(tiff):
            return -1
        if int.from_bytes(tiff[entry:entry + 2], order) == _ORIENTATION_TAG:  # type: ignore[arg-type]
            return int.from_bytes(tiff[entry + 8:entry + 10], order)  # type: ignore[arg-type]
    return 0
