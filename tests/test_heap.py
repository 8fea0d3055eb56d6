"""worker/heap.py: what start-up loaded is frozen out of the collector's sight, and young collections are rarer."""

from __future__ import annotations

import subprocess
import sys


def test_settle_freezes_what_is_loaded_and_keeps_collecting_new_cycles() -> None:
    # In a process of its own: freezing is process-wide.
    script = """
import gc, weakref
from stylequeue.worker import heap
import stylequeue.worker.execution  # something sizeable loaded before, as a worker has
heap.settle()
frozen = gc.get_freeze_count()
assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD, gc.get_threshold()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after settling is still collected
gone = weakref.ref(a)
del a, b
gc.collect()
print(frozen, gone() is None)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 10_000 and out[1] == "True", out
