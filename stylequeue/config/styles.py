"""The styles registry file (docs/styles.md): parsed and validated here, without Paddle.

`models/registry.py` turns a `StyleSpec` into a loaded runtime; producers only need this module.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stylequeue.config.settings import read_toml
from stylequeue.errors import ConfigError, UnknownStyle

BUNDLED_REGISTRY = Path(__file__).parent / "bundled" / "styles.toml"

OutputFormat = Literal["jpeg", "png", "webp"]
OUTPUT_EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
OUTPUT_CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class StyleSpec:
    """One `[styles.NAME]` table, validated; `weights` is an absolute path or an s3:// URI."""

    name: str
    weights: str
    generator: Literal["resnet"] = "resnet"
    direction: Literal["AtoB", "BtoA"] = "AtoB"
    ngf: int = 64
    n_blocks: int = 9
    max_side: int = 512
    output: OutputFormat = "jpeg"
    description: str = ""
    use_dropout: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def extension(self) -> str:
        return OUTPUT_EXTENSIONS[self.output]

    @property
    def content_type(self) -> str:
        return OUTPUT_CONTENT_TYPES[self.output]

    def public_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "generator": self.generator,
            "direction": self.direction,
            "ngf": self.ngf,
            "n_blocks": self.n_blocks,
            "max_side": self.max_side,
            "output": self.output,
            "weights": self.weights,
        }


_FIELDS: dict[str, tuple[type, ...]] = {
    "weights": (str,),
    "generator": (str,),
    "direction": (str,),
    "ngf": (int,),
    "n_blocks": (int,),
    "max_side": (int,),
    "output": (str,),
    "description": (str,),
    "use_dropout": (bool,),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "generator": ("resnet",),
    "direction": ("AtoB", "BtoA"),
    "output": ("jpeg", "png", "webp"),
}
_RANGES: dict[str, tuple[int, int]] = {"ngf": (1, 1024), "n_blocks": (1, 64), "max_side": (16, 8192)}


def _parse_style(name: str, table: Any, base: Path, source: Path) -> StyleSpec:
    where = f"{source}: style {name!r}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}: a style name is lower-case letters, digits, '-' or '_'")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([styles.{name}])")
    if "weights" not in table:
        raise ConfigError(f"{where}: field 'weights' is required (a .pdparams path or s3:// URI)")
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _FIELDS:
            extra[key] = value
            continue
        types = _FIELDS[key]
        if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
            raise ConfigError(f"{where}: field {key!r} must be {types[0].__name__}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{where}: field {key!r} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        if key in _RANGES and isinstance(value, int):  # an int: checked against _FIELDS just above
            low, high = _RANGES[key]
            if not low <= value <= high:
                raise ConfigError(f"{where}: field {key!r} must be between {low} and {high}, got {value}")
        values[key] = value
    if values.get("max_side", 512) % 4:
        raise ConfigError(f"{where}: field 'max_side' must be a multiple of 4, got {values['max_side']}")
    weights = values["weights"]
    if not weights.startswith("s3://"):
        path = Path(os.path.expanduser(weights))
        weights = str(path if path.is_absolute() else (base / path).resolve())
    values["weights"] = weights
    return StyleSpec(name=name, extra=extra, **values)


def parse_registry(path: str | Path) -> dict[str, StyleSpec]:
    """Read and validate a registry file; errors name the file, the style and the field."""
    source = Path(path)
    data = read_toml(source, "styles registry", "STYLEQUEUE_STYLES")
    styles = data.get("styles")
    if not isinstance(styles, dict) or not styles:
        raise ConfigError(f"{source}: no [styles.NAME] tables found")
    base = source.resolve().parent
    return {name: _parse_style(name, table, base, source) for name, table in styles.items()}


class StyleCatalog:
    """The registry as producers and workers see it: names -> StyleSpec, re-read when a file changes.

    Registries combine: the bundled registry's styles are always there, and the file named by
    STYLEQUEUE_STYLES (`path`) adds its own, a style of the same name replacing the bundled one. Files are
    looked at (mtime) at most every `recheck_s` seconds, since `get` sits on every job's path; a name not found
    makes `get` look again at once, so a style added to the file a moment ago is found.
    """

    def __init__(self, path: str | Path | None, *, recheck_s: float = 1.0) -> None:
        self.path = Path(path) if path else BUNDLED_REGISTRY
        self.paths = [BUNDLED_REGISTRY] if self.path.resolve() == BUNDLED_REGISTRY.resolve() else [
            BUNDLED_REGISTRY, self.path]
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._mtimes: list[float | None] = []
        self._checked = float("-inf")
        self._styles: dict[str, StyleSpec] = {}
        self._own: dict[str, StyleSpec] = {}

    def _current(self, *, fresh: bool = False) -> dict[str, StyleSpec]:
        now = time.monotonic()
        with self._lock:
            if fresh or now - self._checked >= self.recheck_s or not self._styles:
                mtimes = [_mtime(path) for path in self.paths]
                if mtimes != self._mtimes or not self._styles:
                    parsed = [parse_registry(path) for path in self.paths]
                    self._styles = {name: spec for styles in parsed for name, spec in styles.items()}
                    self._own = parsed[-1]
                    self._mtimes = mtimes
                self._checked = now
            return self._styles

    def all(self) -> dict[str, StyleSpec]:
        """Every style: the bundled ones and the configured file's."""
        return dict(self._current())

    def own(self) -> dict[str, StyleSpec]:
        """The configured file's styles (the bundled ones when none is configured): what a worker preloads."""
        self._current()
        with self._lock:
            return dict(self._own)

    def get(self, name: str) -> StyleSpec:
        styles = self._current()
        if name not in styles:
            styles = self._current(fresh=True)
        if name not in styles:
            known = ", ".join(sorted(styles)) or "none"
            raise UnknownStyle(f"unknown style {name!r}; registered styles: {known} (registries: "
                               f"{', '.join(str(p) for p in self.paths)})")
        return styles[name]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


_HASH_CACHE: dict[tuple[str, float, int], str] = {}


def weights_sha256(path: str) -> str:
    """Hex SHA-256 of a local weights file (a directory hashes its files in name order), cached by mtime."""
    p = Path(path)
    stat = p.stat()
    key = (str(p), stat.st_mtime, stat.st_size)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def model_label(spec: StyleSpec) -> str:
    """`style@xxxxxxxx`: the style and the first 8 hex digits of its weights' SHA-256 (the record's `model`)."""
    if spec.weights.startswith("s3://"):
        return f"{spec.name}@{hashlib.sha256(spec.weights.encode()).hexdigest()[:8]}"
    return f"{spec.name}@{weights_sha256(spec.weights)[:8]}"
