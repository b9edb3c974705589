"""The JSON API under /api/: what the pages show, and the changes their forms make.

Authenticate with `Authorization: Bearer <run/dashboard.token>` (no CSRF token needed), or
with the session cookie plus the `X-CSRF-Token` header for a state-changing call. Errors
are `{"error": "..."}` with a 4xx status.
"""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, jsonify, request

from agent_core import tasks as task_queue
from dashboard import actions, queries
from dashboard.backend import backend, read_store

bp = Blueprint("api", __name__)


def _body() -> dict:
    """The request's JSON object body ({} when empty); 400 when it is not an object."""
    data = request.get_data()
    if not data.strip():
        return {}
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        abort(400, description="the body must be a JSON object")
    return body


@bp.get("/status")
def status() -> Response:
    """Live status: daemon, watcher, model, index, drift, counts, trainer, tasks."""
    return jsonify(backend().status())


@bp.get("/search")
def search() -> Response:
    """Search memory: q, mode (hybrid|dense|lexical), kind, path, since, k."""
    if not (request.args.get("q") or "").strip():
        abort(400, description="q is missing: search for some words, an identifier or an error message")
    return jsonify(queries.search(backend(), request.args))


@bp.get("/events")
def events() -> Response:
    """Events, newest first: path (substring), kind, since, by_gremlin, before (an id, to page), limit."""
    return jsonify({"events": queries.list_changes(read_store(), request.args)})


@bp.get("/events/<int:event_id>")
def event(event_id: int) -> Response:
    """One event with its diff, memory, hunks, vector shift and similar past changes."""
    return jsonify(queries.change_detail(read_store(), backend(), event_id))


@bp.get("/runs")
def runs() -> Response:
    """Training runs, newest first, with their metrics and progress."""
    return jsonify({"runs": read_store().recent_runs(queries.int_arg(request.args, "limit", 50))})


@bp.get("/models")
def models() -> Response:
    """Every registered model, newest first, with its lineage."""
    found = read_store().list_models()
    return jsonify({"models": found, "current": next((m["id"] for m in found if m["status"] == "current"), None)})


@bp.post("/train")
def train() -> tuple[Response, int]:
    """Queue a retrain: optional body {"note": "...", "force": true}."""
    body = _body()
    note, force = body.get("note", ""), body.get("force", False)
    if not isinstance(note, str) or not isinstance(force, bool):
        abort(400, description='the body\'s "note" must be a string and "force" true or false')
    return jsonify(backend().train(note, force)), 202


@bp.post("/models/<model_id>/rollback")
def rollback(model_id: str) -> Response:
    """Switch search to this kept model (`previous`: the one used before the current one)."""
    return jsonify(actions.switch_model(backend(), None if model_id == "previous" else model_id))


@bp.get("/tasks")
def tasks() -> Response:
    """Tasks, newest first (state may repeat, type, limit), counts by state, rewards by type."""
    return jsonify(queries.tasks(read_store(), request.args))


@bp.get("/tasks/<int:task_id>")
def task(task_id: int) -> Response:
    """One task."""
    found = read_store().get_task(task_id)
    if found is None:
        abort(404, description=f"no task {task_id}")
    return jsonify(found)


@bp.post("/tasks")
def submit_task() -> tuple[Response, int]:
    """Queue the task in the body: 201 with its id (200 when its key was seen before); 400 naming a bad field."""
    done = actions.submit_task(backend(), task_queue.parse_task_text(request.get_data(), "task"))
    return jsonify(done), 201 if done["created"] else 200


@bp.post("/tasks/<int:task_id>/cancel")
def cancel_task(task_id: int) -> Response:
    """Cancel a queued task, or ask a running one to stop."""
    return jsonify(actions.cancel_task(task_id))


@bp.post("/tasks/<int:task_id>/retry")
def retry_task(task_id: int) -> tuple[Response, int]:
    """Queue a finished task again as a new task."""
    return jsonify(actions.retry_task(backend(), task_id)), 201


@bp.get("/snapshots")
def snapshots() -> Response:
    """Snapshots, newest first."""
    settings = current_app.config["GREMLIN_SETTINGS"]
    return jsonify({"snapshots": actions.list_snapshots(settings, queries.int_arg(request.args, "limit", 50))})


@bp.post("/snapshots")
def create_snapshot() -> tuple[Response, int]:
    """Snapshot every watched file: optional body {"message": "..."}."""
    message = _body().get("message", "")
    if not isinstance(message, str):
        abort(400, description='the body\'s "message" must be a string')
    return jsonify(actions.create_snapshot(current_app.config["GREMLIN_SETTINGS"], message)), 201


@bp.get("/snapshots/diff")
def snapshot_diff() -> Response:
    """What changed from snapshot a to snapshot b."""
    a, b = request.args.get("a", "").strip(), request.args.get("b", "").strip()
    if not a or not b:
        abort(400, description="give the two snapshots to compare as a and b")
    return jsonify({"changes": actions.diff_snapshots(current_app.config["GREMLIN_SETTINGS"], a, b)})


@bp.post("/snapshots/<snapshot_id>/restore")
def restore_snapshot(snapshot_id: str) -> Response:
    """Put the watched files back as the snapshot holds them; the result names the undo snapshot."""
    return jsonify(actions.restore_snapshot(current_app.config["GREMLIN_SETTINGS"], snapshot_id))


@bp.get("/logs")
def logs() -> Response:
    """Log records, newest first: level, component, grep, since, limit."""
    records = queries.log_records(current_app.config["GREMLIN_SETTINGS"], request.args)
    return jsonify({"records": [queries.record_dict(r) for r in records]})
