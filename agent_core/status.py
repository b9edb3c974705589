"""Status and search for the CLI: ask the running daemon, or read the home directly."""

from __future__ import annotations

import logging

from agent_core.control import DaemonUnavailable, request
from agent_core.daemon import RECENT_EVENTS, running_pid
from memory.service import Memory
from memory.errors import StoreNotReady
from memory.store import Store
from self_training.trainer import last_run
from memory.vector_store.embedder import Embedder, model_fingerprint, resolve_current_model

logger = logging.getLogger(__name__)


def collect_status(settings) -> dict:
    """Live status from the daemon, or what the database says when it is not running."""
    pid = running_pid(settings)
    if pid:
        try:
            return request(settings, "status", timeout=10)
        except DaemonUnavailable:
            pass  # still loading its model: report from disk
    model_id = model_fingerprint(resolve_current_model(settings.model.path, settings.home))
    info = {"running": bool(pid), "pid": pid, "state": "starting" if pid else "stopped",
            "home": str(settings.home), "roots": [str(r) for r in settings.watch_roots],
            "model_id": model_id, "counts": {"events": 0, "memories": 0}, "index_size": 0,
            "recent_events": []}
    if settings.memory.db.exists():
        try:
            store = Store(settings.memory.db, readonly=True)
        except StoreNotReady as exc:  # a daemon is making it right now
            info["note"] = str(exc)
            return info
        try:
            info.update(counts=store.counts(), index_size=store.vector_count(model_id),
                        recent_events=store.recent_events(RECENT_EVENTS),
                        failures=store.failure_counts(RECENT_EVENTS),
                        training={"state": "not running", "last_run": last_run(store)})
        finally:
            store.close()
    return info


def search_memory(settings, query: str, k: int = 5, kind: str | None = None, mode: str = "hybrid") -> list[dict]:
    """Search through the daemon when it runs, else load the model and index here."""
    if running_pid(settings):
        try:
            return request(settings, "search", query=query, k=k, kind=kind, mode=mode)
        except DaemonUnavailable:
            logger.info("daemon not answering yet, searching locally")
    if not settings.memory.db.exists():
        return []
    store = Store(settings.memory.db, readonly=True)
    try:
        memory = Memory(settings, store, Embedder.from_settings(settings))
        return [hit.to_dict() for hit in memory.search(query, k, kind, mode)]
    finally:
        store.close()
