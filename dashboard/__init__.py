"""The local web dashboard: a Flask app factory with one blueprint per page and a JSON API.

`create_app(settings, ops)` builds the app; `dashboard.server.DashboardServer` serves it
with waitress inside the daemon (with the daemon's live operations as `ops`), and tests
drive it with Flask's test client. Every request is checked in this order: Host header,
body size, authentication (session cookie or Bearer token), CSRF token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from jinja2 import ChainableUndefined

from agent_core.tasks import MAX_TASK_BYTES
from dashboard import auth, security
from dashboard.backend import Backend, close_read_store
from dashboard.render import FILTERS, finalize

NAV = (("overview.index", "Overview", "overview"), ("changes.index", "Changes", "changes"),
       ("search.index", "Search", "search"), ("training.index", "Training", "training"),
       ("tasks.index", "Tasks", "tasks"), ("snapshots.index", "Snapshots", "snapshots"),
       ("logs.index", "Logs", "logs"))
SESSION_LIFETIME = timedelta(days=7)  # a cookie older than this (since its last change) is refused


@dataclass
class DashboardState:
    """What the app shares across requests: the backend, and an event set when the server stops
    (live log streams end on it)."""

    backend: Backend
    stopping: threading.Event = field(default_factory=threading.Event)
    streams: threading.BoundedSemaphore | None = None


class _JSONProvider(DefaultJSONProvider):
    """Flask's JSON, with anything else (a Path, a dataclass Flask does not know) as its text."""

    @staticmethod
    def default(o: object) -> object:
        """What Flask can encode, as Flask does; anything else as its text."""
        try:
            return DefaultJSONProvider.default(o)
        except TypeError:
            return str(o)


def create_app(settings, ops: dict[str, Callable] | None = None, test_config: dict | None = None) -> Flask:
    """The dashboard app for one home; `ops` are the daemon's live operations (None: the CLI's way)."""
    app = Flask(__name__)
    app.jinja_options = {**app.jinja_options, "autoescape": True, "finalize": finalize,  # before first use
                         "undefined": ChainableUndefined}  # a row without some key shows nothing, never fails
    app.json = _JSONProvider(app)
    _configure(app, settings, test_config or {})
    app.extensions["gremlin"] = DashboardState(Backend(settings, ops), streams=threading.BoundedSemaphore(
        app.config["SSE_MAX_STREAMS"] or stream_slots(settings.dashboard.threads)))
    _install_jinja(app)
    for check in (security.check_host, security.check_size, auth.authenticate, auth.check_csrf):
        app.before_request(check)
    app.after_request(security.add_headers)
    app.teardown_appcontext(close_read_store)
    security.register_error_handlers(app)
    _register_blueprints(app)
    return app


def stream_slots(threads: int) -> int:
    """How many live log tails may run at once: each holds a server thread, and two stay for pages
    (one when there are only two or three; none of a single thread may be held)."""
    return max(1, threads - 2) if threads > 1 else 0


def _configure(app: Flask, settings, test_config: dict) -> None:
    """Secret key, cookie flags, size limits and stream timings (test_config overrides them)."""
    port = settings.dashboard.port
    app.config.from_mapping(
        SECRET_KEY=auth.load_or_create_secret(settings), GREMLIN_TOKEN=auth.load_or_create_token(settings),
        GREMLIN_SETTINGS=settings, GREMLIN_ALLOWED_HOSTS=security.allowed_hosts(settings),
        SESSION_COOKIE_NAME=f"gremlin_session_{port}",  # cookies ignore ports: two homes, two names
        SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_SECURE=False,
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
        MAX_CONTENT_LENGTH=MAX_TASK_BYTES, MAX_FORM_MEMORY_SIZE=MAX_TASK_BYTES,  # a mutate task's patch fits
        SSE_KEEPALIVE_S=15.0, SSE_MAX_S=600.0, SSE_POLL_S=0.5,
        SSE_MAX_STREAMS=0)  # live log tails at once; 0: stream_slots(threads)
    app.json.sort_keys = False  # a status or task reads in the order it was built
    app.config.update(test_config)


def _install_jinja(app: Flask) -> None:
    """The templates' filters, and what every page needs (the CSRF token, the navigation)."""
    app.jinja_env.filters.update(FILTERS)
    app.jinja_env.globals.update(csrf_token=auth.csrf_token, NAV=NAV)


def _register_blueprints(app: Flask) -> None:
    from dashboard.views import api, changes, logs, overview, search, snapshots, tasks, training

    app.register_blueprint(auth.bp)
    for module in (overview, changes, search, training, tasks, snapshots, logs):
        app.register_blueprint(module.bp)
    app.register_blueprint(api.bp, url_prefix="/api")
