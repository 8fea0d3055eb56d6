"""The libjpeg-turbo fast path (pipeline/jpeg.py) against Pillow's path (pipeline/images.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms, JpegImagePlugin

from stylequeue.config.styles import StyleSpec
from stylequeue.errors import InputTooLarge, InvalidInput
from stylequeue.pipeline import jpeg
from stylequeue.pipeline.images import decode_image, to_pixels, working_size
from stylequeue.pipeline.process import prepare, render

pytestmark = pytest.mark.skipif(not jpeg.available(), reason="simplejpeg is not installed")


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth, photo-like content (noise would test JPEG's worst case, not its usual one)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC).convert(mode)


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def pillow_pixels(data: bytes) -> np.ndarray:
    image = decode_image(data, max_pixels=10**8)
    return to_pixels(image, image.size)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def spec(max_side: int = 64, output: str = "jpeg") -> StyleSpec:
    return StyleSpec(name="s", weights="w.pdparams", max_side=max_side, output=output)


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}])
def test_plain_jpegs_decode_like_pillow(options: dict) -> None:
    data = jpeg_bytes(photo(40, 24), **options)
    fast = jpeg.decode(data, max_pixels=10**8)
    assert fast is not None and fast.dtype == np.uint8 and fast.shape == (24, 40, 3)
    assert np.abs(fast.astype(int) - pillow_pixels(data)).max() <= 1


def test_greyscale_decodes_to_equal_rgb_channels() -> None:
    data = jpeg_bytes(photo(32, 32, "L"))
    fast = jpeg.decode(data, max_pixels=10**8)
    assert fast is not None and fast.shape == (32, 32, 3)
    assert (fast[..., 0] == fast[..., 1]).all() and (fast[..., 1] == fast[..., 2]).all()
    assert np.abs(fast.astype(int) - pillow_pixels(data)).max() <= 1


def test_a_rotated_photo_goes_to_pillow_and_comes_out_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = jpeg_bytes(photo(48, 32), exif=exif.tobytes())
    assert jpeg.decode(data, max_pixels=10**8) is None
    prepared = prepare(data, spec(), max_pixels=10**8)
    assert (prepared.width, prepared.height) == (32, 48)


def test_exif_without_rotation_stays_on_the_fast_path() -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "a camera maker"
    assert jpeg.decode(jpeg_bytes(photo(16, 16), exif=exif.tobytes()), max_pixels=10**8) is not None


def test_icc_cmyk_and_broken_exif_go_to_pillow() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert jpeg.decode(jpeg_bytes(photo(16, 16), icc_profile=srgb), max_pixels=10**8) is None
    assert jpeg.decode(jpeg_bytes(photo(16, 16, "CMYK")), max_pixels=10**8) is None
    assert jpeg._orientation(b"II*\x00\xff\xff\x00\x00") == -1  # IFD0 offset past the end
    assert jpeg._orientation(b"XX") == -1


def test_corrupt_and_oversized_inputs_keep_pillows_errors() -> None:
    data = jpeg_bytes(photo(64, 64))
    truncated = data[: len(data) // 2]
    assert jpeg.decode(truncated, max_pixels=10**8) is None
    with pytest.raises(InvalidInput):
        prepare(truncated, spec(), max_pixels=10**8)
    assert jpeg.decode(data, max_pixels=64 * 64 - 1) is None
    with pytest.raises(InputTooLarge):
        prepare(data, spec(), max_pixels=64 * 64 - 1)
    with pytest.raises(InvalidInput):
        prepare(b"\xff\xd8\xff" + b"\x00" * 40, spec(), max_pixels=10**8)


def test_large_photos_are_scaled_in_the_dct_and_match_pillows_result() -> None:
    data = jpeg_bytes(photo(1200, 800))
    scaled = jpeg.decode(data, max_pixels=10**8, target_side=256)
    assert scaled is not None and min(scaled.shape[:2]) >= 256 and scaled.shape[1] < 1200
    fast = prepare(data, spec(256), max_pixels=10**8)
    assert (fast.width, fast.height) == working_size(1200, 800, 256)
    slow = to_pixels(decode_image(data, max_pixels=10**8, target_side=256), (fast.width, fast.height))
    assert psnr(fast.pixels, slow) > 35


def test_jpeg_outputs_are_420_without_metadata_and_faithful() -> None:
    pixels = np.asarray(photo(40, 24))
    data = render(pixels, spec(output="jpeg"))
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (40, 24)
    assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0, as Pillow writes at this quality
    assert "exif" not in image.info and "icc_profile" not in image.info
    pillow = io.BytesIO()
    Image.fromarray(pixels).save(pillow, "JPEG", quality=92)
    pillow_psnr = psnr(np.asarray(Image.open(pillow).convert("RGB")), pixels)
    assert psnr(np.asarray(image.convert("RGB")), pixels) >= pillow_psnr - 0.5  # as faithful as Pillow's
    png = Image.open(io.BytesIO(render(pixels, spec(output="png"))))
    assert png.format == "PNG" and np.array_equal(np.asarray(png), pixels)
