"""The control socket: answers, bad requests, permissions."""

from __future__ import annotations

import json
import socket
import stat

import pytest

from agent_core.control import ControlServer, DaemonUnavailable, request, socket_path
from config.errors import GremlinError


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
