"""Decoding and encoding one JPEG: Pillow's path against the libjpeg-turbo path, in the same run.

Both paths are the project's own (`pipeline/images.py` through Pillow, `pipeline/jpeg.py` through
simplejpeg), from bytes to uint8 pixels and back at quality 92, on smooth photo-like images.

    python bench/codec.py
"""

from __future__ import annotations

import argparse
import io
import platform
import time

import numpy as np
from PIL import Image

from stylequeue.pipeline import jpeg
from stylequeue.pipeline.images import JPEG_QUALITY, decode_image, encode_image, to_pixels


def photo(side: int) -> bytes:
    small = np.random.default_rng(side).integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def per_call_us(function, repeat: int) -> float:
    function()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeat):
            function()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="64,256,1024")
    args = parser.parse_args()
    if not jpeg.available():
        raise SystemExit("simplejpeg is not installed")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"## bench/codec.py — {cpu}, Python {platform.python_version()}, one thread\n")
    print("| side | Pillow decode us | turbo decode us | speed-up | Pillow encode us | turbo encode us | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for side in (int(s) for s in args.sides.split(",")):
        data = photo(side)
        pixels = jpeg.decode(data, max_pixels=10**9)
        repeat = max(20, 200_000 // (side * side // 64))

        def pillow_decode(data: bytes = data) -> np.ndarray:
            image = decode_image(data, max_pixels=10**9)
            return to_pixels(image, image.size)

        pd = per_call_us(pillow_decode, repeat)
        td = per_call_us(lambda data=data: jpeg.decode(data, max_pixels=10**9), repeat)
        pe = per_call_us(lambda pixels=pixels: encode_image(Image.fromarray(pixels), "jpeg"), repeat)
        te = per_call_us(lambda pixels=pixels: jpeg.encode(pixels, JPEG_QUALITY), repeat)
        print(f"| {side} | {pd:,.0f} | {td:,.0f} | {pd / td:.1f}x | {pe:,.0f} | {te:,.0f} | {pe / te:.1f}x |")


if __name__ == "__main__":
    main()
