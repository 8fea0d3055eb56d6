"""Settings and the styles registry file: everything a producer needs to know, with no Paddle."""

from stylequeue.config.settings import Settings, load_settings
from stylequeue.config.styles import StyleCatalog, StyleSpec, parse_registry

__all__ = ["Settings", "StyleCatalog", "StyleSpec", "load_settings", "parse_registry"]
