"""Training recipes (YAML or TOML): parsed and validated without Paddle, plus the learning-rate schedule.

`stylequeue train RECIPE` reads one with `load_recipe`; every error names the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from stylequeue.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """A validated training recipe; relative paths are resolved against the recipe file's folder."""

    name: str
    data_dir: Path  # holds trainA/ and trainB/ (images found recursively)
    output_dir: Path  # checkpoint.pdparams, NAME.pdparams, losses.csv
    steps: int
    crop_size: int = 128
    load_size: int | None = None  # shorter side before cropping; None keeps each file's size
    flip: bool = True
    ngf: int = 64
    n_blocks: int = 9
    ndf: int = 64
    n_layers: int = 3
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    # Only for data whose B images are A images transformed (the demo): L1 from G_A(a) to a's twin in
    # trainB (same relative name) and from G_B(b) to b's twin. 0 = pure unpaired CycleGAN.
    lambda_paired_l1: float = 0.0
    pool_size: int = 50
    lr: float = 2e-4
    beta1: float = 0.5
    decay_start: int | None = None  # None: steps // 2
    schedule: str = "linear"
    batch_size: int = 1
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    amp: bool = False
    device: str = "auto"
    threads: int | None = None
    max_side: int = 512  # for the printed registry entry
    output: str = "jpeg"
    description: str = ""


_CHOICES = {
    "schedule": ("linear", "cosine"), "device": ("auto", "cpu", "gpu"), "output": ("jpeg", "png", "webp"),
}
_MINIMUM = {"steps": 1, "crop_size": 16, "load_size": 16, "ngf": 1, "n_blocks": 1, "ndf": 1, "n_layers": 1,
            "batch_size": 1, "checkpoint_every": 1, "log_every": 1, "threads": 1, "max_side": 16}


def _field_types() -> dict[str, tuple[type, bool]]:
    """Recipe field -> (type expected in the file, whether null is allowed), from the dataclass."""
    hints = get_type_hints(Recipe)
    types = {}
    for name, hint in hints.items():
        args = [a for a in get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        types[name] = (str if base is Path else base, bool(args))
    return types


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML (.yaml/.yml) or TOML recipe; a problem raises ConfigError naming the file and field."""
    source = Path(path)
    try:
        text = source.read_text()
        data = tomllib.loads(text) if source.suffix == ".toml" else yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"recipe {source}: cannot read it ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"recipe {source}: not valid {source.suffix.lstrip('.').upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {source}: expected a mapping of fields at the top level")
    where = f"recipe {source}: field"
    types = _field_types()
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            raise ConfigError(f"{where} {key!r} is unknown (known: {', '.join(types)})")
        want, nullable = types[key]
        if value is None and nullable:
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{where} {key!r} must be {want.__name__}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{where} {key!r} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        if isinstance(value, (int, float)) and value < _MINIMUM.get(key, 0):
            raise ConfigError(f"{where} {key!r} must be at least {_MINIMUM.get(key, 0)}, got {value}")
        values[key] = value
    for field in dataclasses.fields(Recipe):
        if field.default is dataclasses.MISSING and field.name not in values:
            raise ConfigError(f"{where} {field.name!r} is required")
    for key in ("crop_size", "max_side"):
        if values.get(key, 4) % 4:
            raise ConfigError(f"{where} {key!r} must be a multiple of 4, got {values[key]}")
    if values.get("decay_start", 0) > values["steps"]:
        raise ConfigError(f"{where} 'decay_start' must not exceed 'steps' ({values['steps']})")
    for key in ("data_dir", "output_dir"):
        values[key] = (source.resolve().parent / os.path.expanduser(values[key])).resolve()
    return Recipe(**values)


def learning_rate(recipe: Recipe, step: int) -> float:
    """The rate for step `step`: constant until decay_start, then linear or cosine decay to 0 at `steps`."""
    start = recipe.steps // 2 if recipe.decay_start is None else recipe.decay_start
    if step < start:
        return recipe.lr
    progress = min(1.0, (step - start) / max(1, recipe.steps - start))
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return recipe.lr * (1.0 - progress)


def registry_snippet(recipe: Recipe, weights_path: Path) -> str:
    """The styles-registry entry (docs/styles.md) for the generator `recipe` trains."""
    description = (recipe.description or f"CycleGAN trained from {recipe.data_dir}").replace("\n", " ")
    escaped = description.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'[styles.{recipe.name}]\nweights = "{weights_path}"\ngenerator = "resnet"\ndirection = "AtoB"\n'
        f'ngf = {recipe.ngf}\nn_blocks = {recipe.n_blocks}\nmax_side = {recipe.max_side}\n'
        f'output = "{recipe.output}"\ndescription = "{escaped}"\n'
    )
