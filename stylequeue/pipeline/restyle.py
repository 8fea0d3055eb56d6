"""`stylequeue.restyle(src, style, dst)`: one image, synchronously, in this process.

    import stylequeue
    stylequeue.restyle("photo.jpg", "ink-demo", "photo-ink.jpg")

Same decode / model / encode path as the worker (pipeline/process.py); plain paths are the caller's
own files and are read and written directly, URIs go through storage with its usual rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stylequeue.config.settings import Settings, load_settings
from stylequeue.config.styles import StyleCatalog
from stylequeue.models.quiet import quiet_paddle
from stylequeue.pipeline.process import prepare, render

if TYPE_CHECKING:
    from stylequeue.models.registry import ModelRegistry

_URI_SCHEMES = ("file://", "s3://", "http://", "https://")
_registries: dict[tuple[object, ...], ModelRegistry] = {}


@dataclass(frozen=True)
class RestyleResult:
    output: str
    width: int
    height: int
    model: str
    runtime: str


def _is_uri(location: str) -> bool:
    return location.startswith(_URI_SCHEMES)


def _registry(settings: Settings) -> ModelRegistry:
    from stylequeue.models.registry import ModelRegistry

    key = (str(settings.styles), settings.runtime, settings.precision, settings.device, str(settings.cache_dir))
    if key not in _registries:
        _registries[key] = ModelRegistry(StyleCatalog(settings.styles), runtime=settings.runtime,
                                         precision=settings.precision, device=settings.device,
                                         cache_dir=settings.cache_dir)
    return _registries[key]


def restyle(src: str | os.PathLike[str], style: str, dst: str | os.PathLike[str] | None = None, *,
            settings: Settings | None = None) -> RestyleResult:
    """Restyle one image and write the result; returns where it went and what made it.

    Args:
        src: a local path, or a file://, s3:// or http(s):// URI.
        dst: a local path or a file:// / s3:// URI; default: `<src stem>-<style>.<ext>` beside a local src.
        settings: default from the environment (STYLEQUEUE_STYLES, STYLEQUEUE_RUNTIME, ...).
    """
    quiet_paddle()  # Paddle's warnings that a caller cannot act on (stylequeue/models/quiet.py)
    settings = settings or load_settings()
    loaded = _registry(settings).get(style)
    spec = loaded.spec
    src, dst = str(src), None if dst is None else str(dst)
    storage = None
    if _is_uri(src) or (dst is not None and _is_uri(dst)):
        from stylequeue.pipeline.storage import Storage

        storage = Storage(settings)
    data = storage.read(src) if storage and _is_uri(src) else Path(src).read_bytes()
    prepared = prepare(data, spec, max_pixels=settings.max_input_pixels)
    output = loaded.runtime.run(prepared.array[None])[0]
    encoded = render(output, spec)
    if dst is None:
        if _is_uri(src):
            raise ValueError("restyle() needs dst when src is a URI")
        source = Path(src)
        dst = str(source.with_name(f"{source.stem}-{spec.name}.{spec.extension}"))
    if storage and _is_uri(dst):
        storage.write(dst, encoded, spec.content_type)
    else:
        target = Path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_bytes(encoded)
        os.replace(tmp, target)
    return RestyleResult(dst, prepared.width, prepared.height, loaded.model, loaded.info.get("runtime", "?"))
