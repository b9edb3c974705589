"""The durable task queue: validation, atomic claims under concurrency, leases, retries,
cancellation, the inbox and its quarantine. Real SQLite files, real threads and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent_core import tasks
from agent_core.tasks import RunningTask, TaskError, TaskOutcome, TaskRunner, parse_task, scan_inbox
from config.settings import load_settings
from memory.store import Store
from tests.conftest import REPO, wait_for, write_config

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("raw, words", [
    ([1], "must be a JSON object"),
    ({"cmd": ["x"]}, "field 'type' must be one of"),
    ({"type": "nope"}, "field 'type' must be one of"),
    ({"type": "shell"}, "field 'cmd' is missing"),
    ({"type": "shell", "cmd": "pytest -q"}, "field 'cmd' must be a non-empty list of strings"),
    ({"type": "shell", "cmd": []}, "field 'cmd' must be a non-empty list"),
    ({"type": "shell", "cmd": ["a"], "timeout_s": "5"}, "field 'timeout_s' must be a number"),
    ({"type": "shell", "cmd": ["a"], "timeout_s": -1}, "field 'timeout_s' must be above 0"),
    ({"type": "self_train", "wait": "yes"}, "field 'wait' must be true or false"),
    ({"type": "self_train", "priority": 1000}, "field 'priority' must be from -100 to 100"),
    ({"type": "self_train", "priority": True}, "field 'priority' must be an integer"),
    ({"type": "self_train", "cmd": ["ls"]}, "unknown field 'cmd' for a self_train task"),
    ({"type": "rollback", "target": "db"}, "field 'target' must be \"files\" or \"model\""),
    ({"type": "rollback", "target": "files"}, "field 'snapshot' is missing"),
    ({"type": "mutate", "patch": "  "}, "field 'patch' is empty"),
    ({"type": "replay"}, "field 'repo' is missing"),
])
def test_a_malformed_task_is_refused_naming_the_field(raw, words):
    with pytest.raises(TaskError, match="task: ") as caught:
        parse_task(raw)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_valid_task_keeps_its_fields_apart_from_queueing_options():
    spec = parse_task({"type": "shell", "cmd": ["pytest", "-q"], "priority": 5, "key": "k1", "note": "n"})
    assert (spec.type, spec.priority, spec.key) == ("shell", 5, "k1")
    assert spec.payload == {"cmd": ["pytest", "-q"], "note": "n"}


def test_a_command_outside_the_allowlist_is_refused_when_submitted(settings, store):
    with pytest.raises(TaskError, match=r"task field 'cmd': .*'rm'.* \[shell\] allow"):
        tasks.submit(store, settings, parse_task({"type": "shell", "cmd": ["rm", "-rf", "/"]}))
    assert store.list_tasks() == []


def test_an_idempotency_key_queues_a_task_once(settings, store):
    spec = parse_task({"type": "snapshot", "key": "nightly-1"})
    first, again = tasks.submit(store, settings, spec), tasks.submit(store, settings, spec)
    assert first.created and not again.created and first.id == again.id
    assert len(store.list_tasks()) == 1


def test_claims_go_by_priority_then_age_and_skip_tasks_not_due(settings, store):
    low = store.submit_task("snapshot", {}, priority=1)[0]
    high = store.submit_task("snapshot", {}, priority=9)[0]
    later = store.submit_task("snapshot", {}, priority=9)[0]
    assert [store.claim_task(1, 60)["id"] for _ in range(3)] == [high, later, low]
    assert store.claim_task(1, 60) is None


def test_threads_claiming_at_once_never_take_a_task_twice(tmp_path):
    db = tmp_path / "q.db"
    Store(db).close()
    with _opened(db) as store:
        ids = [store.submit_task("snapshot", {"n": n})[0] for n in range(300)]
    taken: list[int] = []
    lock = threading.Lock()

    def claimer(worker: int) -> None:
        with _opened(db) as own:  # each thread its own connection: real contention in SQLite
            while (row := own.claim_task(worker, 60)) is not None:
                assert own.finish_task(row["id"], row["attempts"], "done", {"ok": True})[0]
                with lock:
                    taken.append(row["id"])

    threads = [threading.Thread(target=claimer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == ids and max(Counter(taken).values()) == 1


CLAIMER = """
import os, sys, time
from memory.store import Store
store = Store(sys.argv[1])
open(sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[4]):  # all start claiming together
    time.sleep(0.005)
with open(sys.argv[2], "w") as out:
    while (row := store.claim_task(int(sys.argv[3]), 60)) is not None:
        out.write(f"{row['id']}\\n")
        out.flush()
        store.finish_task(row["id"], row["attempts"], "done", {})
"""


def test_processes_claiming_at_once_never_take_a_task_twice(tmp_path):
    db = tmp_path / "q.db"
    with _opened(db) as store:
        ids = [store.submit_task("snapshot", {"n": n})[0] for n in range(300)]
    outs = [tmp_path / f"claims{n}.txt" for n in range(4)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(db), str(out), str(n), str(go)], cwd=REPO)
             for n, out in enumerate(outs)]
    wait_for(lambda: all(Path(f"{out}.ready").exists() for out in outs), 60, 0.05, "the claimers to start")
    go.touch()
    assert [p.wait(120) for p in procs] == [0] * 4
    taken = [int(line) for out in outs for line in out.read_text().split()]
    assert sorted(taken) == ids and max(Counter(taken).values()) == 1
    assert sum(1 for out in outs if out.read_text().strip()) >= 2  # they really did compete


def test_a_task_whose_runner_died_is_claimed_again_after_its_lease(store):
    task_id = store.submit_task("snapshot", {}, max_attempts=2)[0]
    first = store.claim_task(1, 30, now=NOW)
    assert store.claim_task(2, 30, now=NOW + timedelta(seconds=29)) is None  # the lease still holds
    second = store.claim_task(2, 30, now=NOW + timedelta(seconds=31))
    assert second["id"] == task_id and second["attempts"] == 2
    # the first runner comes back late: its result cannot overwrite the new attempt's
    assert store.finish_task(task_id, first["attempts"], "done", {"late": True}, now=NOW) == (False, None)
    assert store.renew_lease(task_id, first["attempts"], 30) is None
    assert store.finish_task(task_id, 2, "done", {"ok": True})[0]
    assert store.get_task(task_id)["result"] == {"ok": True}


def test_a_runner_that_dies_on_the_last_attempt_fails_the_task(store):
    task_id = store.submit_task("snapshot", {}, max_attempts=1)[0]
    store.claim_task(1, 30, now=NOW)
    assert store.claim_task(2, 30, now=NOW + timedelta(seconds=31)) is None
    row = store.get_task(task_id)
    assert row["state"] == "failed" and "lease expired" in row["error"] and row["finished"]


def test_an_unexpected_error_is_retried_with_backoff_then_fails(settings, store):
    task_id = tasks.submit(store, settings, parse_task({"type": "snapshot", "max_attempts": 2})).id

    def boom(task: RunningTask) -> TaskOutcome:
        raise RuntimeError("disk hiccup")

    runner = TaskRunner(settings, store, boom)
    runner.run_one(store.claim_task(1, 60))
    row = store.get_task(task_id)
    assert row["state"] == "queued" and "disk hiccup" in row["error"]
    assert row["not_before"] > row["started"]  # backoff: not due at once
    assert store.claim_task(1, 60) is None
    runner.run_one(store.claim_task(1, 60, now=datetime.now(timezone.utc) + timedelta(hours=1)))
    row = store.get_task(task_id)
    assert row["state"] == "failed" and row["attempts"] == 2 and row["finished"]


def test_a_refused_task_fails_without_retries(settings, store):
    task_id = tasks.submit(store, settings, parse_task({"type": "snapshot", "max_attempts": 3})).id

    def refuse(task: RunningTask) -> TaskOutcome:
        raise TaskError("snapshot refused: no roots")

    TaskRunner(settings, store, refuse).run_one(store.claim_task(1, 60))
    row = store.get_task(task_id)
    assert (row["state"], row["attempts"], row["error"]) == ("failed", 1, "snapshot refused: no roots")


def test_cancel_stops_a_queued_task_at_once_and_a_running_one_at_its_heartbeat(settings, store):
    queued = store.submit_task("snapshot", {})[0]
    assert tasks.cancel(store, queued) == "cancelled"
    assert store.claim_task(1, 60) is None
    running = store.submit_task("snapshot", {})[0]
    seen = threading.Event()

    def wait_for_stop(task: RunningTask) -> TaskOutcome:
        seen.set()
        assert task.stop.wait(20), "the cancel request never reached the task"
        return TaskOutcome("cancelled", {"why": task.why_stopped})

    runner = TaskRunner(settings, store, wait_for_stop)
    worker = threading.Thread(target=runner.run_one, args=(store.claim_task(1, 60),))
    worker.start()
    assert seen.wait(10)
    assert tasks.cancel(store, running) == "running"
    worker.join(20)
    row = store.get_task(running)
    assert row["state"] == "cancelled" and row["result"] == {"why": "cancelled"}
    with pytest.raises(TaskError, match="no task 999"):
        tasks.cancel(store, 999)


def test_retry_queues_a_finished_task_as_a_new_one(settings, store):
    task_id = store.submit_task("snapshot", {"message": "m"}, priority=3)[0]
    row = store.claim_task(1, 60)
    store.finish_task(task_id, row["attempts"], "failed", error="x")
    again = tasks.retry(store, settings, task_id)
    new = store.get_task(again.id)
    assert (new["state"], new["payload"], new["retry_of"], new["priority"]) == ("queued", {"message": "m"}, task_id, 3)
    with pytest.raises(TaskError, match="only a done, failed or cancelled task"):
        tasks.retry(store, settings, again.id)


def test_finished_tasks_fill_what_the_feedback_rules_read(settings, store):
    task_id = store.submit_task("shell", {"cmd": ["false"]})[0]
    row = store.claim_task(1, 60)
    ours, memory_id = store.finish_task(task_id, row["attempts"], "failed", {"exit_code": 1, "reward": 0.1},
                                        "false exited with code 1", memory=("failure", "shell task failed", {}))
    assert ours and memory_id
    done = store.tasks_finished_after("", 0)
    assert [(t["id"], t["state"], t["result"]["exit_code"]) for t in done] == [(task_id, "failed", 1)]
    assert store.get_task(task_id)["reward"] == 0.1 and store.get_memories([memory_id])[memory_id]["kind"] == "failure"


# -- the inbox ---------------------------------------------------------------------------


def _drop(settings, name: str, content: str | bytes) -> Path:
    path = tasks.inbox_dir(settings) / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_inbox_files_are_queued_and_removed(settings, store):
    _drop(settings, "a.json", json.dumps({"type": "snapshot", "message": "from a file"}))
    _drop(settings, "b.json.tmp", "{half written")  # not *.json yet: left alone
    done = scan_inbox(store, settings)
    assert len(done.queued) == 1 and not done.rejected
    assert store.get_task(done.queued[0])["payload"] == {"message": "from a file"}
    assert store.get_task(done.queued[0])["source"] == "inbox"
    assert sorted(p.name for p in tasks.inbox_dir(settings).iterdir()) == ["b.json.tmp"]


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ('{"type": "shell", "cmd": "ls"}', "field 'cmd' must be a non-empty list"),
    ('{"type": "launch_rockets"}', "field 'type' must be one of"),
    ('{"type": "shell", "cmd": ["curl", "evil"]}', "not allowed"),
])
def test_a_bad_inbox_file_is_quarantined_with_its_reason(settings, store, content, reason):
    _drop(settings, "bad.json", content)
    done = scan_inbox(store, settings)
    assert done.rejected == ["bad.json"] and not done.queued
    rejected = tasks.rejected_dir(settings)
    kept = rejected / "bad.json"
    assert kept.read_bytes() == (content.encode() if isinstance(content, str) else content)  # never lost
    assert reason in (rejected / "bad.json.error").read_text()
    assert store.list_tasks() == []
    _drop(settings, "bad.json", content)  # the same name again: kept beside the first, not over it
    scan_inbox(store, settings)
    assert len(list(rejected.glob("bad*.json"))) == 2


def test_an_inbox_file_seen_again_after_a_crash_is_queued_once(settings, store):
    path = _drop(settings, "job.json", json.dumps({"type": "snapshot"}))
    st = path.stat()
    copy = path.read_bytes()
    assert len(scan_inbox(store, settings).queued) == 1
    # a crash after the commit and before the unlink leaves the very same file behind
    path.write_bytes(copy)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = scan_inbox(store, settings)
    assert not again.queued and len(again.duplicates) == 1 and not path.exists()
    assert len(store.list_tasks()) == 1


def test_an_explicit_key_makes_a_resubmitted_file_run_once(settings, store):
    for _ in range(2):
        _drop(settings, "nightly.json", json.dumps({"type": "snapshot", "key": "nightly-2026-01-01"}))
        scan_inbox(store, settings)
    assert len(store.list_tasks()) == 1


def test_task_list_and_show_print_lines_and_json(home, settings, store):
    from tests.conftest import gremlin

    tasks.submit(store, settings, parse_task({"type": "shell", "cmd": ["echo", "hi"], "priority": 2}))
    lines = gremlin("task", "list", home=home).stdout.splitlines()
    assert lines[0].split("\t")[:4] == ["1", "queued", "shell", "2"] and lines[0].endswith("echo hi")
    shown = json.loads(gremlin("task", "show", "1", "--json", home=home).stdout)
    assert shown["payload"] == {"cmd": ["echo", "hi"]} and shown["state"] == "queued"
    missing = gremlin("task", "show", "7", home=home, check=False)
    assert missing.returncode == 1 and "no task 7" in missing.stderr


def _opened(db: Path):
    from contextlib import closing

    return closing(Store(db))


def test_the_daemon_takes_inbox_files_and_runs_them(tmp_path, watched):
    """A task file dropped into a running daemon's inbox runs once and ends done."""
    from tests.conftest import make_home, start_daemon

    home = make_home(tmp_path, watched)
    write_config(home, watch={"roots": [str(watched)], "own_source": False},
                 tasks={"inbox_poll_s": 0.2}, shell={"allow": ["echo"]})
    settings = load_settings(home)
    proc = start_daemon(home)
    try:
        _drop(settings, "hello.json", json.dumps({"type": "shell", "cmd": ["echo", "hello from the inbox"]}))
        wait_for(lambda: settings.memory.db.exists(), 60)
        with _opened(settings.memory.db) as store:
            wait_for(lambda: (store.list_tasks() or [{}])[0].get("state") == "done", 120, 0.2, "the inbox task")
            row = store.list_tasks()[0]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert row["result"]["stdout"].strip() == "hello from the inbox" and row["exit_code"] == 0
    assert 0 <= row["reward"] <= 1 and row["source"] == "inbox"


def test_a_task_cut_off_by_kill_9_runs_again_after_restart_and_completes_once(tmp_path, watched):
    from tests.conftest import gremlin, make_home, start_daemon

    home = make_home(tmp_path, watched)
    write_config(home, watch={"roots": [str(watched)], "own_source": False},
                 tasks={"inbox_poll_s": 0.2, "lease_s": 5}, shell={"allow": [sys.executable]})
    settings = load_settings(home)
    log = tmp_path / "runs.log"  # outside the roots: the watcher need not see it
    script = (f"import time; open({str(log)!r}, 'a').write('start\\n'); time.sleep(4); "
              f"open({str(log)!r}, 'a').write('end\\n')")
    gremlin("task", "add", "--type", "shell", "--", sys.executable, "-c", script, home=home)
    proc = start_daemon(home)
    try:
        wait_for(lambda: log.exists() and "start" in log.read_text(), 120, 0.1, "the task to start")
        proc.kill()  # SIGKILL mid-task: no cleanup at all
        proc.wait(30)
        time.sleep(4.5)  # long enough for a surviving command to have finished: it must not have
        assert log.read_text() == "start\n"
        with _opened(settings.memory.db) as store:
            assert store.get_task(1)["state"] == "running"  # its runner is gone, its lease runs out
        proc = start_daemon(home)
        with _opened(settings.memory.db) as store:
            wait_for(lambda: store.get_task(1)["state"] == "done", 120, 0.2, "the task to run again")
            row = store.get_task(1)
    finally:
        proc.terminate()
        proc.wait(60)
    assert log.read_text() == "start\nstart\nend\n"
    assert row["attempts"] == 2 and row["exit_code"] == 0
