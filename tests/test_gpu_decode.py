"""Bulk groups of large JPEGs decoded together on a device and resized there (pipeline/gpu_decode.py).

The GPU itself is not here: the same code runs with a CPU decoder (or torchvision's on the CPU where it
imports), so the choice of what to take, the resize and the fallback are checked against Pillow's path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylequeue.config.styles import StyleSpec
from stylequeue.errors import InputNotFound
from stylequeue.models.runtime import psnr_db
from stylequeue.pipeline import gpu_decode
from stylequeue.pipeline.process import prepare

torch = pytest.importorskip("torch", reason="PyTorch is not installed: `make torch` or pip install 'stylequeue[torch]'")
simplejpeg = pytest.importorskip("simplejpeg")

SPEC = StyleSpec(name="s", weights="w.pdparams", max_side=256)
MAX_PIXELS = 50_000_000


def photo(width: int, height: int, fmt: str = "JPEG", seed: int = 0, **save: object) -> bytes:
    """A smooth, photo-like image (noise would make JPEG and resizing unrealistically hard)."""
    small = np.random.default_rng(seed).integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(out, fmt, **save)
    return out.getvalue()


def cpu_decoder(datas: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    assert device == "cpu"
    return [torch.from_numpy(simplejpeg.decode_jpeg(d.numpy().tobytes(), colorspace="RGB")).permute(2, 0, 1)
            for d in datas]


def _as_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr_db(a.astype(np.float32) / 127.5 - 1, b.astype(np.float32) / 127.5 - 1)


def test_large_plain_jpegs_match_the_cpu_path() -> None:
    datas = [photo(2000, 1500, seed=1), photo(1200, 1800, seed=2)]
    decoded = gpu_decode.prepare_many(datas, [SPEC, SPEC], max_pixels=MAX_PIXELS, device="cpu", decoder=cpu_decoder)
    for data, got in zip(datas, decoded, strict=True):
        expected = prepare(data, SPEC, max_pixels=MAX_PIXELS)  # simplejpeg DCT scaling + Pillow bicubic
        assert got is not None and (got.width, got.height) == (expected.width, expected.height)
        assert got.pixels.shape == expected.pixels.shape and got.pixels.dtype == np.uint8
        assert _as_psnr(expected.pixels, got.pixels) >= 35.0
        assert np.abs(got.pixels.mean((0, 1)) - expected.pixels.mean((0, 1))).max() < 2.0  # colours, not BGR


def test_only_large_plain_jpegs_are_taken(tmp_path: Path) -> None:
    icc = Image.new("RGB", (1, 1)).info.get("icc_profile") or b"\0" * 128
    datas = [photo(2000, 1500), photo(400, 300), photo(2000, 1500, "PNG"), InputNotFound("gone"),
             photo(2000, 1500, icc_profile=icc)]
    decoded = gpu_decode.prepare_many(datas, [SPEC] * 5, max_pixels=MAX_PIXELS, device="cpu", decoder=cpu_decoder)
    assert [d is not None for d in decoded] == [True, False, False, False, False]
    too_many = gpu_decode.prepare_many(datas[:1], [SPEC], max_pixels=1_000_000, device="cpu", decoder=cpu_decoder)
    assert too_many == [None]  # over the pixel limit: the CPU path fails it with the right error


def test_a_failing_batch_falls_back_to_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    def broken(datas: list[torch.Tensor], device: str) -> list[torch.Tensor]:
        raise RuntimeError("nvjpeg: corrupt stream")

    decoded = gpu_decode.prepare_many([photo(2000, 1500)] * 2, [SPEC] * 2, max_pixels=MAX_PIXELS, device="cpu",
                                      decoder=broken)
    assert decoded == [None, None] and "decoding them on the CPU" in caplog.text


def test_torchvision_on_the_cpu_decodes_the_same() -> None:
    if not gpu_decode.available("cpu"):
        pytest.skip("torchvision is not importable here (on this machine only its CUDA wheel exists)")
    data = photo(2000, 1500, seed=3)
    got = gpu_decode.prepare_many([data, data], [SPEC, SPEC], max_pixels=MAX_PIXELS, device="cpu")[0]
    expected = prepare(data, SPEC, max_pixels=MAX_PIXELS)
    assert got is not None and _as_psnr(expected.pixels, got.pixels) >= 35.0
