"""The one project error that every Gremlin package subclasses.

It lives in `config/` because config is the bottom of the import order: every other
package may import it, and the CLI turns any `GremlinError` into a message and exit code.
"""


class GremlinError(Exception):
    """Base of every error Gremlin raises on purpose; the message says what to do."""


class ConfigError(GremlinError):
    """The configuration or the home directory is invalid."""
