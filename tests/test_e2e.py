"""The real daemon as a process: change files, search them with the CLI, kill -9, restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from memory.store import Store
from tests.conftest import gremlin, make_home, start_daemon, wait_for, write_config

READY_S = 120


def status(home: Path) -> dict:
    return json.loads(gremlin("status", "--json", home=home).stdout)


def wait_ready(home: Path, proc: subprocess.Popen) -> dict:
    def ready():
        assert proc.poll() is None, (home / "daemon.out").read_text()
        info = status(home)
        return info if info.get("state") == "ready" else None
    return wait_for(ready, READY_S, interval=0.5, what="the daemon to be ready")


def search(home: Path, query: str, k: int = 3) -> list[dict]:
    return json.loads(gremlin("search", query, "-k", str(k), "--json", home=home).stdout)


def found(home: Path, query: str, path: Path, change: str) -> bool:
    return any(h["path"] == str(path) and h["change"] == change for h in search(home, query))


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
    proc.send_signal(signum)
    return proc.wait(timeout)


def events(home: Path) -> list[dict]:
    store = Store(home / "data" / "gremlin.db", readonly=True)
    try:
        return [store.events_for_path(p) for p in {e["path"] for e in store.recent_events(10_000)}]
    finally:
        store.close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    (path / "settings.py").write_text("TIMEOUT = 30\nRETRIES = 3\n")
    return path


def test_changes_are_searchable_and_survive_kill_9(tmp_path: Path, project: Path):
    home = make_home(tmp_path, project)
    proc = start_daemon(home)
    try:
        info = wait_ready(home, proc)
        assert info["roots"] == [str(project)] and info["running"] and info["pid"] == proc.pid
        (project / "invoice.py").write_text("def total(items):\n    return sum(i.price * i.qty for i in items)\n")
        wait_for(lambda: found(home, "sum of price times quantity", project / "invoice.py", "created"),
                 60, 0.5, "the created file")
        (project / "settings.py").write_text("TIMEOUT = 120\nRETRIES = 3\n")
        wait_for(lambda: found(home, "raise the timeout", project / "settings.py", "modified"),
                 60, 0.5, "the edit")
        (project / "invoice.py").unlink()
        wait_for(lambda: found(home, "remove invoice total", project / "invoice.py", "deleted"),
                 60, 0.5, "the delete")
        proc.kill()  # kill -9: no shutdown, no index save
        proc.wait(10)
        # while nobody watches
        (project / "settings.py").write_text("TIMEOUT = 120\nRETRIES = 10\n")
        (project / "mailer.py").write_text("def send_welcome_email(user):\n    smtp.send(user.email)\n")
        proc = start_daemon(home)
        wait_ready(home, proc)
        wait_for(lambda: found(home, "send a welcome email", project / "mailer.py", "created"),
                 60, 0.5, "the file created while stopped")
        history = {Path(e[0]["path"]).name: [x["kind"] for x in e] for e in events(home)}
        assert history == {"invoice.py": ["created", "deleted"], "settings.py": ["modified", "modified"],
                           "mailer.py": ["created"]}
        info = status(home)
        assert info["counts"]["memories"] == 5 and info["index_size"] == 5
        assert [e["path"] for e in info["recent_events"]][0] in (str(project / "mailer.py"),
                                                                 str(project / "settings.py"))
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = [json.loads(line) for line in (home / "data" / "logs" / "system" / "gremlin.log").read_text().splitlines()]
    assert any(r["msg"] == "daemon stopped" for r in log)
    audit = (home / "data" / "logs" / "system" / "bootstrap.log").read_text().splitlines()
    assert Counter(json.loads(a)["change"] for a in audit) == Counter(created=2, modified=2, deleted=1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_quick_and_keeps_the_last_change(tmp_path: Path, project: Path, signum):
    home = make_home(tmp_path, project, debounce_ms=2000)
    proc = start_daemon(home)
    try:
        wait_ready(home, proc)
        (project / "last_minute.py").write_text("saved = 'just before shutdown'\n")
        time.sleep(0.3)  # seen by the observer, far inside its 2 s debounce window
        started = time.monotonic()
        assert stop(proc, signum) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [e[0]["kind"] for e in events(home)] == ["created"]
    assert not (home / "run" / "gremlin.sock").exists()


def test_a_second_daemon_refuses_to_start_and_systemd_is_told(tmp_path: Path, project: Path):
    home = make_home(tmp_path, project)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # stands in for systemd's socket
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(READY_S)
    proc = start_daemon(home, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        assert notify.recv(4096).startswith(b"READY=1\nSTATUS=watching 1 roots")
        wait_ready(home, proc)
        second = gremlin("daemon", home=home, check=False, timeout=60)
        assert second.returncode == 1
        assert "already running on this home" in second.stderr and str(proc.pid) in second.stderr
        assert stop(proc) == 0
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()


def test_a_missing_watch_path_is_a_clear_error_at_start(tmp_path: Path, project: Path):
    home = make_home(tmp_path, project)
    result = gremlin("daemon", "--watch", str(tmp_path / "typo"), home=home, check=False, timeout=120)
    assert result.returncode == 1
    assert f"watched path {tmp_path / 'typo'} does not exist" in result.stderr
    assert status(home)["running"] is False
    (tmp_path / "notes.txt").write_text("a file\n")
    result = gremlin("daemon", "--watch", str(tmp_path / "notes.txt"), home=home, check=False, timeout=120)
    assert result.returncode == 1 and f"watched path {tmp_path / 'notes.txt'} is a file, not a folder" in result.stderr
    log = (home / "data" / "logs" / "system" / "gremlin.log").read_text()
    assert "model loaded" not in log and "database migrated" not in log  # checked before anything slow


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_home_is_private_whatever_the_umask(tmp_path: Path, project: Path):
    old = os.umask(0o022)  # the usual default: 0755 folders, 0644 files
    try:
        home = make_home(tmp_path, project)
        for folder in ("data", "run", "data/logs/system"):
            (home / folder).chmod(0o755)  # a home made by an older Gremlin
        Store(home / "data" / "gremlin.db").close()
        (home / "data" / "gremlin.db").chmod(0o644)
        proc = start_daemon(home)
        try:
            wait_ready(home, proc)
            (project / "settings.py").write_text("TIMEOUT = 60\nRETRIES = 3\n")
            wait_for(lambda: status(home)["counts"]["events"] == 1, 30, what="the change")
            assert _mode(home / "data" / "gremlin.db-wal") == 0o600  # open: the WAL is there
        finally:
            assert stop(proc) == 0
    finally:
        os.umask(old)
    for folder in ("data", "run", "data/logs/system", "data/memory", "data/shadow"):
        assert _mode(home / folder) == 0o700, folder
    system = home / "data" / "logs" / "system"
    for file in (home / "data" / "gremlin.db", system / "gremlin.log", system / "bootstrap.log",
                 *(home / "data" / "memory").iterdir()):
        assert _mode(file) == 0o600, file
    lines = [json.loads(line) for line in (system / "gremlin.log").read_text().splitlines()]
    [tightened] = [r for r in lines if r["msg"].startswith("made the home private")]
    assert tightened["paths"] >= 4


def test_an_idle_daemon_keeps_its_log_quiet(tmp_path: Path, project: Path):
    home = make_home(tmp_path, project)
    write_config(home, watch={"roots": [str(project)], "own_source": False},
                 training={"check_interval_s": 1.0, "poll_interval_s": 0.2})
    proc = start_daemon(home)
    try:
        wait_ready(home, proc)
        time.sleep(6)  # 30 trainer polls, 6 rule checks, 6 git syncs
    finally:
        assert stop(proc) == 0
    lines = [json.loads(line) for line in (home / "data" / "logs" / "system" / "gremlin.log").read_text().splitlines()]
    ready = next(i for i, r in enumerate(lines) if r["msg"] == "daemon ready")
    idle = [r["msg"] for r in lines[ready + 1:] if r["msg"] not in ("stop requested", "daemon stopping")]
    assert idle in (["watcher stopped", "daemon stopped"],
                    ["baseline of a new root recorded", "watcher stopped", "daemon stopped"]), idle
