"""The torch runtime computes what Paddle's dygraph does, from every weights format, without Paddle
(models/torch_runtime.py, models/torch_generator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from stylequeue.config.styles import StyleSpec, parse_registry
from stylequeue.errors import ConfigError
from stylequeue.models import runtime_backends as backends
from stylequeue.models.generator import ResnetGenerator
from stylequeue.models.runtime import PSNR_GATE_DB, build_runtime, probe_input, psnr_db, select_runtime
from stylequeue.pipeline.images import from_model_output, to_model_input

torch = pytest.importorskip("torch", reason="PyTorch is not installed: `make torch` or pip install 'stylequeue[torch]'")


def _paddle_state(seed: int, ngf: int = 4, n_blocks: int = 2) -> dict[str, np.ndarray]:
    paddle.seed(seed)
    # Non-trivial norm parameters, so a wrong scale/weight mapping could not pass unnoticed.
    state = {k: v.numpy() for k, v in ResnetGenerator(ngf=ngf, n_blocks=n_blocks).state_dict().items()}
    rng = np.random.default_rng(seed)
    for key in state:
        if key.endswith(".scale"):
            state[key] = rng.uniform(0.5, 1.5, state[key].shape).astype(np.float32)
    return state


def _spec(directory: Path, weights: str, *, direction: str = "AtoB", ngf: int = 4, n_blocks: int = 2) -> StyleSpec:
    registry = directory / f"styles-{direction}.toml"
    registry.write_text(f'[styles.s]\nweights = "{weights}"\nngf = {ngf}\nn_blocks = {n_blocks}\n'
                        f'direction = "{direction}"\nmax_side = 64\n')
    return parse_registry(registry)["s"]


def _same_as_dygraph(spec: StyleSpec, cache_dir: Path, precision: str = "fp32") -> float:
    x = np.concatenate([probe_input(48, seed=1), probe_input(48, seed=2)])
    reference = build_runtime("dygraph", "fp32", spec, device="cpu", cache_dir=cache_dir).run(x)
    runtime = build_runtime("torch", precision, spec, device="cpu", cache_dir=cache_dir)
    assert (runtime.name, runtime.precision) == ("torch", precision)
    out = runtime.run(x)
    assert out.shape == x.shape and out.dtype == np.float32
    return psnr_db(reference, out)


def test_a_bare_paddle_state_dict(tmp_path: Path) -> None:
    paddle.save(_paddle_state(1), str(tmp_path / "g.pdparams"))
    assert _same_as_dygraph(_spec(tmp_path, "g.pdparams"), tmp_path) > 90.0


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_a_full_cyclegan_checkpoint_in_either_direction(tmp_path: Path, direction: str) -> None:
    g_a, g_b = _paddle_state(1), _paddle_state(2)
    paddle.save({"netG_A": {k: paddle.to_tensor(v) for k, v in g_a.items()}, "netG_B": g_b, "netD_A": {},
                 "netD_B": {}, "epoch": 7, "optimG": {"lr": 0.0002}}, str(tmp_path / "cyclegan.pdparams"))
    spec = _spec(tmp_path, "cyclegan.pdparams", direction=direction)
    assert _same_as_dygraph(spec, tmp_path) > 90.0
    other = _spec(tmp_path, "cyclegan.pdparams", direction="BtoA" if direction == "AtoB" else "AtoB")
    x = probe_input(32)
    mine = build_runtime("torch", "fp32", spec, device="cpu", cache_dir=tmp_path).run(x)
    theirs = build_runtime("torch", "fp32", other, device="cpu", cache_dir=tmp_path).run(x)
    assert psnr_db(mine, theirs) < 40.0  # each direction really is its own generator


def test_an_original_cyclegan_pth(tmp_path: Path) -> None:
    from tests.test_weights import _torch_cyclegan_generator

    torch.manual_seed(0)
    original = _torch_cyclegan_generator(torch, ngf=4, n_blocks=2).eval()
    torch.save(original.state_dict(), tmp_path / "latest_net_G.pth")
    spec = _spec(tmp_path, "latest_net_G.pth")
    assert _same_as_dygraph(spec, tmp_path) > 90.0
    x = probe_input(32)
    with torch.no_grad():
        expected = original(torch.from_numpy(x)).numpy()
    got = build_runtime("torch", "fp32", spec, device="cpu", cache_dir=tmp_path).run(x)
    assert psnr_db(expected, got) > 90.0


def test_bf16_on_a_cpu_passes_the_gate(tmp_path: Path) -> None:
    if not backends.cpu_has_bf16():
        pytest.skip("this CPU has neither avx512_bf16 nor amx_bf16")
    paddle.save(_paddle_state(3), str(tmp_path / "g.pdparams"))
    assert PSNR_GATE_DB <= _same_as_dygraph(_spec(tmp_path, "g.pdparams"), tmp_path, "bf16") < 90.0


def test_pixels_in_and_out_match_the_float_path(tmp_path: Path) -> None:
    paddle.save(_paddle_state(4), str(tmp_path / "g.pdparams"))
    runtime = build_runtime("torch", "fp32", _spec(tmp_path, "g.pdparams"), device="cpu", cache_dir=tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    expected = from_model_output(runtime.run(to_model_input(pixels)))
    finish = runtime.start(pixels)  # the batcher's split call
    got = finish()
    assert got.shape == pixels.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1  # rounding of values a hair from .5 only
    assert np.array_equal(runtime.run_pixels(pixels), got)
    assert runtime.warm(8, 32, 48) == 0.0  # nothing to compile on a CPU
    with pytest.raises(ValueError, match="uint8"):
        runtime.run_pixels(pixels.astype(np.float32))


def test_requests_the_cpu_cannot_meet(tmp_path: Path) -> None:
    paddle.save(_paddle_state(5), str(tmp_path / "g.pdparams"))
    spec = _spec(tmp_path, "g.pdparams")
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        select_runtime(spec, runtime="torch", precision="fp16", cache_dir=tmp_path)
    exported = tmp_path / "exported"
    exported.mkdir()
    with pytest.raises(ConfigError, match="torch needs a weights file"):
        build_runtime("torch", "fp32", _spec(tmp_path, "exported"), device="cpu", cache_dir=tmp_path)


def test_auto_without_paddle_measures_against_torch_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paddle.save(_paddle_state(6), str(tmp_path / "g.pdparams"))
    spec = _spec(tmp_path, "g.pdparams")
    real = backends.runtime_installed
    monkeypatch.setattr(backends, "runtime_installed", lambda name: real(name) and name not in (
        "dygraph", "paddle-inference", "openvino", "onnxruntime"))
    selection = select_runtime(spec, cache_dir=tmp_path)
    rows = selection.info["candidates"]
    assert (rows[0]["runtime"], rows[0]["precision"], rows[0]["reference"]) == ("torch", "fp32", True)
    assert selection.runtime.name == "torch"
    assert [r["runtime"] for r in rows[1:] if r["ok"]] == ["torch"] * (2 if backends.cpu_has_bf16() else 1)


def test_serves_with_paddle_unimportable(tmp_path: Path) -> None:
    """What a GPU machine with PyTorch alone does: read .pdparams and run, with `import paddle` failing."""
    state = _paddle_state(7)
    paddle.save({"netG_A": state, "netG_B": _paddle_state(8)}, str(tmp_path / "ckpt.pdparams"))
    spec = _spec(tmp_path, "ckpt.pdparams")
    x = probe_input(32)
    expected = build_runtime("dygraph", "fp32", spec, device="cpu", cache_dir=tmp_path).run(x)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys; sys.modules['paddle'] = None\n"
        "import numpy as np\n"
        "from stylequeue.config.styles import parse_registry\n"
        "from stylequeue.models.runtime import select_runtime\n"
        f"spec = parse_registry({str(tmp_path / 'styles-AtoB.toml')!r})['s']\n"
        f"selection = select_runtime(spec, cache_dir={str(tmp_path / 'cache')!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, selection.runtime.run(np.load({str(tmp_path / 'x.npy')!r})))\n"
        "print(selection.runtime.name, selection.info['candidates'][0]['runtime'], 'paddle' in sys.modules and "
        "sys.modules['paddle'] is not None)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["torch", "torch", "False"]
    assert psnr_db(expected, np.load(tmp_path / "out.npy")) >= PSNR_GATE_DB


def test_a_pinned_worker_finds_its_gpu_at_cuda_0(monkeypatch: pytest.MonkeyPatch) -> None:
    from stylequeue.models.torch_runtime import _visible_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what `worker --device gpu:3` sets before torch starts
    assert _visible_index(3) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert (_visible_index(5), _visible_index(2)) == (1, 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_index(1) == 1
