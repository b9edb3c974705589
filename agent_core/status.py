"""Status and search for the CLI: ask the running daemon, or read the home directly."""

from __future__ import annotations

import logging

from agent_core.control import DaemonUnavailable, request
from agent_core.daemon import RECENT_EVENTS, running_pid
from memory.retention import last_summary
from memory.service import Memory, check_query, lexical_hits
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
                        training={"state": "not running", "last_run": last_run(store)},
                        tasks={"counts": store.task_counts(), "running": []}, retention=last_summary(store))
        finally:
            store.close()
    return info


def search_memory(settings, query: str, k: int = 5, kind: str | None = None, mode: str = "hybrid") -> list[dict]:
    """Search through the daemon when it runs, else here (the model is loaded only when the
    mode needs it: lexical search reads the full-text index alone)."""
    check_query(query, mode)
    if running_pid(settings):
        try:
            return request(settings, "search", query=query, k=k, kind=kind, mode=mode)
        except DaemonUnavailable:
            logger.info("daemon not answering yet, searching locally")
    if not settings.memory.db.exists():
        return []
    store = Store(settings.memory.db, readonly=True)
    try:
        if mode == "lexical":
            return [hit.to_dict() for hit in lexical_hits(store, query, k, kind, settings.memory.lexical_budget)]
        memory = Memory(settings, store, Embedder.from_settings(settings))
        return [hit.to_dict() for hit in memory.search(query, k, kind, mode)]
    finally:
        store.close()


def why_nothing_found(settings, mode: str, kind: str | None = None) -> str:
    """What an empty search result means here, and what to try."""
    of_kind = f" of kind {kind}" if kind else ""
    memories = indexed = 0
    if settings.memory.db.exists():
        model_id = model_fingerprint(resolve_current_model(settings.model.path, settings.home))
        store = Store(settings.memory.db, readonly=True)
        try:
            memories, indexed = store.memory_count(kind), store.vector_count(model_id, kind)
        finally:
            store.close()
    if not memories:
        return f"no memories{of_kind} yet: change a watched file while the daemon runs (or replay a git history)"
    if mode == "lexical":
        return (f"no memory{of_kind} contains a word of the query ({memories} searched); "
                "try --mode dense to search by meaning")
    if not indexed:
        return (f"none of the {memories} memories{of_kind} has its vector yet (the daemon embeds them while it "
                "runs: start it with `gremlin daemon`); --mode lexical finds them by their words meanwhile")
    return f"no match among {memories} memories{of_kind}; try other words, or another --mode"
