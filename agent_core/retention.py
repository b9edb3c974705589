"""Retention for the CLI: through the daemon when it runs (its live index drops the evicted
memories at once), here otherwise (each index drops them when it is next opened)."""

from __future__ import annotations

import logging

from agent_core.control import DaemonUnavailable, request
from agent_core.daemon import apply_retention, running_pid
from memory.store import Store

logger = logging.getLogger(__name__)

DAEMON_TIMEOUT_S = 3600.0  # a first eviction on a large home may take minutes


def run_retention(settings, dry_run: bool = False) -> tuple[dict, bool]:
    """Apply [retention] now (dry_run: only count); returns (summary, whether the daemon applied it)."""
    if running_pid(settings):
        try:
            return request(settings, "retention", timeout=DAEMON_TIMEOUT_S, dry_run=dry_run), True
        except DaemonUnavailable:
            logger.info("daemon not answering yet, applying retention here")
    store = Store(settings.memory.db, settings.memory.synchronous)
    try:
        return apply_retention(settings, store, dry_run=dry_run), False
    finally:
        store.close()
