"""A deterministic photo -> Chinese ink-wash painting (shuimohua) filter, in numpy and Pillow only.

It builds the demo style's domain B: the same photos, painted. The look, layer by layer:
- rice paper: warm off-white, with fine grain, cloudy mottling and faint fibres (fixed seeds);
- washes: the photo's tones, simplified by median filtering into a few soft ink densities, with light
  areas left as bare paper (the empty space of ink painting) and darker rims where wet ink pools;
- brush strokes: contours from a difference of Gaussians, thickened, bled into the paper and broken by
  dry-brush streaks;
- ink: one cool near-black, soaked unevenly into the paper's texture.
Every size is in pixels (not relative to the image), so the filter is the same local operation at any
image size: that is what lets a convolutional generator learn it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

PAPER_RGB = np.array([244, 234, 208], dtype=np.float32) / 255.0  # warm rice paper (xuan)
INK_RGB = np.array([24, 24, 30], dtype=np.float32) / 255.0  # pine-soot ink, slightly cool
_SEED = 20_260_211


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float32 H x W array, reflecting at the borders."""
    if sigma <= 0:
        return array
    radius = max(1, int(3 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = array
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        acc = np.zeros_like(out)
        length = out.shape[axis]
        for i, weight in enumerate(kernel):
            acc += weight * (padded[i : i + length] if axis == 0 else padded[:, i : i + length])
        out = acc
    return out


def _noise(shape: tuple[int, int], sigma: float, seed: int) -> np.ndarray:
    """Smooth noise in about [-1, 1], the same for the same shape and seed."""
    rng = np.random.default_rng(seed)
    field = gaussian_blur(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (3 * field.std() + 1e-6)


def _streaks(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Dry-brush streaks: noise stretched along a diagonal, in [0, 1]."""
    height, width = shape
    rng = np.random.default_rng(seed)
    big = rng.random((height + width, 1)).astype(np.float32)
    rows = np.arange(height)[:, None] + np.arange(width)[None, :]  # lines of constant x + y
    field = big[rows, 0]
    field = gaussian_blur(field, 0.8)
    return np.clip((field - field.min()) / (np.ptp(field) + 1e-6), 0.0, 1.0)


def rice_paper(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Paper colour (H x W x 3 in [0,1]) and its absorbency (H x W, about 0.85-1.15)."""
    shape = (height, width)
    grain = _noise(shape, 0.7, _SEED)
    mottle = _noise(shape, 14.0, _SEED + 1)
    fibres = np.clip(_noise(shape, 1.5, _SEED + 2) * 3 - 2.2, 0, 1)  # sparse bright threads
    tone = 1.0 + 0.025 * grain + 0.035 * mottle - 0.04 * fibres
    paper = PAPER_RGB[None, None, :] * tone[..., None]
    absorbency = 1.0 + 0.08 * grain + 0.07 * mottle - 0.1 * fibres
    return np.clip(paper, 0.0, 1.0), absorbency


def _simplified(image: Image.Image) -> np.ndarray:
    """Luminance in [0, 1] with fine texture removed but edges kept (median filters)."""
    gray = image.convert("L").filter(ImageFilter.MedianFilter(5)).filter(ImageFilter.MedianFilter(5))
    return np.asarray(gray, dtype=np.float32) / 255.0


def wash_density(lum: np.ndarray) -> np.ndarray:
    """Ink density of the washes (0 = bare paper, 1 = solid ink): a few soft tones, pooling at rims."""
    density = np.clip((0.8 - lum) / 0.7, 0.0, 1.0) ** 1.6
    levels = 4.0
    stepped = np.floor(density * levels + 0.5) / levels
    # Soft steps: ink spreads across tone boundaries instead of posterising them.
    washed = 0.5 * gaussian_blur(stepped.astype(np.float32), 3.0) + 0.5 * gaussian_blur(density, 1.0)
    rims = np.clip(washed - gaussian_blur(washed, 5.0), 0.0, None) * 1.2
    return np.clip(washed * 0.8 + rims, 0.0, 1.0)


def stroke_density(lum: np.ndarray) -> np.ndarray:
    """Brush contours from a difference of Gaussians, thickened and bled; 0 = no stroke, 1 = solid."""
    dog = gaussian_blur(lum, 1.2) - gaussian_blur(lum, 3.0)
    # Dark side of an edge: the luminance dips below its surroundings.
    lines = np.clip((-dog - 0.018) / 0.05, 0.0, 1.0)
    thick = gaussian_blur(lines, 0.7)
    bled = np.maximum(thick, 0.5 * gaussian_blur(thick, 3.0))
    return np.clip(bled, 0.0, 1.0)


def inkwash(image: Image.Image) -> Image.Image:
    """Paint `image` as a monochrome ink-wash on rice paper; same size, RGB, deterministic."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    lum = _simplified(rgb)
    # Half local: dark photos still leave paper showing, as ink paintings keep much of the sheet empty.
    lum = 0.5 * lum + 0.5 * np.clip(lum - gaussian_blur(lum, 24.0) + 0.72, 0.0, 1.0)
    wash = wash_density(lum)
    # Ink blooms: a wash soaks in unevenly, in soft clouds a few pixels across.
    wash = np.clip(wash * (1.0 + 0.22 * _noise((height, width), 5.0, _SEED + 4)), 0.0, 1.0)
    strokes = stroke_density(lum)
    streaks = _streaks((height, width), _SEED + 3)
    strokes = strokes * (0.7 + 0.3 * streaks)
    ink = 1.0 - (1.0 - wash) * (1.0 - strokes)  # layers of ink darken each other, never lighten
    paper, absorbency = rice_paper(height, width)
    ink = np.clip(ink * absorbency, 0.0, 1.0)[..., None]
    out = paper * (1.0 - ink) + INK_RGB[None, None, :] * ink
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
