"""Who may use the dashboard: a token file, session cookies, Bearer tokens and CSRF tokens.

`run/dashboard.token` (mode 0600, made once, kept across restarts) is the one credential.
A browser trades it for a session cookie at `/login?token=…` (HttpOnly, SameSite=Strict,
signed with the separate `run/dashboard.secret`); an API client sends it as
`Authorization: Bearer <token>`. A cookie is an ambient credential, so every state-changing
request made with one must also carry the session's CSRF token (a hidden form field or the
`X-CSRF-Token` header); a Bearer request carries its credential explicitly and needs none.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, abort, current_app, g, jsonify, redirect, render_template, request, session, url_for

from config.errors import GremlinError
from config.settings import PRIVATE_FILE
from memory.atomic import fsync_dir, write_bytes_atomically

logger = logging.getLogger(__name__)

TOKEN_NAME = "dashboard.token"
SECRET_NAME = "dashboard.secret"
MIN_TOKEN_CHARS = 32  # a shorter file is not one we wrote: a new token replaces it
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Endpoints anyone may reach: the login page itself and the stylesheets it needs.
PUBLIC_ENDPOINTS = ("auth.login", "auth.login_form", "static")

bp = Blueprint("auth", __name__)


# -- the token and secret files ------------------------------------------------------------


def load_or_create_token(settings) -> str:
    """The dashboard's access token, from `run/dashboard.token` (made on first use, mode 0600)."""
    return _load_or_create(settings.run_dir / TOKEN_NAME, lambda: secrets.token_urlsafe(32))


def load_or_create_secret(settings) -> str:
    """The key that signs session cookies, from `run/dashboard.secret` (made on first use, mode 0600)."""
    return _load_or_create(settings.run_dir / SECRET_NAME, lambda: secrets.token_hex(32))


def login_url(settings, token: str) -> str:
    """The URL that logs a browser in: `http://{host}:{port}/login?token=…`."""
    host = settings.dashboard.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard bind is reached on loopback from this machine
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.dashboard.port}/login?token={quote(token, safe='')}"


def _load_or_create(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path`, or a new one written there without ever replacing another's."""
    text = _read_secret(path)
    if text is not None:
        return text
    value = make()
    try:
        if path.exists():  # there, but not one of ours (empty, cut short): replace it
            write_bytes_atomically(path, (value + "\n").encode(), mode=PRIVATE_FILE)
            return value
        return value if _create_exclusively(path, value) else _read_secret(path) or value
    except OSError as exc:
        raise GremlinError(f"cannot write {path}: {exc.strerror or exc}; give this user write permission on "
                           f"{path.parent}") from exc


def _read_secret(path: Path) -> str | None:
    """The file's secret when it holds one (its mode tightened to 0600), else None."""
    try:
        text = path.read_text(encoding="ascii").strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise GremlinError(f"cannot read {path}: {exc}; remove it and a new one is made at the next start") from exc
    if len(text) < MIN_TOKEN_CHARS:
        return None
    if mode != PRIVATE_FILE:
        os.chmod(path, PRIVATE_FILE)
        logger.warning("made a dashboard credential file private (mode 0600)", extra={"path": str(path)})
    return text


def _create_exclusively(path: Path, value: str) -> bool:
    """Write `value` to a new `path` atomically (temp file, fsync, link); False when another
    process made it first (its secret is then the one to use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), PRIVATE_FILE)
            handle.write((value + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # unlike a rename, never replaces a file another process just made
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


# -- checking requests ---------------------------------------------------------------------


def _session_tag(token: str) -> str:
    """What a logged-in session holds: a digest of the token (a new token ends old sessions)."""
    return hashlib.sha256(b"gremlin-dashboard-session\0" + token.encode()).hexdigest()[:32]


def _bearer() -> str | None:
    """The token of an `Authorization: Bearer …` header, or None when there is none."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def token_matches(given: str | None) -> bool:
    """Whether `given` is this dashboard's token (compared in constant time)."""
    token = current_app.config["GREMLIN_TOKEN"]
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def wants_json() -> bool:
    """Whether this request is an API (or event-stream) call that gets JSON errors, not pages."""
    return request.path.startswith("/api/") or request.path == "/logs/stream"


def authenticate() -> object | None:
    """Before each request: let in a valid session or Bearer token, else send to the login page
    (pages) or answer 401 (API)."""
    bearer = _bearer()
    if bearer is not None:
        if not token_matches(bearer):
            abort(401, description="wrong token: send Authorization: Bearer <the token in run/dashboard.token>")
        g.auth = "bearer"
        return None
    if session.get("auth") and hmac.compare_digest(session["auth"], _session_tag(current_app.config["GREMLIN_TOKEN"])):
        g.auth = "session"
        return None
    if request.endpoint in PUBLIC_ENDPOINTS:
        g.auth = None
        return None
    if wants_json():
        abort(401, description="not logged in: send Authorization: Bearer <the token in run/dashboard.token>, "
                               "or log in at /login")
    return redirect(url_for("auth.login"))


def check_csrf() -> None:
    """Before each request: a state-changing request made with a cookie must carry the session's CSRF token."""
    if request.method in SAFE_METHODS or g.get("auth") == "bearer":
        return
    expected = session.get("csrf")
    given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
    if not expected or not given or not hmac.compare_digest(given.encode(), expected.encode()):
        abort(403, description="missing or wrong CSRF token: reload the page and try again (API clients: send "
                               f"the {CSRF_HEADER} header, or authenticate with a Bearer token)")


def csrf_token() -> str:
    """This session's CSRF token (made on first use), for forms and the X-CSRF-Token header."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _log_in() -> object:
    """Start a fresh session (no fixation: nothing of the old one is kept) and go to the overview."""
    session.clear()
    session["auth"] = _session_tag(current_app.config["GREMLIN_TOKEN"])
    session["csrf"] = secrets.token_urlsafe(32)
    logger.info("dashboard login", extra={"remote": request.remote_addr})
    return redirect(url_for("overview.index"), code=303 if request.method == "POST" else 302)


def _refuse_login() -> tuple[str, int]:
    logger.warning("dashboard login refused: wrong token", extra={"remote": request.remote_addr})
    return render_template("login.html", error="That is not this dashboard's token. Use the login URL the daemon "
                                               "logged at start, or the token in run/dashboard.token."), 403


# -- the login and logout pages ------------------------------------------------------------


@bp.get("/login")
def login() -> object:
    """`/login?token=…` logs in; without a token, the login form."""
    token = request.args.get("token")
    if token is None:
        if g.get("auth") == "session":
            return redirect(url_for("overview.index"))
        return render_template("login.html", error=None)
    return _log_in() if token_matches(token) else _refuse_login()


@bp.post("/login")
def login_form() -> object:
    """The login form's POST (its CSRF token was checked before)."""
    return _log_in() if token_matches(request.form.get("token", "").strip()) else _refuse_login()


@bp.post("/logout")
def logout() -> object:
    """End the session."""
    session.clear()
    if wants_json():
        return jsonify({"logged_out": True})
    return redirect(url_for("auth.login"), code=303)
