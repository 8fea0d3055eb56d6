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
    CALLBACKS_DUE,
    DUE,
    PUBLIC_FIELDS,
    QUEUED,
    RUNNING,
    SENT,
    TERMINAL_STATES,
    TRANSITIONS,
    Change,
    ClaimOutcome,
    Job,
    JobState,
    Priority,
    ReapOutcome,
    RedisJobStore,
    new_job_id,
    parse_iso,
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
    created = store.create(job)
    assert created.created and created.job.id == job.id
    assert store.get(job.id).input_uri == "s3://in/a.jpg"
    with pytest.raises(JobNotFound):
        store.get("j_doesnotexist")


def test_idempotency_key_returns_the_first_job(store: RedisJobStore) -> None:
    first = store.create(make_job(), idempotency_key="order-42")
    again = store.create(make_job(), idempotency_key="order-42")
    assert first.created and not again.created
    assert again.job.id == first.job.id


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


def test_finished_records_expire_and_idempotency_keys_live_a_ttl_from_submit(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job, idempotency_key="k1")
    assert store.redis.ttl(store.job_key(job.id)) == -1  # unfinished jobs never expire
    assert 0 < store.redis.ttl(store.keys.idempotency("k1")) <= 100
    store.transition(job.id, JobState.QUEUED, JobState.CANCELLED)
    assert 0 < store.redis.ttl(store.job_key(job.id)) <= 100


def lapse(store: RedisJobStore, job_id: str, *, begun: bool = True) -> None:
    """End a job's lease now, as if its worker froze past it (leases are Redis time, so no clock to fake).

    `begun`: its worker's lease keeper had reported that a job thread began the attempt (only such an attempt is
    charged when the worker is lost)."""
    if begun:
        job = store.get(job_id)
        assert job.owner is not None
        store.renew_leases(job.owner, [(job_id, job.attempts, True)], lease_s=30)
    store.redis.hset(store.job_key(job_id), "lease_until", "1")
    store.redis.zadd(store.keys.running, {job_id: 1})


def test_claim_outcomes(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    first = store.claim(job.id, "w1", lease_s=30)
    assert first.outcome == ClaimOutcome.CLAIMED and first.job is not None
    assert first.job.lease_until - store.server_time() * 1000 == pytest.approx(30000, abs=2000)
    # live lease: the other copy is dropped
    assert store.claim(job.id, "w2", lease_s=30).outcome == ClaimOutcome.BUSY
    # ended lease: taken over, a new attempt counted
    lapse(store, job.id)
    taken = store.claim(job.id, "w2", lease_s=30)
    assert taken.outcome == ClaimOutcome.CLAIMED and taken.attempts == 2
    assert store.get(job.id).owner == "w2"
    assert not store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1")
    assert not store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w2", attempt=1)
    assert store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w2", attempt=2)
    assert store.claim(job.id, "w3", lease_s=30).outcome == ClaimOutcome.DONE
    assert store.claim("j_missing", "w3", lease_s=30).outcome == ClaimOutcome.MISSING


def test_third_lost_attempt_fails_with_internal(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    for attempt in range(3):
        assert store.claim(job.id, f"w{attempt}", lease_s=10).outcome == ClaimOutcome.CLAIMED
        lapse(store, job.id)
    result = store.claim(job.id, "w9", lease_s=10)
    assert result.outcome == ClaimOutcome.FAILED
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and failed.error and failed.error["code"] == "internal"
    assert failed.attempts == 3 and job.id not in store.scheduled(RUNNING)


def test_a_deadline_that_passed_cancels_the_job_at_claim(store: RedisJobStore) -> None:
    late, timely = make_job(callback_url="https://example.com/hook"), make_job()
    store.create(late, deadline_s=0.001)
    store.create(timely, deadline_s=60)
    time.sleep(0.01)
    expired, claimed = store.claim_many([late.id, timely.id], "w1", lease_s=30)
    assert expired.outcome == ClaimOutcome.EXPIRED and expired.callback_token
    record = store.get(late.id)
    assert record.state == JobState.CANCELLED and record.error["code"] == "expired" and record.attempts == 0
    assert record.callback == CALLBACK_PENDING and late.id in store.scheduled(CALLBACKS_DUE)
    assert claimed.outcome == ClaimOutcome.CLAIMED
    # a retry of a job that did start is no longer bound by its deadline
    lapse(store, timely.id)
    store.redis.hset(store.job_key(timely.id), "deadline_ms", "1")
    assert store.claim(timely.id, "w2", lease_s=30).outcome == ClaimOutcome.CLAIMED


def test_reaper_requeues_ended_leases_only_with_their_message_due(store: RedisJobStore) -> None:
    alive, dead = make_job(), make_job()
    for job in (alive, dead):
        store.dispatched([job.id], store.create(job).token)
    store.claim(alive.id, "w1", lease_s=60)
    store.claim(dead.id, "w2", lease_s=60)
    lapse(store, dead.id)
    assert store.expired_leases() == [dead.id]
    reaped = store.reap([dead.id, alive.id])
    assert [(r.outcome, r.previous_owner) for r in reaped] == [(ReapOutcome.REQUEUED, "w2"), (ReapOutcome.SKIP, None)]
    requeued = store.get(dead.id)
    assert requeued.state == JobState.QUEUED and requeued.attempts == 1 and requeued.owner is None
    assert list(store.scheduled(DUE)) == [dead.id]  # F2: owed in the same step as the requeue
    assert dead.id in store.scheduled(QUEUED)
    assert store.expired_leases() == []


def test_an_attempt_a_lost_worker_never_began_is_given_back(store: RedisJobStore) -> None:
    """A kill -9 is the infrastructure's fault: jobs the worker had only claimed keep their attempts."""
    job = make_job()
    store.dispatched([job.id], store.create(job).token)
    for _ in range(3):  # as many lost workers as MAX_ATTEMPTS allows attempts, none of which began the job
        assert store.claim(job.id, "w1", lease_s=30).attempts == 1
        lapse(store, job.id, begun=False)
        assert [r.outcome for r in store.reap(store.expired_leases())] == [ReapOutcome.REQUEUED]
        assert store.get(job.id).attempts == 0
    taken = store.claim(job.id, "w2", lease_s=30)  # a takeover settles the same way (a fourth loss)
    lapse(store, job.id, begun=False)
    assert store.claim(job.id, "w3", lease_s=30).attempts == 1 and taken.attempts == 1
    # but a job that keeps killing its worker before it can report is charged after a few losses
    for _ in range(10):
        if store.get(job.id).state != JobState.RUNNING:
            break
        lapse(store, job.id, begun=False)
        store.claim(job.id, "w4", lease_s=30)
    assert store.get(job.id).state == JobState.FAILED


def test_lease_renewal_reports_jobs_held_by_another_owner_or_attempt(store: RedisJobStore) -> None:
    mine, stolen = make_job(), make_job()
    for job in (mine, stolen):
        store.create(job)
    store.claim(mine.id, "w1", lease_s=5)
    store.claim(stolen.id, "w1", lease_s=5)
    lapse(store, stolen.id)
    store.claim(stolen.id, "w2", lease_s=30)
    lost = store.renew_leases("w1", [(mine.id, 1), (stolen.id, 1)], lease_s=30)
    assert lost == [stolen.id]
    assert store.get(mine.id).lease_until - store.server_time() * 1000 > 20000
    assert store.renew_leases("w1", [(mine.id, 2)], lease_s=30) == [mine.id]  # not this attempt


def test_due_entries_are_removed_only_by_whoever_holds_them(store: RedisJobStore) -> None:
    """F1: a taker's late `done_due` must not delete a retry another worker scheduled after `take_due`."""
    job = make_job()
    store.dispatched([job.id], store.create(job).token)
    store.claim(job.id, "w1", lease_s=30)
    assert store.transition(job.id, JobState.RUNNING, JobState.QUEUED, owner="w1", delay_s=0)
    taken = store.take_due(DUE)
    assert [job_id for job_id, _ in taken] == [job.id]
    assert store.take_due(DUE) == []  # held for a while by the first taker
    # Meanwhile the job ran on another worker and failed transiently: a new retry is due in 5 s.
    store.claim(job.id, "w2", lease_s=30)
    assert store.transition(job.id, JobState.RUNNING, JobState.QUEUED, owner="w2", delay_s=5)
    assert store.done_due(DUE, taken) == 0  # the first taker's late removal leaves the new entry alone
    assert job.id in store.scheduled(DUE)


def test_a_submit_is_owed_until_dispatched_and_undone_if_unsent(store: RedisJobStore) -> None:
    job, unsent = make_job(), make_job()
    created = store.create(job, idempotency_key="k-sent")
    assert created.created and job.id in store.scheduled(DUE) and job.id in store.scheduled(QUEUED)
    store.dispatched([job.id], created.token + 1)  # not its token: stays owed
    assert job.id in store.scheduled(DUE)
    store.dispatched([job.id], created.token)
    assert job.id not in store.scheduled(DUE)
    again = store.create(unsent, idempotency_key="k-unsent")
    assert store.discard_unsent([again.job]) == 1
    assert not store.exists(unsent.id) and not store.redis.exists(store.keys.idempotency("k-unsent"))
    assert unsent.id not in store.scheduled(DUE) and unsent.id not in store.scheduled(QUEUED)


def test_a_message_the_broker_lost_is_owed_again_from_sent(store: RedisJobStore) -> None:
    """A sent job stays on `sent` until a worker claims it; the watch finds one whose message never arrived."""
    lost, claimed = make_job(), make_job()
    for job in (lost, claimed):
        store.dispatched([job.id], store.create(job).token)
    assert set(store.scheduled(SENT)) == {lost.id, claimed.id} and store.scheduled(DUE) == {}
    store.claim(claimed.id, "w1", lease_s=30)
    assert list(store.scheduled(SENT)) == [lost.id]  # a claim ends the watch
    assert store.lost_candidates(older_than_s=60) == []  # too recent to call lost
    assert store.lost_candidates(older_than_s=0) == [(lost.id, Priority.INTERACTIVE)]
    assert store.resend_lost([lost.id], older_than_s=60) == 0  # checked again in the script: still too recent
    assert store.resend_lost([lost.id, claimed.id], older_than_s=0) == 1
    assert list(store.scheduled(DUE)) == [lost.id] and store.scheduled(SENT) == {}
    assert store.stats() == {"resent": 1}
    # a taker that sends it again moves it back to `sent`
    taken = store.take_due(DUE)
    assert store.sent_due(taken) == 1 and list(store.scheduled(SENT)) == [lost.id]


def test_the_sweep_schedules_only_queued_jobs_with_nothing_owed(store: RedisJobStore) -> None:
    lost, owed, watched, running = make_job(), make_job(), make_job(), make_job()
    store.dispatched([lost.id], store.create(lost).token)
    store.redis.zrem(store.keys.sent, lost.id)  # a bug that dropped its watch: only the sweep can find it
    store.create(owed)  # still owed: not the sweep's business
    store.dispatched([watched.id], store.create(watched).token)  # sent and watched: not the sweep's either
    store.dispatched([running.id], store.create(running).token)
    store.claim(running.id, "w1", lease_s=30)
    candidates = store.sweep_candidates(older_than_s=0)
    assert candidates == [(lost.id, Priority.INTERACTIVE)]
    assert store.sweep([lost.id]) == 1 and lost.id in store.scheduled(DUE)
    assert store.stats() == {"sweep_found": 1}
    assert store.sweep([lost.id]) == 0  # owed now


def test_fence_admits_one_attempt_once(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    store.claim(job.id, "w1", lease_s=30)
    assert store.fence_many("w2", [(job.id, 1, "s3://o/t1", {})], lease_s=30) == [False]  # not the owner
    assert store.fence_many("w1", [(job.id, 2, "s3://o/t1", {})], lease_s=30) == [False]  # not this attempt
    assert store.fence_many("w1", [(job.id, 1, "s3://o/t1", {"width": 7})], lease_s=30) == [True]
    assert store.fence_many("w1", [(job.id, 1, "s3://o/t2", {})], lease_s=30) == [False]  # once
    record = store.get(job.id)
    assert record.staged_uri == "s3://o/t1" and record.width == 7
    lapse(store, job.id)
    promote = store.claim(job.id, "w3", lease_s=30)
    assert promote.outcome == ClaimOutcome.PROMOTE and promote.attempts == 1
    assert promote.job is not None and promote.job.staged_uri == "s3://o/t1"
    assert store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w3", attempt=1)
    assert store.get(job.id).staged_uri is None


def test_callback_deliveries_hold_their_entry_by_token(store: RedisJobStore) -> None:
    job = make_job(callback_url="https://example.com/hook")
    store.create(job)
    store.claim(job.id, "w1", lease_s=30)
    moved = store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, owner="w1")
    token = moved.callback_token
    assert token and store.scheduled(CALLBACKS_DUE) == {job.id: token}
    assert store.callback_begin(job.id, token + 1) == 0  # a stale or duplicate message
    fresh = store.callback_begin(job.id, token)
    assert fresh and store.callback_begin(job.id, token) == 0  # taken
    record = {"state": "pending", "attempts": 1, "last_status": 503}
    assert store.callback_record(job.id, fresh, record, 30.0)
    owed = store.get(job.id).callback
    assert owed["attempts"] == 1 and owed["next_attempt_at"].endswith("Z")
    due = store.scheduled(CALLBACKS_DUE)[job.id]
    assert due - store.server_time() * 1000 == pytest.approx(30000, abs=2000)
    assert not store.callback_record(job.id, fresh, {"state": "delivered"}, None)  # rescheduled: no longer fresh's


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
    assert list(store.scheduled(CALLBACKS_DUE)) == [hooked.id]  # F9: on the outbox in the same step
    # The other ways to a final state: a cancel, and the last lost attempt (at claim and at reaping).
    cancelled, lost, reaped = (make_job(callback_url="https://example.com/hook") for _ in range(3))
    for job in (cancelled, lost, reaped):
        store.create(job)
    assert store.transition(cancelled.id, JobState.QUEUED, JobState.CANCELLED).callback_token
    for attempt in range(3):
        for job in (lost, reaped):
            store.claim(job.id, f"w{attempt}", lease_s=10)
            lapse(store, job.id)
    assert store.claim(lost.id, "w9", lease_s=10).outcome == ClaimOutcome.FAILED
    assert [r.outcome for r in store.reap([reaped.id])] == [ReapOutcome.FAILED]
    for job in (cancelled, lost, reaped):
        assert store.get(job.id).callback == CALLBACK_PENDING
        assert job.id in store.scheduled(CALLBACKS_DUE)


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
        Change(jobs[0].id, JobState.RUNNING, JobState.SUCCEEDED, "w1", values={"width": 64,
                                                                              "timings_ms": {"infer": 1.5}}),
        Change(jobs[1].id, JobState.RUNNING, JobState.SUCCEEDED, "w2", values={"width": 64}),  # not its owner
        Change(jobs[2].id, JobState.RUNNING, JobState.SUCCEEDED, "w1"),  # cancelled meanwhile
        Change("j_missing", JobState.RUNNING, JobState.SUCCEEDED, "w1"),
    ])
    assert [bool(m) for m in moved] == [True, False, False, False]
    done = store.get(jobs[0].id)
    assert done.state == JobState.SUCCEEDED and done.width == 64 and done.timings_ms == {"infer": 1.5}
    assert done.callback == CALLBACK_PENDING and done.owner is None
    assert store.get(jobs[1].id).state == JobState.RUNNING


def test_times_come_from_redis_in_iso_form(store: RedisJobStore) -> None:
    job = make_job()
    store.create(job)
    record = store.get(job.id)
    assert abs(parse_iso(record.created_at) - store.server_time()) < 5
    assert record.created_at == job.created_at  # the caller's copy says what the record says


def test_job_ids_are_base32_of_128_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import secrets

    from stylequeue.jobs import record as jobs_module

    for raw in (bytes(16), b"\xff" * 16, secrets.token_bytes(16), secrets.token_bytes(16)):
        monkeypatch.setattr(jobs_module.secrets, "token_bytes", lambda _n, raw=raw: raw)
        assert jobs_module.new_job_id() == "j_" + base64.b32encode(raw).decode().rstrip("=").lower()
    monkeypatch.undo()
    ids = {jobs_module.new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 28 and i[2:].isalnum() and i[2:].islower() for i in ids)
