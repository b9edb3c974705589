"""Watch plans, the kernel's watch count, inotify exhaustion, observer restarts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from self_mutation_watcher.observers import PlannedWatch, count_dirs, inotify_watch_count, plan_watches
from self_mutation_watcher.watcher import PathFilter, Watcher
from tests.conftest import REPO, wait_for


def make_tree(root: Path, heavy: int = 60) -> None:
    """A project with a big node_modules and .git next to ordinary source folders."""
    for i in range(heavy):
        (root / "node_modules" / f"dep{i}" / "lib").mkdir(parents=True)
        (root / ".git" / "objects" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
    (root / "src" / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "web" / "node_modules" / "left-pad" / "dist").mkdir(parents=True)
    (root / "web" / "app").mkdir(parents=True)


def test_plan_leaves_out_excluded_folders_that_have_subfolders(settings, watched: Path):
    make_tree(watched)
    f = PathFilter(settings, [watched])
    plan = plan_watches(watched, lambda d: f.accepts_dir(d, watched))
    assert set(plan) == {PlannedWatch(watched, False), PlannedWatch(watched / "src", True),
                         PlannedWatch(watched / "web", False), PlannedWatch(watched / "web" / "app", True)}
    assert count_dirs(plan) == 6  # root, src, src/pkg, src/pkg/__pycache__, web, web/app


def test_the_kernel_watches_only_the_planned_folders(settings, store, watched: Path):
    make_tree(watched)
    before = inotify_watch_count() or 0
    watcher = Watcher(settings, store, [].extend)
    watcher.start()
    try:
        assert inotify_watch_count() - before == 6  # not the 180-odd folders of node_modules and .git
        assert watcher.describe()["degraded"] == {}
    finally:
        watcher.stop()


def test_a_folder_created_under_a_split_watch_is_watched(settings, store, watched: Path):
    make_tree(watched)
    watcher = Watcher(settings, store, [].extend)
    watcher.start()
    try:
        assert watcher.wait_idle(20)
        (watched / "docs").mkdir()
        time.sleep(0.5)  # the folder's own event adds its watch
        (watched / "docs" / "guide.md").write_text("# guide\n")
        wait_for(lambda: store.events_for_path(str(watched / "docs" / "guide.md")), 10, what="the new file")
        time.sleep(0.3)
        (watched / "docs" / "guide.md").write_text("# guide\nmore\n")
        wait_for(lambda: len(store.events_for_path(str(watched / "docs" / "guide.md"))) == 2, 10,
                 what="the edit inside the new folder")
        (watched / "node_modules" / "dep0" / "index.js").write_text("ignored")
        time.sleep(0.5)
        assert store.events_for_path(str(watched / "node_modules" / "dep0" / "index.js")) == []
    finally:
        watcher.stop()


def test_a_dead_observer_is_restarted_and_changes_are_not_lost(settings, store, watched: Path):
    make_tree(watched)
    watcher = Watcher(settings, store, [].extend)
    watcher.start()
    try:
        assert watcher.wait_idle(20)
        shutil.rmtree(watched / "web")  # a planned folder is gone by the time of the restart
        time.sleep(0.5)
        watcher.observers._inotify.stop()  # the observer thread ends, as after an uncaught error
        (watched / "during_outage.py").write_text("x = 1\n")
        wait_for(lambda: watcher.observers.restarts >= 1, 10, what="the restart")
        wait_for(lambda: store.events_for_path(str(watched / "during_outage.py")), 10,
                 what="the change made while no observer ran (found by the reconcile)")
        (watched / "after.py").write_text("y = 2\n")
        wait_for(lambda: store.events_for_path(str(watched / "after.py")), 10, what="a change after the restart")
    finally:
        watcher.stop()


ENOSPC_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from config.settings import load_settings
    from memory.store import Store
    from self_mutation_watcher.watcher import Watcher
    home, watched = Path(sys.argv[1]), Path(sys.argv[2])
    settings = load_settings(home)
    store = Store(settings.memory.db)
    watcher = Watcher(settings, store, [].extend)
    watcher.start()
    watcher.wait_idle(30)
    (watched / "d7" / "changed.py").write_text("polled = True\\n")
    deadline = time.time() + 30
    while time.time() < deadline and not store.events_for_path(str(watched / "d7" / "changed.py")):
        time.sleep(0.2)
    print(json.dumps({"degraded": watcher.describe()["degraded"],
                      "events": [e["kind"] for e in store.events_for_path(str(watched / "d7" / "changed.py"))]}))
    watcher.stop()
""")


def test_running_out_of_inotify_watches_falls_back_to_polling(home: Path, watched: Path):
    """A real ENOSPC: a child user namespace whose inotify watch limit is 5."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    for i in range(20):
        (watched / f"d{i}").mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are not available here: {probe.stderr.decode().strip()}")
    cmd = 'echo 5 > /proc/sys/user/max_inotify_watches && exec "$0" -c "$1" "$2" "$3"'
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", cmd, sys.executable,
                           ENOSPC_SCRIPT, str(home), str(watched)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "inotify watch limit reached" in out["degraded"][str(watched)]
    assert out["events"] == ["created"]
    assert "cannot watch with inotify, polling instead" in proc.stderr


def test_a_folder_vanishing_during_an_observer_restart_is_retried(settings, store, watched: Path, monkeypatch):
    import self_mutation_watcher.observers as observers

    make_tree(watched)
    watcher = Watcher(settings, store, [].extend)
    watcher.start()
    real_plan, vanished = observers.plan_watches, []

    def plan_then_lose_a_folder(root, accepts):
        plan = real_plan(root, accepts)
        if not vanished and (watched / "web" / "app").exists():
            shutil.rmtree(watched / "web" / "app")   # gone after planning, before its watch is added
            vanished.append(True)
        return plan

    try:
        assert watcher.wait_idle(20)
        monkeypatch.setattr(observers, "plan_watches", plan_then_lose_a_folder)
        watcher.observers._inotify.stop()
        (watched / "during_outage.py").write_text("x = 1\n")
        wait_for(lambda: watcher.observers.restarts >= 2 and watcher.observers.healthy(), 15,
                 what="a failed restart, then a good one")
        assert watcher._worker.is_alive()                 # the watcher's own thread survived
        wait_for(lambda: store.events_for_path(str(watched / "during_outage.py")), 10,
                 what="the change made during the outage")
    finally:
        watcher.stop()
