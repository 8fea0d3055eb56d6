"""`stylequeue api` as a real uvicorn server: huge and chunked bodies meet the guard before they are read, the
gateway's memory stays flat, and many long polls share one Redis subscription."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis

from stylequeue.config.tenants import token_digest
from stylequeue.embedded import EmbeddedRedis, free_port
from stylequeue.producer.client import Client
from tests.conftest import empty_database
from tests.workers import make_image, wait_for

TOKEN = "server-test-token-0123456789"
PREFIX = "gwsrv:"
MB = 1024 * 1024
MAX_INPUT = 1 * MB


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    redis_url: str
    client: Client

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def get(self, path: str, token: str | None = TOKEN, timeout: float = 60) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        return answer.status, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


@pytest.fixture(scope="module")
def server(redis_server: EmbeddedRedis, tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("gateway-server")
    (root / "inputs" / "a").mkdir(parents=True)
    tenants = root / "tenants.toml"
    tenants.write_text(f'[tenants.a]\ntoken_sha256 = "{token_digest(TOKEN)}"\ninputs = ["file://{root}/inputs/a/"]\n'
                       f'outputs = "file://{root}/outputs/a/"\nuploads = "file://{root}/inputs/a/up/"\n'
                       "requests_per_minute = 100000\nbytes_per_minute = 10000000000\n")
    url = empty_database(redis_server, 13)
    port = free_port()
    env = dict(os.environ, STYLEQUEUE_REDIS_URL=url, STYLEQUEUE_STYLES=str(tiny_registry),
               STYLEQUEUE_STORAGE_URL=f"file://{root}", STYLEQUEUE_INPUT_ROOTS=str(root / "inputs"),
               STYLEQUEUE_API_TENANTS=str(tenants), STYLEQUEUE_KEY_PREFIX=PREFIX,
               STYLEQUEUE_MAX_INPUT_BYTES=str(MAX_INPUT))
    log = open(root / "api.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "stylequeue", "api", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    client = Client(redis_url=url, styles=tiny_registry, storage_url=f"file://{root}", key_prefix=PREFIX,
                    input_roots=str(root / "inputs"))
    server = Server(port, process, url, client)

    def up() -> bool:
        try:
            return server.get("/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        assert wait_for(up, timeout=90), (root / "api.log").read_text()[-3000:]
        yield server
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        client.close()


def send_until_answered(port: int, head: bytes, chunk: bytes, total: int) -> tuple[int, int]:
    """Send `head` (with the body's first bytes, if any), then `chunk`s up to `total` bytes, stopping as soon
    as the server answers or hangs up; returns (the answer's status, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent = 0
    try:
        sock.sendall(head)
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is here: the server stopped reading
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        while b"\r\n" not in answer:
            part = sock.recv(4096)
            if not part:
                break
            answer += part
        return int(answer.split(b" ", 2)[1]), sent
    finally:
        sock.close()


def request_head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


HUGE = 200 * MB


@pytest.mark.slow
def test_huge_unauthenticated_bodies_are_refused_unread(server: Server) -> None:
    before = server.rss()
    results: list[tuple[int, int]] = []

    def attack(token: str | None) -> None:
        headers = {"Content-Type": "application/json", "Content-Length": str(HUGE)}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        results.append(send_until_answered(server.port, request_head("/v1/jobs", headers), b"x" * MB, HUGE))

    threads = [threading.Thread(target=attack, args=(token,)) for token in (None, "wrong-token", "")]
    for thread in threads:
        thread.start()
    assert server.get("/healthz")[0] == 200  # the gateway keeps answering meanwhile
    for thread in threads:
        thread.join(120)
    assert [status for status, _ in results] == [401, 401, 401]
    assert all(sent < HUGE // 4 for _, sent in results)  # it stopped reading long before the end
    assert server.rss() - before < 40 * MB


@pytest.mark.slow
def test_a_declared_oversized_body_is_413_before_it_is_read(server: Server) -> None:
    for content_type in ("application/json", "multipart/form-data; boundary=x"):
        head = request_head("/v1/jobs", {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type,
                                         "Content-Length": str(HUGE)})
        status, sent = send_until_answered(server.port, head, b"x" * MB, HUGE)
        assert status == 413 and sent < HUGE // 4


@pytest.mark.slow
def test_a_chunked_body_is_cut_off_at_its_cap_and_memory_stays_flat(server: Server) -> None:
    before = server.rss()
    photo_part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    for content_type, first in (("application/json", b'{"metadata": "'), ("multipart/form-data; boundary=x",
                                                                          photo_part)):
        head = request_head("/v1/jobs", {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type,
                                         "Transfer-Encoding": "chunked"}) + chunked(first)
        status, sent = send_until_answered(server.port, head, chunked(b"x" * MB), HUGE)
        assert status == 413 and sent < HUGE // 4
    assert server.rss() - before < 64 * MB
    assert server.get("/healthz")[0] == 200


@pytest.mark.slow
def test_a_photo_within_the_cap_still_goes_through_a_real_server(server: Server) -> None:
    boundary = "sqboundary"
    photo = make_image(32, 24)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"style\"\r\n\r\ntiny\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/jobs", body=iter([body[:100], body[100:]]), encode_chunked=True,
                       headers={"Authorization": f"Bearer {TOKEN}",
                                "Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = connection.getresponse()
    job = json.loads(answer.read())
    assert answer.status == 202, job
    assert Path(job["input_uri"].removeprefix("file://")).read_bytes() == photo


@pytest.mark.slow
def test_many_long_polls_share_one_subscription_and_wake_on_finish(server: Server) -> None:
    jobs = [server.client.submit(f"file://{server.client.settings.input_roots[0]}/a/{i}.png", "tiny", tenant="a")
            for i in range(40)]
    answers: dict[str, tuple[int, dict, float]] = {}

    def wait(job_id: str) -> None:
        started = time.monotonic()
        status, body = server.get(f"/v1/jobs/{job_id}?wait=30")
        answers[job_id] = (status, body, time.monotonic() - started)

    threads = [threading.Thread(target=wait, args=(job.id,)) for job in jobs]
    for thread in threads:
        thread.start()

    def waiting() -> float:
        text = server.get("/metrics", token=None)[1]["text"]
        line = next(line for line in text.splitlines() if line.startswith("stylequeue_api_waiting_requests"))
        return float(line.split()[-1])

    assert wait_for(lambda: waiting() == len(jobs), timeout=30)
    watcher = redis.Redis.from_url(server.redis_url)
    assert watcher.pubsub_numsub(f"{PREFIX}finished") == [(f"{PREFIX}finished".encode(), 1)]
    for job in jobs:
        server.client.cancel(job.id)
    for thread in threads:
        thread.join(40)
    assert {job_id: (status, body["state"]) for job_id, (status, body, _) in answers.items()} == {
        job.id: (200, "cancelled") for job in jobs}
    assert max(took for _, _, took in answers.values()) < 20  # woken by the finishes, not by 30 s running out
    watcher.close()
