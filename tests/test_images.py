"""Decoding awkward inputs, working sizes, normalisation and clean outputs (stylequeue/pipeline/images.py)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from stylequeue.errors import InputTooLarge, InvalidInput
from stylequeue.pipeline.images import decode_image, encode_image, from_array, to_array, working_size

LIMIT = 50_000_000


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte, so its header can claim anything."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _swapped_primaries_profile() -> bytes:
    """An ICC v2 RGB profile whose red and green primaries are sRGB's green and red."""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    gamma = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 0x0233) + b"\0\0"
    tags = [(b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.3851, 0.7169, 0.0971)),
            (b"gXYZ", xyz(0.4361, 0.2225, 0.0139)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- inputs that must decode ---------------------------------------------------------------------


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    source = Image.new("CMYK", (40, 30), (10, 200, 30, 5))
    image = decode_image(_save(source, "JPEG", quality=95), max_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (40, 30)
    expected = np.asarray(source.convert("RGB"))[15, 20].astype(int)
    assert np.abs(np.asarray(image)[15, 20].astype(int) - expected).max() <= 6


def test_16bit_grey_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    image = decode_image(_save(Image.fromarray(values), "PNG"), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 127, 255, 3]


def test_16bit_rgb_png_decodes() -> None:
    pixel = struct.pack(">HHH", 65535, 32768, 0)
    rows = b"".join(b"\0" + pixel * 4 for _ in range(2))
    image = decode_image(_png(4, 2, 16, 2, rows), max_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (4, 2)
    red, green, blue = image.getpixel((1, 1))
    assert red == 255 and abs(green - 128) <= 1 and blue == 0


def test_palette_png_with_transparency_is_flattened_on_white() -> None:
    source = Image.new("P", (4, 1))
    source.putpalette([0, 0, 0, 255, 0, 0] + [0] * (3 * 254))
    source.putdata([0, 1, 1, 0])
    image = decode_image(_save(source, "PNG", transparency=0), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white background
    assert image.getpixel((1, 0)) == (255, 0, 0)


def test_half_transparent_rgba_is_blended_with_white() -> None:
    source = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    red, green, blue = decode_image(_save(source, "PNG"), max_pixels=LIMIT).getpixel((0, 0))
    assert 120 <= red <= 135 and red == green == blue


def test_exif_rotated_jpeg_is_turned_upright() -> None:
    source = Image.new("RGB", (40, 20), (255, 0, 0))
    source.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image = decode_image(_save(source, "JPEG", exif=exif, quality=95), max_pixels=LIMIT)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_one_pixel_image() -> None:
    image = decode_image(_save(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), max_pixels=LIMIT)
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (9, 8, 7)
    assert working_size(*image.size, 512) == (8, 8)  # the generator's smallest input


def test_sliver_image() -> None:
    image = decode_image(_save(Image.new("L", (10000, 10), 200), "PNG"), max_pixels=LIMIT)
    assert image.size == (10000, 10) and image.mode == "RGB"
    width, height = working_size(*image.size, 512)
    assert (width, height) == (512, 8)
    assert to_array(image, (width, height)).shape == (3, 8, 512)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, _, blue = decode_image(data, max_pixels=LIMIT).getpixel((4, 4))
    assert red > 200 and blue < 50


def test_embedded_icc_profile_is_converted_to_srgb() -> None:
    source = Image.new("RGB", (8, 8), (255, 0, 0))
    image = decode_image(_save(source, "PNG", icc_profile=_swapped_primaries_profile()), max_pixels=LIMIT)
    red, green, blue = image.getpixel((4, 4))
    assert red < 10 and green > 245 and blue < 10  # "red" in that profile is sRGB green


def test_broken_icc_profile_is_ignored() -> None:
    source = Image.new("RGB", (8, 8), (10, 20, 30))
    image = decode_image(_save(source, "PNG", icc_profile=b"not a profile"), max_pixels=LIMIT)
    assert image.getpixel((0, 0)) == (10, 20, 30)


def test_jpeg_draft_decodes_large_photo_smaller() -> None:
    data = _save(_noise(2000, 1500), "JPEG", quality=80)
    assert decode_image(data, max_pixels=LIMIT).size == (2000, 1500)
    small = decode_image(data, max_pixels=LIMIT, target_side=256)
    assert 256 <= max(small.size) < 2000 and min(small.size) >= 192
    assert working_size(*small.size, 256) == (256, 192)


# --- inputs that must fail with the right typed error --------------------------------------------


def test_truncated_jpeg_is_invalid_input() -> None:
    data = _save(_noise(64, 64), "JPEG")
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_zero_bytes_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", max_pixels=LIMIT)


def test_text_file_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="not an image"):
        decode_image(b"hello,world\n1,2\n" * 20, max_pixels=LIMIT)


def test_garbage_after_a_valid_signature_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, max_pixels=LIMIT)


@pytest.mark.parametrize("max_pixels", [LIMIT, 10**12])
def test_png_header_claiming_100k_by_100k_is_too_large(max_pixels: int) -> None:
    # Rows for a 1-pixel-high image only: the decoder must refuse from the header, never allocate 30 GB.
    data = _png(100_000, 100_000, 8, 2, b"\0" + b"\0" * 3)
    with pytest.raises(InputTooLarge) as info:
        decode_image(data, max_pixels=max_pixels)
    assert info.value.code == "input_too_large"


def test_pixel_limit_is_enforced() -> None:
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(InputTooLarge, match="100x100"):
        decode_image(data, max_pixels=5000)


# --- sizes, arrays, encoding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((4000, 3000), 512, (512, 384)), ((3000, 4000), 512, (384, 512)), ((512, 512), 512, (512, 512)),
     ((513, 100), 512, (512, 100)), ((10, 10), 512, (12, 12)), ((1, 1), 512, (8, 8)),
     ((2000, 10), 512, (512, 8)), ((640, 480), 256, (256, 192))],
)
def test_working_size(size: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    assert working_size(*size, max_side) == expected


def test_working_size_rules_hold_for_many_sizes() -> None:
    rng = np.random.default_rng(3)
    for width, height in rng.integers(1, 9000, (300, 2)):
        w, h = working_size(int(width), int(height), 512)
        assert w % 4 == 0 and h % 4 == 0 and 8 <= w <= 512 and 8 <= h <= 512
        if max(width, height) <= 512:  # small images are only rounded, never enlarged
            assert w <= max(8, width + 2) and h <= max(8, height + 2)
        if min(w, h) >= 64:
            assert abs(w / h - width / height) / (width / height) < 0.07


def test_to_array_and_back_is_lossless_at_the_same_size() -> None:
    image = _noise(24, 16)
    array = to_array(image, (24, 16))
    assert array.shape == (3, 16, 24) and array.dtype == np.float32
    assert array.min() >= -1.0 and array.max() <= 1.0
    assert np.array_equal(np.asarray(from_array(array)), np.asarray(image))


def test_to_array_normalises_like_cyclegan() -> None:
    array = to_array(Image.new("RGB", (8, 4), (255, 0, 255)), (4, 4))
    assert array.shape == (3, 4, 4)
    assert np.allclose(array[0], 1.0) and np.allclose(array[1], -1.0)


def test_from_array_clips_out_of_range_values() -> None:
    array = np.stack([np.full((2, 2), 3.0), np.full((2, 2), -7.0), np.zeros((2, 2))]).astype(np.float32)
    assert from_array(array[None]).getpixel((0, 0)) == (255, 0, 128)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_outputs_carry_no_exif_or_gps(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}  # GPS IFD
    source = _save(_noise(32, 24), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(source)).getexif()  # the input really has EXIF
    data = encode_image(decode_image(source, max_pixels=LIMIT), fmt)  # type: ignore[arg-type]
    output = Image.open(io.BytesIO(data))
    assert output.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    assert output.size == (32, 24) and output.mode == "RGB"
    assert not output.getexif() and "exif" not in output.info and "icc_profile" not in output.info


def test_importing_images_does_not_import_paddle() -> None:
    code = "import sys, stylequeue.pipeline.images; sys.exit('paddle' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
