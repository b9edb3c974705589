"""Every CLI failure is one `error:` line that says what to do, never a traceback."""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from memory.store import Store
from tests.conftest import gremlin, make_home, write_config


def one_error_line(proc: subprocess.CompletedProcess, *expected: str, logs_before: bool = False) -> str:
    """The single error line a failed command printed last (the daemon may log before it)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines and lines[-1].startswith("error: "), proc.stderr
    assert logs_before or len(lines) == 1, proc.stderr
    for part in expected:
        assert part in lines[-1], (part, lines[-1])
    return lines[-1]


@contextmanager
def read_only(path: Path):
    """`path` made unwritable even for root (chattr +i), or by mode for another user; else skip."""
    root = subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0"
    if root:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i is not allowed: nothing is read-only for root")
    else:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield path
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def made(tmp_path: Path, watched: Path) -> Path:
    """A home with its database made."""
    home = make_home(tmp_path, watched)
    Store(home / "data" / "gremlin.db").close()
    return home


def test_a_read_only_database(made: Path, tmp_path: Path):
    (tmp_path / "repo").mkdir()
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    with read_only(made / "data" / "gremlin.db"):
        one_error_line(gremlin("daemon", home=made, check=False), "cannot write the database",
                       "give this user write permission", logs_before=True)
        one_error_line(gremlin("replay", str(tmp_path / "repo"), home=made, check=False), "cannot write the database")


@pytest.mark.parametrize("content", [b"this is not a database" * 100, None])
def test_a_database_that_is_not_gremlins(made: Path, content: bytes | None):
    db = made / "data" / "gremlin.db"
    if content is None:  # a SQLite database of another program
        db.unlink()
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE customers (name)")
        conn.execute("PRAGMA user_version = 9")
        conn.close()
    else:
        db.write_bytes(content)
    for args in (("status",), ("search", "anything", "--mode", "lexical"), ("models", "list")):
        line = one_error_line(gremlin(*args, home=made, check=False), str(db))
        assert "not a SQLite database" in line or "lacks Gremlin's tables" in line


def test_init_where_no_home_can_be(tmp_path: Path):
    (tmp_path / "a_file").write_text("x")
    one_error_line(gremlin("init", str(tmp_path / "a_file" / "home"), home=tmp_path, check=False),
                   "cannot make a home at", "not inside a file")
    (tmp_path / "locked").mkdir()
    with read_only(tmp_path / "locked"):
        one_error_line(gremlin("init", str(tmp_path / "locked" / "home"), home=tmp_path, check=False),
                       "cannot make a home at", "choose a folder this user may write")


def test_a_log_folder_that_cannot_be_written(tmp_path: Path, watched: Path):
    home = make_home(tmp_path, watched)
    (tmp_path / "a_file").write_text("x")
    write_config(home, watch={"roots": [str(watched)], "own_source": False},
                 logging={"dir": str(tmp_path / "a_file" / "logs")})
    one_error_line(gremlin("daemon", home=home, check=False), "cannot write log files in", "[logging] dir",
                   logs_before=True)


def test_a_config_file_that_is_a_folder(tmp_path: Path):
    home = tmp_path / "home"
    (home / "config" / "gremlin.toml").mkdir(parents=True)
    one_error_line(gremlin("init", str(home), home=home, check=False), "is not a file (a folder?)", "remove it")
    one_error_line(gremlin("status", home=home, check=False), "is not a file (a folder?)", "remove it")


def test_usage_errors_keep_clicks_exit_code_2(made: Path):
    proc = gremlin("search", home=made, check=False)
    assert proc.returncode == 2 and "Missing argument 'QUERY'" in proc.stderr
