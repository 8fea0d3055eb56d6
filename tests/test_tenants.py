"""The tenants file (config/tenants.py): parsed, validated with errors naming tenant and field, tokens by hash."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stylequeue.config.tenants import Tenant, TenantBook, load_tenants, tenant_book, token_digest, token_id
from stylequeue.errors import ConfigError

TOKEN = "miniapp-secret-token"
GOOD = f"""
[tenants.miniapp]
token_sha256 = "{token_digest(TOKEN)}"
inputs = ["s3://uploads/miniapp/", "HTTPS://cdn.example.com/photos"]
outputs = "s3://results/miniapp"
uploads = "s3://uploads/miniapp/phone/"
webhook_secret = "whsec_c2VjcmV0LWJ5dGVzLWZvci1taW5pYXBw"
max_in_flight = 200
callback_hosts = ["API.example.com."]
requests_per_minute = 100
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


def test_a_tenants_file_is_read_with_prefixes_normalised(tmp_path: Path) -> None:
    [tenant] = load_tenants(write(tmp_path, GOOD))
    assert tenant.name == "miniapp" and tenant.scoped
    assert tenant.inputs == ("s3://uploads/miniapp/", "https://cdn.example.com/photos/")
    assert tenant.outputs == "s3://results/miniapp/" and tenant.uploads == "s3://uploads/miniapp/phone/"
    assert tenant.callback_hosts == ("api.example.com",) and tenant.max_in_flight == 200
    assert tenant.requests_per_minute == 100 and tenant.bytes_per_minute > 0
    assert TOKEN not in write(tmp_path, GOOD).read_text()  # the file holds only the hash


def test_tokens_are_found_by_hash_and_rotate(tmp_path: Path) -> None:
    book = tenant_book(write(tmp_path, GOOD.replace(f'token_sha256 = "{token_digest(TOKEN)}"',
                                                    f'token_sha256 = ["{token_digest(TOKEN)}", '
                                                    f'"{token_digest("next-token")}"]')), ["plain-token"])
    assert book.find(TOKEN).name == "miniapp" == book.find("next-token").name
    assert book.find("plain-token").name == token_id("plain-token") and not book.find("plain-token").scoped
    assert book.find("") is None and book.find(TOKEN + "x") is None and book.find(token_digest(TOKEN)) is None


@pytest.mark.parametrize(("change", "message"), [
    (("max_in_flight = 200", "max_in_flight = 0"), "tenant 'miniapp': field 'max_in_flight' must be a positive"),
    ((f'"{token_digest(TOKEN)}"', f'"{TOKEN}"'), "tenant 'miniapp': field 'token_sha256' must be 64 hex digits"),
    (('outputs = "s3://results/miniapp"', 'outputs = "https://cdn.example.com/out/"'),
     "tenant 'miniapp': field 'outputs' must be a s3:// or file:// prefix"),
    (('uploads = "s3://uploads/miniapp/phone/"', 'uploads = "s3://elsewhere/phone/"'),
     "tenant 'miniapp': field 'uploads' (s3://elsewhere/phone/) must lie inside one of 'inputs'"),
    (('inputs = ["s3://uploads/miniapp/", "HTTPS://cdn.example.com/photos"]', 'inputs = ["s3://up/../x/"]'),
     "tenant 'miniapp': field 'inputs': "),
    (("inputs = [", "inputs = []\nunused = ["), "tenant 'miniapp': unknown field 'unused'"),
    (('webhook_secret = "whsec_c2VjcmV0LWJ5dGVzLWZvci1taW5pYXBw"', 'webhook_secret = "hunter2"'),
     "tenant 'miniapp': field 'webhook_secret' must be 'whsec_'"),
    (('callback_hosts = ["API.example.com."]', 'callback_hosts = ["api.ex\u0430mple.com"]'),
     "tenant 'miniapp': field 'callback_hosts'"),
    (("[tenants.miniapp]", '[tenants."Mini:App"]'), "tenant 'Mini:App': a tenant name is"),
    (("[tenants.miniapp]", "[tenants.0123456789abcdef01234567]"), "a tenant name is"),
    ((f'token_sha256 = "{token_digest(TOKEN)}"\n', ""), "tenant 'miniapp': field 'token_sha256' is required"),
])
def test_mistakes_are_named_by_tenant_and_field(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    assert change[0] in GOOD
    with pytest.raises(ConfigError, match="^tenants file .*" + re.escape(message)):
        load_tenants(write(tmp_path, GOOD.replace(*change)))


def test_two_tenants_cannot_share_a_token(tmp_path: Path) -> None:
    twice = GOOD + GOOD.replace("[tenants.miniapp]", "[tenants.other]")
    with pytest.raises(ConfigError, match="tenants 'miniapp' and 'other' have the same token"):
        TenantBook(load_tenants(write(tmp_path, twice)))


def test_a_missing_or_empty_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found .*STYLEQUEUE_API_TENANTS"):
        load_tenants(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"no \[tenants.NAME\] tables"):
        load_tenants(write(tmp_path, "# nothing\n"))


def test_unscoped_tenants_keep_the_old_job_owner_id() -> None:
    tenant = Tenant.unscoped("alice-token")
    assert tenant.name == token_id("alice-token") and len(tenant.name) == 24 and not tenant.scoped
