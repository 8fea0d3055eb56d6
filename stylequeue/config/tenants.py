"""The HTTP gateway's tenants file (STYLEQUEUE_API_TENANTS, docs/http.md): who may call, and what they may name.

```toml
[tenants.miniapp]
token_sha256 = "9f86d081..."          # hex SHA-256 of the bearer token (or a list of them, to rotate tokens)
inputs = ["s3://uploads/miniapp/", "https://cdn.example.com/photos/"]
outputs = "s3://results/miniapp/"
uploads = "s3://uploads/miniapp/"     # optional; must lie inside `inputs`
webhook_secret = "whsec_..."          # optional; default STYLEQUEUE_WEBHOOK_SECRET
max_in_flight = 200                   # optional; queued + running jobs, beyond it 429
callback_hosts = ["api.example.com"]  # optional
requests_per_minute = 6000            # optional (stylequeue addition); beyond it 429
bytes_per_minute = 536870912          # optional (stylequeue addition): request bodies; beyond it 429
```

The file never holds a token: a caller is found by the SHA-256 of the token it presents, compared in
constant time (`TenantBook.find`). Prefixes are stored normalised (pipeline/storage/scope.py). Callers of
STYLEQUEUE_API_TOKENS are tenants too, unscoped (`Tenant.scoped` False): their jobs are theirs alone, but
the URIs they name are limited only by the storage rules every job obeys. Light (stdlib + scope.py): the
worker reads this file for the tenants' webhook secrets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylequeue.config.settings import read_toml
from stylequeue.errors import ConfigError, InputForbidden

DEFAULT_REQUESTS_PER_MINUTE = 6000
DEFAULT_BYTES_PER_MINUTE = 512 * 1024 * 1024
# A tenant's name is part of Redis keys and idempotency keys (`{tenant}:{key}`): no ':' and nothing odd.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# What an STYLEQUEUE_API_TOKENS caller's tenant id looks like (`token_id`): tenants file names must differ.
_TOKEN_ID_RE = re.compile(r"^[0-9a-f]{24}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"token_sha256", "inputs", "outputs", "uploads", "webhook_secret", "max_in_flight", "callback_hosts",
           "requests_per_minute", "bytes_per_minute"}


def token_digest(token: str) -> str:
    """The hex SHA-256 of a bearer token: what a tenants file stores (`printf %s TOKEN | sha256sum`)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token: str) -> str:
    """The tenant id of an STYLEQUEUE_API_TOKENS caller, as its jobs record it: never the token itself."""
    return token_digest(token)[:24]


@dataclass(frozen=True)
class Tenant:
    """One caller of the gateway. Prefixes are normalised and end with '/'; `scoped` False = unconfined."""

    name: str
    token_sha256: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: str | None = None
    uploads: str | None = None
    webhook_secret: str | None = None
    max_in_flight: int | None = None
    callback_hosts: tuple[str, ...] | None = None
    requests_per_minute: int = DEFAULT_REQUESTS_PER_MINUTE
    bytes_per_minute: int = DEFAULT_BYTES_PER_MINUTE
    scoped: bool = True

    @classmethod
    def unscoped(cls, token: str) -> Tenant:
        """The tenant of a plain STYLEQUEUE_API_TOKENS token."""
        return cls(name=token_id(token), token_sha256=(token_digest(token),), scoped=False)


@dataclass
class TenantBook:
    """Tenants by token digest and by name."""

    tenants: Sequence[Tenant]
    _by_digest: dict[str, Tenant] = field(init=False, repr=False)
    _by_name: dict[str, Tenant] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_digest, self._by_name = {}, {}
        for tenant in self.tenants:
            if tenant.name in self._by_name:
                raise ConfigError(f"tenant {tenant.name!r} is defined twice (a token in STYLEQUEUE_API_TOKENS twice?)")
            self._by_name[tenant.name] = tenant
            for digest in tenant.token_sha256:
                other = self._by_digest.get(digest)
                if other is not None:
                    raise ConfigError(f"tenants {other.name!r} and {tenant.name!r} have the same token")
                self._by_digest[digest] = tenant

    def __bool__(self) -> bool:
        return bool(self.tenants)

    def find(self, token: str) -> Tenant | None:
        """The tenant whose token this is, or None. The lookup is by SHA-256, so timing says nothing of it."""
        if not token:
            return None
        digest = token_digest(token)
        tenant = self._by_digest.get(digest)
        if tenant is None or not any(hmac.compare_digest(known, digest) for known in tenant.token_sha256):
            return None
        return tenant

    def by_name(self, name: str | None) -> Tenant | None:
        return self._by_name.get(name) if name else None

    @property
    def unscoped(self) -> list[Tenant]:
        return [tenant for tenant in self.tenants if not tenant.scoped]


# --- parsing --------------------------------------------------------------------------------------


def _strings(where: str, name: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"{where}: field {name!r} must be a non-empty string or list of strings")
    return items


def _prefix(where: str, name: str, value: str, schemes: Iterable[str]) -> str:
    from stylequeue.pipeline.storage.scope import normalise

    try:
        prefix = normalise(value, prefix=True)
    except InputForbidden as exc:
        raise ConfigError(f"{where}: field {name!r}: {exc}") from None
    if prefix.split("://", 1)[0] not in schemes:
        raise ConfigError(f"{where}: field {name!r} must be a {' or '.join(f'{s}://' for s in schemes)} prefix, "
                          f"got {value!r}")
    return prefix


def _positive(where: str, name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: field {name!r} must be a positive integer, got {value!r}")
    return value


def _secret(where: str, value: Any) -> str:
    prefix = "whsec_"  # Standard Webhooks' secret form, as STYLEQUEUE_WEBHOOK_SECRET
    try:
        valid = isinstance(value, str) and value.startswith(prefix) and bool(
            base64.b64decode(value.removeprefix(prefix), validate=True))
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise ConfigError(f"{where}: field 'webhook_secret' must be 'whsec_' followed by base64")
    return value


def _hosts(where: str, value: Any) -> tuple[str, ...]:
    from stylequeue.pipeline.storage.scope import normal_host

    try:
        return tuple(normal_host(host) for host in _strings(where, "callback_hosts", value))
    except ValueError as exc:
        raise ConfigError(f"{where}: field 'callback_hosts': {exc}") from None


def parse_tenant(name: str, table: Any, source: str) -> Tenant:
    """One `[tenants.NAME]` table as a Tenant; ConfigError naming the tenant and the field."""
    where = f"{source}: tenant {name!r}"
    if not _NAME_RE.match(name) or _TOKEN_ID_RE.match(name):
        raise ConfigError(f"{where}: a tenant name is 1-63 lower-case letters, digits, '-' or '_' (and not 24 hex "
                          "digits)")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([tenants.{name}])")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(_FIELDS))}")
    for required in ("token_sha256", "inputs", "outputs"):
        if required not in table:
            raise ConfigError(f"{where}: field {required!r} is required")
    digests = [d.lower() for d in _strings(where, "token_sha256", table["token_sha256"])]
    if not all(_DIGEST_RE.match(d) for d in digests):
        raise ConfigError(f"{where}: field 'token_sha256' must be 64 hex digits, the SHA-256 of the token "
                          "(`printf %s TOKEN | sha256sum`), never the token itself")
    inputs = tuple(_prefix(where, "inputs", p, ("s3", "file", "http", "https"))
                   for p in _strings(where, "inputs", table["inputs"]))
    if not isinstance(table["outputs"], str):
        raise ConfigError(f"{where}: field 'outputs' must be one prefix (a string)")
    outputs = _prefix(where, "outputs", table["outputs"], ("s3", "file"))
    uploads = None
    if "uploads" in table:
        if not isinstance(table["uploads"], str):
            raise ConfigError(f"{where}: field 'uploads' must be one prefix (a string)")
        uploads = _prefix(where, "uploads", table["uploads"], ("s3", "file"))
        if not any(uploads.startswith(prefix) for prefix in inputs):
            raise ConfigError(f"{where}: field 'uploads' ({uploads}) must lie inside one of 'inputs', or jobs could "
                              "not read what was uploaded")
    return Tenant(
        name=name, token_sha256=tuple(digests), inputs=inputs, outputs=outputs, uploads=uploads,
        webhook_secret=_secret(where, table["webhook_secret"]) if "webhook_secret" in table else None,
        max_in_flight=_positive(where, "max_in_flight", table["max_in_flight"]) if "max_in_flight" in table else None,
        callback_hosts=_hosts(where, table["callback_hosts"]) if "callback_hosts" in table else None,
        requests_per_minute=_positive(where, "requests_per_minute",
                                      table.get("requests_per_minute", DEFAULT_REQUESTS_PER_MINUTE)),
        bytes_per_minute=_positive(where, "bytes_per_minute", table.get("bytes_per_minute", DEFAULT_BYTES_PER_MINUTE)),
    )


def parse_tenants(data: dict[str, Any], source: str) -> list[Tenant]:
    """Every tenant of a parsed tenants file."""
    unknown = sorted(set(data) - {"tenants"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}; tenants are [tenants.NAME] tables")
    tables = data.get("tenants")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{source}: no [tenants.NAME] tables found")
    return [parse_tenant(name, table, source) for name, table in tables.items()]


def load_tenants(path: Path) -> list[Tenant]:
    """The tenants of the file at `path` (STYLEQUEUE_API_TENANTS); ConfigError naming tenant and field."""
    return parse_tenants(read_toml(path, "tenants file", "named by STYLEQUEUE_API_TENANTS"), f"tenants file {path}")


def tenant_book(tenants_file: Path | None, tokens: Sequence[str]) -> TenantBook:
    """The gateway's callers: the tenants file's tenants and one unscoped tenant per plain token."""
    tenants = load_tenants(tenants_file) if tenants_file is not None else []
    return TenantBook([*tenants, *(Tenant.unscoped(token) for token in dict.fromkeys(tokens))])


__all__ = ["DEFAULT_BYTES_PER_MINUTE", "DEFAULT_REQUESTS_PER_MINUTE", "Tenant", "TenantBook", "load_tenants",
           "parse_tenant", "parse_tenants", "tenant_book", "token_digest", "token_id"]
