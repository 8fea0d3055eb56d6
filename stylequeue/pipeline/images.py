"""Image bytes <-> RGB image <-> float32 CHW array in [-1, 1]: decode, validate, size, encode.

Pure Pillow and numpy (no Paddle), so producers, tests and the worker's I/O threads can use it.
Normalisation is CycleGAN's (mean = std = 127.5); outputs are sRGB without EXIF.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from stylequeue.errors import InputTooLarge, InvalidInput

logger = logging.getLogger("stylequeue.pipeline")

EncodeFormat = Literal["jpeg", "png", "webp"]
JPEG_QUALITY = 92
# The generator downsamples by 4 and reflect-pads by 1 there, which needs >= 2 pixels: 8 px minimum.
MIN_SIDE = 8
WEBP_QUALITY = 90

# Everything Pillow's decoders raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only and enforce the pixel limit before any pixel is decoded."""
    if not data:
        raise InvalidInput("the input is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputTooLarge(f"image too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInput("the input is not an image in a supported format (JPEG, PNG, WebP, GIF, ...)") from None
    except _DECODE_ERRORS as exc:
        raise InvalidInput(f"the image header is corrupt: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(STYLEQUEUE_MAX_INPUT_PIXELS)"
        )
    if width < 1 or height < 1:
        raise InvalidInput(f"image has no pixels ({width}x{height})")
    return image


def probe_image(data: bytes, *, max_pixels: int) -> tuple[str, int, int]:
    """(Pillow format name, width, height) read from the header alone: what the gateway checks of an upload.

    Raises what decoding would: InvalidInput (not an image, corrupt header), InputTooLarge (too many pixels).
    """
    image = _open(data, max_pixels)
    return str(image.format or "").lower(), image.size[0], image.size[1]


def _to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 'L', scaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image.convert("I"), dtype=np.int64)
        # 16-bit modes span 0..65535; a 32-bit 'I' image holding 8-bit data already fits 0..255.
        if image.mode != "I" or values.max(initial=0) > 255:
            values = values // 257
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L")
    return image


def _to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert to sRGB with the embedded ICC profile (Display P3, Adobe RGB); keep alpha apart."""
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    base_mode = {"RGBA": "RGB", "LA": "L", "La": "L", "RGBa": "RGB"}.get(image.mode, image.mode)
    base = image.convert(base_mode) if base_mode != image.mode else image
    if icc and base.mode in ("RGB", "L", "CMYK"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            base = ImageCms.profileToProfile(base, profile, _SRGB, outputMode="RGB")  # type: ignore[assignment]
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            # A broken profile is the sender's problem, not a reason to fail the job.
            logger.warning("ignoring an unusable ICC profile: %s", exc)
    rgb = base.convert("RGB")
    if alpha is None:
        return rgb
    background = Image.new("RGB", rgb.size, (255, 255, 255))
    background.paste(rgb, mask=alpha)
    return background


def decode_image(data: bytes, *, max_pixels: int, target_side: int | None = None) -> Image.Image:
    """Decode any supported image into an upright sRGB 'RGB' image.

    Args:
        max_pixels: width*height limit, checked from the header before decoding (`InputTooLarge`).
        target_side: the working size's longest side, when known: lets the JPEG decoder downscale
            by 1/2..1/8 while decoding (about 2.5x faster for a 12 MP photo).
    Raises InvalidInput for empty, non-image, truncated or corrupt data.
    """
    image = _open(data, max_pixels)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated: the first frame
        if target_side and image.format == "JPEG":
            image.draft("RGB", (target_side, target_side))
        icc = image.info.get("icc_profile")
        image.load()
        image = ImageOps.exif_transpose(image) or image
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode == "1":
            image = image.convert("L")
        image = _to_8bit(image)
        if image.mode not in ("RGB", "RGBA", "L", "LA", "La", "RGBa", "CMYK"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        return _to_srgb(image, icc)
    except Image.DecompressionBombError as exc:
        raise InputTooLarge(f"image too large to decode safely: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise InvalidInput(f"the image data is truncated or corrupt: {exc}") from None


def working_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The model's input size: longest side <= max_side, both sides multiples of 4, aspect kept.

    Sides are at least MIN_SIDE; small images are not upscaled beyond rounding to a multiple of 4.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid image size {width}x{height}")
    cap = max(MIN_SIDE, max_side - max_side % 4)
    scale = min(1.0, cap / max(width, height))

    def side(length: int) -> int:
        return min(cap, max(MIN_SIDE, int(length * scale / 4 + 0.5) * 4))

    return side(width), side(height)


def to_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB image -> uint8 [H, W, 3] at `size` = (width, height), bicubic resize."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != tuple(size):
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (the generator's input)."""
    batch = np.empty((pixels.shape[0], pixels.shape[3], pixels.shape[1], pixels.shape[2]), np.float32)
    np.copyto(batch, pixels.transpose(0, 3, 1, 2))
    batch *= np.float32(1 / 127.5)
    batch -= np.float32(1)
    return batch


def from_model_output(array: np.ndarray) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]; out-of-range values are clipped."""
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"expected a [N, 3, H, W] array, got shape {list(array.shape)}")
    scaled = array * np.float32(127.5)
    scaled += np.float32(127.5)
    np.clip(scaled, 0, 255, out=scaled)
    np.rint(scaled, out=scaled)
    pixels = np.empty((array.shape[0], array.shape[2], array.shape[3], 3), np.uint8)
    np.copyto(pixels, scaled.transpose(0, 2, 3, 1), casting="unsafe")
    return pixels


def to_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB image -> float32 [3, H, W] in [-1, 1] at `size` = (width, height), bicubic resize."""
    array: np.ndarray = to_model_input(to_pixels(image, size)[None])[0]
    return array


def from_array(array: np.ndarray) -> Image.Image:
    """float [3, H, W] (or [1, 3, H, W]) in [-1, 1] -> RGB image; out-of-range values are clipped."""
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[0] != 1 or array.shape[1] != 3:
        raise ValueError(f"expected a [3, H, W] array, got shape {list(array.shape)}")
    return Image.fromarray(from_model_output(array)[0], "RGB")


def encode_image(image: Image.Image, fmt: EncodeFormat) -> bytes:
    """Encode as JPEG (quality 92), PNG or WebP: sRGB, no EXIF, GPS or other metadata."""
    if image.mode != "RGB":
        clean = image.convert("RGB")
    elif image.info:
        clean = image.copy()  # metadata carried from a decoded input must never reach an output
    else:
        clean = image  # fresh from from_array: nothing to strip, no copy needed
    clean.info = {}
    out = io.BytesIO()
    if fmt == "jpeg":
        clean.save(out, "JPEG", quality=JPEG_QUALITY)
    elif fmt == "png":
        clean.save(out, "PNG")
    elif fmt == "webp":
        clean.save(out, "WEBP", quality=WEBP_QUALITY)
    else:
        raise ValueError(f"unknown output format {fmt!r}; one of jpeg, png, webp")
    return out.getvalue()
