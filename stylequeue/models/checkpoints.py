"""Weights files read into plain Python objects, without Paddle and without running pickled code.

A PaddleGAN `.pdparams` file is a pickle (protocol 2-4) of dicts of numpy arrays: `paddle.save` turns
each tensor into an array, or, inside nested dicts, into a `(name, array)` tuple. Plain `pickle.load`
would run whatever callable the file names, so `.pdparams` files go through an unpickler that resolves
only what such files hold: numpy's array and scalar reconstruction, `dtype`, `tuple`, `OrderedDict`
and protocol 2's bytes encoding.
Anything else is refused, naming it. `(name, array)` pairs come back as the arrays.

A PyTorch file (`torch.save`, a zip since PyTorch 1.6, or a `.pth`/`.pt` name) goes through
`torch.load(weights_only=True)`, PyTorch's own restricted unpickler; its tensors come back as arrays.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stylequeue.errors import ConfigError, WeightsError

_TORCH_SUFFIXES = (".pth", ".pt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
# (module, name) a PaddleGAN pickle may name. numpy 2 writes numpy._core, numpy 1 wrote numpy.core.
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "tuple"), ("__builtin__", "tuple"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (older Paddle's default)
})


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that can build numpy arrays and containers, and nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a weights file holds only arrays")
        if module == "__builtin__":  # protocol 2 files written by Python 2
            module = "builtins"
        if module.startswith("numpy.core."):
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return getattr(importlib.import_module(module), name)


def _unwrap(obj: Any) -> Any:
    """paddle.save's `(tensor name, array)` pairs inside nested dicts -> the arrays."""
    if isinstance(obj, Mapping):
        return {key: _unwrap(value) for key, value in obj.items()}
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, list):
        return [_unwrap(value) for value in obj]
    return obj


def read_pickle(path: Path) -> Any:
    """A `.pdparams` file's contents, read with the arrays-only unpickler (no Paddle needed)."""
    try:
        with open(path, "rb") as fh:
            obj = _ArraysOnly(fh).load()
    except Exception as exc:  # a truncated or foreign file raises anything from EOFError to UnicodeError
        raise WeightsError(f"{path}: cannot read as a Paddle .pdparams file: {exc}") from None
    return _unwrap(obj)


def read_torch(path: Path) -> Any:
    """A `torch.save` file's contents with tensors as numpy arrays (needs PyTorch)."""
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"{path} is a PyTorch checkpoint: reading it needs PyTorch, `pip install 'stylequeue[torch]'`"
        ) from None
    try:
        # weights_only refuses arbitrary pickled objects; a CycleGAN state dict needs none.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint: {exc}") from None
    if isinstance(obj, Mapping):
        return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | Path) -> Any:
    """A weights file's contents (Paddle pickle or PyTorch file, told apart by content, then name)."""
    source = Path(path)
    if not source.is_file():
        raise WeightsError(f"weights file {source} not found")
    with open(source, "rb") as fh:
        is_zip = fh.read(4) == _ZIP_MAGIC
    if source.suffix in _TORCH_SUFFIXES or is_zip:
        return read_torch(source)
    return read_pickle(source)
