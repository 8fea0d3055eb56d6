"""Large plain JPEGs decoded in batches on the GPU (nvJPEG, through torchvision) and resized there.

A 12 MP JPEG costs a CPU core 45 ms even in draft mode (docs/performance.md): on a card that restyles thousands of
images a second, bulk groups of large photos are decode-bound. `prepare_many` takes the large plain
JPEGs of a group (pipeline/jpeg.py's definition: no ICC profile, no rotation, YCbCr or grey), decodes
them together with `torchvision.io.decode_jpeg(list, device="cuda")`, resizes each on the device to
its working size (bicubic with antialiasing, as Pillow's resize) and returns uint8 pixels; whatever it
does not take (small, not plain, or a batch the decoder refused) is None, and the caller decodes it on
the CPU (`process.prepare`: simplejpeg's DCT scaling or Pillow's draft mode), which also names errors.

The seam: `decoder` turns encoded bytes into CHW uint8 tensors on the device. torchvision's is the
only GPU-only line; tests pass a CPU decoder (or torchvision's with device="cpu" where it imports) and
so run the selection, the resize and the fallback on any machine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stylequeue.config.styles import StyleSpec
from stylequeue.pipeline import jpeg
from stylequeue.pipeline.images import working_size
from stylequeue.pipeline.process import Prepared

if TYPE_CHECKING:
    import torch

log = logging.getLogger("stylequeue.pipeline")

# Below this many pixels a CPU core decodes fast enough (simplejpeg, DCT-scaled) that the round trip to
# the GPU does not pay; above it (a 2 MP photo and up) nvJPEG's batch throughput wins (measured on an H100).
LARGE_PIXELS = 2_000_000
Decoder = Callable[[list["torch.Tensor"], str], list["torch.Tensor"]]


@functools.cache
def available(device: str) -> bool:
    """Whether `device` ("cuda:N", or "cpu" for tests) can decode here: torchvision imports, CUDA is up."""
    try:
        import torch
        import torchvision.io  # noqa: F401
    except Exception:  # ImportError, or a CUDA build of torchvision beside a CPU torch
        return False
    return device == "cpu" or torch.cuda.is_available()


def torchvision_decoder(datas: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """nvJPEG through torchvision: one call for the whole list (batched decoding)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)  # type: ignore[no-any-return]


def resize(image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """CHW uint8 on any device -> HWC uint8 numpy at `size` = (width, height), bicubic with antialiasing."""
    import torch
    from torch.nn import functional

    width, height = size
    if tuple(image.shape[1:]) != (height, width):
        scaled = functional.interpolate(image[None].float(), size=(height, width), mode="bicubic",
                                        antialias=True, align_corners=False)[0]
        image = scaled.clamp_(0, 255).round_().to(torch.uint8)
    pixels: np.ndarray = image.permute(1, 2, 0).contiguous().cpu().numpy()
    return pixels


def prepare_many(datas: Sequence[bytes | Any], specs: Sequence[StyleSpec], *, max_pixels: int, device: str,
                 decoder: Decoder | None = None) -> list[Prepared | None]:
    """A `Prepared` for each large plain JPEG in `datas`, decoded together on `device`; None for the rest.

    Items that are not bytes (a read that failed) are None too.
    """
    import torch

    taken: list[tuple[int, tuple[int, int]]] = []
    for index, data in enumerate(datas):
        size = jpeg.plain_size(data, max_pixels=max_pixels) if isinstance(data, bytes) else None
        if size is not None and size[0] * size[1] >= LARGE_PIXELS:
            taken.append((index, size))
    results: list[Prepared | None] = [None] * len(datas)
    if not taken:
        return results
    encoded = [torch.frombuffer(bytearray(datas[index]), dtype=torch.uint8) for index, _ in taken]
    try:
        images = (decoder or torchvision_decoder)(encoded, device)
    except Exception as exc:  # one bad file fails the batch call: the CPU path decodes and judges each
        log.warning("GPU decoding of %d JPEGs failed (%s); decoding them on the CPU", len(taken), exc)
        return results
    for (index, (width, height)), image in zip(taken, images, strict=True):
        target = working_size(width, height, specs[index].max_side)
        results[index] = Prepared(resize(image, target), *target)
    return results
