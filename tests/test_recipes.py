"""The recipes shipped in recipes/: they load, and the tiny example trains from data made by its script and serves."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from rich.console import Console

from stylequeue.config.settings import Settings
from stylequeue.config.styles import parse_registry
from stylequeue.models.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_keep_their_runs_out_of_the_package(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for folder in (recipe.data_dir, recipe.output_dir):
        assert folder.is_relative_to(ROOT / "runs")  # ignored by git, never inside stylequeue/


def test_the_tiny_example_trains_from_its_own_data_and_serves(tmp_path: Path) -> None:
    """What docs/recipes.md tells a newcomer to run, shortened to a few steps and moved into tmp_path."""
    data = tmp_path / "data"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example_data.py"), str(data)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (data / "trainA").iterdir()) == sorted(p.name for p in (data / "trainB").iterdir())

    fields = yaml.safe_load((ROOT / "recipes" / "tiny-example.yaml").read_text())
    fields |= {"data_dir": str(data), "output_dir": str(tmp_path / "out")}
    recipe = tmp_path / "tiny-example.yaml"
    recipe.write_text(yaml.safe_dump(fields))

    from stylequeue.models.train import train
    from stylequeue.pipeline.restyle import restyle

    result = train(recipe, max_steps=5, console=Console(file=io.StringIO()))
    assert result.steps_done == 5 and all(math.isfinite(v) for v in result.losses.values())
    registry = tmp_path / "styles.toml"
    registry.write_text(result.registry_toml)
    assert parse_registry(registry)["tiny-example"].ngf == fields["ngf"]

    settings = Settings(styles=registry, runtime="dygraph", cache_dir=tmp_path / "cache",
                        storage_url=f"file://{tmp_path}/store")
    done = restyle(ROOT / "stylequeue" / "demo_assets" / "cat.jpg", "tiny-example", tmp_path / "cat-tiny.jpg",
                   settings=settings)
    with Image.open(done.output) as image:
        assert max(image.size) == fields["max_side"] and image.mode == "RGB"
