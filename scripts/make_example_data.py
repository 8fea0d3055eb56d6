"""Make the small training set `recipes/tiny-example.yaml` trains on, from the bundled demo photos only.

    python scripts/make_example_data.py [OUT_DIR]      # default: runs/tiny-example/data

trainA/ gets the four photos of stylequeue/demo_assets scaled to a longest side of 192 px; trainB/ gets each
of them painted by stylequeue's ink-wash filter under the same name, so
the recipe can pair them. Nothing is downloaded; it takes a second or two. These photos are the demo's
held-out set: a model trained on them is for trying `stylequeue train`, not for the demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageOps

from stylequeue.models.inkwash import inkwash

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "stylequeue" / "demo_assets"
DEFAULT_OUT = REPO / "runs" / "tiny-example" / "data"
SIDE = 192  # small enough for a one-minute CPU run, large enough for 64 px crops to vary


def scaled(path: Path, side: int) -> Image.Image:
    with Image.open(path) as im:
        photo = ImageOps.exif_transpose(im).convert("RGB")
    photo.thumbnail((side, side), Image.Resampling.LANCZOS)
    return photo


def make(out_dir: Path, side: int = SIDE) -> int:
    """Write trainA/NAME.png and its painted twin trainB/NAME.png; returns how many pairs."""
    for folder in ("trainA", "trainB"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(PHOTOS.glob("*.jpg")):
        photo = scaled(path, side)
        photo.save(out_dir / "trainA" / f"{path.stem}.png")
        inkwash(photo).save(out_dir / "trainB" / f"{path.stem}.png")
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, nargs="?", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    count = make(args.out_dir)
    print(f"{count} photo/painting pairs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
