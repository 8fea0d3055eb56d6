"""Photos into the tenant's `uploads` prefix: presigned straight to the store, or sent to the gateway.

- `POST /v1/uploads` (`{"content_type": "image/jpeg", "filename": "a.jpg"}`): 201 + `{"input_uri", "upload":
  {"url", "fields"}, "expires_at"}`, a presigned POST for the key `{uploads}u_<random>.<ext>` (ext from the
  content type, else the file name). The phone posts `fields` then the file (field `file`) to `url`; the
  photo never passes through the gateway. Only an `s3://` uploads prefix can be presigned: for a `file://`
  one the answer is 409 `direct_upload_unavailable`, and the photo goes by the next way.
- `POST /v1/jobs` as `multipart/form-data` (field `image` + the submit fields): the photo's header is read
  with Pillow (an image, within STYLEQUEUE_MAX_INPUT_PIXELS), it is stored at `{uploads}u_<random>.<ext>`
  through `Storage.write`, and that is submitted. Everything is checked before the photo is written. The
  guard has capped the body while it streamed (STYLEQUEUE_MAX_INPUT_BYTES plus the fields).
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from stylequeue.errors import InputForbidden, InputTooLarge, InvalidInput
from stylequeue.jobs import Job, new_job_id
from stylequeue.pipeline.images import probe_image
from stylequeue.producer.gateway.routes import caller
from stylequeue.producer.gateway.tenancy import SubmitBody, submit_jobs

if TYPE_CHECKING:
    from stylequeue.config.tenants import Tenant
    from stylequeue.producer.gateway.app import Gateway

# Content type -> extension of what phones send; other image types take the file name's extension.
_EXTENSIONS = {"image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif",
               "image/heic": "heic", "image/heif": "heif", "image/avif": "avif", "image/bmp": "bmp",
               "image/tiff": "tiff"}
# Pillow format -> (extension, content type) of a stored photo. MPO is the multi-picture JPEG many phones write.
_FORMATS = {"jpeg": ("jpg", "image/jpeg"), "mpo": ("jpg", "image/jpeg"), "png": ("png", "image/png"),
            "webp": ("webp", "image/webp"), "gif": ("gif", "image/gif"), "bmp": ("bmp", "image/bmp"),
            "tiff": ("tiff", "image/tiff")}
_CONTENT_TYPE_RE = re.compile(r"^image/[a-z0-9][a-z0-9.+-]{0,60}$")
_EXTENSION_RE = re.compile(r"^[a-z0-9]{1,5}$")
_FORM_FIELDS = ("style", "callback_url", "output_uri", "priority", "idempotency_key", "metadata", "deadline_s")


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content_type: str = Field(max_length=100, description="the photo's type: image/jpeg, image/png, ...")
    filename: str | None = Field(None, max_length=255, description="the photo's name (for its extension)")


class DirectUploadUnavailable(InputForbidden):
    """The tenant's uploads prefix is not in an object store: no presigned POST (HTTP 409)."""


def _upload_prefix(tenant: Tenant) -> str:
    if tenant.uploads is None:
        raise InputForbidden("this token has no uploads prefix (`uploads` in the tenants file): it can only "
                             "submit photos already in storage, by input_uri")
    return tenant.uploads


def _extension(content_type: str, filename: str | None) -> str:
    if content_type in _EXTENSIONS:
        return _EXTENSIONS[content_type]
    extension = (filename or "").rpartition(".")[2].lower() if "." in (filename or "") else ""
    return extension if _EXTENSION_RE.match(extension) else "img"


def _new_key() -> str:
    return "u_" + new_job_id().removeprefix("j_")


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


def presigned_upload(gateway: Gateway, tenant: Tenant, body: UploadBody) -> dict[str, Any]:
    """The 201 answer of POST /v1/uploads."""
    prefix = _upload_prefix(tenant)
    content_type = body.content_type.strip().lower()
    if not _CONTENT_TYPE_RE.match(content_type):
        raise InvalidInput(f"content_type must be an image type (image/jpeg, image/png, ...), got {content_type!r}")
    if not prefix.startswith("s3://"):
        raise DirectUploadUnavailable("this server stores uploads outside an object store: send the photo with "
                                      "POST /v1/jobs as multipart/form-data (field `image`) instead")
    input_uri = f"{prefix}{_new_key()}.{_extension(content_type, body.filename)}"
    ttl = gateway.settings.upload_ttl_s
    upload = gateway.storage.presign_upload(input_uri, max_bytes=gateway.settings.max_input_bytes, ttl_s=ttl,
                                            content_type=content_type)
    return {"input_uri": input_uri, "upload": upload, "expires_at": _iso(time.time() + ttl)}


def _form_body(form: Any, input_uri: str) -> SubmitBody:
    """The submit fields of a multipart form as a SubmitBody for `input_uri` (422 for a malformed one)."""
    values: dict[str, Any] = {"input_uri": input_uri}
    errors = []
    for name, value in form.multi_items():
        if name == "image":
            continue
        if name not in _FORM_FIELDS or not isinstance(value, str) or name in values:
            errors.append({"type": "extra_forbidden", "loc": ("body", name), "msg": "unexpected or repeated field",
                           "input": None})
            continue
        values[name] = value
    if "metadata" in values:
        try:
            values["metadata"] = json.loads(values["metadata"])
        except ValueError:
            errors.append({"type": "json_invalid", "loc": ("body", "metadata"), "msg": "metadata must be a JSON "
                           "object", "input": None})
    if errors:
        raise RequestValidationError(errors)
    try:
        return SubmitBody.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def submit_photo(gateway: Gateway, request: Request, tenant: Tenant) -> Job:
    """The multipart form of POST /v1/jobs: check the photo, store it under `uploads`, submit it."""
    prefix = _upload_prefix(tenant)
    settings = gateway.settings
    async with request.form(max_files=1, max_fields=len(_FORM_FIELDS)) as form:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise RequestValidationError([{"type": "missing", "loc": ("body", "image"), "input": None,
                                           "msg": "the photo goes in a file field named `image`"}])
        data = await image.read(settings.max_input_bytes + 1)
        if len(data) > settings.max_input_bytes:
            raise InputTooLarge(f"the photo is larger than {settings.max_input_bytes} bytes "
                                "(STYLEQUEUE_MAX_INPUT_BYTES)")
        kind, _width, _height = probe_image(data, max_pixels=settings.max_input_pixels)
        extension, content_type = _FORMATS.get(kind, (kind if _EXTENSION_RE.match(kind) else "img", f"image/{kind}"))
        input_uri = f"{prefix}{_new_key()}.{extension}"
        body = _form_body(form, input_uri)

    def store() -> None:
        gateway.storage.write(input_uri, data, content_type)

    jobs = await run_in_threadpool(submit_jobs, gateway, tenant, [body], store)
    return jobs[0]


def router(gateway: Gateway) -> Any:
    api = APIRouter()

    @api.post("/v1/uploads", status_code=201)
    def create_upload(body: UploadBody, tenant: Tenant = Depends(caller)) -> Any:
        """A presigned POST for one photo under the caller's uploads prefix; then submit its `input_uri`."""
        try:
            return presigned_upload(gateway, tenant, body)
        except DirectUploadUnavailable as exc:
            return JSONResponse({"error": {"code": "direct_upload_unavailable", "message": exc.message}},
                                status_code=409)

    return api
