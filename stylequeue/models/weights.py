"""Generator weights: read PaddleGAN and original-CycleGAN checkpoints, validate them, import them.

Accepted files (docs/styles.md):
- a bare Paddle generator state dict (`.pdparams`, what `paddle.save(generator.state_dict())` writes);
- a PaddleGAN CycleGAN weights file `{"netG_A", "netG_B", "netD_A", "netD_B"}` (training checkpoints add
  `epoch`, `optimG`, `optimD`): `direction` AtoB takes netG_A, BtoA takes netG_B;
- an original PyTorch CycleGAN `latest_net_G.pth` (48 keys: no instance-norm entries, filled here with
  scale 1 / bias 0). Needs the `stylequeue[torch]` extra.

Reading needs no Paddle (models/checkpoints.py: `.pdparams` pickles through an unpickler that builds
numpy arrays and containers only, `.pth` through `torch.load(weights_only=True)`); so the torch runtime
loads every format on a machine without Paddle. Still, load only files the operator registered or
imported on purpose, never a file a job submitter supplied.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stylequeue.errors import PaddleMissing, WeightsError
from stylequeue.models.checkpoints import read_checkpoint

if TYPE_CHECKING:
    from stylequeue.config.styles import StyleSpec
    from stylequeue.models.generator import ResnetGenerator

Layout = dict[str, tuple[int, ...]]

_DROPPED_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
_BLOCK_RE = re.compile(r"^model\.(\d+)\.conv_block\.")


def expected_layout(ngf: int = 64, n_blocks: int = 9, use_dropout: bool = False) -> Layout:
    """Key -> shape of a PaddleGAN ResnetGenerator state dict, in the generator's own key order."""
    layout: Layout = {}

    def conv(prefix: str, out_c: int, in_c: int, k: int) -> None:
        layout[f"{prefix}.weight"] = (out_c, in_c, k, k)
        layout[f"{prefix}.bias"] = (out_c,)

    def conv_transpose(prefix: str, in_c: int, out_c: int, k: int) -> None:
        # ConvTranspose weights are [in, out, k, k] in Paddle and PyTorch alike.
        layout[f"{prefix}.weight"] = (in_c, out_c, k, k)
        layout[f"{prefix}.bias"] = (out_c,)

    def norm(prefix: str, channels: int) -> None:
        layout[f"{prefix}.scale"] = (channels,)
        layout[f"{prefix}.bias"] = (channels,)

    conv("model.1", ngf, 3, 7)
    norm("model.2", ngf)
    conv("model.4", 2 * ngf, ngf, 3)
    norm("model.5", 2 * ngf)
    conv("model.7", 4 * ngf, 2 * ngf, 3)
    norm("model.8", 4 * ngf)
    second = 6 if use_dropout else 5  # Dropout sits at block index 4 and shifts the second conv
    for block in range(10, 10 + n_blocks):
        conv(f"model.{block}.conv_block.1", 4 * ngf, 4 * ngf, 3)
        norm(f"model.{block}.conv_block.2", 4 * ngf)
        conv(f"model.{block}.conv_block.{second}", 4 * ngf, 4 * ngf, 3)
        norm(f"model.{block}.conv_block.{second + 1}", 4 * ngf)
    up = 10 + n_blocks
    conv_transpose(f"model.{up}", 4 * ngf, 2 * ngf, 3)
    norm(f"model.{up + 1}", 2 * ngf)
    conv_transpose(f"model.{up + 3}", 2 * ngf, ngf, 3)
    norm(f"model.{up + 4}", ngf)
    conv(f"model.{up + 7}", 3, ngf, 7)
    return layout


def infer_architecture(state: Mapping[str, Any]) -> tuple[int, int, bool]:
    """(ngf, n_blocks, use_dropout) of a generator state dict, read from its keys and shapes."""
    first = state.get("model.1.weight")
    if first is None or len(np.shape(first)) != 4:
        sample = ", ".join(list(state)[:4]) or "none"
        raise WeightsError(f"not a CycleGAN ResnetGenerator state dict (no model.1.weight; keys: {sample}, ...)")
    blocks = {int(m.group(1)) for key in state if (m := _BLOCK_RE.match(key))}
    use_dropout = any(key.endswith("conv_block.6.weight") for key in state)
    return int(np.shape(first)[0]), len(blocks), use_dropout


def _select_generator(obj: Any, direction: str, source: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a state dict, found {type(obj).__name__}")
    if "netG_A" in obj or "netG_B" in obj:
        key = "netG_A" if direction == "AtoB" else "netG_B"
        if key not in obj:
            raise WeightsError(f"{source}: direction {direction} needs {key}; the file holds {sorted(obj)}")
        obj = obj[key]
    elif isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: the generator entry is not a state dict")
    return obj


def _normalise(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Strip `module.`, drop norm buffers and metadata, convert values to float32 arrays."""
    state: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key.endswith("@@") or key == "_metadata":
            continue  # paddle.save's name table and the like: metadata, not weights
        name = key.removeprefix("module.")
        if name.endswith(_DROPPED_SUFFIXES):
            continue
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            value = value.numpy()
        state[name] = np.asarray(value, dtype=np.float32)
    return state


def _fill_norms(state: dict[str, np.ndarray], layout: Layout) -> None:
    """A PyTorch file has no norm entries (affine=False): give them PaddleGAN's frozen 1 and 0."""
    if any(key.endswith(".scale") for key in state):
        return
    for key, shape in layout.items():
        if key.endswith(".scale"):
            state[key] = np.ones(shape, np.float32)
            state[key.removesuffix(".scale") + ".bias"] = np.zeros(shape, np.float32)


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def check_layout(state: Mapping[str, np.ndarray], layout: Layout, source: str) -> None:
    """Raise WeightsError naming the first missing key, extra key or shape that differs from `layout`."""
    dropout_in_file = any(key.endswith("conv_block.6.weight") for key in state)
    dropout_expected = any(key.endswith("conv_block.6.weight") for key in layout)
    if dropout_in_file and not dropout_expected:
        raise WeightsError(
            f"{source}: these weights come from a generator trained with dropout (conv_block.6.weight "
            "present); set `use_dropout = true` in the style's registry entry"
        )
    if dropout_expected and not dropout_in_file:
        raise WeightsError(
            f"{source}: the style sets use_dropout = true but these weights have no dropout layout "
            "(no conv_block.6.weight); remove use_dropout"
        )
    try:
        found = "the file looks like ngf={}, n_blocks={}".format(*infer_architecture(state))
    except WeightsError:
        found = "the file is not a ResnetGenerator"
    missing = [key for key in layout if key not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: missing key {missing[0]}{more}; {found}")
    extra = [key for key in state if key not in layout]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"{source}: unexpected key {extra[0]}{more}; {found}")
    for key, shape in layout.items():
        if tuple(state[key].shape) != tuple(shape):
            raise WeightsError(
                f"{source}: {key}: expected shape {_shape(shape)} found {_shape(state[key].shape)}; {found}"
            )


def load_state_dict(
    path: str | Path,
    *,
    direction: str = "AtoB",
    use_dropout: bool = False,
    expected: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Read a weights file into a validated PaddleGAN-layout state dict of float32 arrays.

    Args:
        direction: which generator of a full CycleGAN checkpoint (AtoB -> netG_A, BtoA -> netG_B).
        use_dropout: whether the style declares a dropout generator.
        expected: key -> shape to validate against (`expected_layout(...)` of the style); None
            validates against the architecture inferred from the file itself.
    """
    source = str(path)
    state = _normalise(_select_generator(read_checkpoint(path), direction, source))
    return _validated(state, expected, use_dropout, source)


def _validated(
    state: dict[str, np.ndarray], expected: Mapping[str, Sequence[int]] | None, use_dropout: bool, source: str
) -> dict[str, np.ndarray]:
    if expected is None:
        ngf, n_blocks, _ = infer_architecture(state)
        layout = expected_layout(ngf, n_blocks, use_dropout)
    else:
        layout = {key: tuple(shape) for key, shape in expected.items()}
    _fill_norms(state, layout)
    check_layout(state, layout, source)
    return {key: state[key] for key in layout}


def load_for_spec(spec: StyleSpec) -> dict[str, np.ndarray]:
    """The validated state dict of a registered style (its weights must be a local file)."""
    return load_state_dict(
        spec.weights,
        direction=spec.direction,
        use_dropout=spec.use_dropout,
        expected=expected_layout(spec.ngf, spec.n_blocks, spec.use_dropout),
    )


def load_generator(spec: StyleSpec) -> ResnetGenerator:
    """A `ResnetGenerator` in eval mode holding the style's weights (dygraph; needs Paddle)."""
    try:
        from stylequeue.models.generator import build_generator
    except ImportError:
        raise PaddleMissing() from None
    state = load_for_spec(spec)
    generator = build_generator(spec.generator, ngf=spec.ngf, n_blocks=spec.n_blocks, use_dropout=spec.use_dropout)
    generator.set_state_dict(state)  # type: ignore[arg-type]  # Paddle takes numpy arrays as well
    generator.eval()
    return generator


def import_weights(src: str | Path, dst_path: str | Path, *, direction: str = "AtoB", style: str = "NAME") -> str:
    """Convert any accepted checkpoint into a bare Paddle state dict at `dst_path`.

    Returns the TOML registry entry for it (for `stylequeue models import FILE --style S`).
    """
    try:
        import paddle
    except ImportError:
        raise PaddleMissing() from None
    raw = _normalise(_select_generator(read_checkpoint(src), direction, str(src)))
    ngf, n_blocks, use_dropout = infer_architecture(raw)
    state = _validated(raw, None, use_dropout, str(src))
    target = Path(dst_path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    paddle.save({key: paddle.to_tensor(value) for key, value in state.items()}, str(partial))
    os.replace(partial, target)
    lines = [
        f"[styles.{style}]",
        f"weights = {json.dumps(str(target))}",
        'generator = "resnet"',
        f"ngf = {ngf}",
        f"n_blocks = {n_blocks}",
    ]
    if use_dropout:
        lines.append("use_dropout = true")
    lines += ["max_side = 512", 'output = "jpeg"', f"description = {json.dumps(f'imported from {Path(src).name}')}"]
    return "\n".join(lines) + "\n"
