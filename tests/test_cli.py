"""The `gremlin` command line, through click's CliRunner and the installed script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from agent_core.cli import main
from memory.service import Memory
from memory.store import FileState, NewEvent, Store, utc_now
from config.settings import load_settings
from tests.conftest import gremlin


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_installed_script_and_help():
    script = Path(sys.executable).parent / "gremlin"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("init", "daemon", "status", "search"):
        assert command in proc.stdout
    assert "--watch" in run("daemon", "--help").output
    assert "--kind" in run("search", "--help").output


def test_init_creates_a_private_home(tmp_path: Path):
    old = os.umask(0o022)
    try:
        result = run("init", str(tmp_path / "h"))
    finally:
        os.umask(old)
    assert result.exit_code == 0 and "home ready" in result.output
    assert (tmp_path / "h" / "config" / "gremlin.toml").is_file()
    assert load_settings(tmp_path / "h").home == tmp_path / "h"
    for folder in ("data", "run", "data/logs/system", "run/checkpoints"):
        assert (tmp_path / "h" / folder).stat().st_mode & 0o777 == 0o700


def test_status_of_a_home_whose_daemon_is_not_running(home: Path, watched: Path):
    result = run("--home", str(home), "status", "--json")
    info = json.loads(result.output)
    assert info["running"] is False and info["roots"] == [str(watched)]
    assert info["model_id"].startswith("all-MiniLM-L6-v2-")
    text = run("--home", str(home), "status").output
    assert "not running" in text and str(watched) in text


def test_status_without_a_home_says_how_to_make_one(tmp_path: Path):
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "none"), "status"])
    assert result.exit_code == 1 and "gremlin init" in result.output


def test_search_without_a_daemon_loads_the_model_itself(home: Path, settings, embedder):
    store = Store(settings.memory.db)
    p = "/p/cache.py"
    ev = NewEvent(kind="modified", path=p, root="/p", time=utc_now(), state=FileState(p, "/p", "s", 1, 1),
                  memory_kind="code_diff", memory_text="modified p/cache.py\n+@lru_cache(maxsize=1024)",
                  memory_meta={"path": p, "label": "p/cache.py"})
    Memory(settings, store, embedder).ingest(store.record_events([ev]))
    store.close()
    hits = json.loads(run("--home", str(home), "search", "memoize results", "--json").output)
    assert hits[0]["path"] == p and hits[0]["change"] == "modified"
    table = run("--home", str(home), "search", "memoize results").output
    assert "p/cache.py" in table and "lru_cache" in table


def test_search_on_an_empty_home(home: Path):
    assert "no memories yet" in run("--home", str(home), "search", "anything").output


LONG = "a_rather_long_folder_name_for_a_project/with/nested/packages/and/a_widget_factory_module.py"


def _long_path_memory(settings) -> str:
    store = Store(settings.memory.db)
    path = f"/srv/{LONG}"
    store.record_events([NewEvent(kind="modified", path=path, root="/srv", time=utc_now(),
                                  state=FileState(path, "/srv", "s", 1, 1), memory_kind="code_diff",
                                  memory_text=f"modified {LONG}\n+make_widget(size=3)",
                                  memory_meta={"path": path, "label": LONG})])
    store.close()
    return path


def test_piped_output_is_plain_lines_that_never_break_a_path(home: Path, settings, tmp_path: Path):
    path = _long_path_memory(settings)
    found = gremlin("search", "make_widget", "--mode", "lexical", home=home).stdout
    assert [line for line in found.splitlines() if path in line] == found.splitlines()  # grep finds it
    assert "\x1b[" not in found and "┃" not in found
    status = gremlin("status", home=home).stdout
    assert any(line.endswith(path) for line in status.splitlines()) and "┃" not in status


def test_on_a_terminal_hits_are_headed_by_their_whole_path(home: Path, settings, monkeypatch):
    from rich.console import Console

    import agent_core.cli as cli

    path = _long_path_memory(settings)
    terminal = Console(force_terminal=True, width=60, color_system=None, record=True)
    monkeypatch.setattr(cli, "console", terminal)
    run("--home", str(home), "search", "make_widget", "--mode", "lexical")
    text = terminal.export_text()
    heading, preview = text.splitlines()
    assert " bm25  code_diff (modified)  " in heading and heading.endswith(path)  # whole, on one line
    assert preview == "    +make_widget(size=3)"
