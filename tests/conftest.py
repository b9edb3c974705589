"""Shared fixtures: real homes in tmp_path, the real MiniLM loaded once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.settings import init_home, load_settings, toml_value
from memory.store import Store
from memory.vector_store.embedder import Embedder, resolve_model_path
from self_mutation_watcher.watcher import Watcher

REPO = Path(__file__).resolve().parent.parent
GREMLIN = [sys.executable, "-m", "agent_core.cli"]


def write_config(home: Path, **sections: dict) -> Path:
    """Write `home/config/gremlin.toml` from {section: {key: value}} (the dashboard off unless given:
    test daemons would all ask for port 8765)."""
    sections = {"dashboard": {"enabled": False}, **sections}
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path = home / "config" / "gremlin.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_home(base: Path, watched: Path | None = None, **watch) -> Path:
    """A fresh home under `base` watching `watched` (not Gremlin's own source)."""
    home = base / "home"
    init_home(home)
    roots = [str(watched)] if watched else []
    write_config(home, watch={"roots": roots, "own_source": False, "debounce_ms": 100, **watch},
                 memory={"index_save_interval_s": 0.5})
    return home


@pytest.fixture
def watched(tmp_path: Path) -> Path:
    """An empty project folder to watch."""
    path = tmp_path / "project"
    path.mkdir()
    return path


@pytest.fixture
def home(tmp_path: Path, watched: Path) -> Path:
    """A home that watches `watched`."""
    return make_home(tmp_path, watched)


@pytest.fixture
def settings(home: Path):
    """Settings of the `home` fixture."""
    return load_settings(home)


@pytest.fixture
def store(settings):
    """The writer Store of the `home` fixture."""
    s = Store(settings.memory.db)
    yield s
    s.close()


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real base MiniLM, loaded once for the whole session."""
    e = Embedder(resolve_model_path("", REPO), device="cpu", batch_size=16, max_seq_length=128)
    assert e.dim == 384
    return e


def gremlin(*args: str, home: Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `gremlin` CLI in a subprocess."""
    proc = subprocess.run([*GREMLIN, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"gremlin {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_daemon(home: Path, *extra: str, log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start `gremlin daemon` as a real process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log or home / "daemon.out", "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([*GREMLIN, "--home", str(home), "daemon", *extra], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env)


SETTLE_S = 0.6  # several debounce windows (100 ms in these homes)


class Running:
    """A started Watcher whose sink keeps what it was given."""

    def __init__(self, settings, store: Store, roots=None, sink=None):
        self.got = []
        self.watcher = Watcher(settings, store, sink or self.got.extend, roots=roots)
        self.store = store
        self.watcher.start()
        assert self.watcher.wait_idle(20)

    def events(self) -> list[tuple[str, str]]:
        """(kind, file name) of every recorded event, oldest first."""
        return [(e["kind"], Path(e["path"]).name) for e in reversed(self.store.recent_events(10_000))]

    def wait_events(self, count: int, timeout: float = 10) -> list[tuple[str, str]]:
        """Wait for `count` events, then a little longer to catch any extra one."""
        wait_for(lambda: len(self.events()) >= count, timeout, what=f"{count} events")
        time.sleep(SETTLE_S)
        return self.events()

    def stop(self):
        self.watcher.stop()


@pytest.fixture
def running(settings, store):
    r = Running(settings, store)
    yield r
    r.stop()
