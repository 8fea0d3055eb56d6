"""One job's data path, shared by the worker and `restyle()`: bytes -> array, and array -> bytes.

    URI --storage.read--> bytes --prepare--> float32 [3,H,W] --(model)--> [3,H,W] --render--> bytes --> URI
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.pipeline.images import decode_image, encode_image, from_array, to_array, working_size


@dataclass(frozen=True)
class Prepared:
    """A decoded input at its working size (the output has this size too)."""

    array: np.ndarray
    width: int
    height: int


def prepare(data: bytes, spec: StyleSpec, *, max_pixels: int) -> Prepared:
    """Decode and validate input bytes and bring them to the style's working size, in [-1, 1]."""
    image = decode_image(data, max_pixels=max_pixels, target_side=spec.max_side)
    width, height = working_size(image.width, image.height, spec.max_side)
    return Prepared(to_array(image, (width, height)), width, height)


def render(output: np.ndarray, spec: StyleSpec) -> bytes:
    """A model output [3,H,W] in [-1, 1] -> encoded bytes in the style's output format."""
    return encode_image(from_array(output), spec.output)
