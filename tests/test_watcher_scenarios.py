"""Real editors, bulk checkouts, hostile files, and kill -9 in the middle of a burst."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from memory.store import Store
from tests.conftest import SETTLE_S, Running, make_home, start_daemon, wait_for
from tests.test_e2e import status, wait_ready


def history(store: Store, path: Path) -> list[str]:
    return [e["kind"] for e in store.events_for_path(str(path))]


def test_vim_style_save_is_one_modification(running, watched: Path, store):
    f = watched / "main.py"
    f.write_text("print('v1')\n")
    running.wait_events(1)
    (watched / ".main.py.swp").write_bytes(b"b0VIM swap")          # swap file while editing
    (watched / "4913").write_text("")                               # vim's write test
    (watched / "4913").unlink()
    f.rename(watched / "main.py~")                                  # backup by rename
    f.write_text("print('v2')\n")                                   # the new file
    (watched / "main.py~").unlink()
    (watched / ".main.py.swp").unlink()
    running.wait_events(2)
    assert history(store, f) == ["created", "modified"]
    assert store.recent_events(10)[0]["path"] == str(f)
    assert "-print('v1')\n+print('v2')" in store.events_for_path(str(f))[1]["diff"]


def test_jetbrains_safe_write_is_one_modification(running, watched: Path, store):
    f = watched / "Service.kt"
    f.write_text("fun a() = 1\n")
    running.wait_events(1)
    tmp, old = watched / "Service.kt___jb_tmp___", watched / "Service.kt___jb_old___"
    tmp.write_text("fun a() = 2\n")
    f.rename(old)
    tmp.rename(f)
    old.unlink()
    running.wait_events(2)
    assert history(store, f) == ["created", "modified"]
    assert len(store.recent_events(100)) == 2


def test_sed_in_place_is_one_modification(running, watched: Path, store):
    f = watched / "app.cfg"
    f.write_text("port = 80\n")
    running.wait_events(1)
    subprocess.run(["sed", "-i", "s/80/8080/", str(f)], check=True)
    running.wait_events(2)
    assert history(store, f) == ["created", "modified"] and len(store.recent_events(100)) == 2


def test_a_directory_moved_out_of_the_root_deletes_its_files(running, watched: Path, store, tmp_path: Path):
    (watched / "pkg" / "sub").mkdir(parents=True)
    (watched / "pkg" / "a.py").write_text("a\n")
    (watched / "pkg" / "sub" / "b.py").write_text("b\n")
    running.wait_events(2)
    (watched / "pkg").rename(tmp_path / "elsewhere")
    assert sorted(running.wait_events(4)[2:]) == [("deleted", "a.py"), ("deleted", "b.py")]


def test_a_directory_renamed_inside_the_root_is_moves(running, watched: Path, store):
    (watched / "old_pkg").mkdir()
    for name in ("a.py", "b.py"):
        (watched / "old_pkg" / name).write_text(f"# {name} content\n")
    running.wait_events(2)
    (watched / "old_pkg").rename(watched / "new_pkg")
    events = running.wait_events(4)
    assert sorted(events[2:]) == [("moved", "a.py"), ("moved", "b.py")], events
    assert store.file_state(str(watched / "old_pkg" / "a.py")) is None


def test_hostile_files_are_handled_and_the_watcher_goes_on(running, watched: Path, store, tmp_path: Path):
    (watched / "loop").mkdir()
    (watched / "loop" / "again").symlink_to(watched / "loop")      # a symlink loop
    (watched / "escape").symlink_to(tmp_path)                      # points outside the root
    (watched / "long_line.txt").write_text("x" * 600_000)          # one very long line
    (watched / "nul.bin").write_bytes(b"abc\0def" * 100)
    (watched / "fine.py").write_text("ok = True\n")
    events = dict((name, kind) for kind, name in running.wait_events(3))
    assert events == {"long_line.txt": "created", "nul.bin": "created", "fine.py": "created"}
    long_event = store.events_for_path(str(watched / "long_line.txt"))[0]
    assert long_event["meta"]["truncated"] and len(long_event["diff"]) <= 262_144
    assert store.events_for_path(str(watched / "loop" / "again")) == []


def test_ten_thousand_files_at_once_are_all_recorded_once(settings, store, watched: Path):
    r = Running(settings, store)
    try:
        big = watched / "flat"
        big.mkdir()
        for i in range(5000):
            (big / f"f{i:05d}.txt").write_text(f"file {i}\n")
        for i in range(5000):
            sub = watched / "tree" / f"d{i % 50:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"g{i:05d}.txt").write_text(f"tree file {i}\n")
        wait_for(lambda: store.counts()["events"] >= 10_000, 240, interval=0.5, what="10,000 events")
        time.sleep(SETTLE_S)
    finally:
        r.stop()
    counts = Counter(e["path"] for e in store.recent_events(20_000))
    assert len(counts) == 10_000 and set(counts.values()) == {1}
    assert {e["kind"] for e in store.recent_events(20_000)} == {"created"}


def test_kill_9_during_a_burst_loses_and_duplicates_nothing(tmp_path: Path, watched: Path):
    home = make_home(tmp_path, watched)
    proc = start_daemon(home)
    try:
        wait_ready(home, proc)
        for i in range(300):
            (watched / f"burst_{i:03d}.py").write_text(f"def burst_{i}():\n    return {i}\n")
        wait_for(lambda: status(home)["counts"]["events"] > 0, 60, 0.05, "the first events")
        proc.send_signal(signal.SIGKILL)  # in the middle of recording and embedding the burst
        proc.wait(10)
        for i in range(300, 320):  # more changes while it is down
            (watched / f"burst_{i:03d}.py").write_text(f"def burst_{i}():\n    return {i}\n")
        proc = start_daemon(home)
        wait_ready(home, proc)
        wait_for(lambda: (s := status(home))["counts"]["events"] >= 320 and s["index_size"] >= 320,
                 120, 0.5, "all 320 changes recorded and embedded")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    store = Store(home / "data" / "gremlin.db", readonly=True)
    try:
        events = store.recent_events(1000)
        assert Counter(e["path"] for e in events) == Counter({str(watched / f"burst_{i:03d}.py"): 1
                                                               for i in range(320)})
        assert store.counts()["memories"] == 320 and store.vector_count(status(home)["model_id"]) == 320
    finally:
        store.close()
