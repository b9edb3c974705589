"""Reading Gremlin's logs back: `gremlin logs`, `read_records`, `follow_records`, components, journald."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent_core.logs import (COMPONENTS, component_of, configure_logging, follow_records, log_files, parse_when,
                             read_records)
from config.settings import journal_stream, load_settings
from tests.conftest import gremlin, write_config


@contextmanager
def logging_into(settings, console: bool = False):
    """The real handlers of `configure_logging` for the duration; none afterwards."""
    system = configure_logging(settings, console=console)
    try:
        yield system
    finally:
        configure_logging(settings, console=False, files=False)
        logging.captureWarnings(False)


def record(when: str, level: str, logger: str, msg: str, **fields) -> str:
    """One hand-written line as JsonFormatter writes it."""
    return json.dumps({"time": when, "level": level, "component": component_of(logger), "logger": logger,
                       "msg": msg, **fields}) + "\n"


def write_log(settings, name: str, *lines: str | bytes) -> Path:
    path = Path(settings.logging.dir) / "system" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(x.encode() if isinstance(x, str) else x for x in lines))
    return path


def messages(records) -> list[str]:
    return [r.message for r in records]


@pytest.fixture
def small_logs(home: Path):
    """Settings whose gremlin.log rotates at 1 KiB, keeping 3 rotated files."""
    write_config(home, watch={"roots": [], "own_source": False}, logging={"max_bytes": 1024, "backup_count": 3})
    return load_settings(home)


def test_every_record_names_its_component(settings, capsys):
    names = {"self_mutation_watcher.watcher": "watcher", "self_training.trainer": "trainer",
             "self_training.finetune": "trainer", "self_training.feedback_loop": "feedback",
             "self_training.git_history": "git", "memory.store": "memory", "agent_core.tool_executor": "tasks",
             "tools.shell_executor": "tasks", "agents.planner_agent": "planner", "dashboard.views": "dashboard",
             "agent_core.control": "daemon", "agent_core.service": "service", "watchdog.observers": "watchdog"}
    with logging_into(settings, console=True) as system:
        for name in names:
            logging.getLogger(name).warning("hello from %s", name)
        logging.getLogger("memory.store").warning("told", extra={"component": "dashboard"})
    stored = [json.loads(line) for line in (system / "gremlin.log").read_text("utf-8").splitlines()]
    assert [(r["logger"], r["component"]) for r in stored[:-1]] == list(names.items())
    assert stored[-1]["component"] == "dashboard" and "component" not in stored[-1]["msg"]
    assert set(names.values()) - {"watchdog"} <= set(COMPONENTS)
    err = capsys.readouterr().err
    assert re.search(r"WARNING +planner +hello from agents\.planner_agent", err)
    assert re.search(r"WARNING +dashboard +told$", err, re.M)  # the override is not repeated as a field


def test_filters_by_level_component_text_and_run(settings):
    with logging_into(settings):
        logging.getLogger("self_training.trainer").info("training run started", extra={"run_id": "r1"})
        logging.getLogger("self_mutation_watcher.watcher").warning("cannot read file", extra={"path": "/p/a.py"})
        logging.getLogger("self_training.trainer").error("training run failed", extra={"run_id": "r1"})
        logging.getLogger("self_training.trainer").info("training run started", extra={"run_id": "r2"})
        logging.getLogger("agent_core.tasks").error("task failed", extra={"task_id": 7})
    assert len(list(read_records(settings))) == 5
    assert messages(read_records(settings, level="warning")) == ["cannot read file", "training run failed",
                                                                 "task failed"]
    assert messages(read_records(settings, level="ERROR", component="trainer")) == ["training run failed"]
    assert messages(read_records(settings, component="tasks")) == ["task failed"]
    assert messages(read_records(settings, grep="A.PY")) == ["cannot read file"]  # fields count, case ignored
    assert messages(read_records(settings, run_id="r1")) == ["training run started", "training run failed"]
    assert [r.fields for r in read_records(settings, run_id="r2")] == [{"run_id": "r2"}]
    with pytest.raises(ValueError, match="unknown level 'loud'"):
        read_records(settings, level="loud")


def test_rotated_files_are_read_oldest_first(small_logs):
    with logging_into(small_logs):
        for n in range(40):
            logging.getLogger("memory.store").info("record %02d", n, extra={"pad": "x" * 60})
    assert [p.name for p in log_files(small_logs)] == ["gremlin.log.3", "gremlin.log.2", "gremlin.log.1",
                                                       "gremlin.log"]
    got = [int(m.split()[1]) for m in messages(read_records(small_logs))]
    assert got == list(range(got[0], 40)) and got[0] > 0  # the oldest were rotated away; the rest in order


def test_since_and_until_take_durations_and_iso_times(settings):
    write_log(settings, "gremlin.log.2", record("2024-01-01T10:00:00.000+00:00", "INFO", "memory.store", "day one"))
    write_log(settings, "gremlin.log.1", record("2024-01-02T10:00:00.000+00:00", "INFO", "memory.store", "day two"))
    write_log(settings, "gremlin.log", record("2024-01-03T10:00:00.000+00:00", "INFO", "memory.store", "day three"))
    now = datetime(2024, 1, 3, 12, tzinfo=timezone.utc)
    assert messages(read_records(settings)) == ["day one", "day two", "day three"]
    assert messages(read_records(settings, since=parse_when("1d", now))) == ["day three"]
    assert messages(read_records(settings, since=parse_when("2d", now), until=parse_when("1d", now))) == ["day two"]
    assert messages(read_records(settings, until=parse_when("2024-01-01T12:00:00Z"))) == ["day one"]
    assert messages(read_records(settings, since=parse_when("2024-01-02T11:00:00+01:00"))) == ["day two", "day three"]
    assert parse_when("90s", now) == now - timedelta(seconds=90)
    assert parse_when("15m", now) == now - timedelta(minutes=15)
    assert parse_when("2024-01-02") == datetime(2024, 1, 2, tzinfo=timezone.utc)  # no offset: UTC
    for bad in ("yesterday", "5y", "", "-1h"):
        with pytest.raises(ValueError, match="neither a duration"):
            parse_when(bad)


def test_corrupt_lines_are_shown_escaped_and_never_crash(settings):
    ok = record("2024-01-01T10:00:00.000+00:00", "ERROR", "memory.store", "before")
    write_log(settings, "gremlin.log", ok, b"\x00\xff\xfe\x1b[31mjunk\n", "[1, 2]\n", '"a string"\n',
              '{"no": "record"}\n', "[" * 50_000 + "\n",
              record("2024-01-01T11:00:00.000+00:00", "INFO", "agent_core.tasks", "after"),
              '{"time": "2024-01-01T11:00:01.000+00:00", "level": "INFO", "msg": "half wri')
    got = list(read_records(settings))
    assert [r.corrupt for r in got] == [False, True, True, True, True, True, False, True]
    junk = got[1]
    assert junk.message == "\\x00\\xff\\xfe\\x1b[31mjunk" and junk.fields["reason"] == "not UTF-8 text"
    assert "\x1b" not in junk.plain() and junk.plain().startswith("-\tCORRUPT\t-\t")
    assert [got[i].fields["reason"] for i in (2, 3, 4)] == ["a JSON array, not a log record",
                                                            "a JSON string, not a log record",
                                                            "JSON object without a valid time, level and msg"]
    assert got[-1].raw.endswith('"half wri') and got[-1].fields["reason"].startswith("not JSON")
    assert all("\n" not in r.plain() for r in got)
    # Level and component filters cannot judge a corrupt line: it stays; text filters match its text.
    kept = list(read_records(settings, level="error", component="memory"))
    assert messages(kept)[0] == "before" and [r.corrupt for r in kept[1:]] == [True] * 6
    assert messages(read_records(settings, grep="junk")) == ["\\x00\\xff\\xfe\\x1b[31mjunk"]
    assert [r.corrupt for r in read_records(settings, grep="half")] == [True]


def test_a_corrupt_line_is_placed_in_time_between_its_neighbours(settings):
    write_log(settings, "gremlin.log", record("2024-01-01T10:00:00+00:00", "INFO", "memory.store", "first"),
              "garbage\n", record("2024-01-03T10:00:00+00:00", "INFO", "memory.store", "last"), "tail junk\n")
    at = lambda text: parse_when(text)  # noqa: E731
    assert messages(read_records(settings, since=at("2024-01-02"))) == ["garbage", "last", "tail junk"]
    assert messages(read_records(settings, until=at("2024-01-02"))) == ["first", "garbage"]
    assert messages(read_records(settings, since=at("2024-01-04"))) == ["tail junk"]


def test_cli_piped_lines_json_and_errors(settings, home: Path):
    with logging_into(settings):
        logging.getLogger("self_training.trainer").warning("training\trun failed", extra={"run_id": "r9"})
        logging.getLogger("memory.store").info("memory stored", extra={"memory_id": 4})
    with open(Path(settings.logging.dir) / "system" / "gremlin.log", "ab") as f:
        f.write(b"\xff broken line\n")
    lines = gremlin("logs", home=home).stdout.splitlines()
    assert [line.split("\t")[1:3] for line in lines] == [["WARNING", "trainer"], ["INFO", "memory"], ["CORRUPT", "-"]]
    assert lines[0].split("\t")[3] == "training\\trun failed run_id=r9"  # a tab in a message cannot split columns
    assert lines[1].endswith("memory stored memory_id=4")
    assert datetime.fromisoformat(lines[0].split("\t")[0]).tzinfo is not None
    filtered = gremlin("logs", "--level", "warning", "--component", "trainer", home=home).stdout.splitlines()
    assert filtered == [lines[0], lines[2]]  # a corrupt line has no level or component to filter on
    objects = [json.loads(line) for line in gremlin("logs", "--json", home=home).stdout.splitlines()]
    assert objects[0]["msg"] == "training\trun failed" and objects[0]["component"] == "trainer"
    assert objects[2] == {"corrupt": True, "file": "gremlin.log", "reason": "not UTF-8 text",
                          "raw": "\\xff broken line"}
    assert gremlin("logs", "--run", "r9", "--json", home=home).stdout.count("\n") == 1
    bad = gremlin("logs", "--since", "last tuesday", home=home, check=False)
    assert bad.returncode == 2 and "'last tuesday' is neither a duration" in bad.stderr
    shutil.rmtree(Path(settings.logging.dir) / "system")
    none = gremlin("logs", home=home, check=False)
    assert none.returncode == 0 and none.stdout == "" and none.stderr.startswith("no log folder yet")


def _follow_in_thread(settings, **filters):
    """Run follow_records in a thread; returns (queue of messages, stop event, thread)."""
    got: queue.Queue = queue.Queue()
    stop = threading.Event()
    records = follow_records(settings, stop, poll_s=0.02, **filters)
    thread = threading.Thread(target=lambda: [got.put(r) for r in records], daemon=True)
    thread.start()
    return got, stop, thread


def _take(got: queue.Queue, count: int) -> list:
    return [got.get(timeout=5) for _ in range(count)]


def test_follow_picks_up_appended_records_across_rotation(small_logs):
    with logging_into(small_logs) as system:
        log = logging.getLogger("memory.store")
        log.info("old")
        got, stop, thread = _follow_in_thread(small_logs, level="info")
        log.info("b1")
        log.debug("not shown")
        log.info("b2")
        assert messages(_take(got, 2)) == ["b1", "b2"]
        log.info("b3")  # lands in the old file just before it is renamed: still shown
        logging.getLogger().handlers[0].doRollover()
        log.info("c1")
        log.warning("c2")
        assert messages(_take(got, 3)) == ["b3", "c1", "c2"]
        assert (system / "gremlin.log.1").is_file()
        stop.set()
        thread.join(2)
    assert not thread.is_alive() and got.empty()


def test_follow_waits_for_a_line_to_be_finished(settings):
    path = write_log(settings, "gremlin.log", record("2024-01-01T10:00:00+00:00", "INFO", "memory.store", "before"),
                     '{"time": "2024-01-01T10:00:01+00:00", "lev')  # being written as the tail starts
    got, stop, thread = _follow_in_thread(settings)
    try:
        line = record("2024-01-01T10:00:02+00:00", "INFO", "memory.store", "written in two parts")
        with open(path, "ab") as f:
            f.write(b'el": "INFO", "msg": "x"}\n' + line[:30].encode())
            f.flush()
            time.sleep(0.2)  # several polls see the half line
            f.write(line[30:].encode() + b"\0binary\n")
        got_now = _take(got, 3)
    finally:
        stop.set()
        thread.join(2)
    assert [(r.message, r.corrupt) for r in got_now] == [("x", False), ("written in two parts", False),
                                                         ("\\x00binary", True)]  # the first shown whole, not cut
    assert got.empty()


def test_journald_lines_when_stderr_is_the_journal(settings, monkeypatch, capfd):
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert journal_stream() == f"{st.st_dev}:{st.st_ino}"
    with logging_into(settings, console=True):
        logging.getLogger().setLevel(logging.DEBUG)
        logging.getLogger("self_mutation_watcher.watcher").warning("cannot read file", extra={"path": "/p/a.py"})
        logging.getLogger("memory.store").info("memory stored")
        logging.getLogger("agents.planner_agent").debug("spec proposed")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("agent_core.tasks").exception("task failed")
    err = capfd.readouterr().err.splitlines()
    assert err[:4] == ["<4>watcher: cannot read file path=/p/a.py", "<6>memory: memory stored",
                       "<7>planner: spec proposed", "<3>tasks: task failed"]
    assert len(err) > 5 and all(line.startswith("<3>") for line in err[4:])  # the traceback keeps its priority
    assert err[-1] == "<3>RuntimeError: boom"


def test_console_lines_when_journal_stream_names_another_file(settings, monkeypatch, capfd):
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # inherited from a service, but stderr goes elsewhere
    with logging_into(settings, console=True):
        logging.getLogger("memory.store").warning("memory stored")
    err = capfd.readouterr().err
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING memory +memory stored\n", err)
