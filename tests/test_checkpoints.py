"""Weights files are read without Paddle and without running pickled code (models/checkpoints.py)."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import paddle
import pytest

from stylequeue.errors import WeightsError
from stylequeue.models.checkpoints import read_checkpoint


class _Boom:
    """What a hostile pickle does: run a command while loading."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_paddle_save_files_come_back_as_plain_arrays(tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    nested = {"netG_A": {"model.1.weight": paddle.to_tensor(weight)}, "epoch": np.int64(3),
              "optimG": OrderedDict(lr=np.float32(0.5))}
    paddle.save(nested, str(tmp_path / "c.pdparams"))  # tensors in nested dicts: (name, array) pairs
    paddle.save({"model.1.weight": paddle.to_tensor(weight)}, str(tmp_path / "s.pdparams"))
    loaded = read_checkpoint(tmp_path / "c.pdparams")
    assert isinstance(loaded["netG_A"]["model.1.weight"], np.ndarray)
    assert np.array_equal(loaded["netG_A"]["model.1.weight"], weight) and int(loaded["epoch"]) == 3
    assert np.array_equal(read_checkpoint(tmp_path / "s.pdparams")["model.1.weight"], weight)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    for protocol in (2, 4):
        path = tmp_path / f"evil{protocol}.pdparams"
        path.write_bytes(pickle.dumps({"model.1.weight": _Boom()}, protocol=protocol))
        with pytest.raises(WeightsError, match="refusing to load (posix|os).system"):
            read_checkpoint(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_numpy_1_pickles_still_load(tmp_path: Path) -> None:
    data = pickle.dumps({"w": np.ones(3, np.float32)}, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # what numpy 1.x wrote
    (tmp_path / "old.pdparams").write_bytes(legacy)
    assert np.array_equal(read_checkpoint(tmp_path / "old.pdparams")["w"], np.ones(3))
