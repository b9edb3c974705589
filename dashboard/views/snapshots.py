"""Snapshots: the list, a diff between two, taking one and restoring one."""

from __future__ import annotations

from flask import Blueprint, Response, abort, render_template, request, url_for

from dashboard import actions, queries
from dashboard.backend import backend
from dashboard.views import form_action

bp = Blueprint("snapshots", __name__)


@bp.get("/snapshots")
def index() -> str:
    """The snapshot list, with the forms to take, compare and restore."""
    settings = backend().settings
    return render_template("snapshots.html", snapshots=actions.list_snapshots(settings, queries.int_arg(
        request.args, "limit", 50)))


@bp.get("/snapshots/diff")
def diff() -> str:
    """What changed from snapshot `a` to snapshot `b`, diff by diff."""
    a, b = request.args.get("a", "").strip(), request.args.get("b", "").strip()
    if not a or not b:
        abort(400, description="pick two snapshots to compare (a and b)")
    return render_template("snapshot_diff.html", a=a, b=b, changes=actions.diff_snapshots(backend().settings, a, b))


@bp.post("/snapshots")
def create() -> Response:
    """Snapshot every watched file now."""
    def run() -> str:
        info = actions.create_snapshot(backend().settings, request.form.get("message", "").strip())
        return f"snapshot {info['id'][:12]} taken: {info['files']} files"
    return form_action(run, url_for("snapshots.index"))


@bp.post("/snapshots/<snapshot_id>/restore")
def restore(snapshot_id: str) -> Response:
    """Put the watched files back as the snapshot holds them."""
    def run() -> str:
        done = actions.restore_snapshot(backend().settings, snapshot_id)
        return (f"restored {done['snapshot'][:12]}: {len(done['written'])} written, {len(done['deleted'])} deleted, "
                f"{done['unchanged']} unchanged; snapshot {done['undo'][:12]} undoes it")
    return form_action(run, url_for("snapshots.index"))
