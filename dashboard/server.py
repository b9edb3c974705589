"""The dashboard served by waitress on a background thread, inside the daemon.

`start()` binds at once (a busy port is a clear GremlinError, raised in the caller's
thread); `stop()` ends the live log tails, lets requests in progress finish (a few
seconds at most), closes every connection and the listening socket, and waits for the
server thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from waitress import wasyncore
from waitress.server import create_server
from waitress.trigger import trigger as Trigger

from config.errors import GremlinError
from dashboard import create_app
from dashboard.auth import load_or_create_token, login_url

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
# Waitress refuses bodies above this before the app sees them; the app's own limit (which
# answers with a JSON 413) is lower, so this one is only a backstop.
BODY_BACKSTOP = 16 * 1024 * 1024


class DashboardServer:
    """The dashboard app on `[dashboard] host:port`, with the daemon's live operations."""

    def __init__(self, settings, ops: dict[str, Callable] | None = None):
        self.settings = settings
        self.app = create_app(settings, ops)
        self.url = login_url(settings, load_or_create_token(settings))
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the port and serve on a daemon thread; GremlinError naming the port when it cannot."""
        cfg = self.settings.dashboard
        sock = self._bind()
        try:
            self._server = create_server(self.app, sockets=[sock], threads=cfg.threads, ident="gremlin",
                                         max_request_body_size=BODY_BACKSTOP)
        except BaseException:
            sock.close()
            raise
        self._thread = threading.Thread(target=self._server.run, name="gremlin-dashboard", daemon=True)
        self._thread.start()
        logger.debug("dashboard listening", extra={"host": cfg.host, "port": cfg.port, "threads": cfg.threads})

    def _bind(self) -> socket.socket:
        """The listening socket, bound here so that a busy port is our error to word (and our socket to close)."""
        cfg = self.settings.dashboard
        try:
            family, kind, proto, _, address = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as exc:
            raise GremlinError(f"[dashboard] host = {cfg.host!r} is not an address of this machine ({exc.strerror}); "
                               f"set it to \"127.0.0.1\" in {self.settings.config_file}") from exc
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise GremlinError(
                f"the dashboard cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc}); if another program "
                f"uses the port, set [dashboard] port in {self.settings.config_file} to a free one, or "
                "[dashboard] enabled = false") from exc
        return sock

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop serving: end live tails, finish requests in progress, close every socket."""
        if self._server is None:
            return
        self.app.extensions["gremlin"].stopping.set()
        server, self._server = self._server, None
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout)
        socket_map = getattr(server, "_map", None) or server.map
        trigger = next((d for d in list(socket_map.values()) if isinstance(d, Trigger)), None)
        if trigger is not None and self._thread.is_alive():
            # close the sockets in the server's own thread: its loop then finds nothing left and returns
            trigger.pull_trigger(lambda: wasyncore.close_all(socket_map))
            self._thread.join(timeout)
        if self._thread.is_alive() or trigger is None:
            wasyncore.close_all(socket_map)
            self._thread.join(timeout)
        logger.debug("dashboard stopped")
