"""Request checks and response headers every dashboard response gets, and its error answers.

The Host check defeats DNS rebinding: a page on an attacker's domain that re-resolves to
127.0.0.1 still sends its own name as Host, and is refused. Errors are JSON for API calls
and a plain page otherwise; neither ever shows a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from flask import Flask, Response, abort, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

from config.errors import GremlinError
from memory.errors import StoreError

logger = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cross-Origin-Opener-Policy": "same-origin",
           "Cross-Origin-Resource-Policy": "same-origin"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
HANDLED_STATUSES = (400, 401, 403, 404, 405, 413, 421, 500)
# Library errors that mean the request itself was wrong; any other GremlinError is a conflict
# with the present state (a run in progress, a model without weights).
BAD_REQUEST_ERRORS = ("TaskError", "TriggerError", "SnapshotError", "EmptyQuery", "SearchModeError")


def allowed_hosts(settings) -> frozenset[str]:
    """The Host header values this dashboard answers: loopback names and its configured host, with its port."""
    port = settings.dashboard.port
    host = settings.dashboard.host
    configured = f"[{host}]" if ":" in host else host
    return frozenset(f"{name}:{port}".lower() for name in (*LOOPBACK_NAMES, configured))


def host_allowed(host: str, settings) -> bool:
    """Whether a Host header names this dashboard (an IP literal too when it listens beyond
    loopback: DNS rebinding needs a name, and a literal address is never one)."""
    host = host.lower()
    if host in current_app.config["GREMLIN_ALLOWED_HOSTS"]:
        return True
    if not settings.dashboard.allow_remote:
        return False
    name, _, port = host.rpartition(":")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return port == str(settings.dashboard.port)


def check_host() -> None:
    """Before each request: refuse a Host (and an Origin) that is not this dashboard's."""
    settings = current_app.config["GREMLIN_SETTINGS"]
    if not host_allowed(request.host, settings):
        abort(421, description=f"this dashboard answers only as http://127.0.0.1:{settings.dashboard.port} "
                               f"(or localhost); the Host header {request.host[:100]!r} is not one of its names")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and not host_allowed(urlsplit(origin).netloc, settings):
        abort(403, description="cross-origin request refused: the Origin header is not this dashboard")


def check_size() -> None:
    """Before each request: refuse a body over MAX_CONTENT_LENGTH before anything reads it."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        abort(413, description=f"the request body is {request.content_length} bytes, above the {limit} "
                               "the dashboard accepts")


def add_headers(response: Response) -> Response:
    """After each request: the security headers, and no caching of anything but static files."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response


# -- errors -------------------------------------------------------------------------------


def error_response(status: int, message: str) -> tuple[Response | str, int]:
    """A JSON error for API calls, an error page otherwise."""
    from dashboard.auth import wants_json

    if wants_json() or request.accept_mimetypes.best == "application/json":
        return jsonify({"error": message}), status
    return render_template("error.html", status=status, message=message), status


def _http_error(exc: HTTPException) -> tuple[Response | str, int]:
    if isinstance(exc, InternalServerError):
        return _internal_error(exc)
    return error_response(exc.code or 400, exc.description or exc.name)


def _gremlin_error(exc: GremlinError) -> tuple[Response | str, int]:
    if isinstance(exc, StoreError):
        return error_response(503, str(exc))
    status = 400 if type(exc).__name__ in BAD_REQUEST_ERRORS else 409
    return error_response(status, str(exc))


def _internal_error(exc: Exception) -> tuple[Response | str, int]:
    original = getattr(exc, "original_exception", None) or exc
    logger.error("dashboard request failed", exc_info=original, extra={"path": request.path})
    return error_response(500, "internal error; the daemon's log (gremlin logs --level error) has the details")


def register_error_handlers(app: Flask) -> None:
    """JSON or page answers for every HTTP error, library errors and unexpected exceptions."""
    for status in HANDLED_STATUSES:
        app.register_error_handler(status, _http_error)
    app.register_error_handler(HTTPException, _http_error)  # any other status werkzeug raises
    app.register_error_handler(GremlinError, _gremlin_error)
    app.register_error_handler(Exception, _internal_error)
