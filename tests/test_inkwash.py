"""The ink-wash filter that paints the demo style's domain B (pure numpy/Pillow)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from stylequeue.models.inkwash import inkwash


def _colourful(width: int = 160, height: int = 120) -> Image.Image:
    """A saturated test picture: colour gradients with a dark disc and a bright bar."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 1.0 - x / width], axis=-1) * 255
    rgb[(x - 50) ** 2 + (y - 60) ** 2 < 25**2] = (120, 20, 20)
    rgb[20:30, 90:150] = (250, 240, 60)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def test_same_input_gives_identical_bytes() -> None:
    photo = _colourful()
    assert _png(inkwash(photo)) == _png(inkwash(photo.copy()))


def test_output_has_the_input_size_and_is_rgb() -> None:
    for size in [(160, 120), (123, 77), (7, 5)]:
        out = inkwash(_colourful(*size))
        assert out.size == size
        assert out.mode == "RGB"
    assert inkwash(Image.new("L", (40, 30), 128)).size == (40, 30)  # grey input works too


def test_output_is_ink_low_saturation() -> None:
    photo = _colourful()
    saturation_in = np.asarray(photo.convert("HSV"))[..., 1].mean() / 255
    saturation_out = np.asarray(inkwash(photo).convert("HSV"))[..., 1].mean() / 255
    assert saturation_in > 0.5
    assert saturation_out < 0.2  # monochrome ink on a barely tinted paper


def test_blank_photo_becomes_warm_paper() -> None:
    out = np.asarray(inkwash(Image.new("RGB", (64, 64), "white")), dtype=np.float32)
    red, blue = out[..., 0].mean(), out[..., 2].mean()
    assert red > 220  # bare paper, no ink
    assert red - blue > 15  # warm rice paper, not grey


def test_edges_are_drawn_darker_than_flat_regions() -> None:
    # A light square on a darker ground: both flat areas stay pale washes, the contour between them gets
    # a brush stroke.
    gray = np.full((120, 120), 170, dtype=np.uint8)
    gray[30:90, 30:90] = 235
    out = _luma(inkwash(Image.fromarray(gray, "L")))
    inside = out[50:70, 50:70].mean()
    outside = np.concatenate([out[5:15, 5:115].ravel(), out[105:115, 5:115].ravel()]).mean()
    edge = out[84:97, 40:80].mean(axis=1).min()  # darkest row across the square's lower edge
    assert edge < inside - 40
    assert edge < outside - 40
