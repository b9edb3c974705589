"""The changes the dashboard can make, shared by its forms and its JSON API.

Each goes through the `agent_core` function the CLI uses (tasks.submit/cancel/retry,
Snapshots.create/restore, the model switch), on a writer connection opened for the
request; a missing task or model is a 404, a task in the wrong state a 409.
"""

from __future__ import annotations

import logging
import shlex

from flask import abort

from agent_core import tasks as task_queue
from agent_core.snapshot import Snapshots
from dashboard.backend import Backend, read_store, writer_store

logger = logging.getLogger(__name__)
audit = logging.getLogger("gremlin.audit")

SOURCE = "dashboard"


def submit_task(backend: Backend, spec: task_queue.TaskSpec) -> dict:
    """Queue a validated task; {"id", "created", "daemon"}."""
    with writer_store() as store:
        submitted = task_queue.submit(store, backend.settings, spec, SOURCE)
    return {**submitted.to_dict(), "daemon": backend.wake_tasks()}


def shell_task(cmd: str, cwd: str = "", timeout_s: str = "", priority: str = "") -> task_queue.TaskSpec:
    """A validated shell task from the form's fields (the command split as a POSIX shell would)."""
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise task_queue.TaskError(f"task: field 'cmd' cannot be split into words ({exc}); check its quotes") from None
    raw: dict = {"type": "shell", "cmd": argv}
    if cwd.strip():
        raw["cwd"] = cwd.strip()
    for name, text, kind in (("timeout_s", timeout_s, float), ("priority", priority, int)):
        if text.strip():
            try:
                raw[name] = kind(text)
            except ValueError:
                raise task_queue.TaskError(f"task: field '{name}' must be a number (got {text[:40]!r})") from None
    return task_queue.parse_task(raw)


def cancel_task(task_id: int) -> dict:
    """Cancel a queued task, or ask a running one to stop; {"id", "state"}."""
    _task_or_404(task_id)
    with writer_store() as store:
        return {"id": task_id, "state": task_queue.cancel(store, task_id)}


def retry_task(backend: Backend, task_id: int) -> dict:
    """Queue a finished task again; {"id", "created", "retry_of", "daemon"} (409 while it has not ended)."""
    task = _task_or_404(task_id)
    if task["state"] not in task_queue.FINAL:
        abort(409, description=f"task {task_id} is {task['state']}; only a done, failed or cancelled task "
                               "can be retried")
    with writer_store() as store:
        submitted = task_queue.retry(store, backend.settings, task_id)
    return {**submitted.to_dict(), "retry_of": task_id, "daemon": backend.wake_tasks()}


def _task_or_404(task_id: int) -> dict:
    task = read_store().get_task(task_id)
    if task is None:
        abort(404, description=f"no task {task_id}; see /tasks")
    return task


def switch_model(backend: Backend, model_id: str | None) -> dict:
    """Switch search to a kept model (the one used before when None); 404 for an unknown id."""
    if model_id is not None and read_store().get_model(model_id) is None:
        abort(404, description=f"no model {model_id[:80]!r} (or the prefix is ambiguous); see /training")
    result = backend.switch_model(model_id)
    audit.info("model switched from the dashboard", extra={"model_id": result.get("id")})
    return result


def list_snapshots(settings, limit: int = 50) -> list[dict]:
    """The newest snapshots, newest first."""
    snaps = Snapshots(settings)
    try:
        return [s.to_dict() for s in snaps.list(limit)]
    finally:
        snaps.close()


def diff_snapshots(settings, a: str, b: str) -> list[dict]:
    """What changed from snapshot `a` to `b` (SnapshotError for an unknown id)."""
    snaps = Snapshots(settings)
    try:
        return snaps.diff(a, b)
    finally:
        snaps.close()


def create_snapshot(settings, message: str = "") -> dict:
    """Snapshot every watched file."""
    with writer_store() as store:
        snaps = Snapshots(settings, store)
        try:
            return snaps.create(message or "taken from the dashboard").to_dict()
        finally:
            snaps.close()


def restore_snapshot(settings, ref: str) -> dict:
    """Put the watched files back as snapshot `ref` holds them (its undo snapshot is taken first)."""
    with writer_store() as store:
        snaps = Snapshots(settings, store)
        try:
            return snaps.restore(ref).to_dict()
        finally:
            snaps.close()
