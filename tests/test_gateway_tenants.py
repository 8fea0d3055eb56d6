"""The gateway with a tenants file (docs/http.md), in process over a real Redis: two tenants that must not meet."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from stylequeue.config.tenants import load_tenants, token_digest
from stylequeue.jobs import JobState, Presence
from stylequeue.producer.client import Client
from stylequeue.producer.gateway import make_app
from tests.workers import make_image, wait_for

A, B, PLAIN = "tenant-a-token-0123456789", "tenant-b-token-9876543210", "plain-token-55555"


def tenants_file(tmp_path: Path, a_extra: str = "", b_extra: str = "") -> Path:
    uploads = tmp_path / "data" / "inputs" / "a" / "uploads"
    path = tmp_path / "tenants.toml"
    path.write_text(f"""
[tenants.a]
token_sha256 = "{token_digest(A)}"
inputs = ["s3://photos/a/", "file://{tmp_path}/data/inputs/a/"]
outputs = "s3://results/a/"
uploads = "file://{uploads}/"
callback_hosts = ["hooks.example.com"]
{a_extra}

[tenants.b]
token_sha256 = "{token_digest(B)}"
inputs = ["s3://photos/b/"]
outputs = "s3://results/b/"
{b_extra}
""")
    return path


@pytest.fixture
def client(redis_url: str, tiny_registry: Path, tmp_path: Path) -> Client:
    (tmp_path / "data" / "inputs").mkdir(parents=True)
    return Client(redis_url=redis_url, styles=tiny_registry, storage_url=f"file://{tmp_path}/data",
                  input_roots=str(tmp_path / "data" / "inputs"), max_input_bytes=50_000)


@pytest.fixture
def serving() -> Iterator[Callable[[FastAPI], TestClient]]:
    """Start apps with their lifespan (the long-poll subscriber stops with it) for the test's duration."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(TestClient(app))


@pytest.fixture
def gateway(client: Client, tmp_path: Path, serving: Callable[[FastAPI], TestClient]) -> Callable[..., TestClient]:
    return lambda **extra: serving(make_app(client, [PLAIN], tenants=load_tenants(tenants_file(tmp_path, **extra))))


@pytest.fixture
def http(gateway: Callable[..., TestClient]) -> TestClient:
    return gateway()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(http: TestClient, token: str, **body: Any) -> Any:
    return http.post("/v1/jobs", json={"style": "tiny", **body}, headers=auth(token))


def job_count(client: Client) -> int:
    return len(client.store.redis.keys(client.store.job_key("*")))


# --- scopes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    {"input_uri": "s3://photos/a/private.jpg"},  # the other tenant's photo
    {"input_uri": "s3://photos/b/../a/private.jpg"},
    {"input_uri": "s3://photos/b%2f..%2fa/private.jpg"},
    {"input_uri": "s3://photos/bb/x.jpg"},
    {"input_uri": "S3://PHOTOS/b/x.jpg"},
    {"input_uri": "s3://photos/b/x.jpg", "output_uri": "s3://results/a/overwrite.jpg"},  # the other's output
    {"input_uri": "s3://photos/b/x.jpg", "output_uri": "s3://results/b/../a/overwrite.jpg"},
    {"input_uri": "s3://photos/b/x.jpg", "output_uri": "s3://photos/b/x.jpg"},  # outputs only under outputs
    {"input_uri": "https://cdn.example.com/photos/x.jpg"},
])
def test_a_tenant_cannot_name_another_tenants_objects(http: TestClient, client: Client, body: dict) -> None:
    response = submit(http, B, **body)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "input_forbidden"
    assert job_count(client) == 0  # refused before any job existed


def test_outputs_default_under_the_tenants_outputs_prefix(http: TestClient) -> None:
    job = submit(http, B, input_uri="S3://photos/b/x.jpg").json()
    assert job["input_uri"] == "s3://photos/b/x.jpg"  # stored as it was checked
    assert job["output_uri"] == f"s3://results/b/tiny/{job['id']}.png"
    named = submit(http, B, input_uri="s3://photos/b/x.jpg", output_uri="s3://results/b/mine/x.png").json()
    assert named["output_uri"] == "s3://results/b/mine/x.png"


def test_jobs_and_idempotency_keys_belong_to_their_tenant(http: TestClient, client: Client) -> None:
    mine = submit(http, A, input_uri="s3://photos/a/x.jpg", idempotency_key="order-7").json()
    theirs = submit(http, B, input_uri="s3://photos/b/x.jpg", idempotency_key="order-7").json()
    assert mine["id"] != theirs["id"]
    assert submit(http, A, input_uri="s3://photos/a/x.jpg", idempotency_key="order-7").json()["id"] == mine["id"]
    for path in (f"/v1/jobs/{mine['id']}", f"/v1/jobs/{mine['id']}?wait=1"):
        response = http.get(path, headers=auth(B))
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert http.post(f"/v1/jobs/{mine['id']}/cancel", headers=auth(B)).status_code == 404
    assert client.get(mine["id"]).state == JobState.QUEUED


def test_callback_hosts_are_enforced(http: TestClient) -> None:
    refused = submit(http, A, input_uri="s3://photos/a/x.jpg", callback_url="https://evil.example.com/hook")
    assert refused.status_code == 403 and "callback_hosts" in refused.json()["error"]["message"]
    tricked = submit(http, A, input_uri="s3://photos/a/x.jpg", callback_url="https://hooks.example.com@evil.com/")
    assert tricked.status_code == 403
    allowed = submit(http, A, input_uri="s3://photos/a/x.jpg", callback_url="https://HOOKS.example.com/h")
    assert allowed.status_code == 202
    # a tenant without callback_hosts may name any public host
    assert submit(http, B, input_uri="s3://photos/b/x.jpg", callback_url="https://any.example.org/h").status_code == 202


def test_plain_tokens_still_work_unscoped_beside_tenants(http: TestClient) -> None:
    response = submit(http, PLAIN, input_uri="s3://anything/x.jpg")
    assert response.status_code == 202 and response.json()["output_uri"].endswith(".png")
    assert http.get(f"/v1/jobs/{response.json()['id']}", headers=auth(A)).status_code == 404


# --- quotas -------------------------------------------------------------------------------------


def test_max_in_flight_answers_429_until_jobs_finish(client: Client, gateway: Callable[..., TestClient]) -> None:
    http = gateway(b_extra="max_in_flight = 3")
    batch = [{"input_uri": f"s3://photos/b/{i}.jpg", "style": "tiny"} for i in range(2)]
    assert http.post("/v1/jobs:batch", json={"jobs": batch}, headers=auth(B)).status_code == 202
    third = submit(http, B, input_uri="s3://photos/b/3.jpg").json()
    refused = submit(http, B, input_uri="s3://photos/b/4.jpg")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_in_flight"
    assert int(refused.headers["retry-after"]) >= 1
    too_big = http.post("/v1/jobs:batch", json={"jobs": batch * 2}, headers=auth(B))
    assert too_big.status_code == 429 and job_count(client) == 3  # nothing of a refused batch exists
    assert submit(http, A, input_uri="s3://photos/a/x.jpg").status_code == 202  # other tenants are not held up
    http.post(f"/v1/jobs/{third['id']}/cancel", headers=auth(B))  # one finishes: room for one more
    assert submit(http, B, input_uri="s3://photos/b/5.jpg").status_code == 202
    assert submit(http, B, input_uri="s3://photos/b/6.jpg").status_code == 429


def test_requests_and_bytes_per_minute_answer_429(gateway: Callable[..., TestClient]) -> None:
    http = gateway(a_extra="requests_per_minute = 3", b_extra="bytes_per_minute = 600")
    for _ in range(3):
        assert http.get("/v1/styles", headers=auth(A)).status_code == 200
    refused = http.get("/v1/styles", headers=auth(A))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert http.get("/v1/styles", headers=auth(B)).status_code == 200  # per tenant
    body = {"input_uri": "s3://photos/b/x.jpg", "style": "tiny", "metadata": {"note": "x" * 300}}
    assert http.post("/v1/jobs", json=body, headers=auth(B)).status_code == 202
    assert http.post("/v1/jobs", json=body, headers=auth(B)).status_code == 429  # 2 x 350 bytes > 600
    huge = http.post("/v1/jobs", content=b"{" + b" " * 700 + b"}",
                     headers={**auth(B), "Content-Type": "application/json"})
    assert huge.status_code == 413  # more than a whole minute's bytes: never fits


# --- listing ------------------------------------------------------------------------------------


def test_listing_pages_through_the_tenants_own_jobs_newest_first(http: TestClient, client: Client) -> None:
    ids = [submit(http, A, input_uri=f"s3://photos/a/{i}.jpg").json()["id"] for i in range(3)]
    batch = [{"input_uri": f"s3://photos/a/b{i}.jpg", "style": "tiny"} for i in range(4)]  # same millisecond
    ids += [job["id"] for job in http.post("/v1/jobs:batch", json={"jobs": batch}, headers=auth(A)).json()["jobs"]]
    submit(http, B, input_uri="s3://photos/b/x.jpg")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = http.get("/v1/jobs", params=params, headers=auth(A)).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)  # every job once, none of B's
    assert seen[:3] != ids[:3] and set(seen[-3:]) == set(ids[:3])  # newest first
    assert seen[-3:] == ids[:3][::-1]
    http.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(A))
    cancelled = http.get("/v1/jobs", params={"state": "cancelled"}, headers=auth(A)).json()
    assert [job["id"] for job in cancelled["jobs"]] == [ids[0]] and cancelled["next_cursor"] is None
    client.store.redis.delete(client.store.job_key(ids[1]))  # its record expired
    listed = http.get("/v1/jobs", params={"limit": 100}, headers=auth(A)).json()["jobs"]
    assert ids[1] not in {job["id"] for job in listed} and len(listed) == len(ids) - 1
    assert client.store.redis.zcard(client.store.keys.tenant_jobs("a")) == len(ids) - 1  # and left the index
    bad = http.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=auth(A))
    assert bad.status_code == 400 and "cursor" in bad.json()["error"]["message"]


# --- photos sent to the gateway -----------------------------------------------------------------


def test_a_photo_sent_as_multipart_is_checked_stored_under_uploads_and_submitted(
        http: TestClient, client: Client, tmp_path: Path) -> None:
    photo = make_image(40, 30, "JPEG")
    response = http.post("/v1/jobs", headers=auth(A), files={"image": ("me.heic", photo, "image/heic")},
                         data={"style": "tiny", "metadata": json.dumps({"user": 7}), "deadline_s": "60"})
    assert response.status_code == 202, response.text
    job = response.json()
    uploads = tmp_path / "data" / "inputs" / "a" / "uploads"
    assert job["input_uri"].startswith(f"file://{uploads}/u_") and job["input_uri"].endswith(".jpg")
    assert Path(job["input_uri"].removeprefix("file://")).read_bytes() == photo
    assert job["metadata"] == {"user": 7} and job["output_uri"].startswith("s3://results/a/tiny/")


@pytest.mark.parametrize(("files", "data", "status", "code"), [
    ({"image": ("a.jpg", b"not an image at all", "image/jpeg")}, {"style": "tiny"}, 400, "invalid_input"),
    ({"image": ("a.png", make_image(200, 200, "PNG") + b"\0" * 50_000, "image/png")}, {"style": "tiny"}, 413, None),
    ({"photo": ("a.png", make_image(20, 20), "image/png")}, {"style": "tiny"}, 422, None),
    ({"image": ("a.png", make_image(20, 20), "image/png")}, {"style": "nope"}, 400, "unknown_style"),
    ({"image": ("a.png", make_image(20, 20), "image/png")}, {"style": "tiny", "input_uri": "s3://x/y"}, 422, None),
])
def test_a_bad_photo_submit_stores_nothing(http: TestClient, client: Client, tmp_path: Path, files: dict,
                                           data: dict, status: int, code: str | None) -> None:
    response = http.post("/v1/jobs", headers=auth(A), files=files, data=data)
    assert response.status_code == status, response.text
    if code:
        assert response.json()["error"]["code"] == code
    uploads = tmp_path / "data" / "inputs" / "a" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())
    assert job_count(client) == 0


def test_without_an_uploads_prefix_photos_are_refused(http: TestClient) -> None:
    response = http.post("/v1/jobs", headers=auth(B), files={"image": ("a.png", make_image(20, 20), "image/png")},
                         data={"style": "tiny"})
    assert response.status_code == 403 and "uploads" in response.json()["error"]["message"]
    assert http.post("/v1/uploads", json={"content_type": "image/png"}, headers=auth(B)).status_code == 403


def test_file_uploads_cannot_be_presigned_so_the_page_falls_back(http: TestClient) -> None:
    response = http.post("/v1/uploads", json={"content_type": "image/jpeg", "filename": "a.jpg"}, headers=auth(A))
    assert response.status_code == 409 and response.json()["error"]["code"] == "direct_upload_unavailable"


def test_a_succeeded_jobs_file_output_can_be_fetched_by_its_tenant_only(
        client: Client, tmp_path: Path, serving: Callable[[FastAPI], TestClient]) -> None:
    http = serving(make_app(client, [PLAIN]))
    job = submit(http, PLAIN, input_uri=f"file://{tmp_path}/data/inputs/x.png").json()
    assert http.get(f"/v1/jobs/{job['id']}/output", headers=auth(PLAIN)).status_code == 409  # not yet
    from stylequeue.pipeline.storage import Storage

    Storage(client.settings).write(job["output_uri"], b"\x89PNG result", "image/png")
    client.store.transition(job["id"], JobState.QUEUED, JobState.RUNNING)
    client.store.transition(job["id"], JobState.RUNNING, JobState.SUCCEEDED)
    response = http.get(f"/v1/jobs/{job['id']}/output", headers=auth(PLAIN))
    assert response.status_code == 200 and response.content == b"\x89PNG result"
    assert response.headers["content-type"] == "image/png"
    other = serving(make_app(client, ["someone-else-token"]))
    assert other.get(f"/v1/jobs/{job['id']}/output", headers=auth("someone-else-token")).status_code == 404


# --- long polls ---------------------------------------------------------------------------------


def long_poll(http: TestClient, job_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `GET /v1/jobs/{id}?wait=30` as tenant A in a thread; once joined, the dict holds the answered record
    (`job`) and the seconds it took (`took`)."""
    answer: dict[str, Any] = {}

    def wait() -> None:
        started = time.monotonic()
        answer["job"] = http.get(f"/v1/jobs/{job_id}", params={"wait": 30}, headers=auth(A)).json()
        answer["took"] = time.monotonic() - started

    thread = threading.Thread(target=wait)
    thread.start()
    return thread, answer


def test_a_long_poll_answers_when_the_job_finishes(http: TestClient, client: Client) -> None:
    job = submit(http, A, input_uri="s3://photos/a/x.jpg").json()
    watcher = http.app.state.gateway.watcher
    thread, answer = long_poll(http, job["id"])
    assert wait_for(lambda: watcher.waiting == 1, timeout=20)  # the request is parked, not polling
    client.cancel(job["id"])
    thread.join(30)
    assert answer["job"]["state"] == "cancelled"
    assert answer["took"] < 20  # woken by the finish, not by its 30 s running out


def test_a_finish_announced_while_the_subscriber_was_away_still_wakes_the_wait(http: TestClient,
                                                                                client: Client) -> None:
    job = submit(http, A, input_uri="s3://photos/a/x.jpg").json()
    watcher = http.app.state.gateway.watcher
    thread, answer = long_poll(http, job["id"])
    assert wait_for(lambda: watcher.waiting == 1, timeout=20)
    client.store.redis.client_kill_filter(_type="pubsub")  # the subscription drops (a Redis restart, a failover)
    client.cancel(job["id"])  # announced, perhaps to no one
    thread.join(30)
    assert answer["job"]["state"] == "cancelled" and answer["took"] < 20  # the reconnect made it read again


def test_a_long_poll_that_runs_out_answers_with_the_current_record(http: TestClient) -> None:
    job = submit(http, A, input_uri="s3://photos/a/x.jpg").json()
    assert http.get(f"/v1/jobs/{job['id']}", params={"wait": 0.3}, headers=auth(A)).json()["state"] == "queued"
    http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(A))
    assert http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}, headers=auth(A)).json()["state"] == "cancelled"
    for wait in (0, -1, 31, "soon"):
        assert http.get(f"/v1/jobs/{job['id']}", params={"wait": wait}, headers=auth(A)).status_code == 422


# --- what callers never see ---------------------------------------------------------------------


def test_styles_show_what_callers_can_use_and_nothing_internal(http: TestClient, client: Client,
                                                               tiny_registry: Path) -> None:
    presence = Presence(client.store)
    presence.heartbeat("gpu-host-4711", {"pid": 1, "ready": True})
    presence.publish_runtime("tiny", "gpu-host-4711", {"runtime": "openvino", "precision": "bf16"})
    response = http.get("/v1/styles", headers=auth(A))
    [style] = [entry for entry in response.json()["styles"] if entry["name"] == "tiny"]
    assert style == {"name": "tiny", "description": "tiny test style", "output": "png", "max_side": 64,
                     "model": style["model"], "runtimes": ["openvino/bf16"]}
    assert style["model"].startswith("tiny@")
    assert "gpu-host-4711" not in response.text and str(tiny_registry.parent) not in response.text


def test_errors_and_health_name_no_server_internals(http: TestClient, tmp_path: Path, tiny_registry: Path,
                                                    serving: Callable[[FastAPI], TestClient]) -> None:
    inside = f"file://{tmp_path}/data/inputs/x.png"
    bodies = [
        (PLAIN, {"input_uri": "file:///etc/passwd"}),
        (PLAIN, {"input_uri": inside, "output_uri": "file:///tmp/x.png"}),
        (PLAIN, {"input_uri": inside, "output_uri": inside}),
        (PLAIN, {"input_uri": "file://./relative.png"}),
        (A, {"input_uri": "s3://photos/b/x.jpg"}),
        (A, {"input_uri": "s3://photos/a/x.jpg", "style": "../../etc"}),
    ]
    for token, body in bodies:
        answer = submit(http, token, **body)
        assert 400 <= answer.status_code < 500, answer.text
        message = answer.json()["error"]["message"]
        for sent in body.values():  # a caller's own URI may be quoted back to it; nothing else of ours
            message = message.replace(sent, "")
        for internal in (str(tmp_path), str(tiny_registry.parent), "redis://", str(Path.cwd())):
            assert internal not in message, answer.text
    health = http.get("/healthz")
    assert health.json() == {"ok": True} and "redis" not in health.text.lower()
    down = Client(redis_url="redis://127.0.0.1:1/0", styles=tiny_registry, storage_url="s3://out")
    unhealthy = serving(make_app(down, [PLAIN])).get("/healthz")
    assert unhealthy.status_code == 503 and unhealthy.json() == {"ok": False}
