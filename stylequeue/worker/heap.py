"""The garbage collector's settings for a long-running worker process.

What a worker loads at start-up (the runtime's modules, the models, Celery) is a few hundred thousand
objects that live as long as the process. Left in the collector's oldest generation, each full collection
walks all of them again; on the null-model bulk path that was about a tenth of the worker's CPU (full
collections of 80-130 ms every 2 s). `settle()` collects once, then freezes what is left, so later
collections walk only what was allocated since. It also makes young collections rarer: a job's objects
(its record, its timings, its futures) mostly die within one group, and a collection every few hundred
allocations promotes many of them to older generations while they are still in use, which is what makes
full collections come so often.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("stylequeue.worker")

# Allocations (net of deallocations) between young collections; Python's default is 700.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once start-up has loaded everything long-lived (models, connections, threads)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.debug("heap settled: %d objects frozen", gc.get_freeze_count())
