"""The one settings object: environment (`STYLEQUEUE_*`) over an optional TOML file over defaults.

Only the CLI (`cli/`), the Celery app factory and `Client()` call `load_settings`; everything else is handed
the `Settings` (or the values) it needs.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from stylequeue.config.redis_url import check_redis_url, is_sentinel_url
from stylequeue.errors import ConfigError

ENV_PREFIX = "STYLEQUEUE_"
CONFIG_ENV = "STYLEQUEUE_CONFIG"

_DEVICE_RE = re.compile(r"^(cpu|gpu:\d+)$")


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting (docs/configuration.md); field `x` is env `STYLEQUEUE_X` and TOML key `x`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None
    storage_url: str = "file://./stylequeue-data"
    s3_endpoint_url: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_region: str | None = None
    s3_public_endpoint_url: str | None = None
    styles: Path | None = None
    device: str = "cpu"
    # One of models/runtimes.py's table, or auto; "null" returns its input unchanged (bench/e2e.py).
    runtime: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_batch: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(10, ge=0)
    output_url_ttl_s: int = Field(3600, ge=1, le=604800)
    job_ttl_s: int = Field(604800, ge=1)
    job_timeout_s: float = Field(300, gt=0)
    key_prefix: str = "sq:"
    visibility_timeout_s: int = Field(600, ge=1)
    webhook_secret: SecretStr | None = None
    input_roots: Annotated[list[Path] | None, NoDecode] = None
    allow_private_networks: bool = False
    max_input_bytes: int = Field(26214400, ge=1)
    max_input_pixels: int = Field(50000000, ge=1)
    # How long a worker holds jobs back while a dependency is down before they fail `storage_error`.
    outage_s: float = Field(900, gt=0)
    # Where exported models and runtime choices are cached, and how long a
    # worker's claim on a running job lasts without renewal (a killed worker's jobs return after it).
    cache_dir: Path = Path(os.path.expanduser("~/.cache/stylequeue"))
    lease_s: float = Field(30, ge=1, le=3600)
    # Bearer tokens of the HTTP gateway (`stylequeue api`), comma-separated: unscoped (docs/http.md).
    api_tokens: Annotated[list[SecretStr] | None, NoDecode] = None
    # The gateway's tenants file (config/tenants.py), and the lifetime of a presigned upload.
    api_tenants: Path | None = None
    upload_ttl_s: int = Field(600, ge=1, le=604800)

    @field_validator("input_roots", "api_tokens", mode="before")
    @classmethod
    def _roots_from_commas(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be 'cpu' or 'gpu:N' (N a GPU index, e.g. gpu:0)")
        return value

    @field_validator("runtime")
    @classmethod
    def _check_runtime(cls, value: str) -> str:
        from stylequeue.models.runtimes import RUNTIME_CHOICES  # the table module imports nothing heavy

        if value not in RUNTIME_CHOICES:
            raise ValueError(f"must be one of {', '.join(RUNTIME_CHOICES)}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        return check_redis_url(value)

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        # Only the sentinel forms are ours to judge; kombu judges every other broker URL itself. Kombu's own
        # `sentinel://h1:26379;sentinel://h2:26379` names no service: it takes the one of a redis+sentinel://
        # STYLEQUEUE_REDIS_URL (broker.make_celery_app checks there is one).
        return check_redis_url(value) if value and is_sentinel_url(value) else value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        if not value.startswith(("file://", "s3://")):
            raise ValueError("must be a file:// or s3:// URI")
        return normalise_storage_url(value)

    @field_validator("input_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path] | None) -> list[Path] | None:
        # A client and a worker started in different directories must mean the same roots.
        return None if value is None else [Path(os.path.abspath(os.path.expanduser(root))) for root in value]

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        return value

    @model_validator(mode="after")
    def _default_input_roots(self) -> Settings:
        if self.input_roots is None and self.storage_url.startswith("file://"):
            self.input_roots = [file_uri_path(self.storage_url)]
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_settings` passes the TOML file's values as init kwargs; environment wins over them.
        return (env_settings, init_settings)


def file_uri_path(uri: str) -> Path:
    """`file:///abs/dir` or `file://./rel/dir` -> an absolute Path."""
    return Path(file_uri_str(uri))


def normalise_storage_url(value: str) -> str:
    """A storage root without its trailing slash; a `file://` one made absolute.

    Resolved once, at load, so no record ever stores a `file://./...` that means another directory to a
    process started elsewhere (a worker, the gateway, a later `status`).
    """
    if not value.startswith("file://"):
        return value.rstrip("/")
    absolute = file_uri_absolute(value)
    return absolute if absolute == "file:///" else absolute.rstrip("/")


def file_uri_absolute(uri: str) -> str:
    """`file://./rel/dir/` -> `file:///abs/rel/dir/` (a trailing slash, meaning a prefix, is kept); others unchanged."""
    if not uri.startswith("file://"):
        return uri
    path = file_uri_str(uri)
    return "file://" + path + ("/" if uri.endswith("/") and not path.endswith("/") else "")


def file_uri_str(uri: str) -> str:
    """`file_uri_path` as a plain string (storage's hot path, every input and output, skips pathlib)."""
    rest = uri[len("file://") :] or "."
    return os.path.abspath(os.path.expanduser(rest) if rest.startswith("~") else rest)


def read_toml(path: Path, what: str, named_by: str) -> dict[str, Any]:
    """A TOML file's contents; a missing or malformed file is a one-line ConfigError naming `what` it is."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found ({named_by})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def _read_config_file(path: Path) -> dict[str, Any]:
    data = read_toml(path, "config file", f"named by --config or {CONFIG_ENV}")
    known = set(Settings.model_fields)
    for key in data:
        if key not in known:
            raise ConfigError(
                f"config file {path}: unknown key {key!r}; keys are the STYLEQUEUE_* names in lower "
                f"case without the prefix, e.g. redis_url"
            )
    base = path.parent
    for key in ("styles", "cache_dir", "api_tenants"):
        if isinstance(data.get(key), str) and not os.path.isabs(os.path.expanduser(data[key])):
            data[key] = str(base / data[key])
    return data


def _describe(error: Mapping[str, Any], from_file: Path | None, env: dict[str, str]) -> str:
    field = str(error["loc"][0]) if error["loc"] else "?"
    env_name = ENV_PREFIX + field.upper()
    source = env_name if env_name in env or from_file is None else f"{field} in {from_file}"
    value = error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown setting {field!r}"
    return f"invalid {source}={value!r}: {message}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the Settings: `overrides` > environment > TOML file (`config_file` or $STYLEQUEUE_CONFIG).

    Raises ConfigError with one line naming the variable and what it accepts.
    """
    path_str = config_file or os.environ.get(CONFIG_ENV)
    path = Path(path_str) if path_str else None
    file_values = _read_config_file(path) if path else {}
    try:
        settings = Settings(**file_values)
        if overrides:
            merged = settings.model_dump() | {k: v for k, v in overrides.items() if v is not None}
            roots_explicit = "input_roots" in file_values or ENV_PREFIX + "INPUT_ROOTS" in os.environ
            if "input_roots" not in overrides and not roots_explicit:
                merged["input_roots"] = None  # re-derive from the (possibly overridden) storage root
            settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], path, dict(os.environ))) from None
    return settings
