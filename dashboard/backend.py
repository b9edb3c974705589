"""What the dashboard asks of Gremlin, and the database connections it uses.

Inside the daemon the dashboard gets the daemon's live operations (the control socket's
`status`, `search`, `train`, `models.switch`, `tasks.wake`); run without them it does what
the CLI does when no daemon answers. Reads go through a read-only connection opened for
each request; writes only through `agent_core` functions, on a writer connection opened
for the request that writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import current_app, g

from agent_core.control import DaemonUnavailable, request as control_request
from agent_core.daemon import running_pid
from agent_core.status import collect_status
from agent_core.training import queue_training, rollback
from config.errors import GremlinError
from memory.service import check_query, lexical_hits
from memory.store import Store
from self_training.feedback_loop import manual_trigger

logger = logging.getLogger(__name__)

Ops = dict[str, Callable[..., object]]
NO_DAEMON_NOTE = ("no daemon is running, so these are lexical (full-text) results; start the daemon "
                  "(gremlin daemon) to search by meaning")


class Backend:
    """The daemon's live operations when there are some, the CLI's way otherwise."""

    def __init__(self, settings, ops: Ops | None = None):
        self.settings = settings
        self.ops: Ops = dict(ops or {})

    def status(self) -> dict:
        """Live status (the daemon's own, or what the database says)."""
        if "status" in self.ops:
            return self.ops["status"]()
        return collect_status(self.settings)

    def search(self, query: str, k: int = 10, kind: str | None = None, mode: str = "hybrid") -> tuple[list[dict], str]:
        """(hits, the mode used): with the daemon's loaded model, else lexically here (never a
        model load inside a web request), or through a daemon running beside this dashboard."""
        check_query(query, mode)
        if "search" in self.ops:
            return self.ops["search"](query=query, k=k, kind=kind, mode=mode), mode
        if mode != "lexical" and running_pid(self.settings):
            try:
                return control_request(self.settings, "search", query=query, k=k, kind=kind, mode=mode), mode
            except DaemonUnavailable:
                pass  # still starting: lexical results now rather than a model load
        budget = self.settings.memory.lexical_budget
        return [hit.to_dict() for hit in lexical_hits(read_store(), query, k, kind, budget)], "lexical"

    def train(self, note: str = "", force: bool = False) -> dict:
        """Queue a manual retrain trigger; {"trigger": …, "daemon": whether a daemon took it}."""
        note = note or "requested from the dashboard"
        if "train" in self.ops:
            return {"trigger": self.ops["train"](trigger=manual_trigger(note, force=force).to_dict()), "daemon": True}
        trigger, via_daemon = queue_training(self.settings, note, force)
        return {"trigger": trigger if isinstance(trigger, dict) else trigger.to_dict(), "daemon": via_daemon}

    def switch_model(self, model_id: str | None) -> dict:
        """Switch search to a kept model (the previous one when None); {"id", "path"}."""
        if "models.switch" in self.ops:
            return self.ops["models.switch"](model_id=model_id)
        return rollback(self.settings, model_id)

    def wake_tasks(self) -> bool:
        """Tell the task runners a task is waiting (they poll anyway); False when no daemon runs."""
        if "tasks.wake" in self.ops:
            self.ops["tasks.wake"]()
            return True
        try:
            control_request(self.settings, "tasks.wake", timeout=5.0)
            return True
        except (GremlinError, OSError):
            return False

    def daemon_running(self) -> bool:
        """Whether a daemon serves this home (this dashboard's own, or one beside it)."""
        return bool(self.ops) or bool(running_pid(self.settings))


def backend() -> Backend:
    """The app's Backend."""
    return current_app.extensions["gremlin"].backend


def read_store() -> Store:
    """This request's read-only connection (opened on first use, closed when the request ends)."""
    if "read_store" not in g:
        g.read_store = Store(current_app.config["GREMLIN_SETTINGS"].memory.db, readonly=True)
    return g.read_store


def close_read_store(_exc: BaseException | None = None) -> None:
    """Teardown: close the request's read-only connection, if it opened one."""
    store = g.pop("read_store", None)
    if store is not None:
        store.close()


@contextmanager
def writer_store() -> Iterator[Store]:
    """A writer connection for one request's change (task submit, restore), closed after it."""
    settings = current_app.config["GREMLIN_SETTINGS"]
    store = Store(settings.memory.db, settings.memory.synchronous)
    try:
        yield store
    finally:
        store.close()
