"""The HTTP gateway (producer/gateway.py) over a real Redis: in process, and as `stylequeue api`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from stylequeue.embedded import free_port
from stylequeue.producer.client import Client
from stylequeue.producer.gateway import make_app, token_id
from tests.workers import wait_for

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"


@pytest.fixture
def client(redis_url: str, tiny_registry: Path, tmp_path: Path) -> Client:
    (tmp_path / "in").mkdir()
    return Client(redis_url=redis_url, styles=tiny_registry, storage_url=f"file://{tmp_path}/out",
                  input_roots=str(tmp_path / "in"))


@pytest.fixture
def http(client: Client) -> TestClient:
    return TestClient(make_app(client, [ALICE, BOB]))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def photo_uri(client: Client, name: str = "a.jpg") -> str:
    return f"file://{client.settings.input_roots[0]}/{name}"


def test_every_job_route_needs_a_known_bearer_token(http: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ALICE}"}):
        response = http.get("/v1/styles", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"
    assert "tiny" in {s["name"] for s in http.get("/v1/styles", headers=auth(ALICE)).json()["styles"]}
    assert http.get("/healthz").json() == {"ok": True}  # probes need no token


def test_submit_get_and_cancel_a_job(http: TestClient, client: Client) -> None:
    body = {"input_uri": photo_uri(client), "style": "tiny", "metadata": {"order": 7},
            "callback_url": "https://example.com/hook"}
    response = http.post("/v1/jobs", json=body, headers=auth(ALICE))
    assert response.status_code == 202
    job = response.json()
    assert job["state"] == "queued" and job["style"] == "tiny" and job["metadata"] == {"order": 7}
    assert "tenant" not in job  # the owner is internal, and never the token itself
    assert client.get(job["id"]).tenant == token_id(ALICE) != ALICE
    assert http.get(f"/v1/jobs/{job['id']}", headers=auth(ALICE)).json() == job
    cancelled = http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(ALICE)).json()
    assert cancelled["state"] == "cancelled" and cancelled["callback"]["state"] == "pending"


def test_a_token_sees_only_its_own_jobs(http: TestClient, client: Client) -> None:
    job = http.post("/v1/jobs", json={"input_uri": photo_uri(client), "style": "tiny"}, headers=auth(ALICE)).json()
    for method, path in (("get", f"/v1/jobs/{job['id']}"), ("post", f"/v1/jobs/{job['id']}/cancel"),
                         ("get", "/v1/jobs/j_doesnotexist")):
        response = getattr(http, method)(path, headers=auth(BOB))
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get(job["id"]).state == "queued"  # Bob's cancel changed nothing


def test_idempotency_keys_are_per_token(http: TestClient, client: Client) -> None:
    body = {"input_uri": photo_uri(client), "style": "tiny", "idempotency_key": "order-7"}
    first = http.post("/v1/jobs", json=body, headers=auth(ALICE)).json()
    again = http.post("/v1/jobs", json=body, headers=auth(ALICE)).json()
    other = http.post("/v1/jobs", json=body, headers=auth(BOB)).json()
    assert first["id"] == again["id"] != other["id"]
    assert http.get(f"/v1/jobs/{other['id']}", headers=auth(BOB)).status_code == 200


def test_batches_are_all_or_nothing(http: TestClient, client: Client) -> None:
    good = [{"input_uri": photo_uri(client, f"{i}.jpg"), "style": "tiny", "priority": "bulk"} for i in range(5)]
    response = http.post("/v1/jobs:batch", json={"jobs": good}, headers=auth(ALICE))
    assert response.status_code == 202
    jobs = response.json()["jobs"]
    assert len({job["id"] for job in jobs}) == 5 and all(job["priority"] == "bulk" for job in jobs)
    before = len(client.store.redis.keys(client.store.job_key("*")))
    bad = [*good, {"input_uri": photo_uri(client), "style": "no-such-style"}]
    response = http.post("/v1/jobs:batch", json={"jobs": bad}, headers=auth(ALICE))
    assert response.status_code == 400 and response.json()["error"]["code"] == "unknown_style"
    assert len(client.store.redis.keys(client.store.job_key("*"))) == before


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"input_uri": "file:///etc/passwd", "style": "tiny"}, 403, "input_forbidden"),
    ({"input_uri": "ftp://x/a.jpg", "style": "tiny"}, 403, "input_forbidden"),
    ({"input_uri": "s3://photos/a.jpg", "style": "nope"}, 400, "unknown_style"),
    ({"input_uri": "s3://photos/a.jpg", "style": "tiny", "callback_url": "ftp://x"}, 400, "invalid_request"),
    ({"input_uri": "s3://photos/a.jpg", "style": "tiny", "priority": "urgent"}, 422, None),
    ({"input_uri": "s3://photos/a.jpg", "style": "tiny", "surprise": 1}, 422, None),
])
def test_bad_submissions_get_a_clear_4xx(http: TestClient, body: dict, status: int, code: str | None) -> None:
    response = http.post("/v1/jobs", json=body, headers=auth(ALICE))
    assert response.status_code == status, response.text
    if code:
        assert response.json()["error"]["code"] == code


def test_metrics_and_openapi(http: TestClient, client: Client) -> None:
    http.post("/v1/jobs", json={"input_uri": photo_uri(client), "style": "tiny"}, headers=auth(ALICE))
    text = http.get("/metrics").text
    assert 'stylequeue_api_requests_total{route="/v1/jobs",status="202"} 1.0' in text
    assert 'stylequeue_queue_depth{queue="stylequeue.interactive"} 1.0' in text
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs:batch", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/styles"} <= set(paths)
    assert http.get("/docs").status_code == 200


def test_an_unreachable_redis_is_503(tiny_registry: Path) -> None:
    down = Client(redis_url=f"redis://127.0.0.1:{free_port()}/0", styles=tiny_registry, storage_url="s3://out")
    http = TestClient(make_app(down, [ALICE]))
    assert http.get("/healthz").status_code == 503
    response = http.post("/v1/jobs", json={"input_uri": "s3://photos/a.jpg", "style": "tiny"}, headers=auth(ALICE))
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"


def test_stylequeue_api_serves_over_real_http(redis_url: str, tiny_registry: Path, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, STYLEQUEUE_REDIS_URL=redis_url, STYLEQUEUE_STYLES=str(tiny_registry),
               STYLEQUEUE_STORAGE_URL="s3://out", STYLEQUEUE_API_TOKENS=f"{ALICE}, {BOB}")
    server = subprocess.Popen([sys.executable, "-m", "stylequeue", "api", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(f"{base}/healthz", timeout=2).status == 200
            except OSError:
                return False

        assert wait_for(up, timeout=60), server.stderr.read1().decode() if server.poll() is not None else ""
        request = urllib.request.Request(f"{base}/v1/jobs", method="POST", headers={**auth(BOB),
                                         "Content-Type": "application/json"},
                                         data=json.dumps({"input_uri": "s3://photos/a.jpg", "style": "tiny"}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            job = json.loads(response.read())
        fetched = urllib.request.urlopen(urllib.request.Request(f"{base}/v1/jobs/{job['id']}", headers=auth(BOB)),
                                         timeout=10)
        assert json.loads(fetched.read())["id"] == job["id"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{base}/v1/jobs/{job['id']}", headers=auth(ALICE)),
                                   timeout=10)
        assert refused.value.code == 404
    finally:
        server.terminate()
        server.wait(30)
    assert "unscoped" in server.stderr.read().decode()  # plain tokens work, with a warning at start


def test_the_gateway_refuses_to_start_without_tokens(redis_url: str, tiny_registry: Path) -> None:
    env = dict(os.environ, STYLEQUEUE_REDIS_URL=redis_url, STYLEQUEUE_STYLES=str(tiny_registry))
    env.pop("STYLEQUEUE_API_TOKENS", None)
    result = subprocess.run([sys.executable, "-m", "stylequeue", "api", "--port", str(free_port())], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "STYLEQUEUE_API_TOKENS" in result.stderr
