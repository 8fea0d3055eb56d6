"""Unpaired training images for CycleGAN: two folders of any images, sampled at random, cropped and flipped.

Pure numpy/Pillow (no Paddle): `UnpairedImages.sample(step)` returns float32 NCHW batches in [-1, 1]
(mean = std = 127.5, as PaddleGAN and the original CycleGAN normalise). Sampling is a pure function of
(seed, step), so a resumed run draws exactly the crops the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def list_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, in a stable (sorted) order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_rgb(path: Path, load_size: int | None, min_side: int) -> np.ndarray:
    """Decode to uint8 HWC RGB; shorter side scaled to `load_size` (if set) and never below `min_side`."""
    with Image.open(path) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    short = min(image.size)
    target = load_size if load_size else short
    target = max(target, min_side)
    if target != short:
        scale = target / short
        size = (max(min_side, round(image.width * scale)), max(min_side, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class Batch:
    """One training batch: `real_a`, `real_b` float32 N x 3 x crop x crop in [-1, 1].

    With pairing on, `real_b[i]` is the B image with `real_a[i]`'s relative path, cropped and flipped
    the same way.
    """

    real_a: np.ndarray
    real_b: np.ndarray


class UnpairedImages:
    """`trainA/` and `trainB/` image folders with random crop and horizontal flip.

    Args:
        dir_a, dir_b: folders searched recursively for images.
        crop_size: side of the square random crop.
        load_size: shorter side each image is scaled to before cropping; None keeps the file's size
            (images smaller than the crop are scaled up to it).
        flip: random horizontal flips.
        seed: with the step number, fixes every random choice.
        paired: draw B as the same-named file of A (same relative path, any image suffix).
        cache_images: decoded images kept in memory (least recently used are dropped).
    """

    def __init__(
        self,
        dir_a: Path,
        dir_b: Path,
        *,
        crop_size: int,
        load_size: int | None = None,
        flip: bool = True,
        seed: int = 0,
        paired: bool = False,
        cache_images: int = 512,
    ) -> None:
        self.files_a = list_images(dir_a)
        self.files_b = list_images(dir_b)
        for folder, files in ((dir_a, self.files_a), (dir_b, self.files_b)):
            if not files:
                raise FileNotFoundError(f"no images found under {folder}")
        self.crop_size = crop_size
        self.load_size = load_size
        self.flip = flip
        self.seed = seed
        self.cache_images = cache_images
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self.pairs: list[Path] | None = None
        if paired:
            by_stem = {p.relative_to(dir_b).with_suffix(""): p for p in self.files_b}
            missing = [p for p in self.files_a if p.relative_to(dir_a).with_suffix("") not in by_stem]
            if missing:
                raise FileNotFoundError(f"paired training: no image in {dir_b} named like {missing[0]}")
            self.pairs = [by_stem[p.relative_to(dir_a).with_suffix("")] for p in self.files_a]

    def _image(self, path: Path) -> np.ndarray:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        array = load_rgb(path, self.load_size, self.crop_size)
        self._cache[path] = array
        if len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)
        return array

    def _crop(self, array: np.ndarray, top: int, left: int, flip: bool) -> np.ndarray:
        size = self.crop_size
        patch = array[top : top + size, left : left + size]
        if flip:
            patch = patch[:, ::-1]
        return patch.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0

    def _random_patch(self, array: np.ndarray, rng: np.random.Generator) -> tuple[int, int, bool]:
        top = int(rng.integers(0, array.shape[0] - self.crop_size + 1))
        left = int(rng.integers(0, array.shape[1] - self.crop_size + 1))
        return top, left, bool(self.flip and rng.random() < 0.5)

    def sample(self, step: int, batch_size: int = 1) -> Batch:
        """The batch for training step `step` (0-based); the same (seed, step) gives the same batch."""
        rng = np.random.default_rng([self.seed, step])
        batch_a, batch_b = [], []
        for _ in range(batch_size):
            index_a = int(rng.integers(len(self.files_a)))
            image_a = self._image(self.files_a[index_a])
            top, left, flip = self._random_patch(image_a, rng)
            batch_a.append(self._crop(image_a, top, left, flip))
            if self.pairs is not None:
                image_b = self._image(self.pairs[index_a])
                if image_b.shape != image_a.shape:
                    pair = f"{self.files_a[index_a]}, {self.pairs[index_a]}"
                    raise ValueError(f"paired images differ in size: {pair}")
            else:
                image_b = self._image(self.files_b[int(rng.integers(len(self.files_b)))])
                top, left, flip = self._random_patch(image_b, rng)
            batch_b.append(self._crop(image_b, top, left, flip))
        return Batch(real_a=np.stack(batch_a), real_b=np.stack(batch_b))
