"""Search memory: hybrid, dense or lexical, filtered by kind, path and time."""

from __future__ import annotations

from flask import Blueprint, render_template, request

from config.errors import GremlinError
from dashboard import queries
from dashboard.backend import backend

bp = Blueprint("search", __name__)


@bp.get("/search")
def index() -> str | tuple[str, int]:
    """The search form and its scored results, each linking to its event."""
    page = {"modes": queries.SEARCH_MODES, "kinds": queries.MEMORY_KINDS, "args": request.args}
    try:
        found = queries.search(backend(), request.args)
    except GremlinError as exc:  # an unknown mode: said on the form, not on an error page
        return render_template("search.html", error=str(exc), results=[], **page), 400
    return render_template("search.html", error=None, **found, **page)
