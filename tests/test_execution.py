"""The executor (worker/execution.py) with fakes and a fake clock: its queue, fenced outputs, retries,
give-back, time-outs, and threads that survive their own error handling. Real Redis and real workers are in
test_worker.py and test_faults*.py; here every interleaving is driven by hand."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import fakeredis
import numpy as np
import pytest

from stylequeue.config.settings import Settings
from stylequeue.config.styles import StyleCatalog, StyleSpec
from stylequeue.errors import ErrorCode, RedisUnavailable, StorageError
from stylequeue.jobs import CALLBACKS_DUE, DUE, Job, JobState, Priority, RedisJobStore, new_job_id
from stylequeue.pipeline.process import Prepared
from stylequeue.pipeline.storage import Storage, files
from stylequeue.worker.batching import GroupFuture
from stylequeue.worker.codec import Done, LoadItem, PromoteItem, Staged, StageItem
from stylequeue.worker.execution import GroupQueue, Held, JobExecutor
from tests.workers import make_image, wait_for

INTERACTIVE, BULK = Priority.INTERACTIVE, Priority.BULK


def held(name: str) -> Held:
    return Held(Job(id=name, style="s", input_uri="u", output_uri="o"), Priority.BULK)


def test_interactive_groups_come_first_then_bulk_in_order() -> None:
    q = GroupQueue()
    b1, b2, b3, i1 = held("b1"), held("b2"), held("b3"), held("i1")
    q.put(BULK, (b1, b2))
    q.put(BULK, (b3,))
    q.put(INTERACTIVE, (i1,))
    assert [q.get(), q.get(), q.get()] == [(i1,), (b1, b2), (b3,)]


def test_reserved_threads_take_only_interactive_work() -> None:
    q = GroupQueue()
    b1, i1 = held("b1"), held("i1")
    q.put(BULK, (b1,))
    got: list[tuple[Held, ...] | None] = []
    reserved = threading.Thread(target=lambda: got.append(q.get(interactive_only=True)))
    reserved.start()
    reserved.join(0.2)
    assert reserved.is_alive() and got == []  # a bulk group does not wake it
    q.put(INTERACTIVE, (i1,))
    reserved.join(5)
    assert got == [(i1,)]
    assert q.get() == (b1,)


def test_drain_and_close_release_every_waiter() -> None:
    q = GroupQueue()
    b1, i1 = held("b1"), held("i1")
    q.put(BULK, (b1,))
    q.put(INTERACTIVE, (i1,))
    assert q.drain() == [(i1,), (b1,)]
    results: list[tuple[Held, ...] | None] = []
    waiters = [threading.Thread(target=lambda r=r: results.append(q.get(interactive_only=r))) for r in (True, False)]
    for w in waiters:
        w.start()
    q.close()
    for w in waiters:
        w.join(5)
    assert results == [None, None]


# --- the executor over fakes -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStorage:
    """Object storage in a dict; `hooks` run before a named operation (to interleave another worker)."""

    def __init__(self, inputs: dict[str, bytes]) -> None:
        self.objects = dict(inputs)
        self.hooks: dict[str, list] = {}
        self.fail_promote = 0
        self.fail_discard = 0
        self.fail_stage_after_write = 0  # stage writes, then raises (the answer lost on a dropped connection)
        self.counter = 0

    def _hook(self, name: str, *args: object) -> None:
        for hook in self.hooks.pop(name, []):
            hook(*args)

    def read(self, uri: str) -> bytes:
        self._hook("read", uri)
        return self.objects[uri]

    def stage(self, uri: str, data: bytes, content_type: str, *, tag: str) -> str:
        self._hook("stage", uri)
        self.counter += 1
        staged = f"{uri}.{tag}.{self.counter}.sqtmp"
        self.objects[staged] = data
        if self.fail_stage_after_write:
            self.fail_stage_after_write -= 1
            raise StorageError("S3 did not answer (EndpointConnectionError)", transient=True)
        return staged

    def promote(self, staged_uri: str, uri: str) -> None:
        self._hook("promote", uri)
        if self.fail_promote:
            self.fail_promote -= 1
            raise StorageError("the store answered 503", transient=True)
        if staged_uri in self.objects:
            self.objects[uri] = self.objects.pop(staged_uri)
        elif uri not in self.objects:
            raise StorageError("staged output gone", transient=False)

    def discard(self, staged_uri: str) -> None:
        if self.fail_discard:
            self.fail_discard -= 1
            raise StorageError("the store did not answer", transient=True)
        self.objects.pop(staged_uri, None)

    def staged_copies(self, uri: str) -> list[str]:
        return [key for key in self.objects if key.startswith(f"{uri}.") and key.endswith(".sqtmp")]

    def batch(self) -> AbstractContextManager[None]:
        return nullcontext()


class FakeModels:
    """Returns its input (the image's pixels) as the output; `gate` holds results back until set."""

    def __init__(self, spec: StyleSpec) -> None:
        self.spec = spec
        self.gate = threading.Event()
        self.gate.set()
        self.submitted = threading.Event()  # set once an image reached the model

    def spec_and_model(self, style: str) -> tuple[StyleSpec, str]:
        return self.spec, f"{style}@test"

    def submit(self, style: str, pixels: np.ndarray, priority: Priority) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        self.submitted.set()
        threading.Thread(target=lambda: (self.gate.wait(10), future.set_result(pixels)), daemon=True).start()
        return future

    def result(self, future: Future[np.ndarray]) -> np.ndarray:
        return future.result(10)

    def submit_many(self, style: str, pixels: Sequence[np.ndarray], priority: Priority) -> GroupFuture:
        raise AssertionError("no codec pool here")

    def results(self, group: GroupFuture) -> list[np.ndarray | Exception]:
        raise AssertionError("no codec pool here")


@pytest.fixture
def spec(tiny_registry: Path) -> StyleSpec:
    return StyleCatalog(tiny_registry).get("tiny")


@pytest.fixture
def store() -> Iterator[RedisJobStore]:
    client = fakeredis.FakeRedis()
    yield RedisJobStore(client, key_prefix="ex:", job_ttl_s=100)
    client.close()


def make_executor(store: RedisJobStore, storage: FakeStorage, models: FakeModels, worker: str = "w1",
                  clock: FakeClock | None = None, finished: list | None = None, errors: list | None = None
                  ) -> JobExecutor:
    finished = finished if finished is not None else []
    errors = errors if errors is not None else []
    return JobExecutor(store=store, storage=storage, models=models, worker_id=worker, lease_s=30,
                       max_input_pixels=10**8, job_timeout_s=60, threads=2, group_size=4,
                       on_finished=lambda job, token: finished.append((job.id, token)), on_error=errors.append,
                       clock=clock or FakeClock())


def submit(store: RedisJobStore, callback: bool = False) -> Job:
    job_id = new_job_id()
    job = Job(id=job_id, style="tiny", input_uri="mem://in.png", output_uri=f"mem://out/{job_id}.png",
              callback_url="http://hooks.example/x" if callback else None)
    created = store.create(job)
    store.dispatched([job.id], created.token)
    return job


def final(store: RedisJobStore, job_id: str, timeout: float = 10) -> Job:
    assert wait_for(lambda: store.get(job_id).finished, timeout), store.get(job_id)
    return store.get(job_id)


def test_a_job_is_staged_fenced_promoted_and_succeeds(store: RedisJobStore, spec: StyleSpec) -> None:
    storage, finished = FakeStorage({"mem://in.png": make_image(64, 48)}), []
    executor = make_executor(store, storage, FakeModels(spec), finished=finished)
    job = submit(store, callback=True)
    executor.accept([job.id], INTERACTIVE)
    done = final(store, job.id)
    assert done.state == JobState.SUCCEEDED and (done.width, done.height) == (64, 48) and done.attempts == 1
    assert done.staged_uri is None and done.model == "tiny@test"
    assert job.output_uri in storage.objects
    assert not [uri for uri in storage.objects if uri.endswith(".sqtmp")]  # nothing staged is left behind
    assert wait_for(lambda: finished == [(job.id, store.scheduled(CALLBACKS_DUE)[job.id])], 5)
    executor.stop(timeout=5)


def test_a_stale_attempt_never_replaces_the_winners_output(store: RedisJobStore, spec: StyleSpec) -> None:
    """F6: attempt 1 stalls past its lease; attempt 2 (another worker) takes over and succeeds; when attempt 1
    resumes, its fence fails, its staged bytes are deleted, and the output stays attempt 2's."""
    storage = FakeStorage({"mem://in.png": make_image(64, 48, seed=1)})
    models = FakeModels(spec)
    job = submit(store)
    first = make_executor(store, storage, models, worker="w1")
    models.gate.clear()  # attempt 1 stalls in the model
    first.accept([job.id], INTERACTIVE)
    assert models.submitted.wait(5)
    # w1's lease keeper reported the attempt begun, then its lease lapsed (as if w1 froze): a second worker
    # takes over, and attempt 1 is charged.
    store.renew_leases("w1", first.held(), lease_s=30)
    store.redis.hset(store.job_key(job.id), "lease_until", "1")
    store.redis.zadd(store.keys.running, {job.id: 1})
    second_storage = FakeStorage({"mem://in.png": make_image(64, 48, seed=2)})
    second = make_executor(store, second_storage, FakeModels(spec), worker="w2")
    second_storage.objects = storage.objects  # one store, seen by both
    second.accept([job.id], INTERACTIVE)
    done = final(store, job.id)
    assert done.attempts == 2 and done.state == JobState.SUCCEEDED
    winner = storage.objects[job.output_uri]
    models.gate.set()  # attempt 1 wakes up, stages, and tries to fence
    assert wait_for(lambda: first.inflight() == 0, 10)
    assert storage.objects[job.output_uri] == winner  # still attempt 2's bytes
    assert not [uri for uri in storage.objects if uri.endswith(".sqtmp")]
    assert store.get(job.id).attempts == 2
    first.stop(timeout=5)
    second.stop(timeout=5)


def test_a_cancelled_attempt_deletes_only_what_it_staged(store: RedisJobStore, spec: StyleSpec) -> None:
    """F7: two jobs share an output key; the first is cancelled mid-run after the second succeeded there."""
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    models = FakeModels(spec)
    executor = make_executor(store, storage, models)
    first, second = submit(store), submit(store)
    shared = "mem://out/shared.png"
    for job in (first, second):
        store.redis.hset(store.job_key(job.id), "output_uri", f'"{shared}"')
    models.gate.clear()
    executor.accept([first.id], INTERACTIVE)
    assert models.submitted.wait(5)
    storage.objects[shared] = b"second job's bytes"  # what the other job wrote meanwhile
    store.transition(first.id, JobState.RUNNING, JobState.CANCELLED)  # a user cancels the first
    executor.abandon([first.id])  # what the lease keeper does when a renewal finds the job gone
    models.gate.set()
    assert wait_for(lambda: executor.inflight() == 0, 10)
    assert storage.objects[shared] == b"second job's bytes"
    assert not [uri for uri in storage.objects if uri.endswith(".sqtmp")]
    executor.stop(timeout=5)


def test_a_promotion_left_by_a_dead_worker_is_finished_by_the_next_claim(store: RedisJobStore,
                                                                        spec: StyleSpec) -> None:
    storage, finished = FakeStorage({"mem://in.png": make_image(32, 32)}), []
    job = submit(store)
    # A worker claimed it, staged and fenced its output, then died before promoting.
    claim = store.claim(job.id, "dead", lease_s=30)
    storage.objects[f"{job.output_uri}.a1.x.sqtmp"] = b"attempt one"
    assert store.fence_many("dead", [(job.id, 1, f"{job.output_uri}.a1.x.sqtmp", {"width": 32, "height": 32})],
                            lease_s=0.001) == [True]
    time.sleep(0.01)
    reaped = store.reap(store.expired_leases())
    assert [r.outcome for r in reaped] == ["requeued"] and claim.attempts == 1
    executor = make_executor(store, storage, FakeModels(spec), finished=finished)
    executor.accept([job.id], BULK)
    done = final(store, job.id)
    assert done.state == JobState.SUCCEEDED and done.attempts == 1 and done.width == 32  # no new attempt
    assert storage.objects[job.output_uri] == b"attempt one"
    executor.stop(timeout=5)


def test_a_failed_promotion_is_finished_later_not_run_again(store: RedisJobStore, spec: StyleSpec) -> None:
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    storage.fail_promote = 1
    executor = make_executor(store, storage, FakeModels(spec))
    job = submit(store)
    executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: executor.inflight() == 0, 10)
    record = store.get(job.id)
    assert record.state == JobState.RUNNING and record.staged_uri  # fenced: its output is kept for a retry
    store.redis.hset(store.job_key(job.id), "lease_until", "1")
    store.redis.zadd(store.keys.running, {job.id: 1})
    store.reap(store.expired_leases())
    executor.accept([job.id], INTERACTIVE)
    done = final(store, job.id)
    assert done.state == JobState.SUCCEEDED and done.attempts == 1
    executor.stop(timeout=5)


def test_transient_errors_retry_with_backoff_on_the_due_set(store: RedisJobStore, spec: StyleSpec) -> None:
    storage = FakeStorage({})  # the input is missing: a KeyError, mapped to `internal` (permanent)
    executor = make_executor(store, storage, FakeModels(spec))
    job = submit(store)

    def outage(uri: str) -> None:
        raise StorageError("the store answered 503", transient=True)

    storage.hooks["read"] = [outage]
    executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: store.get(job.id).state == JobState.QUEUED, 5)
    due = store.scheduled(DUE)[job.id]
    assert 500 <= due - store.server_time() * 1000 <= 1000  # its message is owed in about a second
    assert store.get(job.id).error["code"] == "storage_error"
    executor.stop(timeout=5)


def test_a_message_for_a_job_still_held_is_rescheduled_not_dropped(store: RedisJobStore, spec: StyleSpec) -> None:
    """F4: an attempt timed out and its job went back to `queued`; its resend lands on the same worker while the
    old attempt still runs. It must come back later, not be acknowledged away."""
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    models, clock = FakeModels(spec), FakeClock()
    executor = make_executor(store, storage, models, clock=clock)
    job = submit(store)
    models.gate.clear()
    executor.accept([job.id], INTERACTIVE)
    assert models.submitted.wait(5)  # attempt 1 is in the model
    clock.now += 120  # past the job timeout
    assert executor.timed_out() == [job.id]
    executor.expire(job.id)
    assert store.get(job.id).state == JobState.QUEUED
    store.done_due(DUE, [(job.id, store.scheduled(DUE)[job.id])])  # its retry message went out ...
    executor.accept([job.id], INTERACTIVE)  # ... and came back here while attempt 1 still runs
    assert job.id in store.scheduled(DUE), (store.get(job.id), executor.held())  # owed again, not dropped
    models.gate.set()
    assert wait_for(lambda: executor.inflight() == 0, 10)
    assert store.get(job.id).state == JobState.QUEUED  # attempt 1's late result was not kept
    executor.stop(timeout=5)


def test_give_back_at_stop_makes_messages_due_and_returns_attempts(store: RedisJobStore, spec: StyleSpec) -> None:
    """F3: jobs given back on SIGTERM are due in the same step, so a SIGKILL right after loses nothing."""
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    models = FakeModels(spec)
    executor = make_executor(store, storage, models)
    models.gate.clear()
    jobs = [submit(store) for _ in range(12)]
    executor.accept([j.id for j in jobs], BULK)  # 3 groups of 4 on 2 general threads: one group waits
    assert wait_for(lambda: sum(h.started for h in list(executor._held.values())) == 8, 5)  # two groups began
    threading.Timer(0.5, models.gate.set).start()
    released = executor.stop(timeout=10)
    assert len(released) == 4
    due = store.scheduled(DUE)
    for job_id in released:
        record = store.get(job_id)
        assert record.state == JobState.QUEUED and record.attempts == 0 and job_id in due


def test_job_threads_survive_a_job_store_that_fails_in_their_error_handling(store: RedisJobStore,
                                                                           spec: StyleSpec) -> None:
    """F5: a Redis error while recording a failure must not kill the thread."""
    storage, errors = FakeStorage({"mem://in.png": make_image(32, 32)}), []
    executor = make_executor(store, storage, FakeModels(spec), errors=errors)
    job = submit(store)

    def break_redis(uri: str) -> None:
        original = store._run

        def failing(*args: object, **kwargs: object) -> object:
            store._run = original  # fail once
            raise RedisUnavailable("cannot reach Redis (test)")

        store._run = failing  # type: ignore[method-assign]
        raise StorageError("bad bytes", transient=False)

    storage.hooks["read"] = [break_redis]
    executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: bool(errors), 5) and isinstance(errors[0], RedisUnavailable)
    assert executor.held() == [(job.id, 1, True)]  # parked: still held (its lease renewed) until Redis answers
    assert store.get(job.id).state == JobState.RUNNING
    assert executor.retry_parked() == 1  # what the lease keeper does every round
    assert executor.inflight() == 0
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and failed.error["code"] == "storage_error" and failed.attempts == 1
    later = submit(store)
    executor.accept([later.id], INTERACTIVE)  # the threads still work
    assert final(store, later.id).state == JobState.SUCCEEDED
    assert all(thread.is_alive() for thread in executor._threads)
    executor.stop(timeout=5)


def test_a_parked_output_of_a_job_lost_meanwhile_is_deleted(store: RedisJobStore, spec: StyleSpec) -> None:
    """Redis goes away at the fence, so the step is parked with the output staged; when Redis is back the lease
    keeper's renew finds the job taken over (its lease ran out during the outage) before the step is retried."""
    storage, errors = FakeStorage({"mem://in.png": make_image(32, 32)}), []
    executor = make_executor(store, storage, FakeModels(spec), errors=errors)
    job = submit(store)
    fence = store.fence_many

    def unreachable(*args: object, **kwargs: object) -> list[bool]:
        store.fence_many = fence  # type: ignore[method-assign]  # away once
        raise RedisUnavailable("cannot reach Redis (test)")

    store.fence_many = unreachable  # type: ignore[method-assign]
    executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: bool(errors), 5)
    assert [uri for uri in storage.objects if uri.endswith(".sqtmp")]  # parked with its output staged
    assert store.transition(job.id, JobState.RUNNING, JobState.QUEUED)  # reaped by a peer meanwhile
    executor.abandon([job.id])  # what renew_leases reports, so the lease keeper abandons it
    executor.retry_parked()
    assert not [uri for uri in storage.objects if uri.endswith(".sqtmp")], "a staged output was left behind"
    executor.stop(timeout=5)


def test_a_staged_output_the_store_could_not_delete_is_deleted_once_it_answers(store: RedisJobStore,
                                                                               spec: StyleSpec) -> None:
    """The attempt loses its job before its fence (a peer reaped it) and the store is down when it deletes its
    staged output; once the store answers, the lease keeper's next round (`retry_parked`) must delete it."""
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    executor = make_executor(store, storage, FakeModels(spec))
    job = submit(store)

    def lose_the_job_and_the_store(uri: str) -> None:
        assert store.transition(job.id, JobState.RUNNING, JobState.QUEUED)  # reaped by a peer meanwhile
        storage.fail_discard = 1

    storage.hooks["stage"] = [lose_the_job_and_the_store]
    executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: executor.inflight() == 0, 5)
    assert [uri for uri in storage.objects if uri.endswith(".sqtmp")]  # the delete met the store down
    executor.retry_parked()  # the store answers again
    assert not [uri for uri in storage.objects if uri.endswith(".sqtmp")], "a staged output was left behind"
    executor.stop(timeout=5)


def test_a_retried_attempt_deletes_what_lost_attempts_staged(store: RedisJobStore, spec: StyleSpec) -> None:
    """A worker killed between staging and fencing leaves its staged copy; the attempt that finishes the job
    deletes it once its own fence makes sure no other attempt can promote."""
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    executor = make_executor(store, storage, FakeModels(spec))
    job = submit(store)
    store.claim(job.id, "dead", lease_s=30)
    store.renew_leases("dead", [(job.id, 1, True)], lease_s=30)  # it began, staged, and was killed
    storage.objects[f"{job.output_uri}.a1-{job.id}.deadbeef0000.sqtmp"] = b"attempt one"
    store.redis.hset(store.job_key(job.id), "lease_until", "1")
    store.redis.zadd(store.keys.running, {job.id: 1})
    store.reap(store.expired_leases())
    executor.accept([job.id], INTERACTIVE)
    done = final(store, job.id)
    assert done.state == JobState.SUCCEEDED and done.attempts == 2
    assert storage.objects[job.output_uri] != b"attempt one"
    assert not [uri for uri in storage.objects if uri.endswith(".sqtmp")]
    executor.stop(timeout=5)


def test_a_copy_staged_by_an_attempt_given_back_is_deleted_by_the_one_that_wins(store: RedisJobStore,
                                                                                spec: StyleSpec) -> None:
    """The soak's leftover: attempt 1 stages, the store goes away before it answers (the copy exists, the worker
    never learns its name), the job is retried, and the outage gives that attempt back. The attempt that wins
    is numbered 1 again, yet it must still look for and delete what the given-back attempt staged."""
    storage, errors = FakeStorage({"mem://in.png": make_image(32, 32)}), []
    storage.fail_stage_after_write = 1
    executor = make_executor(store, storage, FakeModels(spec), errors=errors)
    job = submit(store)
    executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: store.get(job.id).state == JobState.QUEUED and store.get(job.id).attempts == 1, 10)
    assert [uri for uri in storage.objects if uri.endswith(".sqtmp")], "the lost answer left a staged copy"
    assert store.refund_attempts([job.id], ErrorCode.STORAGE_ERROR) == 1
    executor.accept([job.id], INTERACTIVE)
    done = final(store, job.id)
    assert done.state == JobState.SUCCEEDED and done.attempts == 1 and done.given_back == 1
    assert not [uri for uri in storage.objects if uri.endswith(".sqtmp")], "the given-back attempt's copy was left"
    executor.stop(timeout=5)


def test_copies_another_job_is_staging_for_the_same_output_are_left_alone(store: RedisJobStore,
                                                                          spec: StyleSpec) -> None:
    """Two jobs name one explicit output_uri. The winner of a retried job deletes what its own lost attempts
    staged, never the copy the other job staged a moment ago and is about to fence and promote."""
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    executor = make_executor(store, storage, FakeModels(spec))
    job = submit(store)
    store.claim(job.id, "dead", lease_s=30)
    store.renew_leases("dead", [(job.id, 1, True)], lease_s=30)  # it began, staged, and was killed
    ours = f"{job.output_uri}.a1-{job.id}.deadbeef0000.sqtmp"
    theirs = f"{job.output_uri}.a1-j_another.cafe00000000.sqtmp"
    storage.objects.update({ours: b"our lost attempt", theirs: b"another job, in flight"})
    store.redis.hset(store.job_key(job.id), "lease_until", "1")
    store.redis.zadd(store.keys.running, {job.id: 1})
    store.reap(store.expired_leases())
    executor.accept([job.id], INTERACTIVE)
    assert final(store, job.id).state == JobState.SUCCEEDED
    assert ours not in storage.objects, "the job's own lost attempt's copy was left"
    assert storage.objects.get(theirs) == b"another job, in flight", "another job's staged copy was deleted"
    executor.stop(timeout=5)


class PromotingCodec:
    """A codec pool that only records the promotions it is asked for (and reports them done)."""

    def __init__(self) -> None:
        self.calls: list[list[PromoteItem]] = []

    def promote(self, items: Sequence[PromoteItem]) -> list[Done]:
        self.calls.append(list(items))
        return [Done(None) for _ in items]


def test_file_outputs_are_promoted_in_process_in_one_batch_and_remote_ones_through_the_codec(
        store: RedisJobStore, spec: StyleSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(Settings(storage_url=f"file://{tmp_path}/data"))
    codec = PromotingCodec()
    executor = JobExecutor(store=store, storage=storage, models=FakeModels(spec), worker_id="w1", lease_s=30,
                           max_input_pixels=10**8, job_timeout_s=60, threads=1, codec=codec,  # type: ignore[arg-type]
                           clock=FakeClock())
    uris = [f"file://{tmp_path}/data/outputs/ink/j_{i}.png" for i in range(3)]
    staged = [storage.stage(uri, f"output {i}".encode(), "image/png", tag="a1") for i, uri in enumerate(uris)]
    storage.discard(staged[2])  # its staged copy is gone and its output was never promoted
    walks: list[tuple[str, ...]] = []
    walk = files.walk
    monkeypatch.setattr(files, "walk", lambda root, parts, **options: (walks.append(tuple(parts)),
                                                                        walk(root, parts, **options))[1])
    assert executor._promote(list(zip(staged[:2], uris[:2], strict=True))) == [None, None]
    assert codec.calls == [] and walks == [("ink",)]  # renamed here, the directory walked once for the group
    assert [storage.read_output(uri) for uri in uris[:2]] == [b"output 0", b"output 1"]
    errors = executor._promote([(staged[2], uris[2]), (staged[0], uris[0])])  # each item gets its own outcome
    assert isinstance(errors[0], StorageError) and not errors[0].transient and errors[1] is None
    assert codec.calls == []
    remote = [(f"s3://out/j_{i}.png.a1.0123456789ab.sqtmp", f"s3://out/j_{i}.png") for i in range(2)]
    assert executor._promote(remote) == [None, None]
    assert [[(item.staged_uri, item.output_uri) for item in call] for call in codec.calls] == [remote]
    executor.stop(timeout=5)


class GroupModels(FakeModels):
    """FakeModels with the group calls a codec pool's bulk path makes (outputs = inputs)."""

    def submit_many(self, style: str, pixels: Sequence[np.ndarray], priority: Priority) -> GroupFuture:
        return list(pixels)  # type: ignore[return-value]

    def results(self, group: GroupFuture) -> list[np.ndarray | Exception]:
        return list(group)  # type: ignore[call-overload]


class FencingCodec:
    """A codec pool whose stage call answers for each job as a codec process would: fenced and promoted by the
    process ('fenced'), left unfenced because it could not reach the job store ('unreachable'), or found lost."""

    def __init__(self, store: RedisJobStore, storage: FakeStorage, answers: dict[str, str]) -> None:
        self.store, self.storage, self.answers = store, storage, answers

    def load(self, items: Sequence[LoadItem]) -> list[Done]:
        return [Done(Prepared(np.zeros((8, 8, 3), np.uint8), 8, 8)) for _ in items]

    def stage(self, items: Sequence[StageItem]) -> list[Done]:
        done = []
        for item in items:
            assert item.fence is not None and item.fence.owner == "w1"
            staged = self.storage.stage(item.output_uri, b"bytes", "image/png", tag=item.tag)
            answer = self.answers[item.fence.job_id]
            if answer == "fenced":
                results = dict(item.fence.results, output_bytes=5)
                assert self.store.fence_many("w1", [(item.fence.job_id, item.fence.attempt, staged, results)],
                                             lease_s=30) == [True]
                self.storage.promote(staged, item.output_uri)
                done.append(Done(Staged(staged, 5, fenced=True)))
            else:
                done.append(Done(Staged(staged, 5, fenced=None if answer == "unreachable" else False)))
        return done


def test_a_bulk_group_the_codec_fenced_is_only_marked_succeeded_and_the_rest_is_finished_here(
        store: RedisJobStore, spec: StyleSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage({"mem://in.png": make_image(8, 8)})
    jobs = []
    for _ in range(3):
        job_id = new_job_id()
        job = Job(id=job_id, style="tiny", input_uri="mem://in.png", output_uri=f"mem://out/{job_id}.png",
                  priority="bulk")
        store.dispatched([job.id], store.create(job).token)
        jobs.append(job)
    answers = dict(zip((job.id for job in jobs), ("fenced", "unreachable", "lost"), strict=True))
    fences: list[int] = []
    fence_many = store.fence_many

    def counted(owner: str, items: list, **options: float) -> list[bool]:
        fences.append(len(items))
        return fence_many(owner, items, **options)

    monkeypatch.setattr(store, "fence_many", counted)
    executor = JobExecutor(store=store, storage=storage, models=GroupModels(spec), worker_id="w1", lease_s=30,
                           max_input_pixels=10**8, job_timeout_s=60, threads=1,
                           codec=FencingCodec(store, storage, answers),  # type: ignore[arg-type]
                           clock=FakeClock())
    fenced, unreachable, lost = jobs
    executor.accept([job.id for job in jobs], Priority.BULK)
    assert final(store, fenced.id).state == JobState.SUCCEEDED
    assert final(store, unreachable.id).state == JobState.SUCCEEDED
    assert fences == [1, 1]  # the codec's own fence, then this worker's for the one the codec could not fence
    assert storage.objects[fenced.output_uri] == storage.objects[unreachable.output_uri] == b"bytes"
    assert store.get(unreachable.id).timings_ms.keys() >= {"fetch", "infer", "store"}
    assert wait_for(lambda: executor.inflight() == 0, 5)
    assert store.get(lost.id).state == JobState.RUNNING  # not this worker's to finish any more
    assert lost.output_uri not in storage.objects and not storage.staged_copies(lost.output_uri)  # copy deleted
    executor.stop(timeout=5)
