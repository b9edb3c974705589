"""Configuration: the frozen settings tree, the home directory, the project error."""

from config.errors import ConfigError, GremlinError
from config.settings import Settings, init_home, load_settings

__all__ = ["ConfigError", "GremlinError", "Settings", "init_home", "load_settings"]
