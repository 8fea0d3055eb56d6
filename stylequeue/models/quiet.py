"""Keep Paddle's messages that a stylequeue user cannot act on out of their terminal and logs (unless --debug).

What gets hidden, and how:
- glog lines from Paddle's C++ core, e.g. `W1128 ... eager_utils.cc] Paddle static graph(PIR) not support
  input out tensor for now!!!!!`: `GLOG_minloglevel=2` (errors only). glog reads it once, when Paddle's core
  library loads, so `quiet_paddle` must run before `import paddle`; an explicit GLOG_minloglevel wins.
- `UserWarning: No ccache found ...` from paddle.utils.cpp_extension (paddle2onnx and static export import it):
  it is about compiling C++ extensions, which stylequeue never does. A warnings filter.
- `WARNING: OMP_NUM_THREADS set to N, not 1 ...` printed by `import paddle`: the worker sets that variable
  on purpose (one oneDNN thread per core), so `import_paddle_quietly` drops those two lines.
Errors, and every message of stylequeue's own, still show.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings

_OMP_NOTICE = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


def quiet_paddle(debug: bool = False) -> None:
    """Hide Paddle's unactionable warnings in this process and its children; with `debug`, change nothing."""
    if debug:
        return
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)


def import_paddle_quietly() -> None:
    """`import paddle`, without its OMP_NUM_THREADS notice; anything else it prints passes through.

    Nothing happens where Paddle is not installed (a worker serving through another runtime)."""
    if "paddle" in sys.modules:
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            import paddle  # noqa: F401 - imported for its side effect: loaded once, quietly
    except ImportError:
        pass
    finally:
        for line in captured.getvalue().splitlines(keepends=True):
            if not line.startswith(_OMP_NOTICE):
                sys.stderr.write(line)
