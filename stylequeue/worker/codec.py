"""Where bulk jobs are fetched, decoded, encoded and stored: a pool of codec processes.

The worker's main process runs Celery, the job store, the batcher and the model. Decoding an input
and encoding an output is Python-level work (Pillow, numpy) that holds the GIL, so in threads it
queues behind everything else and adds GIL hand-offs to every job. Bulk groups therefore go to
this pool instead: `load` reads and prepares a group's inputs, `stage` renders its outputs and
writes each to an attempt-specific temporary object (see worker/execution.py, fenced writes) and, for items
that carry a `Fence`, fences them in the job store and promotes those this attempt still holds, so a bulk
group's whole finishing but the final `succeeded` costs the worker one round trip; `promote` moves fenced
outputs into place. Each runs in a child process with its own `Storage` (and, once it fences, its own
connection to the job store). Interactive jobs stay
on the executor's threads: a single image should not wait behind queued bulk groups, nor pay the round trip.

Each child has its own pipe, and the job thread that checked it out talks to it directly: no
manager or feeder thread in the worker process stands between a group and its child.
A child that dies (a decoder crashing on a hostile file) is replaced, and its group retried one
job at a time, so the job that kills a child again fails alone. A group past `timeout_s` fails
this attempt with `timeout` (transient) and its child is replaced. Children exit when their pipe
closes, so a worker killed with SIGKILL leaves none behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from stylequeue.config.settings import Settings
from stylequeue.config.styles import StyleSpec
from stylequeue.errors import InternalError, InvalidInput, JobError, JobTimeout
from stylequeue.worker import heap

log = logging.getLogger("stylequeue.worker")



@dataclass(frozen=True)
class LoadItem:
    """Fetch and prepare one input."""

    input_uri: str
    spec: StyleSpec
    max_pixels: int


@dataclass(frozen=True)
class Fence:
    """What the owner check of one staged output needs (the job store's FENCE), so that the child which staged
    it can fence and promote it in the same call: `results` are the record's results as the worker knows them;
    the child adds `output_bytes` and the `store` timing."""

    job_id: str
    attempt: int
    owner: str
    lease_s: float
    results: dict[str, Any]


@dataclass(frozen=True)
class StageItem:
    """Render one output and stage it beside `output_uri` (attempt `tag`); with `fence`, also fence it and, if
    this attempt still holds the job, promote it."""

    output_uri: str
    pixels: np.ndarray
    spec: StyleSpec
    tag: str
    fence: Fence | None = None


@dataclass(frozen=True)
class PromoteItem:
    """Move a fenced, staged output into place."""

    staged_uri: str
    output_uri: str


@dataclass(frozen=True)
class Staged:
    """Where an output was staged and how many bytes it has; for an item staged with a `Fence`, what came of it.

    `fenced`: None when the child did not fence it (not asked, or the job store did not answer: the worker
    fences it then), True when this attempt holds the job and the output is fenced, False when the attempt
    lost the job (the staged copy is deleted). `promote_error`: for a fenced output, the error that kept it
    from being promoted (the job's next claim finishes the promotion), or None once it is in place.
    """

    staged_uri: str
    size: int
    fenced: bool | None = None
    promote_error: JobError | None = None


@dataclass(frozen=True)
class Done:
    """One item's outcome and the seconds it took: a `Prepared` (load), a `Staged` (stage), None (promote),
    or the JobError that ended it."""

    value: Any
    seconds: float = 0.0

    @property
    def error(self) -> JobError | None:
        return self.value if isinstance(self.value, JobError) else None


# spawn, not fork: the worker already runs threads (Celery, Redis, the batcher).
_CONTEXT = multiprocessing.get_context("spawn")
# Buffers one writev may take (the usual IOV_MAX); a message has two more than it has arrays.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


def _send(conn: Connection, message: Any) -> None:
    """Send a message whose pixel arrays travel as raw bytes beside the pickle, not inside it.

    Pickle protocol 5 hands numpy's buffers out of band; they follow the pickle, written straight from the
    arrays' memory with one `writev` (no joined copy). Framing: the byte count of the rest, then the pickle's
    size, the buffer count and each buffer's size (unsigned 64-bit, little-endian), the pickle, the buffers.
    A group of 128 images is about 1.5 MB each way: `Connection.send_bytes`/`recv_bytes` copied it three
    more times between them, and the copies held the GIL.
    """
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [buffer.raw() for buffer in buffers]
    sizes = [raw.nbytes for raw in raws]
    rest = 8 * (2 + len(raws)) + len(body) + sum(sizes)
    head = struct.pack(f"<{3 + len(raws)}Q", rest, len(body), len(raws), *sizes)
    _write_all(conn.fileno(), [memoryview(head), memoryview(body), *raws])


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write every byte of `views` in order (a blocking descriptor may still take only part of a writev)."""
    pending = [view for view in views if view.nbytes]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while pending and written >= pending[0].nbytes:
            written -= pending.pop(0).nbytes
        if written:
            pending[0] = pending[0][written:]


def _recv(conn: Connection) -> Any:
    """What `_send` sent, read into one buffer; its arrays are views of that buffer (no further copy)."""
    fd = conn.fileno()
    (rest,) = struct.unpack("<Q", _read_exactly(fd, 8))
    data = memoryview(_read_exactly(fd, rest))
    body_size, count = struct.unpack_from("<2Q", data)
    sizes = struct.unpack_from(f"<{count}Q", data, 16)
    position = 16 + 8 * count
    body = data[position:position + body_size]
    position += body_size
    buffers = []
    for size in sizes:
        buffers.append(data[position:position + size])
        position += size
    return pickle.loads(body, buffers=buffers)


def _read_exactly(fd: int, size: int) -> bytearray:
    """`size` bytes from `fd`; EOFError when the other end closes first (it died)."""
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        count = os.readv(fd, [view[got:]])
        if count == 0:
            raise EOFError("the other end of the codec pipe closed")
        got += count
    return data


def default_processes() -> int:
    """Codec processes when not configured: one per core up to 4; none on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 2 else min(4, cores)


@dataclass
class _Child:
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection


class CodecPool:
    """`processes` child processes that load and store groups of jobs.

    Args:
        settings: the worker's settings (each child builds its own Storage from them).
        processes: how many children.
        timeout_s: the longest a group may take; its jobs then fail this attempt with `timeout`.
    """

    def __init__(self, settings: Settings, processes: int, *, timeout_s: float) -> None:
        if processes < 1:
            raise ValueError("a codec pool needs at least one process")
        self.settings = settings
        self.processes = processes
        self.timeout_s = timeout_s
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._children: list[_Child] = []
        for _ in range(processes):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Child:
        ours, theirs = _CONTEXT.Pipe()
        process = _CONTEXT.Process(target=_child_main, args=(theirs, self.settings), name="stylequeue-codec",
                                   daemon=True)
        process.start()
        theirs.close()
        child = _Child(process, ours)
        self._children.append(child)
        return child

    def warm(self) -> None:
        """Wait until every child has started (imports take a moment), so the first group does not."""
        children = [self._idle.get() for _ in range(self.processes)]
        try:
            for child in children:
                _send(child.conn, (_child_ping, None))
            for child in children:
                if not child.conn.poll(120):
                    raise TimeoutError("a codec process did not start within 120 s")
                _recv(child.conn)
        finally:
            for child in children:
                self._idle.put(child)

    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children if child.process.is_alive()]

    def close(self) -> None:
        for child in self._children:
            try:
                _send(child.conn, None)  # stop
            except OSError:
                pass
        for child in self._children:
            child.process.join(5)
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(5)
            child.conn.close()
        self._children.clear()

    # --- the two calls ------------------------------------------------------------------------

    def load(self, items: Sequence[LoadItem]) -> list[Done]:
        """Fetch and prepare each input: a `Prepared` per job, or its JobError."""
        return self._call(_child_load, list(items), crashed="the image crashed the decoder")

    def stage(self, items: Sequence[StageItem]) -> list[Done]:
        """Render and stage each output: a `Staged` per job, or its JobError."""
        return self._call(_child_stage, list(items), crashed="a codec process died while encoding this output")

    def promote(self, items: Sequence[PromoteItem]) -> list[Done]:
        """Promote each fenced output: None per job, or its JobError (the calls to a remote store overlap)."""
        return self._call(_child_promote, list(items), crashed="a codec process died while promoting this output")

    def _call(self, function: Callable[[list[Any]], list[Done]], items: list[Any], *, crashed: str) -> list[Done]:
        """Run `function(items)` in a free child; one outcome per item, whatever happens to the child."""
        if not items:
            return []
        taken = self._idle.get()
        child: _Child | None = taken  # None once it was replaced: nothing to give back then
        try:
            _send(taken.conn, (function, items))
            if not taken.conn.poll(self.timeout_s):
                self._replace(taken)
                child = None
                error = JobTimeout(f"decoding or encoding took longer than {self.timeout_s:g} s")
                return [Done(error, self.timeout_s)] * len(items)
            outcomes: list[Done] = _recv(taken.conn)
            return outcomes
        except (EOFError, OSError):  # the child died
            self._replace(taken)
            child = None
            if len(items) == 1:
                log.warning("a codec process died on one job: %s", crashed)
                return [Done(InvalidInput(crashed) if function is _child_load else InternalError(crashed))]
            # Some job in this group killed the child: one at a time now, so that one fails alone.
            return [self._call(function, [item], crashed=crashed)[0] for item in items]
        finally:
            if child is not None:
                self._idle.put(child)

    def _replace(self, child: _Child) -> None:
        """End a dead or stuck child and put a new one in its place."""
        log.warning("codec process %s stopped or hung; starting a new one", child.process.pid)
        if child.process.is_alive():
            child.process.kill()
        child.process.join(5)
        child.conn.close()
        self._children.remove(child)
        self._idle.put(self._spawn())


# --- the children -------------------------------------------------------------------------------

_storage: Any = None
_settings: Settings | None = None
_store: Any = None  # this child's RedisJobStore, made at its first fence
_io: ThreadPoolExecutor | None = None
_gpu_decode: str | None = None  # the CUDA device large JPEGs decode on (pipeline/gpu_decode.py), if any
# The worker that started this child. A worker killed with `kill -9` leaves its children running: one in the middle
# of a group would go on staging outputs for jobs that other workers have meanwhile taken over and finished, and
# nothing would ever delete those copies. So each write first checks that its worker is still the parent.
_parent: int | None = None


def _worker_alive() -> bool:
    return _parent is None or os.getppid() == _parent


def _child_main(conn: Connection, settings: Settings) -> None:
    from stylequeue.pipeline import gpu_decode
    from stylequeue.pipeline.storage import Storage

    global _storage, _settings, _io, _gpu_decode, _parent
    _parent = os.getppid()
    _settings = settings
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    _storage = Storage(settings, max_pool_connections=16)
    _io = ThreadPoolExecutor(8, thread_name_prefix="codec-io")
    if settings.device != "cpu" and gpu_decode.available("cuda:0"):
        _gpu_decode = "cuda:0"  # the worker pinned its one GPU (CUDA_VISIBLE_DEVICES): it is cuda:0 here
    heap.settle()
    while True:
        try:
            request = _recv(conn)
        except (EOFError, OSError):  # the worker is gone
            return
        if request is None:
            return
        function, items = request
        try:
            outcomes = function(items)
        except Exception as exc:  # the functions catch per item; this is a last resort
            outcomes = [Done(_as_job_error(exc))] * len(items)
        try:
            _send(conn, outcomes)
        except OSError:  # the worker is gone
            return


def _child_ping(_: object) -> int:
    return os.getpid()


def _as_job_error(exc: Exception) -> JobError:
    return exc if isinstance(exc, JobError) else InternalError(f"{type(exc).__name__}: {exc}")


def _remote(uri: str) -> bool:
    return not uri.startswith("file:")


def _read_one(uri: str) -> bytes | JobError:
    try:
        data: bytes = _storage.read(uri)
        return data
    except Exception as exc:
        return _as_job_error(exc)


def _child_load(items: list[LoadItem]) -> list[Done]:
    from stylequeue.pipeline.process import prepare

    started = time.perf_counter()
    uris = [item.input_uri for item in items]
    # Remote reads wait on the network: fetch them together, then decode one after another.
    if _io is not None and len(uris) > 1 and any(map(_remote, uris)):
        datas = list(_io.map(_read_one, uris))
    else:
        datas = [_read_one(uri) for uri in uris]
    fetch_each = (time.perf_counter() - started) / len(items)
    on_gpu, gpu_each = _decode_on_gpu(datas, items)
    outcomes: list[Done] = []
    for data, item, decoded in zip(datas, items, on_gpu, strict=True):
        began = time.perf_counter()
        if isinstance(data, JobError):
            outcomes.append(Done(data, fetch_each))
            continue
        if decoded is not None:
            outcomes.append(Done(decoded, fetch_each + gpu_each))
            continue
        try:
            result: Any = prepare(data, item.spec, max_pixels=item.max_pixels)
        except Exception as exc:
            result = _as_job_error(exc)
        outcomes.append(Done(result, fetch_each + time.perf_counter() - began))
    return outcomes


def _decode_on_gpu(datas: list[bytes | JobError], items: list[LoadItem]) -> tuple[list[Any], float]:
    """The group's large plain JPEGs decoded together on the GPU (None for the rest), and seconds per image."""
    if _gpu_decode is None or len(items) < 2:
        return [None] * len(items), 0.0
    from stylequeue.pipeline.gpu_decode import prepare_many

    started = time.perf_counter()
    decoded = prepare_many(datas, [item.spec for item in items], max_pixels=min(item.max_pixels for item in items),
                           device=_gpu_decode)
    taken = sum(1 for d in decoded if d is not None)
    return decoded, (time.perf_counter() - started) / max(1, taken)


def _stage_one(item: tuple[str, bytes, str, str]) -> Staged | JobError:
    uri, data, content_type, tag = item
    if not _worker_alive():  # nobody would fence, promote or delete what this writes
        return InternalError("the worker that asked for this output is gone")
    try:
        return Staged(_storage.stage(uri, data, content_type, tag=tag), len(data))
    except Exception as exc:
        return _as_job_error(exc)


def _child_stage(items: list[StageItem]) -> list[Done]:
    from stylequeue.pipeline.process import render

    encoded: list[tuple[bytes | JobError, float]] = []
    for item in items:
        began = time.perf_counter()
        try:
            encoded.append((render(item.pixels, item.spec), time.perf_counter() - began))
        except Exception as exc:
            encoded.append((_as_job_error(exc), time.perf_counter() - began))
    writes = [(item.output_uri, data, item.spec.content_type, item.tag)
              for item, (data, _) in zip(items, encoded, strict=True) if not isinstance(data, JobError)]
    started = time.perf_counter()
    staged = _overlap(_stage_one, writes, remote=any(_remote(uri) for uri, _, _, _ in writes))
    write_each = (time.perf_counter() - started) / max(1, len(writes))
    results = iter(staged)
    outcomes: list[Done] = []
    for data, seconds in encoded:
        if isinstance(data, JobError):
            outcomes.append(Done(data, seconds))
        else:
            outcomes.append(Done(next(results), seconds + write_each))
    return _fence_and_promote(items, outcomes)


# Seconds a child waits for the job store to answer a fence. Short: a store that does not answer (restarting,
# paused, failing over) is the worker's to wait for, which parks the step without holding a codec process.
FENCE_TIMEOUT_S = 5.0


def _job_store() -> Any:
    global _store
    if _store is None:
        from stylequeue.jobs import RedisJobStore

        assert _settings is not None
        _store = RedisJobStore.from_url(_settings.redis_url, key_prefix=_settings.key_prefix,
                                        job_ttl_s=_settings.job_ttl_s, max_connections=4,
                                        socket_timeout=FENCE_TIMEOUT_S)
    return _store


def _fence_and_promote(items: list[StageItem], outcomes: list[Done]) -> list[Done]:
    """Fence the staged outputs of the items that carry a `Fence` and promote those this attempt still holds,
    as the worker's finishing step would (worker/execution.py), without a round trip back to the worker
    between the stage, the fence and the promotion. A job store that does not answer leaves them unfenced
    (`fenced` None): the worker fences them itself then."""
    asked = [(index, item.fence) for index, item in enumerate(items)
             if item.fence is not None and isinstance(outcomes[index].value, Staged)]
    if not asked or not _worker_alive():
        return outcomes
    owner, lease_s = asked[0][1].owner, asked[0][1].lease_s
    requests = []
    for index, fence in asked:
        staged: Staged = outcomes[index].value
        results = dict(fence.results, output_bytes=staged.size)
        results["timings_ms"] = dict(results.get("timings_ms") or {}, store=round(outcomes[index].seconds * 1000, 1))
        requests.append((fence.job_id, fence.attempt, staged.staged_uri, results))
    try:
        fenced = _job_store().fence_many(owner, requests, lease_s=lease_s)
    except Exception as exc:  # unreachable, timed out, failing over: the worker fences these itself
        log.debug("a codec process could not fence %d outputs (%s); its worker will", len(asked), exc)
        return outcomes
    done = list(outcomes)
    promoting: list[tuple[int, PromoteItem]] = []
    for (index, _), ok in zip(asked, fenced, strict=True):
        staged = outcomes[index].value
        if ok:
            promoting.append((index, PromoteItem(staged.staged_uri, items[index].output_uri)))
        else:  # the worker deletes the copy (and tries again later if the store refuses now)
            done[index] = Done(Staged(staged.staged_uri, staged.size, fenced=False), outcomes[index].seconds)
    errors = _overlap(_promote_one, [item for _, item in promoting],
                      remote=any(_remote(item.output_uri) for _, item in promoting))
    # A new Staged per item, not dataclasses.replace: it costs a third as much, and a group has up to 128 items.
    for (index, _), error in zip(promoting, errors, strict=True):
        staged = outcomes[index].value
        done[index] = Done(Staged(staged.staged_uri, staged.size, True, error), outcomes[index].seconds)
    return done


def _promote_one(item: PromoteItem) -> JobError | None:
    try:
        _storage.promote(item.staged_uri, item.output_uri)
    except Exception as exc:
        return _as_job_error(exc)
    return None


def _child_promote(items: list[PromoteItem]) -> list[Done]:
    return [Done(error) for error in _overlap(_promote_one, items,
                                              remote=any(_remote(item.output_uri) for item in items))]


def _overlap(function: Callable[[Any], Any], items: list[Any], *, remote: bool) -> list[Any]:
    """`function` over `items`: together on the I/O threads when they wait on a network, else in turn, inside
    one storage batch scope, so a group's files walk their shared directory once (Storage.batch); items on the
    I/O threads do not need it (their time is the network's)."""
    if _io is not None and len(items) > 1 and remote:
        return list(_io.map(function, items))
    with _storage.batch():
        return [function(item) for item in items]
