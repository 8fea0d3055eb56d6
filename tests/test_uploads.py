"""POST /v1/uploads: a presigned POST a phone can use, posted as a real multipart form to the S3 test server."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient

from stylequeue.config.tenants import load_tenants, token_digest
from stylequeue.producer.client import Client
from stylequeue.producer.gateway import make_app
from tests.s3post import post_policy_gate
from tests.workers import make_image

TOKEN = "miniapp-token-0123456789"
MAX_BYTES = 20_000


@pytest.fixture
def gate(s3_endpoint: str) -> Iterator[str]:
    with post_policy_gate(s3_endpoint) as url:
        yield url


@pytest.fixture
def http(redis_url: str, tiny_registry: Path, tmp_path: Path, s3_endpoint: str, s3_bucket: str,
         gate: str) -> Iterator[TestClient]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.miniapp]\ntoken_sha256 = "{token_digest(TOKEN)}"\n'
                       f'inputs = ["s3://{s3_bucket}/miniapp/"]\noutputs = "s3://{s3_bucket}/results/miniapp/"\n'
                       f'uploads = "s3://{s3_bucket}/miniapp/phone/"\n')
    # Workers reach the store on its internal endpoint; phones on the public one (here: the policy gate).
    client = Client(redis_url=redis_url, styles=tiny_registry, storage_url=f"s3://{s3_bucket}",
                    s3_endpoint_url=s3_endpoint, s3_public_endpoint_url=gate, s3_addressing_style="path",
                    max_input_bytes=MAX_BYTES, upload_ttl_s=300)
    with TestClient(make_app(client, tenants=load_tenants(tenants))) as http:
        yield http


def presign(http: TestClient, **body: str) -> dict:
    response = http.post("/v1/uploads", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 201, response.text
    return response.json()


def post(upload: dict, data: bytes, **fields: str) -> httpx.Response:
    form = upload["upload"]["fields"] | fields
    return httpx.post(upload["upload"]["url"], data=form, files={"file": ("photo.jpg", data, form["Content-Type"])})


def stored(s3_endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [entry["Key"] for entry in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def test_the_policy_fixes_key_size_type_and_expiry(http: TestClient, s3_bucket: str, gate: str) -> None:
    upload = presign(http, content_type="image/jpeg", filename="IMG_0001.HEIC")
    key = upload["input_uri"].removeprefix(f"s3://{s3_bucket}/")
    assert key.startswith("miniapp/phone/u_") and key.endswith(".jpg")  # the content type decides
    assert upload["upload"]["url"] == f"{gate}/{s3_bucket}"  # signed for the public endpoint
    fields = upload["upload"]["fields"]
    assert fields["key"] == key and fields["Content-Type"] == "image/jpeg"
    policy = json.loads(base64.b64decode(fields["policy"]))
    conditions = policy["conditions"]
    assert {"bucket": s3_bucket} in conditions and {"key": key} in conditions
    assert ["content-length-range", 1, MAX_BYTES] in conditions
    assert ["starts-with", "$Content-Type", "image/"] in conditions
    expires = time.mktime(time.strptime(policy["expiration"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(expires - (time.time() + 300)) < 60 and upload["expires_at"].endswith("Z")
    other = presign(http, content_type="image/png")
    assert other["input_uri"] != upload["input_uri"] and other["input_uri"].endswith(".png")


def test_a_photo_posted_within_the_policy_is_stored_and_can_be_submitted(
        http: TestClient, s3_endpoint: str, s3_bucket: str) -> None:
    upload = presign(http, content_type="image/jpeg", filename="a.jpg")
    photo = make_image(48, 32, "JPEG")
    response = post(upload, photo)
    assert response.status_code == 204, response.text
    key = upload["input_uri"].removeprefix(f"s3://{s3_bucket}/")
    assert stored(s3_endpoint, s3_bucket) == {key: photo}
    job = http.post("/v1/jobs", json={"input_uri": upload["input_uri"], "style": "tiny"},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert job.status_code == 202 and job.json()["output_uri"].startswith(f"s3://{s3_bucket}/results/miniapp/tiny/")


@pytest.mark.parametrize(("data", "fields", "status", "code"), [
    (b"\xff" * (MAX_BYTES + 1), {}, 400, "EntityTooLarge"),
    (b"", {}, 400, "EntityTooSmall"),
    (make_image(16, 16, "JPEG"), {"Content-Type": "text/html"}, 403, "AccessDenied"),
    (make_image(16, 16, "JPEG"), {"key": "miniapp/other-tenant/x.jpg"}, 403, "AccessDenied"),
    (make_image(16, 16, "JPEG"), {"key": "miniapp/phone/chosen-by-the-phone.jpg"}, 403, "AccessDenied"),
    (make_image(16, 16, "JPEG"), {"x-amz-meta-owner": "someone"}, 403, "AccessDenied"),
])
def test_posts_outside_the_policy_are_refused_and_store_nothing(
        http: TestClient, s3_endpoint: str, s3_bucket: str, data: bytes, fields: dict, status: int,
        code: str) -> None:
    upload = presign(http, content_type="image/jpeg")
    response = post(upload, data, **fields)
    assert response.status_code == status and f"<Code>{code}</Code>" in response.text
    assert stored(s3_endpoint, s3_bucket) == {}


def test_a_tampered_policy_is_refused(http: TestClient, s3_endpoint: str, s3_bucket: str) -> None:
    upload = presign(http, content_type="image/jpeg")
    policy = json.loads(base64.b64decode(upload["upload"]["fields"]["policy"]))
    policy["conditions"] = [c for c in policy["conditions"] if not isinstance(c, list)]  # drop the size cap
    forged = base64.b64encode(json.dumps(policy).encode()).decode()
    response = post(upload, b"\xff" * (MAX_BYTES + 1), policy=forged)
    assert response.status_code == 403 and "SignatureDoesNotMatch" in response.text
    assert stored(s3_endpoint, s3_bucket) == {}


@pytest.mark.parametrize("content_type", ["text/plain", "image/", "image/jpeg; x=<script>", "application/pdf"])
def test_only_image_types_get_an_upload(http: TestClient, content_type: str) -> None:
    response = http.post("/v1/uploads", json={"content_type": content_type},
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_input"
