"""The dashboard's blueprints: one per page, and the JSON API."""

from __future__ import annotations

from collections.abc import Callable

from flask import Response, flash, redirect, request
from werkzeug.exceptions import HTTPException

from config.errors import GremlinError


def form_action(action: Callable[[], str], back: str) -> Response:
    """Run a form's change, flash what it did (or why it could not), and go back (303 See Other)."""
    try:
        flash(action(), "ok")
    except GremlinError as exc:
        flash(str(exc), "error")
    except HTTPException as exc:
        if (exc.code or 500) >= 500:
            raise
        flash(exc.description or exc.name, "error")
    return redirect(back, code=303)


def back_to(default: str) -> str:
    """Where a form asked to go back to (its `back` field), when that is a path on this site; else `default`."""
    back = request.form.get("back", "")
    if back.startswith("/") and not back.startswith("//") and "\\" not in back and back.isprintable():
        return back
    return default
