"""`stylequeue train`: recipes, a tiny CycleGAN run, PaddleGAN-layout checkpoints, resume."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image
from rich.console import Console

from stylequeue.config.styles import parse_registry
from stylequeue.errors import ConfigError
from stylequeue.models.generator import ResnetGenerator
from stylequeue.models.recipe import learning_rate, load_recipe
from stylequeue.models.train import train

TINY = {
    "name": "tiny-ink", "data_dir": "data", "output_dir": "out", "steps": 4, "crop_size": 32, "ngf": 4,
    "n_blocks": 1, "ndf": 4, "checkpoint_every": 1, "log_every": 1, "threads": 1, "seed": 3,
}


def _write_yaml(path: Path, fields: dict[str, object]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def _write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A tiny YAML recipe next to trainA/ (3 images) and trainB/ (2 images, one in a subfolder)."""
    _write_images(tmp_path / "data" / "trainA", 3, seed=1)
    _write_images(tmp_path / "data" / "trainB" / "nested", 2, seed=2)
    return _write_yaml(tmp_path / "tiny.yaml", TINY)


def _quiet() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=120), buffer


def test_two_steps_write_a_paddlegan_checkpoint_that_serves_an_image(recipe: Path) -> None:
    console, output = _quiet()
    result = train(recipe, max_steps=2, console=console)

    assert result.steps_done == 2
    state = paddle.load(str(result.checkpoint_path))
    assert {"netG_A", "netG_B", "netD_A", "netD_B", "optimG", "optimD"} <= set(state)
    assert state["step"] == 2
    assert set(result.losses) == {"G", "D", "cycle", "idt"}

    generator = ResnetGenerator(ngf=4, n_blocks=1)
    assert set(state["netG_A"]) == set(generator.state_dict())
    generator.set_state_dict(state["netG_A"])
    for key, value in generator.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), np.asarray(state["netG_A"][key]))
    generator.eval()
    photo = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 64)).astype(np.float32)
    with paddle.no_grad():
        styled = generator(paddle.to_tensor(photo)).numpy()
    assert styled.shape == (1, 3, 48, 64)
    assert np.abs(styled).max() <= 1.0
    assert not np.allclose(styled, photo)

    # The bare weights file is what a styles registry points at; the printed entry parses as one.
    bare = paddle.load(str(result.weights_path))
    assert set(bare) == set(generator.state_dict())
    registry = recipe.parent / "styles.toml"
    registry.write_text(result.registry_toml)
    spec = parse_registry(registry)["tiny-ink"]
    assert (spec.ngf, spec.n_blocks, spec.direction) == (4, 1, "AtoB")
    assert Path(spec.weights) == result.weights_path
    assert "[styles.tiny-ink]" in output.getvalue()


def test_resume_continues_step_count_and_optimiser_state(recipe: Path) -> None:
    train(recipe, max_steps=2, console=_quiet()[0])
    console, output = _quiet()
    result = train(recipe, max_steps=2, console=console)

    assert result.steps_done == 4
    assert "steps 2 -> 4" in output.getvalue()
    state = paddle.load(str(result.checkpoint_path))
    assert state["step"] == 4
    # Paddle's Adam keeps beta1**(updates + 1): 0.5**5 proves the second call continued the first's
    # moments (a fresh optimiser would be at 0.5**3).
    optim_g = state["optimG"]
    pows = [float(np.asarray(v).ravel()[0]) for k, v in optim_g.items() if k.endswith("beta1_pow_acc_0")]
    assert pows and all(p == pytest.approx(0.5**5) for p in pows)
    assert all(k.startswith(("netG_A.", "netG_B.")) for k in state["optimG"])

    # A finished run resumes to nothing; resume=False starts again from step 0.
    assert train(recipe, console=_quiet()[0]).steps_done == 4
    assert train(recipe, resume=False, max_steps=1, console=_quiet()[0]).steps_done == 1


def test_checkpoint_of_another_architecture_is_refused(recipe: Path) -> None:
    train(recipe, max_steps=1, console=_quiet()[0])
    _write_yaml(recipe, {**TINY, "ngf": 8})
    with pytest.raises(ConfigError, match="netG_A.model.1.weight"):
        train(recipe, max_steps=1, console=_quiet()[0])


def test_amp_on_cpu_is_ignored_with_a_warning(recipe: Path) -> None:
    _write_yaml(recipe, {**TINY, "amp": True, "device": "cpu"})
    with pytest.warns(UserWarning, match="amp"):
        assert train(recipe, max_steps=1, console=_quiet()[0]).steps_done == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"crop_size": 30}, "crop_size"),  # not a multiple of 4
        ({"lr": "fast"}, "lr"),
        ({"steps": 0}, "steps"),
        ({"schedule": "step"}, "schedule"),
        ({"lamda_cycle": 10}, "lamda_cycle"),  # a typo is an unknown field, not silently ignored
        ({"steps": None}, "steps"),  # required, and missing
    ],
)
def test_bad_recipe_names_the_field(tmp_path: Path, change: dict[str, object], field: str) -> None:
    fields = {k: v for k, v in {**TINY, **change}.items() if v is not None}  # None: leave the field out
    path = _write_yaml(tmp_path / "bad.yaml", fields)
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_recipe(path)


def test_missing_images_name_the_data_dir(tmp_path: Path) -> None:
    (tmp_path / "data" / "trainA").mkdir(parents=True)
    path = _write_yaml(tmp_path / "r.yaml", TINY)
    with pytest.raises(ConfigError, match="data_dir.*no images"):
        train(path, console=_quiet()[0])


def test_yaml_and_toml_recipes_read_the_same(tmp_path: Path) -> None:
    yaml_recipe = load_recipe(_write_yaml(tmp_path / "r.yaml", {**TINY, "schedule": "cosine", "lr": 1}))
    toml_path = tmp_path / "r.toml"
    toml_path.write_text(
        'name = "tiny-ink"\ndata_dir = "data"\noutput_dir = "out"\nsteps = 4\ncrop_size = 32\nngf = 4\n'
        'n_blocks = 1\nndf = 4\ncheckpoint_every = 1\nlog_every = 1\nthreads = 1\nseed = 3\n'
        'schedule = "cosine"\nlr = 1.0\n'
    )
    assert tomllib.loads(toml_path.read_text())["lr"] == 1.0
    assert load_recipe(toml_path) == yaml_recipe
    assert yaml_recipe.data_dir == tmp_path / "data"  # relative to the recipe file
    assert (yaml_recipe.lambda_cycle, yaml_recipe.lambda_identity, yaml_recipe.pool_size) == (10.0, 0.5, 50)


def test_learning_rate_is_constant_then_decays_to_zero(tmp_path: Path) -> None:
    linear = load_recipe(_write_yaml(tmp_path / "l.yaml", {**TINY, "steps": 100, "decay_start": 60}))
    assert [learning_rate(linear, s) for s in (0, 59, 60, 80, 100)] == pytest.approx(
        [2e-4, 2e-4, 2e-4, 1e-4, 0.0])
    cosine = load_recipe(_write_yaml(tmp_path / "c.yaml", {**TINY, "steps": 100, "schedule": "cosine"}))
    assert learning_rate(cosine, 49) == pytest.approx(2e-4)
    assert learning_rate(cosine, 75) == pytest.approx(1e-4)
    assert learning_rate(cosine, 100) == pytest.approx(0.0)


def test_shipped_demo_recipe_is_valid() -> None:
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "ink-demo.yaml")
    assert recipe.name == "ink-demo"
    assert recipe.crop_size % 4 == 0 and recipe.max_side <= 512


DEMO_ASSETS = Path(__file__).parents[1] / "stylequeue" / "demo_assets"


def test_demo_photos_are_small_jpegs_with_named_sources() -> None:
    photos = sorted(DEMO_ASSETS.glob("*.jpg"))
    assert 4 <= len(photos) <= 6
    sources = (DEMO_ASSETS / "SOURCES.md").read_text()
    for photo in photos:
        with Image.open(photo) as im:
            assert im.format == "JPEG" and max(im.size) <= 640
        assert photo.stat().st_size < 150_000
        assert f"`{photo.name}`" in sources  # where it came from and its licence


@pytest.mark.parametrize("photo", ["cat.jpg", "coffee.jpg"])
def test_bundled_demo_style_paints_held_out_photos_in_ink(photo: str) -> None:
    from stylequeue.config.styles import BUNDLED_REGISTRY
    from stylequeue.models.inkwash import inkwash

    spec = parse_registry(BUNDLED_REGISTRY)["ink-demo"]
    assert Path(spec.weights).stat().st_size <= 12 * 2**20
    generator = ResnetGenerator(ngf=spec.ngf, n_blocks=spec.n_blocks)
    generator.set_state_dict(paddle.load(spec.weights))
    generator.eval()
    with Image.open(DEMO_ASSETS / photo) as im:
        image = im.convert("RGB").resize((192, 128), Image.Resampling.BICUBIC)
    batch = np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    with paddle.no_grad():
        styled = generator(paddle.to_tensor(batch)).numpy()[0].transpose(1, 2, 0)
    out = Image.fromarray(np.clip((styled + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8))

    def saturation(i: Image.Image) -> float:
        return float(np.asarray(i.convert("HSV"))[..., 1].mean() / 255)

    def luma(i: Image.Image) -> np.ndarray:
        return np.asarray(i.convert("L"), np.float32)

    painted = inkwash(image)  # what the style imitates
    rgb = np.asarray(out, np.float32)
    assert saturation(image) > 0.3 and saturation(out) < 0.2  # colour photo in, monochrome ink out
    assert rgb[..., 0].mean() - rgb[..., 2].mean() > 10  # on warm paper
    # Much closer to the ink painting of the photo than the photo itself is.
    assert np.abs(luma(out) - luma(painted)).mean() < 0.5 * np.abs(luma(image) - luma(painted)).mean()
