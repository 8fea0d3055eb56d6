"""Reading PaddleGAN and original-CycleGAN checkpoints, validating them, importing them (models/weights.py)."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import paddle
import pytest

from stylequeue.config.styles import parse_registry
from stylequeue.errors import ConfigError, WeightsError
from stylequeue.models.generator import ResnetGenerator
from stylequeue.models.weights import (
    expected_layout,
    import_weights,
    infer_architecture,
    load_for_spec,
    load_generator,
    load_state_dict,
)


def _state(ngf: int = 4, n_blocks: int = 1, seed: int = 0, use_dropout: bool = False) -> dict[str, np.ndarray]:
    paddle.seed(seed)
    model = ResnetGenerator(ngf=ngf, n_blocks=n_blocks, use_dropout=use_dropout)
    return {key: value.numpy() for key, value in model.state_dict().items()}


def _torch_layout(state: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """What the original PyTorch CycleGAN saves: conv entries only, plus stale norm buffers in old files."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, value in state.items():
        if key.endswith(".scale"):
            norm = key.removesuffix(".scale")
            out[f"{norm}.running_mean"] = np.zeros_like(value)
            out[f"{norm}.running_var"] = np.ones_like(value)
            out[f"{norm}.num_batches_tracked"] = np.array(0, dtype=np.int64)
        elif not (key.endswith(".bias") and f"{key.removesuffix('.bias')}.scale" in state):
            out[key] = value
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_layout_helper_agrees_with_the_generator() -> None:
    for ngf, n_blocks, dropout in [(4, 1, False), (8, 3, True), (64, 9, False)]:
        model = ResnetGenerator(ngf=ngf, n_blocks=n_blocks, use_dropout=dropout)
        layout = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert list(layout.items()) == list(expected_layout(ngf, n_blocks, dropout).items())


def test_bare_paddle_state_dict(tmp_path: Path) -> None:
    state = _state()
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp_path / "g.pdparams"))
    loaded = load_state_dict(tmp_path / "g.pdparams", expected=expected_layout(4, 1))
    assert _same(loaded, state)


def test_paddlegan_checkpoint_picks_the_generator_by_direction(tmp_path: Path) -> None:
    g_a, g_b = _state(seed=1), _state(seed=2)
    checkpoint = {"netG_A": g_a, "netG_B": g_b, "netD_A": {"x": np.zeros(2)}, "netD_B": {"x": np.zeros(2)},
                  "epoch": 200, "optimG": {"lr": 0.0002}, "optimD": {"lr": 0.0002}}
    paddle.save(checkpoint, str(tmp_path / "cyclegan.pdparams"))
    assert _same(load_state_dict(tmp_path / "cyclegan.pdparams", direction="AtoB"), g_a)
    assert _same(load_state_dict(tmp_path / "cyclegan.pdparams", direction="BtoA"), g_b)


def test_checkpoint_without_the_requested_generator(tmp_path: Path) -> None:
    paddle.save({"netG_A": _state()}, str(tmp_path / "half.pdparams"))
    with pytest.raises(WeightsError, match="direction BtoA needs netG_B"):
        load_state_dict(tmp_path / "half.pdparams", direction="BtoA")


def test_pytorch_layout_fills_norms_and_drops_buffers(tmp_path: Path) -> None:
    state = _state(ngf=4, n_blocks=9)
    torch_like = _torch_layout(state)
    assert sum(1 for key in torch_like if key.endswith((".weight", ".bias"))) == 48
    paddle.save(dict(torch_like), str(tmp_path / "latest_net_G.pdparams"))
    loaded = load_state_dict(tmp_path / "latest_net_G.pdparams", expected=expected_layout(4, 9))
    assert len(loaded) == 94 and _same(loaded, state)  # the tiny generator's norms are 1 and 0 too
    assert np.array_equal(loaded["model.2.scale"], np.ones(4)) and np.array_equal(loaded["model.2.bias"], np.zeros(4))


def test_module_prefix_is_stripped(tmp_path: Path) -> None:
    state = _state()
    paddle.save({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "dp.pdparams"))
    assert _same(load_state_dict(tmp_path / "dp.pdparams"), state)


def test_wrong_ngf_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    paddle.save(_state(ngf=4), str(tmp_path / "g.pdparams"))
    with pytest.raises(WeightsError) as info:
        load_state_dict(tmp_path / "g.pdparams", expected=expected_layout(8, 1))
    message = str(info.value)
    assert "model.1.weight: expected shape [8, 3, 7, 7] found [4, 3, 7, 7]" in message
    assert "ngf=4, n_blocks=1" in message


def test_fewer_blocks_than_declared_names_the_first_missing_key(tmp_path: Path) -> None:
    paddle.save(_state(n_blocks=1), str(tmp_path / "g.pdparams"))
    with pytest.raises(WeightsError, match=r"missing key model\.11\.conv_block\.1\.weight"):
        load_state_dict(tmp_path / "g.pdparams", expected=expected_layout(4, 2))


def test_more_blocks_than_declared_says_what_the_file_holds(tmp_path: Path) -> None:
    paddle.save(_state(n_blocks=2), str(tmp_path / "g.pdparams"))
    with pytest.raises(WeightsError, match=r"missing key model\.11\.weight .*looks like ngf=4, n_blocks=2"):
        load_state_dict(tmp_path / "g.pdparams", expected=expected_layout(4, 1))


def test_an_extra_key_is_named(tmp_path: Path) -> None:
    paddle.save(_state() | {"model.99.weight": np.zeros((2, 2), "float32")}, str(tmp_path / "g.pdparams"))
    with pytest.raises(WeightsError, match=r"unexpected key model\.99\.weight"):
        load_state_dict(tmp_path / "g.pdparams", expected=expected_layout(4, 1))


def test_dropout_weights_are_refused_unless_declared(tmp_path: Path) -> None:
    state = _state(n_blocks=2, use_dropout=True)
    paddle.save(state, str(tmp_path / "drop.pdparams"))
    with pytest.raises(WeightsError, match="set `use_dropout = true`"):
        load_state_dict(tmp_path / "drop.pdparams", expected=expected_layout(4, 2))
    with pytest.raises(WeightsError, match="use_dropout = true"):
        load_state_dict(tmp_path / "drop.pdparams")
    loaded = load_state_dict(tmp_path / "drop.pdparams", use_dropout=True, expected=expected_layout(4, 2, True))
    assert _same(loaded, state)
    paddle.save(_state(n_blocks=2), str(tmp_path / "plain.pdparams"))
    with pytest.raises(WeightsError, match="remove use_dropout"):
        load_state_dict(tmp_path / "plain.pdparams", use_dropout=True)


def test_infer_architecture() -> None:
    assert infer_architecture(_state(ngf=8, n_blocks=3)) == (8, 3, False)
    assert infer_architecture(_torch_layout(_state(ngf=4, n_blocks=2))) == (4, 2, False)
    assert infer_architecture(_state(ngf=4, n_blocks=2, use_dropout=True)) == (4, 2, True)
    with pytest.raises(WeightsError, match="not a CycleGAN ResnetGenerator"):
        infer_architecture({"fc.weight": np.zeros((2, 2))})


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "nope.pdparams")
    (tmp_path / "junk.pdparams").write_bytes(b"definitely not a pickle")
    with pytest.raises(WeightsError, match="cannot read"):
        load_state_dict(tmp_path / "junk.pdparams")
    paddle.save([1, 2, 3], str(tmp_path / "list.pdparams"))
    with pytest.raises(WeightsError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pdparams")


def test_pth_without_torch_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "latest_net_G.pth").write_bytes(b"PK\x03\x04 not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ConfigError, match=r"stylequeue\[torch\]"):
        load_state_dict(tmp_path / "latest_net_G.pth")


def test_import_writes_a_bare_state_dict_and_a_registry_entry(tmp_path: Path) -> None:
    g_a, g_b = _state(ngf=8, n_blocks=2, seed=1), _state(ngf=8, n_blocks=2, seed=2)
    paddle.save({"netG_A": g_a, "netG_B": g_b}, str(tmp_path / "cyclegan.pdparams"))
    snippet = import_weights(tmp_path / "cyclegan.pdparams", tmp_path / "out" / "b2a.pdparams",
                             direction="BtoA", style="reverse")
    registry = tmp_path / "styles.toml"
    registry.write_text(snippet)
    spec = parse_registry(registry)["reverse"]
    assert (spec.ngf, spec.n_blocks, spec.use_dropout) == (8, 2, False)
    assert _same(load_for_spec(spec), g_b)
    raw = paddle.load(str(tmp_path / "out" / "b2a.pdparams"))
    assert sorted(raw) == sorted(g_b)  # bare: no netG_* wrapper


def test_import_of_a_dropout_generator_declares_it(tmp_path: Path) -> None:
    paddle.save(_state(n_blocks=1, use_dropout=True), str(tmp_path / "d.pdparams"))
    snippet = import_weights(tmp_path / "d.pdparams", tmp_path / "d2.pdparams", style="d")
    assert "use_dropout = true" in snippet


def test_load_generator_holds_the_weights(tiny_registry: Path) -> None:
    spec = parse_registry(tiny_registry)["tiny"]
    model = load_generator(spec)
    assert not model.training
    stored = paddle.load(spec.weights)
    assert np.array_equal(model.state_dict()["model.1.weight"].numpy(), stored["model.1.weight"].numpy())


# --- the original PyTorch CycleGAN -----------------------------------------------------------------


def _torch_cyclegan_generator(torch: object, ngf: int, n_blocks: int) -> object:
    """The original CycleGAN ResnetGenerator (affine-free instance norm, reflect padding), written for this test."""
    nn = torch.nn  # type: ignore[attr-defined]

    class Block(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.conv_block = nn.Sequential(
                nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
                nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim),
            )

        def forward(self, x: object) -> object:
            return x + self.conv_block(x)

    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    channels = ngf
    for _ in range(2):
        layers += [nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * channels),
                   nn.ReLU(True)]
        channels *= 2
    layers += [Block(channels) for _ in range(n_blocks)]
    for _ in range(2):
        layers += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.InstanceNorm2d(channels // 2), nn.ReLU(True)]
        channels //= 2
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]

    class Generator(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(*layers)

        def forward(self, x: object) -> object:
            return self.model(x)

    return Generator()


def test_real_pytorch_checkpoint_loads_and_computes_the_same(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = _torch_cyclegan_generator(torch, ngf=4, n_blocks=2).eval()  # type: ignore[attr-defined]
    state = reference.state_dict()
    assert len(state) == 20  # 10 convs, weight + bias each (24 convs = 48 keys at 9 blocks)
    state["model.2.num_batches_tracked"] = torch.tensor(0)  # what very old files carry
    torch.save(state, tmp_path / "latest_net_G.pth")

    loaded = load_state_dict(tmp_path / "latest_net_G.pth", expected=expected_layout(4, 2))
    model = ResnetGenerator(ngf=4, n_blocks=2)
    model.set_state_dict(loaded)
    model.eval()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 24)).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        got = model(paddle.to_tensor(x)).numpy()
    assert np.abs(got - expected).max() < 1e-4

    torch.save(state, tmp_path / "renamed.pdparams")  # recognised by content, not by name
    assert _same(load_state_dict(tmp_path / "renamed.pdparams"), loaded)

    snippet = import_weights(tmp_path / "latest_net_G.pth", tmp_path / "ink.pdparams", style="ink")
    assert "ngf = 4" in snippet and "n_blocks = 2" in snippet
