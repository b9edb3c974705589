"""The control socket: answers, bad requests, permissions."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import tempfile

import pytest

from agent_core.control import ControlServer, DaemonUnavailable, request, socket_path
from config.errors import GremlinError
from config.settings import load_settings
from tests.conftest import make_home


@pytest.fixture
def server(settings):
    def fail():
        raise GremlinError("the index is rebuilding, try again")

    srv = ControlServer(settings, {"echo": lambda text="": text.upper(), "fail": fail})
    srv.start()
    yield srv
    srv.stop()


def test_answers_operations_and_reports_errors(settings, server):
    assert request(settings, "echo", text="hi") == "HI"
    with pytest.raises(GremlinError, match="the index is rebuilding"):
        request(settings, "fail")
    with pytest.raises(GremlinError, match="unknown operation; known: echo, fail"):
        request(settings, "drop_tables")
    with pytest.raises(GremlinError, match="bad request"):
        request(settings, "echo", nonsense=1)


def test_socket_is_private_and_survives_garbage(settings, server):
    assert stat.S_IMODE(socket_path(settings).stat().st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path(settings)))
        sock.sendall(b"{not json\n")
        answer = json.loads(sock.makefile().readline())
    assert answer["ok"] is False and "bad request" in answer["error"]
    assert request(settings, "echo", text="still up") == "STILL UP"


def test_no_daemon_is_a_clear_error(settings):
    with pytest.raises(DaemonUnavailable, match="no daemon is listening"):
        request(settings, "status")


def test_a_long_home_listens_in_a_private_folder_no_one_can_take_first(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # read TMPDIR again
    try:
        home = make_home(tmp_path / ("deep" * 30))
        settings = load_settings(home)
        digest = hashlib.sha256(os.fsencode(settings.home)).hexdigest()[:16]
        (tmp_path / "tmp" / f"gremlin-{digest}.sock").mkdir()  # the name an older Gremlin used, taken
        server = ControlServer(settings, {"echo": lambda text="": text.upper()})
        server.start()
        try:
            path = socket_path(settings)
            assert path.parent.parent == tmp_path / "tmp" and path.parent.name.startswith("gremlin-")
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and len(os.fsencode(path)) <= 100
            assert request(settings, "echo", text="long") == "LONG"
        finally:
            server.stop()
        assert not path.parent.exists() and not (settings.run_dir / "gremlin.sock.path").exists()
        with pytest.raises(DaemonUnavailable):
            request(settings, "echo")
    finally:
        tempfile.tempdir = None


def test_a_private_folder_left_by_a_killed_daemon_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir()
    settings = load_settings(make_home(tmp_path / ("deep" * 30)))
    first = ControlServer(settings, {})  # never stopped, as after kill -9
    left = socket_path(settings).parent
    second = ControlServer(settings, {"echo": lambda text="": text})
    second.start()
    try:
        assert not left.exists() and socket_path(settings).parent.parent == tmp_path / "xdg"
        assert request(settings, "echo", text="ok") == "ok"
    finally:
        second.stop()
        first._server.server_close()
