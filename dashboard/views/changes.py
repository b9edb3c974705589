"""Changes: the event list with filters, and one change with its diff and similar past changes."""

from __future__ import annotations

from flask import Blueprint, render_template, request

from dashboard import queries
from dashboard.backend import backend, read_store

bp = Blueprint("changes", __name__)


@bp.get("/changes")
def index() -> str:
    """Events, newest first, filtered by path substring, kind, since and made by Gremlin."""
    events = queries.list_changes(read_store(), request.args)
    return render_template("changes.html", events=events, kinds=queries.EVENT_KINDS, args=request.args,
                           more=len(events) == queries.int_arg(request.args, "limit", queries.CHANGES_PAGE))


@bp.get("/changes/<int:event_id>")
def show(event_id: int) -> str:
    """One change: the highlighted diff, its hunks, the vector shift and similar past changes."""
    return render_template("change.html", **queries.change_detail(read_store(), backend(), event_id))
