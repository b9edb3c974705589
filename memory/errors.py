"""Errors raised by the memory package."""

from config.errors import GremlinError


class MemoryLayerError(GremlinError):
    """Base of the memory package's errors (`MemoryError` is a Python builtin)."""


class StoreError(MemoryLayerError):
    """The database cannot be opened, migrated or written."""


class StoreNotReady(StoreError):
    """The database is still being made by a starting daemon (try again in a moment)."""


class ModelError(MemoryLayerError):
    """The embedding model cannot be found or loaded."""

