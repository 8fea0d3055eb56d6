"""The job record, the state machine and RedisJobStore — on fakeredis and on a real Redis server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from stylequeue.embedded import free_port
from stylequeue.errors import InvalidTransition, JobNotFound, RedisUnavailable
from stylequeue.jobs import (
    CALLBACK_PENDING,
    PUBLIC_FIELDS,
    RETRY_KEY,
    TERMINAL_STATES,
    TRANSITIONS,
    Job,
    JobState,
    RedisJobStore,
    new_job_id,
)


@pytest.fixture(params=["fakeredis", "real"])
def store(request: pytest.FixtureRequest) -> Iterator[RedisJobStore]:
    if request.param == "fakeredis":
        client = fakeredis.FakeRedis()
    else:
        url = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)
    yield RedisJobStore(client, key_prefix="sqtest:", job_ttl_s=100)
    client.close()


def make_job(**overrides: object) -> Job:
    job_id = new_job_id()
    values: dict = dict(id=job_id, style="ink", input_uri="s3://in/a.jpg", output_uri=f"s3://out/{job_id}.jpg")
    values.update(overrides)
    return Job(**values)


def test_job_ids_are_opaque_and_unique() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    for job_id in list(ids)[:10]:
        assert job_id.startswith("j_") and len(job_id) == 28 and job_id[2:].isalnum()


def test_state_table_matches_spec() -> None:
    assert TRANSITIONS[JobState.QUEUED] == {JobState.RUNNING, JobState.CANCELLED}
    assert TRANSITIONS[JobState.RUNNING] == {
        JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == frozenset()


def test_public_record_has_exactly_the_spec_fields(store: RedisJobStore) -> None:
    job = make_job(metadata={"user": 7})
    store.create(job)
    record = store.get(job.id).to_dict(output_url=None)
    assert list(record) == list(PUBLIC_FIELDS)
    assert record["state"] == "queued" and record["metadata"] == {"user": 7}
    assert record["created_at"].endswith("Z") and "T" in record["created_at"]
    assert "owner" not in record and "lease_until" not in record


def test_create_get_and_missing(store: RedisJobStore) -> None:
    job = make_job()
    stored, created = store.create(job)
    assert created and stored.id == job.id
    assert store.get(job.id).input_uri == "s3://in/a.jpg"
    with pytest.raises(JobNotFound):
        store.get("j_doesnotexist")


def test_idempotency_key_returns_the_first_job(store: RedisJobStore) -> None:
    first, created = store.create(make_job(), idempotency_key="order-42")
    again, created_again = store.create(make_job(), idempotency_key="order-42")
    assert created and not created_again
    assert again.id == first.id


def test_create_many_and_get_many(store: RedisJobStore) -> None:
    jobs = [make_job(priority="bulk") for _ in range(50)]
    store.create_many(jobs)
    fetched = store.get_many([j.id for j in jobs] + ["j_missing"])
    assert [j.id for j in fetched[:-1] if j] == [j.id for j in jobs]
    assert fetched[-1] is None


def test_transition_is_compare_and_set(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    claim = store.claim(job.id, "w1", lease_s=30)
    assert claim.outcome == "claimed" and claim.attempts == 1
    # wrong from-state: nothing written
    assert not store.transition(job.id, JobState.QUEUED, JobState.CANCELLED)
    # wrong owner: nothing written
    assert not store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w2")
    assert store.get(job.id).state == JobState.RUNNING
    assert store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1", width=64, height=48)
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED and done.width == 64 and done.finished_at
    assert done.owner is None


def test_forbidden_transition_raises(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    with pytest.raises(InvalidTransition):
        store.transition(job.id, JobState.SUCCEEDED, JobState.RUNNING)
    with pytest.raises(JobNotFound):
        store.transition("j_nope", JobState.QUEUED, JobState.CANCELLED)


def test_finished_records_and_idempotency_keys_expire(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job, idempotency_key="k1")
    assert store.redis.ttl(store.job_key(job.id)) == -1  # unfinished jobs never expire
    store.transition(job.id, JobState.QUEUED, JobState.CANCELLED)
    assert 0 < store.redis.ttl(store.job_key(job.id)) <= 100
    assert 0 < store.redis.ttl(store.idempotency_key("k1")) <= 100


def test_claim_outcomes(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    now = time.time()
    assert store.claim(job.id, "w1", lease_s=30, now=now).outcome == "claimed"
    # live lease: the other copy is dropped
    assert store.claim(job.id, "w2", lease_s=30, now=now + 1).outcome == "busy"
    # expired lease: taken over, a new attempt counted
    taken = store.claim(job.id, "w2", lease_s=30, now=now + 31)
    assert taken.outcome == "claimed" and taken.attempts == 2
    assert store.get(job.id).owner == "w2"
    assert not store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1")
    store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w2")
    assert store.claim(job.id, "w3", lease_s=30).outcome == "done"
    assert store.claim("j_missing", "w3", lease_s=30).outcome == "missing"


def test_third_lost_attempt_fails_with_internal(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    now = time.time()
    for attempt in range(3):
        assert store.claim(job.id, f"w{attempt}", lease_s=10, now=now + attempt * 20).outcome == "claimed"
    result = store.claim(job.id, "w9", lease_s=10, now=now + 100)
    assert result.outcome == "failed"
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and failed.error and failed.error["code"] == "internal"
    assert failed.attempts == 3


def test_reaper_requeues_expired_leases_only(store: RedisJobStore) -> None:
    alive, dead = make_job(), make_job()
    store.create(alive)
    store.create(dead)
    now = time.time()
    store.claim(alive.id, "w1", lease_s=60, now=now)
    store.claim(dead.id, "w2", lease_s=5, now=now)
    expired = store.expired_leases(now=now + 10)
    assert expired == [dead.id]
    assert store.reap(dead.id, now=now + 10) == "requeued"
    assert store.reap(alive.id, now=now + 10) == "skip"
    requeued = store.get(dead.id)
    assert requeued.state == JobState.QUEUED and requeued.attempts == 1 and requeued.owner is None
    assert store.expired_leases(now=now + 10) == []


def test_lease_renewal_reports_lost_jobs(store: RedisJobStore) -> None:
    mine, stolen = make_job(), make_job()
    for job in (mine, stolen):
        store.create(job)
    now = time.time()
    store.claim(mine.id, "w1", lease_s=5, now=now)
    store.claim(stolen.id, "w1", lease_s=5, now=now)
    store.claim(stolen.id, "w2", lease_s=30, now=now + 10)
    lost = store.renew_leases("w1", [mine.id, stolen.id], lease_s=30)
    assert lost == [stolen.id]
    assert store.get(mine.id).lease_until > now + 20


def test_schedules_hand_each_due_item_to_one_taker(store: RedisJobStore) -> None:
    store.schedule(RETRY_KEY, "j_a", time.time() - 1)
    store.schedule(RETRY_KEY, "j_b", time.time() + 3600)
    assert store.take_due(RETRY_KEY) == ["j_a"]
    assert store.take_due(RETRY_KEY) == []  # claimed for a while by the first taker
    store.done_due(RETRY_KEY, ["j_a"])
    assert list(store.scheduled(RETRY_KEY)) == ["j_b"]


def test_transition_with_schedule_is_atomic(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    store.claim(job.id, "w1", lease_s=30)
    due = time.time() + 5
    assert store.transition(job.id, JobState.RUNNING, JobState.QUEUED, owner="w1", schedule=(RETRY_KEY, due))
    assert store.scheduled(RETRY_KEY) == {job.id: pytest.approx(due)}
    assert store.get(job.id).state == JobState.QUEUED


def test_update_never_resurrects_an_expired_record(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    assert store.update(job.id, callback={"state": "pending", "attempts": 0})
    assert store.get(job.id).callback == {"state": "pending", "attempts": 0}
    store.redis.delete(store.job_key(job.id))
    assert not store.update(job.id, callback={"state": "delivered"})
    assert not store.exists(job.id)


def test_two_workers_racing_exactly_one_wins(redis_url: str) -> None:
    store = RedisJobStore(redis.Redis.from_url(redis_url), key_prefix="race:")
    jobs = [make_job() for _ in range(40)]
    store.create_many(jobs)
    wins: dict[str, list[str]] = {job.id: [] for job in jobs}
    barrier = threading.Barrier(8)

    def worker(name: str) -> None:
        barrier.wait()
        for job in jobs:
            if store.claim(job.id, name, lease_s=30).outcome == "claimed":
                wins[job.id].append(name)
            if store.transition(job.id, JobState.QUEUED, JobState.CANCELLED):
                wins[job.id].append(name + ":cancel")

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs:
        assert len(wins[job.id]) == 1, wins[job.id]
        final = store.get(job.id)
        assert final.state in (JobState.RUNNING, JobState.CANCELLED)


def test_unreachable_redis_names_the_server() -> None:
    port = free_port()
    store = RedisJobStore.from_url(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}"):
        store.get("j_x")


def test_a_final_state_owes_the_callback_in_the_same_step(store: RedisJobStore) -> None:
    hooked, plain = make_job(callback_url="https://example.com/hook"), make_job()
    store.create(hooked)
    store.create(plain)
    for job in (hooked, plain):
        store.claim(job.id, "w1", lease_s=30)
        assert store.get(job.id).callback is None  # running: nothing owed yet
        assert store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1")
    assert store.get(hooked.id).callback == CALLBACK_PENDING
    assert store.get(plain.id).callback is None
    # The other ways to a final state: a cancel, and the last lost attempt (at claim and at reaping).
    cancelled, lost, reaped = (make_job(callback_url="https://example.com/hook") for _ in range(3))
    for job in (cancelled, lost, reaped):
        store.create(job)
    assert store.transition(cancelled.id, JobState.QUEUED, JobState.CANCELLED)
    now = time.time()
    for attempt in range(3):
        store.claim(lost.id, f"w{attempt}", lease_s=10, now=now + attempt * 20)
        store.claim(reaped.id, f"w{attempt}", lease_s=10, now=now + attempt * 20)
    assert store.claim(lost.id, "w9", lease_s=10, now=now + 100).outcome == "failed"
    assert store.reap(reaped.id, now=now + 100) == "failed"
    for job in (cancelled, lost, reaped):
        assert store.get(job.id).callback == CALLBACK_PENDING


def test_a_group_claims_and_finishes_in_one_call_each_even_after_redis_lost_its_scripts(
        store: RedisJobStore) -> None:
    jobs = [make_job(callback_url="https://example.com/hook" if i == 0 else None) for i in range(3)]
    for job in jobs:
        store.create(job)
    store.transition(jobs[2].id, JobState.QUEUED, JobState.CANCELLED)
    store.redis.script_flush()  # what a Redis restart does to the script cache
    claims = store.claim_many([j.id for j in jobs] + ["j_missing"], "w1", lease_s=30)
    assert [c.outcome for c in claims] == ["claimed", "claimed", "done", "missing"]
    first = claims[0].job
    assert first is not None
    assert (first.id, first.state, first.attempts, first.owner) == (jobs[0].id, "running", 1, "w1")
    assert (first.style, first.input_uri, first.output_uri, first.callback_url, first.created_at) == (
        jobs[0].style, jobs[0].input_uri, jobs[0].output_uri, jobs[0].callback_url, jobs[0].created_at)
    assert first.started_at == store.get(jobs[0].id).started_at
    assert claims[1].job is not None and claims[1].job.callback_url is None
    store.redis.script_flush()
    moved = store.transition_many([
        (jobs[0].id, JobState.RUNNING, JobState.SUCCEEDED, "w1", {"width": 64, "timings_ms": {"infer": 1.5}}),
        (jobs[1].id, JobState.RUNNING, JobState.SUCCEEDED, "w2", {"width": 64}),  # not its owner
        (jobs[2].id, JobState.RUNNING, JobState.SUCCEEDED, "w1", {}),  # cancelled meanwhile
        ("j_missing", JobState.RUNNING, JobState.SUCCEEDED, "w1", {}),
    ])
    assert moved == [True, False, False, False]
    done = store.get(jobs[0].id)
    assert done.state == JobState.SUCCEEDED and done.width == 64 and done.timings_ms == {"infer": 1.5}
    assert done.callback == CALLBACK_PENDING and done.owner is None
    assert store.get(jobs[1].id).state == JobState.RUNNING


def test_job_ids_are_base32_of_128_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import secrets

    from stylequeue import jobs as jobs_module

    for raw in (bytes(16), b"\xff" * 16, secrets.token_bytes(16), secrets.token_bytes(16)):
        monkeypatch.setattr(jobs_module.secrets, "token_bytes", lambda _n, raw=raw: raw)
        assert jobs_module.new_job_id() == "j_" + base64.b32encode(raw).decode().rstrip("=").lower()
    monkeypatch.undo()
    ids = {jobs_module.new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 28 and i[2:].isalnum() and i[2:].islower() for i in ids)
