"""Log following: failure grouping, signatures, rotation by rename and by copytruncate, repeats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from memory.store import NewEvent
from self_mutation_watcher.diff_engine import ChangeDetector, ShadowStore
from self_mutation_watcher.log_tail import group_failures

TRACEBACK = """2026-11-24 10:00:01 INFO worker started
2026-11-24 10:00:02 INFO job 17 picked
Traceback (most recent call last):
  File "/srv/app/jobs.py", line 88, in run
    result = handler(job)
  File "/srv/app/handlers.py", line 12, in handler
    return 1 / job.weight
ZeroDivisionError: division by zero
2026-11-24 10:00:03 INFO job 18 picked
"""


def test_a_traceback_is_one_failure_with_its_last_frame():
    [failure] = group_failures(TRACEBACK)
    assert failure.title == "ZeroDivisionError: division by zero"
    assert (failure.file, failure.line) == ("/srv/app/handlers.py", 12)
    assert failure.text.startswith("2026-11-24 10:00:01 INFO worker started")  # two context lines
    assert failure.text.endswith("ZeroDivisionError: division by zero")


def test_an_error_record_keeps_its_continuation_and_chained_tracebacks():
    text = ("12:00:00 ERROR payment failed for order 991\n"
            "Traceback (most recent call last):\n"
            '  File "pay.py", line 5, in charge\n'
            "KeyError: 'card'\n"
            "\n"
            "During handling of the above exception, another exception occurred:\n"
            "\n"
            "Traceback (most recent call last):\n"
            '  File "pay.py", line 9, in charge\n'
            "RuntimeError: no card on file\n"
            "12:00:01 INFO next\n"
            "12:00:02 CRITICAL disk full on /var\n")
    first, second = group_failures(text)
    assert first.title == "RuntimeError: no card on file" and first.line == 9
    assert "KeyError: 'card'" in first.text and "INFO next" not in first.text
    assert second.title == "12:00:02 CRITICAL disk full on /var" and second.file is None


def test_signatures_ignore_numbers_and_quoted_values_but_not_the_error():
    a = group_failures("10:00 ERROR timeout after 30s talking to 'db-1'\n")[0]
    b = group_failures("11:15 ERROR timeout after 45s talking to 'db-7'\n")[0]
    c = group_failures("11:15 ERROR connection refused by 'db-7'\n")[0]
    assert a.signature == b.signature != c.signature
    assert group_failures("INFO all good\nWARNING slow\n") == []


@pytest.fixture
def detector(settings, store) -> ChangeDetector:
    return ChangeDetector(store, ShadowStore(settings.memory.shadow_dir), settings.watch,
                          settings.memory.memory_chars, is_log=lambda p: ".log" in p.name)


def follow(detector, store, log: Path, root: Path, window: float = 300) -> list[NewEvent]:
    """One check of the log, committed as the watcher commits it; the events stored."""
    outcome = detector.check(log, root)
    if outcome.events:
        return [s.event for s in store.record_events(list(outcome.events), window)]
    if outcome.state:
        store.save_file_states([outcome.state])
    return []


def test_rotation_by_rename_loses_no_line(detector, store, watched: Path):
    log = watched / "svc.log"
    log.write_text("INFO up\n")
    assert follow(detector, store, log, watched) == []
    with log.open("a") as handle:  # written after our last read, just before rotation
        handle.write("ERROR lost unless the old file is read\n")
    log.rename(watched / "svc.log.1")
    log.write_text("ERROR first line of the new file\n")
    titles = [e.meta["title"] for e in follow(detector, store, log, watched)]
    assert titles == ["ERROR lost unless the old file is read", "ERROR first line of the new file"]
    assert follow(detector, store, log, watched) == []  # nothing read twice


def test_rotation_by_copytruncate_loses_no_line(detector, store, watched: Path):
    log = watched / "web.log"
    log.write_text("INFO web up, serving on port 8080 with 4 workers\n")
    follow(detector, store, log, watched)
    with log.open("a") as handle:
        handle.write("CRITICAL written just before the copy\n")
    shutil.copyfile(log, watched / "web.log.1")  # logrotate's copytruncate
    with log.open("r+") as handle:
        handle.truncate(0)
    with log.open("a") as handle:
        handle.write("ERROR after the truncate\n")
    titles = [e.meta["title"] for e in follow(detector, store, log, watched)]
    assert titles == ["CRITICAL written just before the copy", "ERROR after the truncate"]
    assert all(e["meta"]["rotated"] for e in store.events_for_path(str(log)))


def test_repeats_of_one_failure_are_counted_not_stored(detector, store, watched: Path):
    log = watched / "jobs.log"
    log.write_text("")
    follow(detector, store, log, watched)
    for attempt in range(5):
        with log.open("a") as handle:
            handle.write(f"ERROR job {attempt} failed: timeout after {attempt * 10}s\n")
        follow(detector, store, log, watched)
    [failure] = store.failure_counts()
    assert failure["count"] == 5 and store.counts()["events"] == 1
    with log.open("a") as handle:
        handle.write("ERROR job 9 failed: timeout after 90s\n")
    assert len(follow(detector, store, log, watched, window=0)) == 1  # outside the window: stored again


def test_restart_continues_from_the_saved_offset(detector, store, watched: Path, settings):
    log = watched / "app.log"
    log.write_text("ERROR before the restart\n")
    assert len(follow(detector, store, log, watched)) == 1
    with log.open("a") as handle:
        handle.write("ERROR while Gremlin was down\n")
    again = ChangeDetector(store, ShadowStore(settings.memory.shadow_dir), settings.watch,
                           settings.memory.memory_chars, is_log=lambda p: p.suffix == ".log")
    assert [e.meta["title"] for e in follow(again, store, log, watched)] == ["ERROR while Gremlin was down"]


def test_a_log_checked_between_rotation_and_its_new_file_loses_nothing(detector, store, watched: Path):
    log = watched / "api.log"
    log.write_text("INFO up\n")
    follow(detector, store, log, watched)
    with log.open("a") as handle:
        handle.write("ERROR just before rotation\n")
    log.rename(watched / "api.log.1")
    assert follow(detector, store, log, watched) == []  # no file right now: nothing yet, nothing lost
    with (watched / "api.log.1").open("a") as handle:  # the app writes on until it reopens
        handle.write("ERROR late line in the old file\n")
    log.write_text("ERROR in the new file\n")
    titles = [e.meta["title"] for e in follow(detector, store, log, watched)]
    assert titles == ["ERROR just before rotation", "ERROR late line in the old file", "ERROR in the new file"]
