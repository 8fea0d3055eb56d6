"""The outage guard (worker/outage.py) on a fake clock and a scripted probe, and the executor handing jobs back
without spending attempts while a dependency is down. Real outages (moto behind a switched-off forwarder) are in
test_faults.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest

from stylequeue.config.styles import StyleCatalog, StyleSpec
from stylequeue.errors import ErrorCode, RedisUnavailable, StorageError
from stylequeue.jobs import DUE, JobState, RedisJobStore
from stylequeue.worker.outage import OUTAGE_FAILURES, PROBE_MAX_S, OutageGuard, dependency_of
from tests.test_execution import INTERACTIVE, FakeModels, FakeStorage, final, make_executor, submit
from tests.workers import make_image, wait_for

S3 = "s3:http://store:9000"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def guard(clock: Clock, answers: list[bool], outage_s: float = 900) -> tuple[OutageGuard, list]:
    changes: list = []
    probes: list[str] = []

    def probe(uri: str) -> bool:
        probes.append(uri)
        return answers.pop(0) if answers else False

    g = OutageGuard(outage_s=outage_s, probe=probe, clock=clock, on_change=lambda d, down: changes.append((d, down)))
    return g, changes


def test_dependencies_by_scheme() -> None:
    assert dependency_of("s3://a/b.jpg", "http://store:9000") == S3
    assert dependency_of("s3://other/x", "http://store:9000") == S3  # one endpoint, every bucket
    assert dependency_of("s3://a/b.jpg", None) == "s3:aws"
    assert dependency_of("https://CDN.example.com/p.jpg?sig=1", None) == "http:cdn.example.com"
    assert dependency_of("file:///data/a.jpg", None) is None


def test_one_jobs_failures_are_its_own_and_a_success_resets_the_run() -> None:
    clock = Clock()
    g, changes = guard(clock, [])
    for _ in range(5):  # one job failing again and again: that job's fault, never an outage
        assert not g.failed(S3, "j_1", "s3://a/1")
    assert g.down() == [] and changes == []
    assert not g.failed(S3, "j_2", "s3://a/2")  # a second job, but ...
    g.succeeded(S3)  # ... a success in between ends the run
    assert not g.failed(S3, "j_3", "s3://a/3")
    assert not g.failed(S3, "j_4", "s3://a/4")
    assert not g.holds(S3)


def test_failures_of_several_jobs_in_a_row_are_an_outage_until_a_probe_answers() -> None:
    clock = Clock()
    g, changes = guard(clock, [False, False, True])
    held = [g.failed(S3, f"j_{i}", f"s3://a/{i}") for i in range(OUTAGE_FAILURES)]
    assert held == [False] * (OUTAGE_FAILURES - 1) + [True]  # the one that tipped it is handed back
    assert g.holds(S3) and changes == [(S3, True)] and g.down() == [S3]
    assert g.holds("http:cdn.example.com") is False  # other dependencies are unaffected
    g.probe_due()  # not yet: the first probe is a second away
    assert g.retry_in(S3) == pytest.approx(1.0)
    clock.now += 1
    g.probe_due()  # fails: the next one waits twice as long
    assert g.retry_in(S3) == pytest.approx(2.0)
    clock.now += 2
    g.probe_due()  # fails again
    clock.now += 4
    g.probe_due()  # answers
    assert not g.holds(S3) and changes == [(S3, True), (S3, False)] and g.down() == []


def test_backoff_is_capped_and_after_outage_s_jobs_are_no_longer_held() -> None:
    clock = Clock()
    g, _ = guard(clock, [], outage_s=120)
    for i in range(OUTAGE_FAILURES):
        g.failed(S3, f"j_{i}", f"s3://a/{i}")
    for _ in range(10):
        clock.now += PROBE_MAX_S
        g.probe_due()
        assert g.retry_in(S3) <= PROBE_MAX_S
    assert clock.now - 5000 >= 120
    assert not g.holds(S3)  # too long: jobs run again and fail storage_error after their attempts
    assert not g.failed(S3, "j_9", "s3://a/9")


def test_workers_count_the_outage_from_when_the_first_saw_it() -> None:
    clock = Clock()
    store = RedisJobStore(fakeredis.FakeRedis(), key_prefix="og:")
    first = OutageGuard(outage_s=60, probe=lambda uri: False, clock=clock,
                        record_start=lambda d, now: store.outage_begun(d, "w1", now, stale_after_s=120))
    for i in range(OUTAGE_FAILURES):
        first.failed(S3, f"j_{i}", "s3://a/x")
    clock.now += 50
    second = OutageGuard(outage_s=60, probe=lambda uri: False, clock=clock,
                         record_start=lambda d, now: store.outage_begun(d, "w2", now, stale_after_s=120))
    for i in range(OUTAGE_FAILURES):
        second.failed(S3, f"j_{i}", "s3://a/x")
    assert second.holds(S3)
    clock.now += 11  # 61 s after the first worker saw it: both stop holding jobs back
    assert not first.holds(S3) and not second.holds(S3)


# --- the executor with a guard ---------------------------------------------------------------------------


@pytest.fixture
def spec(tiny_registry: Path) -> StyleSpec:
    return StyleCatalog(tiny_registry).get("tiny")


@pytest.fixture
def store() -> Iterator[RedisJobStore]:
    client = fakeredis.FakeRedis()
    yield RedisJobStore(client, key_prefix="og:", job_ttl_s=100)
    client.close()


def test_jobs_are_handed_back_without_spending_attempts_while_the_store_is_down(store: RedisJobStore,
                                                                                spec: StyleSpec) -> None:
    clock = Clock()
    answers: list[bool] = []
    g, _ = guard(clock, answers)
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    down = {"on": True}

    def read(uri: str) -> None:
        if down["on"]:
            raise StorageError("mem://in.png: the store did not answer (ConnectionRefused)", transient=True)

    original = storage.read
    storage.read = lambda uri: (read(uri), original(uri))[1]  # type: ignore[method-assign]
    executor = make_executor(store, storage, FakeModels(spec))
    executor.guard, executor.dependency_of = g, lambda uri: "mem"
    g.refund = lambda job_ids: store.refund_attempts(job_ids, ErrorCode.STORAGE_ERROR) and None
    jobs = [submit(store) for _ in range(6)]
    for job in jobs:
        executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: all(store.get(j.id).state == JobState.QUEUED for j in jobs), 10)
    assert wait_for(lambda: executor.inflight() == 0, 10)
    records = [store.get(j.id) for j in jobs]
    # the failures that revealed the outage were given their attempts back once it was known
    assert [r.attempts for r in records] == [0] * len(jobs)
    assert all(j.id in store.scheduled(DUE) for j in jobs)  # their messages are owed: nothing is lost
    assert any("no attempt was spent" in (r.error or {}).get("message", "") for r in records)
    # The store comes back: the probe answers, and the jobs run and succeed.
    down["on"] = False
    answers.append(True)
    clock.now += 1
    g.probe_due()
    for job in jobs:
        executor.accept([job.id], INTERACTIVE)
    for job in jobs:
        assert final(store, job.id).state == JobState.SUCCEEDED
    executor.stop(timeout=5)


def test_a_finish_that_meets_an_unreachable_job_store_is_parked_and_completed_later(store: RedisJobStore,
                                                                                   spec: StyleSpec) -> None:
    storage = FakeStorage({"mem://in.png": make_image(32, 32)})
    executor = make_executor(store, storage, FakeModels(spec))
    job = submit(store)
    original = store.fence_many
    calls = {"n": 0}

    def flaky_fence(*args: object, **kwargs: object) -> list[bool]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RedisUnavailable("cannot reach Redis (test)")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    store.fence_many = flaky_fence  # type: ignore[method-assign]
    executor.accept([job.id], INTERACTIVE)
    assert wait_for(lambda: calls["n"] == 1, 5)
    assert wait_for(lambda: executor._parked != [], 5)
    assert executor.held() == [(job.id, 1, True)] and store.get(job.id).state == JobState.RUNNING
    assert executor.retry_parked() == 1
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED and done.attempts == 1 and job.output_uri in storage.objects
    assert executor.inflight() == 0
    executor.stop(timeout=5)
