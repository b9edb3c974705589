"""Shared pieces of the benchmarks: temporary homes, the real daemon, result tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent_core.control import DaemonUnavailable, request
from config.settings import init_home, load_settings

REPO = Path(__file__).resolve().parent.parent
console = Console()


def make_home(base: Path, watched: Path, **watch) -> Path:
    """A home under `base` that watches only `watched` (not Gremlin's own source)."""
    home = base / "home"
    init_home(home)
    values = {"roots": [str(watched)], "own_source": False, **watch}
    lines = ["[watch]"] + [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                           for k, v in values.items()]
    (home / "config" / "gremlin.toml").write_text("\n".join(lines) + "\n")
    return home


def start_daemon(home: Path) -> subprocess.Popen:
    """The real `gremlin daemon`, logging only to its files."""
    with open(home / "daemon.out", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "agent_core.cli", "--home", str(home), "daemon",
                                 "--quiet"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def wait_ready(home: Path, proc: subprocess.Popen, timeout: float = 180) -> dict:
    """Poll the control socket until the daemon says it is ready."""
    settings = load_settings(home)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited {proc.returncode}: {(home / 'daemon.out').read_text()}")
        try:
            info = request(settings, "status", timeout=5)
            if info["state"] == "ready" and info["pending"] == 0:
                return info
        except DaemonUnavailable:
            pass
        time.sleep(0.2)
    raise SystemExit("daemon did not become ready")


def stop_daemon(proc: subprocess.Popen) -> int:
    """SIGTERM and wait; returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def print_table(title: str, rows: list[tuple], columns: tuple[str, ...]) -> None:
    """A Rich table of results."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


def verdict(ok: bool, text: str) -> None:
    """The final PASS/FAIL line."""
    console.print(f"[bold {'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {text}")


def cpu_count_note() -> str:
    """A note on the machine the numbers come from."""
    return f"{os.cpu_count()} CPUs, torch threads default"
