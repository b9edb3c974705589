"""The watcher on real folders: debounce, baseline, reconcile, moves, excludes, logs."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from config.settings import load_settings
from memory.store import FileState, NewEvent, Store, utc_now
from self_mutation_watcher.diff_engine import ShadowStore
from self_mutation_watcher.watcher import Hint, PathFilter, Watcher, WatchError, outermost
from tests.conftest import SETTLE_S, Running, make_home, wait_for

def test_files_present_at_first_start_are_a_baseline_not_events(settings, store, watched: Path):
    (watched / "old.py").write_text("x = 1\n")
    r = Running(settings, store)
    try:
        time.sleep(SETTLE_S)
        assert r.events() == []
        (watched / "old.py").write_text("x = 2\n")
        assert r.wait_events(1) == [("modified", "old.py")]
        assert "-x = 1\n+x = 2" in store.events_for_path(str(watched / "old.py"))[0]["diff"]
    finally:
        r.stop()


def test_create_modify_delete_each_make_one_event(running, watched: Path):
    f = watched / "a.py"
    f.write_text("a = 1\n")
    running.wait_events(1)
    f.write_text("a = 2\n")
    running.wait_events(2)
    f.unlink()
    assert running.wait_events(3) == [("created", "a.py"), ("modified", "a.py"), ("deleted", "a.py")]
    assert len(running.got) == 3 and running.got[0].memory_id is not None


def test_a_burst_of_writes_is_one_event(running, watched: Path):
    f = watched / "burst.py"
    for i in range(20):
        f.write_text(f"value = {i}\n")
        time.sleep(0.005)
    assert running.wait_events(1) == [("created", "burst.py")]
    assert "+value = 19" in running.store.events_for_path(str(f))[0]["diff"]


def test_excluded_files_make_no_events(running, watched: Path):
    (watched / ".git" / "objects").mkdir(parents=True)
    (watched / ".git" / "objects" / "ab").write_text("blob")
    (watched / "__pycache__").mkdir()
    (watched / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0\1")
    (watched / ".env").write_text("TOKEN=abc\n")
    (watched / "notes.txt.swp").write_text("swap")
    (watched / "kept.md").write_text("# kept\n")
    assert running.wait_events(1) == [("created", "kept.md")]


def test_a_rename_is_one_moved_event(running, watched: Path, store):
    (watched / "before.py").write_text("moved = True\n")
    running.wait_events(1)
    (watched / "before.py").rename(watched / "after.py")
    assert running.wait_events(2) == [("created", "before.py"), ("moved", "after.py")]
    moved = store.events_for_path(str(watched / "after.py"))[0]
    assert moved["old_path"] == str(watched / "before.py") and moved["meta"]["same_content"]
    assert store.file_state(str(watched / "before.py")) is None
    assert running.got[-1].event.memory_text.startswith("moved project/before.py -> project/after.py")


def test_a_rename_with_an_edit_is_one_moved_event_with_the_diff(running, watched: Path, store):
    (watched / "old_name.py").write_text("a = 1\nb = 2\n")
    running.wait_events(1)
    (watched / "old_name.py").rename(watched / "new_name.py")
    (watched / "new_name.py").write_text("a = 1\nb = 3\n")
    events = running.wait_events(2)
    assert events == [("created", "old_name.py"), ("moved", "new_name.py")], events
    assert "-b = 2\n+b = 3" in store.events_for_path(str(watched / "new_name.py"))[0]["diff"]


def test_removing_a_directory_deletes_every_file_in_it(running, watched: Path):
    pkg = watched / "pkg"
    pkg.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (pkg / name).write_text(f"# {name}\n")
    running.wait_events(3)
    shutil.rmtree(pkg)
    assert sorted(running.wait_events(6)[3:]) == [("deleted", "a.py"), ("deleted", "b.py"), ("deleted", "c.py")]


def test_a_directory_moved_in_from_outside_is_scanned(running, watched: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "one.py").write_text("one = 1\n")
    (outside / "sub" / "two.py").write_text("two = 2\n")
    outside.rename(watched / "moved_in")
    assert sorted(running.wait_events(2)) == [("created", "one.py"), ("created", "two.py")]


def test_reconcile_finds_exactly_what_changed_while_stopped(settings, store, watched: Path):
    for name in ("same.py", "edit.py", "remove.py", "rename.py"):
        (watched / name).write_text(f"# {name}\n")
    Running(settings, store).stop()  # baseline only
    (watched / "edit.py").write_text("# edited while stopped\n")
    (watched / "remove.py").unlink()
    (watched / "new.py").write_text("# new while stopped\n")
    (watched / "rename.py").rename(watched / "renamed.py")
    os.utime(watched / "same.py")  # touched, same content: not a change
    r = Running(settings, store)
    try:
        assert sorted(r.wait_events(4)) == [("created", "new.py"), ("deleted", "remove.py"),
                                           ("modified", "edit.py"), ("moved", "renamed.py")]
    finally:
        r.stop()
    Running(settings, store).stop()  # a second reconcile finds nothing new
    assert len(store.recent_events(100)) == 4


def test_stop_records_changes_still_in_their_debounce_window(settings, store, watched: Path):
    r = Running(settings, store)
    (watched / "late.py").write_text("late = True\n")
    time.sleep(0.05)  # seen by the observer, not yet quiet for the debounce window
    r.stop()
    assert r.events() == [("created", "late.py")]


def test_failing_sink_loses_no_event_and_the_watcher_goes_on(settings, store, watched: Path):
    calls = []

    def flaky(stored):
        calls.append(stored)
        if len(calls) == 1:
            raise RuntimeError("encoder exploded")

    r = Running(settings, store, sink=flaky)
    try:
        (watched / "one.py").write_text("1\n")
        r.wait_events(1)
        (watched / "two.py").write_text("2\n")
        assert r.wait_events(2) == [("created", "one.py"), ("created", "two.py")]
        assert len(calls) == 2 and r.watcher.stats.errors == 1
        assert "encoder exploded" in r.watcher.stats.last_error
    finally:
        r.stop()


def test_log_failures_become_memories_and_normal_lines_do_not(running, watched: Path):
    log = watched / "service.log"
    log.write_text("INFO boot\n")
    time.sleep(SETTLE_S)
    with log.open("a") as handle:
        handle.write("INFO ok\nERROR payment failed: card declined\n")
    assert running.wait_events(1) == [("log", "service.log")]
    assert running.got[0].event.memory_kind == "failure"


def test_watching_the_home_ignores_gremlins_own_files(tmp_path: Path):
    home = make_home(tmp_path)
    settings = load_settings(home).with_extra_roots([home])
    store = Store(settings.memory.db)
    try:
        r = Running(settings, store)
        (home / "data" / "gremlin.db-extra").write_text("internal")
        (home / "run" / "state.json").write_text("{}")
        (home / "data" / "logs" / "system").mkdir(parents=True, exist_ok=True)
        (home / "data" / "logs" / "system" / "gremlin.log").write_text("ERROR own log\n")
        (home / "data" / "logs" / "applications").mkdir(parents=True, exist_ok=True)
        (home / "data" / "logs" / "applications" / "web.log").write_text("CRITICAL web down\n")
        assert r.wait_events(1) == [("log", "web.log")]
        r.stop()
    finally:
        store.close()


def test_a_missing_root_stops_start_with_a_clear_error(settings, store, tmp_path: Path):
    with pytest.raises(WatchError, match="does not exist.*remove it from \\[watch\\] roots"):
        Watcher(settings, store, list.append, roots=[tmp_path / "nope"]).start()


def test_nested_roots_are_watched_once(tmp_path: Path):
    assert outermost([tmp_path / "a" / "b", tmp_path / "a", tmp_path / "c"]) == [tmp_path / "a", tmp_path / "c"]


def test_filter_decides_by_gitignore_patterns(settings, watched: Path):
    f = PathFilter(settings, [watched])
    assert f.accepts(watched / "src" / "main.py", watched)
    assert not f.accepts(watched / "node_modules" / "x" / "i.js", watched)
    assert not f.accepts_dir(watched / ".venv", watched)
    assert not f.accepts(watched / "keys" / "server.pem", watched)
    assert f.root_of(watched / "deep" / "file") == watched and f.root_of(Path("/elsewhere")) is None
    assert Hint(str(watched)) != Hint(str(watched), scan=True)


def test_a_crash_during_the_first_scan_does_not_swallow_later_files_into_the_baseline(settings, store, watched: Path):
    (watched / "old.py").write_text("old = 1\n")
    old_time = time.time() - 3600
    os.utime(watched / "old.py", (old_time, old_time))
    store.root_watched_since(str(watched), time.time_ns())  # the first run began, then crashed mid-scan
    time.sleep(0.01)
    (watched / "new_while_down.py").write_text("new = 1\n")
    r = Running(settings, store)
    try:
        time.sleep(SETTLE_S)
        assert r.events() == [("created", "new_while_down.py")]  # old.py predates the watch: baseline
        assert store.file_state(str(watched / "old.py")) is not None
    finally:
        r.stop()


def test_gitignore_is_honoured_when_asked(tmp_path: Path, watched: Path):
    (watched / ".gitignore").write_text("build/\n*.tmp\n!keep.tmp\n")
    (watched / "sub").mkdir()
    (watched / "sub" / ".gitignore").write_text("generated.py\n/local_only.txt\n")
    settings = load_settings(make_home(tmp_path, watched, gitignore=True))
    f = PathFilter(settings, [watched])
    assert not f.accepts_dir(watched / "build", watched)
    assert not f.accepts(watched / "x" / "scratch.tmp", watched)
    assert f.accepts(watched / "keep.tmp", watched)
    assert not f.accepts(watched / "sub" / "deeper" / "generated.py", watched)
    assert not f.accepts(watched / "sub" / "local_only.txt", watched)
    assert f.accepts(watched / "sub" / "deeper" / "local_only.txt", watched)
    assert f.accepts(watched / "generated.py", watched)  # the nested rule stays in its folder
    off = PathFilter(load_settings(make_home(tmp_path / "off", watched)), [watched])
    assert off.accepts(watched / "x" / "scratch.tmp", watched)


def test_named_log_files_are_followed_without_watching_their_folder(tmp_path: Path, watched: Path):
    logs = tmp_path / "var_log"
    (logs / "nested").mkdir(parents=True)
    app_log = logs / "app.log"
    app_log.write_text("INFO boot\n")
    home = make_home(tmp_path, watched, log_files=[str(app_log)])
    settings = load_settings(home)
    store = Store(settings.memory.db)
    r = Running(settings, store)
    try:
        assert logs in r.watcher.roots
        with app_log.open("a") as handle:
            handle.write("ERROR the named log failed\n")
        (logs / "other.log").write_text("ERROR not named, not followed\n")
        (logs / "nested" / "deep.log").write_text("ERROR not named either\n")
        assert r.wait_events(1) == [("log", "app.log")]
    finally:
        r.stop()
        store.close()
    missing = load_settings(make_home(tmp_path / "m", watched, log_files=[str(tmp_path / "nope" / "x.log")]))
    with pytest.raises(WatchError, match="remove it from \\[watch\\] log_files"):
        Watcher(missing, Store(missing.memory.db), list.append).start()


def _change_unseen_by_inotify(watched: Path, tmp_path: Path) -> Path:
    """Edit a watched file through a hard link outside the root: inotify reports nothing."""
    target = watched / "linked.py"
    target.write_text("value = 1\n")
    (tmp_path / "outside").mkdir(exist_ok=True)
    os.link(target, tmp_path / "outside" / "linked.py")
    return target


def test_a_kernel_queue_overflow_triggers_a_reconcile(settings, store, watched: Path, tmp_path: Path):
    target = _change_unseen_by_inotify(watched, tmp_path)
    r = Running(settings, store)
    try:
        (tmp_path / "outside" / "linked.py").write_text("value = 2\n")
        time.sleep(SETTLE_S)
        assert r.events() == []  # inotify did not see it
        # what watchdog logs when the kernel drops events (its only signal of an overflow)
        logging.getLogger("watchdog.observers.inotify").warning(
            "Inotify queue overflowed; reconciling recursive watches below %r", str(watched))
        assert r.wait_events(1) == [("modified", "linked.py")]
        assert "+value = 2" in store.events_for_path(str(target))[0]["diff"]
    finally:
        r.stop()


def test_the_scheduled_reconcile_finds_what_inotify_missed(tmp_path: Path, watched: Path):
    settings = load_settings(make_home(tmp_path, watched, reconcile_interval_s=1.0))
    store = Store(settings.memory.db)
    target = _change_unseen_by_inotify(watched, tmp_path)
    r = Running(settings, store)
    try:
        (tmp_path / "outside" / "linked.py").write_text("value = 3\n")
        assert r.wait_events(1, timeout=5) == [("modified", "linked.py")]
        assert store.file_state(str(target)) is not None
    finally:
        r.stop()
        store.close()


def test_a_file_name_that_is_not_utf8_is_recorded_once_and_shown_escaped(settings, store, watched: Path):
    raw = os.fsencode(watched) + b"/caf\xe9-\xff.py"  # Latin-1 bytes: not UTF-8
    path = os.fsdecode(raw)
    r = Running(settings, store)
    try:
        with open(raw, "w") as handle:
            handle.write("x = 1\n")
        assert r.wait_events(1) == [("created", Path(path).name)]
        [event] = store.events_for_path(path)  # the exact name comes back from the database
        assert event["path"] == path and store.file_state(path).path == path
        assert list(store.file_states_under(str(watched))) == [path]
        memory = store.get_memories(store.memory_ids().tolist())
        [label] = [m["meta"]["label"] for m in memory.values()]
        assert label == "project/caf\\xe9-\\xff.py" and memory[1]["text"].startswith("created project/caf\\xe9")
        assert r.watcher.stats.errors == 0
        r.watcher.request_reconcile()  # nothing to do again: no error, no second event
        time.sleep(SETTLE_S)
        assert len(r.events()) == 1 and r.watcher.stats.errors == 0
    finally:
        r.stop()


def test_a_file_name_with_a_newline_keeps_its_diff_parseable(running, watched: Path, store):
    f = watched / "two\nlines.py"
    f.write_text("a = 1\nb = 2\n")
    running.wait_events(1)
    [event] = store.events_for_path(str(f))
    assert event["meta"]["added"] == 2 and event["meta"]["parsed"]
    assert event["diff"].startswith('--- /dev/null\n+++ "b/project/two\\nlines.py"\n')
    [memory] = store.get_memories(store.memory_ids().tolist()).values()
    assert memory["text"].splitlines()[0] == "created project/two\\nlines.py"


def test_one_change_the_database_refuses_does_not_hold_up_the_others(settings, store, watched: Path):
    watcher = Watcher(settings, store, lambda stored: None)
    good = NewEvent(kind="created", path=str(watched / "good.py"), root=str(watched), time=utc_now(),
                    state=FileState(str(watched / "good.py"), str(watched), "ab", 1, 1), memory_kind="code_diff",
                    memory_text="created good.py")
    bad = dataclasses.replace(good, path=str(watched / "bad.py"), memory_text="lone \ud800 surrogate",
                              state=FileState(str(watched / "bad.py"), str(watched), "cd", 1, 1))
    started = time.monotonic()
    watcher._commit([good, bad], [], [])
    assert time.monotonic() - started < 1  # no back-off: the database is fine, one item is not
    assert [e["kind"] for e in store.events_for_path(str(watched / "good.py"))] == ["created"]
    assert store.events_for_path(str(watched / "bad.py")) == [] and store.file_state(str(watched / "bad.py")) is None
    assert watcher.stats.skipped == 1 and "bad.py" in watcher.stats.last_error


def test_a_root_moved_away_and_back_is_reconciled_at_once(settings, store, watched: Path, tmp_path: Path):
    (watched / "sub").mkdir()
    (watched / "a.py").write_text("a = 1\n")
    (watched / "sub" / "b.py").write_text("b = 1\n")
    r = Running(settings, store)
    try:
        away = tmp_path / "away"
        watched.rename(away)
        wait_for(lambda: str(watched) in r.watcher.describe()["missing"], 5, what="the root to be missing")
        (away / "a.py").write_text("a = 2\n")  # inotify still reports it, under the old path
        (away / "sub" / "b.py").unlink()
        (away / "new.py").write_text("n = 1\n")
        time.sleep(SETTLE_S)
        assert r.events() == []  # nothing was deleted: the whole root is elsewhere
        away.rename(watched)
        got = sorted(r.wait_events(3))
        assert got == [("created", "new.py"), ("deleted", "b.py"), ("modified", "a.py")]
        assert r.watcher.describe()["missing"] == {} and r.watcher.stats.errors == 0
        (watched / "after.py").write_text("x = 1\n")
        assert r.wait_events(4)[-1] == ("created", "after.py")
    finally:
        r.stop()


def test_a_root_deleted_and_made_again_is_watched_again(settings, store, watched: Path, caplog):
    (watched / "old.py").write_text("o = 1\n")
    r = Running(settings, store)
    try:
        shutil.rmtree(watched)  # or unmounted: a missing root records nothing until it is back
        wait_for(lambda: str(watched) in r.watcher.describe()["missing"], 5, what="the root to be missing")
        time.sleep(1.5)
        assert r.events() == []
        watched.mkdir()
        (watched / "fresh.py").write_text("f = 1\n")
        assert sorted(r.wait_events(2)) == [("created", "fresh.py"), ("deleted", "old.py")]
        (watched / "later.py").write_text("l = 1\n")
        assert r.wait_events(3)[-1] == ("created", "later.py")
        assert not [rec for rec in caplog.records if "restarting the observers failed" in rec.getMessage()]
    finally:
        r.stop()


AWS_KEY = "AKIAZ7EXAMPLEQ4VXK2M"


def _home_bytes_holding(home: Path, needle: bytes) -> list[str]:
    """Files anywhere under the home whose bytes contain `needle`."""
    return [str(p) for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_no_secret_reaches_any_file_of_the_home(settings, store, watched: Path, home: Path):
    r = Running(settings, store)
    try:
        config = watched / "deploy.py"
        config.write_text(f"REGION = 'eu'\nKEY_ID = '{AWS_KEY}'\n")
        r.wait_events(1)
        config.write_text(f"REGION = 'us'\nKEY_ID = '{AWS_KEY}'\n")
        r.wait_events(2)
        (watched / "app.log").write_text("ERROR login failed for db: password=hunter2hunter2 rejected\n")
        r.wait_events(3)
    finally:
        r.stop()
    store.close()
    for secret in (AWS_KEY.encode(), b"hunter2hunter2"):
        assert _home_bytes_holding(home, secret) == []
    created, modified = Store(settings.memory.db, readonly=True).events_for_path(str(config))
    assert created["meta"]["redacted"] == {"aws_access_key": 1}
    assert "-REGION = 'eu'\n+REGION = 'us'\n" in modified["diff"] and "KEY_ID" in modified["diff"]
    assert "[REDACTED:aws_access_key]" in modified["diff"]  # the context line, redacted on both sides


def test_shadow_copies_made_before_redaction_are_redacted_at_start(settings, store, watched: Path, home: Path,
                                                                  caplog):
    (watched / "old.py").write_text("x = 1\n")
    Running(settings, store).stop()  # baseline: old.py has a shadow copy
    shadow = ShadowStore(settings.memory.shadow_dir)
    secret = f"KEY = '{AWS_KEY}'\n".encode()
    shadow.put(secret, "ab" * 32)  # as an older Gremlin left it: raw content
    store.set_marker("shadow.redaction", "older")
    with caplog.at_level(logging.INFO, logger="self_mutation_watcher.watcher"):
        Running(settings, store).stop()
    assert _home_bytes_holding(home, AWS_KEY.encode()) == []
    assert shadow.path("ab" * 32).read_bytes() == b"KEY = '[REDACTED:aws_access_key]'\n"
    assert any(getattr(rec, "copies", 0) == 1 for rec in caplog.records)


def test_an_empty_folder_in_place_of_a_root_is_not_a_mass_delete(settings, store, watched: Path, tmp_path: Path):
    for n in range(5):
        (watched / f"m{n}.py").write_text(f"m = {n}\n")
    r = Running(settings, store)
    try:
        watched.rename(tmp_path / "mounted")
        watched.mkdir()  # what an unmounted mount point looks like
        wait_for(lambda: str(watched) in r.watcher.describe()["missing"], 5, what="the root to be missing")
        r.watcher.request_reconcile()
        time.sleep(1.5)
        assert r.events() == [] and len(store.file_states_under(str(watched))) == 5
        (tmp_path / "mounted" / "m0.py").write_text("m = 'changed while unmounted'\n")
        watched.rmdir()
        (tmp_path / "mounted").rename(watched)  # mounted again
        assert r.wait_events(1) == [("modified", "m0.py")]
    finally:
        r.stop()


def test_the_watcher_thread_survives_a_failing_step(settings, store, watched: Path, monkeypatch):
    r = Running(settings, store)
    try:
        real, calls = store.file_states_under, []

        def flaky(directory: str):
            calls.append(directory)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database is locked")
            if len(calls) == 2:
                raise RuntimeError("a bug in one step")
            return real(directory)

        monkeypatch.setattr(store, "file_states_under", flaky)
        (watched / "made_meanwhile.py").write_text("x = 1\n")
        r.watcher.request_reconcile()
        assert r.wait_events(1) == [("created", "made_meanwhile.py")]
        (watched / "after.py").write_text("y = 2\n")
        assert r.wait_events(2)[-1] == ("created", "after.py")
        wait_for(lambda: len(calls) == 2, 10, what="the reconcile to be tried again after the busy database")
        assert r.watcher._worker.is_alive() and r.watcher.stats.errors == 2
        r.watcher.request_reconcile()  # the step that failed for good is covered by the next reconcile
        wait_for(lambda: len(calls) == 3, 10, what="the next reconcile")
    finally:
        r.stop()
