"""One job's data path, shared by the worker and `restyle()`: bytes -> pixels, and pixels -> bytes.

    URI --storage.read--> bytes --prepare--> uint8 [H,W,3] --(model, per batch: to float [-1,1] and
    back)--> uint8 [H,W,3] --render--> bytes --> URI

Pixels stay uint8 between processes and threads (a quarter of float32's bytes); the conversion to
the generator's float input happens once per batch, beside the model (worker/inference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.pipeline import jpeg
from stylequeue.pipeline.images import (
    JPEG_QUALITY,
    decode_image,
    encode_image,
    from_array,
    to_model_input,
    to_pixels,
    working_size,
)


@dataclass(frozen=True)
class Prepared:
    """A decoded input at its working size (the output has this size too)."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    width: int
    height: int

    @property
    def array(self) -> np.ndarray:
        """The generator's input for this image alone: float32 [3, H, W] in [-1, 1]."""
        array: np.ndarray = to_model_input(self.pixels[None])[0]
        return array


def prepare(data: bytes, spec: StyleSpec, *, max_pixels: int) -> Prepared:
    """Decode and validate input bytes and bring them to the style's working size."""
    pixels = jpeg.decode(data, max_pixels=max_pixels, target_side=spec.max_side)  # plain JPEGs, fast
    if pixels is not None:
        height, width = pixels.shape[:2]
        size = working_size(width, height, spec.max_side)
        if size != (width, height):
            from PIL import Image

            pixels = to_pixels(Image.fromarray(pixels), size)
        return Prepared(pixels, *size)
    image = decode_image(data, max_pixels=max_pixels, target_side=spec.max_side)
    width, height = working_size(image.width, image.height, spec.max_side)
    return Prepared(to_pixels(image, (width, height)), width, height)


def render(output: np.ndarray, spec: StyleSpec) -> bytes:
    """Output pixels (uint8 [H,W,3]), or a model output (float [3,H,W] in [-1, 1]) -> encoded bytes."""
    if output.dtype == np.uint8:
        from PIL import Image

        if spec.output == "jpeg" and (encoded := jpeg.encode(output, JPEG_QUALITY)) is not None:
            return encoded

        return encode_image(Image.fromarray(output), spec.output)
    return encode_image(from_array(output), spec.output)
