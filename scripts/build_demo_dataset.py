"""Build the demo style's training data offline: trainA/ = sample photos that installed packages ship,
trainB/ = the same images painted by stylequeue's ink-wash filter (same file names, so pairs line up).

    python scripts/build_demo_dataset.py OUT_DIR [--scan DIR ...] [--holdout NAME ...]

Without --scan it looks for the sample-data folders of scikit-image (`skimage/data`), scikit-learn
(`sklearn/datasets/images`) and matplotlib (`mpl-data/sample_data`) in the running interpreter; these
packages are not stylequeue dependencies (install them in a scratch environment, or pass --scan).
Photos named in --holdout (by default the ones in stylequeue/demo_assets) are left out, so the demo
shows photos the model never saw. Each photo is written at several sizes (longest side 512, 384, 256):
the filter works in pixels, so this shows the generator the style at several scales.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps


def _load_inkwash() -> Callable[[Image.Image], Image.Image]:
    """The filter module by file path: any interpreter with numpy and Pillow runs this script, without
    stylequeue's own dependencies (importing the package would pull in redis, celery...)."""
    path = Path(__file__).resolve().parents[1] / "stylequeue" / "models" / "inkwash.py"
    spec = importlib.util.spec_from_file_location("_stylequeue_inkwash", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.inkwash  # type: ignore[no-any-return]


inkwash = _load_inkwash()

PACKAGE_FOLDERS = {"skimage": "data", "sklearn": "datasets/images", "matplotlib": "mpl-data/sample_data"}
# Sample files that are not photographs of scenes (charts, text, synthetic, microscopy, medical, stars).
NOT_PHOTOS = frozenset({
    "cell", "chessboard_GRAY", "chessboard_RGB", "clock_motion", "color", "horse", "hubble_deep_field", "ihc",
    "logo", "logo2", "microaneurysms", "page", "phantom", "retina", "text", "Minduka_Present_Blue_Pack",
    "motorcycle_right",  # the stereo twin of motorcycle_left: near-duplicate
})
DEFAULT_HOLDOUT = ("astronaut", "chelsea", "coffee", "rocket")
SIDES = (512, 384, 256)
MIN_SIDE = 200


def package_folders() -> list[Path]:
    """Sample-data folders of the packages above that this interpreter can import."""
    found = []
    for package, sub in PACKAGE_FOLDERS.items():
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations))) / sub
            if folder.is_dir():
                found.append(folder)
    return found


def find_photos(folders: list[Path], holdout: set[str]) -> list[Path]:
    """Photographs (by name and size) in `folders`, minus the held-out names."""
    photos = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in {".png", ".jpg", ".jpeg"} or path.stem in NOT_PHOTOS | holdout:
                continue
            with Image.open(path) as im:
                if min(im.size) >= MIN_SIDE:
                    photos.append(path)
    return photos


def build(out_dir: Path, photos: list[Path], sides: tuple[int, ...] = SIDES) -> int:
    """Write trainA/NAME_SIDE.png and its painted twin trainB/NAME_SIDE.png; returns how many pairs."""
    (out_dir / "trainA").mkdir(parents=True, exist_ok=True)
    (out_dir / "trainB").mkdir(parents=True, exist_ok=True)
    count = 0
    for path in photos:
        with Image.open(path) as im:
            photo = ImageOps.exif_transpose(im).convert("RGB")
        for side in sides:
            scale = min(1.0, side / max(photo.size))
            size = (round(photo.width * scale), round(photo.height * scale))
            scaled = photo.resize(size, Image.Resampling.LANCZOS) if size != photo.size else photo
            name = f"{path.stem}_{side}.png"
            scaled.save(out_dir / "trainA" / name)
            inkwash(scaled).save(out_dir / "trainB" / name)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scan", type=Path, action="append", help="folder of photos (repeatable)")
    parser.add_argument("--holdout", action="append", help="photo name (file stem) to leave out (repeatable)")
    args = parser.parse_args(argv)
    folders = args.scan or package_folders()
    if not folders:
        parser.error("no sample-data folders: install scikit-image, scikit-learn, matplotlib or pass --scan")
    holdout = set(args.holdout or DEFAULT_HOLDOUT)
    photos = find_photos(folders, holdout)
    if not photos:
        parser.error(f"no photos found in {', '.join(map(str, folders))}")
    count = build(args.out_dir, photos)
    names = ", ".join(p.stem for p in photos)
    print(f"{count} pairs from {len(photos)} photos ({names}) in {args.out_dir}")
    print(f"held out: {', '.join(sorted(holdout))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
