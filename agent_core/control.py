"""The daemon's local control socket: one JSON request per line, one JSON answer per line.

`run/gremlin.sock` is a Unix socket created with mode 0600, so only the daemon's user
can ask it anything. The CLI uses it to search with the daemon's loaded model and live
index (milliseconds instead of seconds of model loading) and to read live status.

A socket path holds at most 108 bytes. For a home whose path is longer, the daemon makes
a private folder with an unpredictable name (`mkdtemp`, mode 0700) in `$XDG_RUNTIME_DIR`
or the temp folder, listens there, and writes the socket's path to
`run/gremlin.sock.path`, which only its user can write: no other user can take the name
first or point a client elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import shutil
import socketserver
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from config.errors import GremlinError
from config.settings import runtime_dir
from memory.atomic import write_bytes_atomically

logger = logging.getLogger(__name__)

SOCKET_NAME = "gremlin.sock"
POINTER_NAME = "gremlin.sock.path"  # in run/: where the socket of a long home path is
PRIVATE_PREFIX = "gremlin-"
MAX_REQUEST_BYTES = 1 << 20
# sun_path holds 108 bytes on Linux; longer homes listen in a private folder (see above).
MAX_SOCKET_PATH = 100


class DaemonUnavailable(GremlinError):
    """No daemon answers on this home's control socket."""


def socket_path(settings) -> Path:
    """Where this home's daemon listens: run/gremlin.sock, or where run/gremlin.sock.path says."""
    path = settings.run_dir / SOCKET_NAME
    if _fits(path):
        return path
    try:
        return _pointed_to(settings)
    except OSError:
        return path  # no daemon has said where it listens: connecting fails with "no daemon"


def _pointed_to(settings) -> Path:
    """The socket path recorded in run/gremlin.sock.path (OSError when there is none)."""
    return Path(os.fsdecode((settings.run_dir / POINTER_NAME).read_bytes().strip()))


def _fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH


def _private_socket(settings) -> Path:
    """A socket path in a new private folder, recorded in run/ (the old folder is removed)."""
    _remove_private_folder(settings)
    folder = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=runtime_dir()))
    path = folder / SOCKET_NAME
    if not _fits(path):
        shutil.rmtree(folder, ignore_errors=True)
        raise GremlinError(f"no short socket path: {path} is longer than {MAX_SOCKET_PATH} bytes; "
                           "set XDG_RUNTIME_DIR or TMPDIR to a short folder, or use a shorter --home")
    write_bytes_atomically(settings.run_dir / POINTER_NAME, os.fsencode(path))
    return path


def _remove_private_folder(settings) -> None:
    """Remove the private socket folder a daemon of this home left, if it is one of ours."""
    pointer = settings.run_dir / POINTER_NAME
    try:
        folder = _pointed_to(settings).parent
        st = folder.lstat()
    except OSError:
        pointer.unlink(missing_ok=True)
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and folder.name.startswith(PRIVATE_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
    pointer.unlink(missing_ok=True)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_BYTES)
        try:
            answer = {"ok": True, "result": self._answer(line)}
        except (ValueError, TypeError, KeyError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        except GremlinError as exc:
            answer = {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failing request must not stop the server
            logger.exception("control request failed")
            answer = {"ok": False, "error": f"internal error: {exc}"}
        self.wfile.write(json.dumps(answer, default=str).encode() + b"\n")

    def _answer(self, line: bytes) -> object:
        request = json.loads(line)
        if not isinstance(request, dict) or request.get("op") not in self.server.ops:
            raise ValueError(f"unknown operation; known: {', '.join(self.server.ops)}")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise ValueError("args must be an object")
        return self.server.ops[request["op"]](**args)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class ControlServer:
    """Serves named operations (`status`, `search`, ...) on the control socket."""

    def __init__(self, settings, ops: dict[str, Callable[..., object]]):
        self.settings = settings
        self.path = settings.run_dir / SOCKET_NAME
        try:
            if not _fits(self.path):
                self.path = _private_socket(settings)
            self.path.unlink(missing_ok=True)  # left by a crashed daemon; we hold the lock
            old_umask = os.umask(0o177)
            try:
                self._server = _Server(str(self.path), _Handler)
            finally:
                os.umask(old_umask)
        except OSError as exc:
            raise GremlinError(f"cannot create the control socket {self.path}: {exc}; remove what is "
                               "in its place, or start with another --home") from exc
        self._server.ops = ops
        self._thread = threading.Thread(target=self._server.serve_forever, name="gremlin-control",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    def start(self) -> None:
        """Answer requests in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop answering and remove the socket."""
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)
        if self.path.parent != self.settings.run_dir:
            _remove_private_folder(self.settings)


def request(settings, op: str, timeout: float = 30.0, **args) -> object:
    """Ask the running daemon; raises DaemonUnavailable when none answers."""
    path = socket_path(settings)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnavailable(f"no daemon is listening on {path}") from exc
    except OSError as exc:
        raise DaemonUnavailable(f"the daemon on {path} did not answer: {exc}") from exc
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise DaemonUnavailable(f"the daemon on {path} sent a malformed answer") from exc
    if not answer.get("ok"):
        raise GremlinError(f"daemon: {answer.get('error')}")
    return answer["result"]
