"""The generator is PaddleGAN's ResnetGenerator key for key, and behaves like CycleGAN's (models/generator.py)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from stylequeue.models.generator import ResnetGenerator, build_generator
from stylequeue.pipeline.images import MIN_SIDE


def paddlegan_layout(ngf: int, n_blocks: int) -> list[tuple[str, list[int]]]:
    """PaddleGAN's state dict written out by hand from its layer list, in order."""
    c1, c2, c4 = ngf, 2 * ngf, 4 * ngf
    keys: list[tuple[str, list[int]]] = [
        ("model.1.weight", [c1, 3, 7, 7]), ("model.1.bias", [c1]), ("model.2.scale", [c1]), ("model.2.bias", [c1]),
        ("model.4.weight", [c2, c1, 3, 3]), ("model.4.bias", [c2]), ("model.5.scale", [c2]), ("model.5.bias", [c2]),
        ("model.7.weight", [c4, c2, 3, 3]), ("model.7.bias", [c4]), ("model.8.scale", [c4]), ("model.8.bias", [c4]),
    ]
    for block in range(10, 10 + n_blocks):
        for conv, norm in ((1, 2), (5, 6)):
            keys += [
                (f"model.{block}.conv_block.{conv}.weight", [c4, c4, 3, 3]),
                (f"model.{block}.conv_block.{conv}.bias", [c4]),
                (f"model.{block}.conv_block.{norm}.scale", [c4]),
                (f"model.{block}.conv_block.{norm}.bias", [c4]),
            ]
    up = 10 + n_blocks
    keys += [
        (f"model.{up}.weight", [c4, c2, 3, 3]), (f"model.{up}.bias", [c2]),
        (f"model.{up + 1}.scale", [c2]), (f"model.{up + 1}.bias", [c2]),
        (f"model.{up + 3}.weight", [c2, c1, 3, 3]), (f"model.{up + 3}.bias", [c1]),
        (f"model.{up + 4}.scale", [c1]), (f"model.{up + 4}.bias", [c1]),
        (f"model.{up + 7}.weight", [3, c1, 7, 7]), (f"model.{up + 7}.bias", [3]),
    ]
    return keys


def test_nine_block_state_dict_is_paddlegans_key_for_key() -> None:
    expected = paddlegan_layout(64, 9)
    state = ResnetGenerator(ngf=64, n_blocks=9).state_dict()
    assert len(state) == 94 == len(expected)
    assert [(key, list(value.shape)) for key, value in state.items()] == expected
    assert "model.19.weight" in state and "model.26.bias" in state  # PaddleGAN's indices for the last layers


@pytest.mark.parametrize(("ngf", "n_blocks"), [(4, 1), (8, 2), (32, 6)])
def test_other_sizes_follow_the_same_layout(ngf: int, n_blocks: int) -> None:
    state = build_generator("resnet", ngf=ngf, n_blocks=n_blocks).state_dict()
    assert [(key, list(value.shape)) for key, value in state.items()] == paddlegan_layout(ngf, n_blocks)


def test_dropout_shifts_the_second_conv_of_each_block() -> None:
    state = ResnetGenerator(ngf=4, n_blocks=2, use_dropout=True).state_dict()
    assert "model.10.conv_block.6.weight" in state and "model.10.conv_block.7.scale" in state
    assert "model.10.conv_block.5.weight" not in state


def test_unknown_generator_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator("unet")


def _tiny(seed: int = 0) -> ResnetGenerator:
    paddle.seed(seed)
    model = ResnetGenerator(ngf=4, n_blocks=1)
    model.eval()
    return model


def test_output_has_the_input_size_and_range_for_any_multiple_of_four_from_eight() -> None:
    model = _tiny()
    with paddle.no_grad():
        for shape in [(1, 3, 64, 64), (2, 3, 32, 48), (1, 3, MIN_SIDE, MIN_SIDE)]:
            out = model(paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, shape).astype("float32"))).numpy()
            assert out.shape == shape
            assert np.abs(out).max() <= 1.0


def test_batching_changes_nothing() -> None:
    model = _tiny()
    batch = np.random.default_rng(1).uniform(-1, 1, (3, 3, 32, 32)).astype("float32")
    with paddle.no_grad():
        together = model(paddle.to_tensor(batch)).numpy()
        alone = np.concatenate([model(paddle.to_tensor(batch[i : i + 1])).numpy() for i in range(3)])
    assert np.allclose(together, alone, atol=1e-5)


def test_stored_norm_parameters_are_honoured() -> None:
    model = _tiny()
    x = paddle.to_tensor(np.random.default_rng(2).uniform(-1, 1, (1, 3, 16, 16)).astype("float32"))
    with paddle.no_grad():
        before = model(x).numpy()
        state = model.state_dict()
        # The last norm before the output conv: no later instance norm can undo its scale.
        state["model.15.scale"].set_value(np.full([4], 2.0, "float32"))
        model.set_state_dict(state)
        after = model(x).numpy()
    assert not np.allclose(before, after, atol=1e-3)
