"""Each task type through the real executor and runner: real processes, real files, real
snapshots, a real trainer run; every outcome is stored, scored and becomes a memory."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from agent_core import tasks
from agent_core.tasks import TaskRunner, parse_task
from agent_core.tool_executor import ToolExecutor
from config.settings import load_settings
from memory.store import Store
from self_training.feedback_loop import trigger_path
from self_training.trainer import Trainer
from tests.conftest import write_config


@pytest.fixture
def task_settings(home: Path, watched: Path):
    write_config(home, watch={"roots": [str(watched)], "own_source": False},
                 shell={"allow": ["echo", "false", "sleep", sys.executable], "timeout_s": 20},
                 tasks={"max_attempts": 1})
    return load_settings(home)


def run_task(settings, store: Store, raw: dict, executor: ToolExecutor | None = None) -> dict:
    """Submit, claim and run one task to its end; the stored row."""
    task_id = tasks.submit(store, settings, parse_task(raw)).id
    TaskRunner(settings, store, executor or ToolExecutor(settings, store)).run_one(store.claim_task(1, 60))
    return store.get_task(task_id)


def memory_of(store: Store, task_id: int) -> dict:
    found = [m for m in store.get_memories(list(store.memory_ids())).values() if m["meta"].get("task_id") == task_id]
    assert len(found) == 1, found
    return found[0]


def test_a_shell_task_is_stored_scored_and_remembered(task_settings, store):
    row = run_task(task_settings, store, {"type": "shell", "cmd": ["echo", "all good"]})
    assert row["state"] == "done" and row["exit_code"] == 0 and row["result"]["stdout"] == "all good\n"
    assert row["reward"] >= task_settings.training.reward_threshold
    memory = memory_of(store, row["id"])
    assert memory["kind"] == "task" and "all good" in memory["text"] and memory["meta"]["reward"] == row["reward"]


def test_a_failing_shell_task_is_a_failure_memory_and_feedback(task_settings, store):
    row = run_task(task_settings, store, {"type": "shell", "cmd": ["false"]})
    assert row["state"] == "failed" and row["exit_code"] == 1 and "exited with code 1" in row["error"]
    assert row["reward"] < task_settings.training.reward_threshold
    assert memory_of(store, row["id"])["kind"] == "failure"
    from self_training.feedback_loop import classify_task

    assert set(classify_task(store.tasks_finished_after("", 0)[0], 0.5)) == {"failed", "nonzero_shell", "low_reward"}


def test_pytest_counts_feed_the_reward(task_settings, store, watched):
    (watched / "test_mix.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert False\n")
    row = run_task(task_settings, store, {"type": "shell", "cmd": [sys.executable, "-m", "pytest", "-q", "-p",
                                                                   "no:cacheprovider", str(watched)]})
    assert row["result"]["tests"]["passed"] == 1 and row["result"]["tests"]["failed"] == 1
    assert row["reward"] < 0.5


def test_secrets_a_command_prints_are_not_stored(task_settings, store):
    secret = "AKIA" + "ABCDEFGHIJKLMNOP"
    row = run_task(task_settings, store, {"type": "shell", "cmd": ["echo", f"key={secret}"]})
    # the task itself is kept as given (a retry must run it); what it printed and its memory are not
    assert secret not in json.dumps(row["result"]) and "[REDACTED" in row["result"]["stdout"]
    assert secret not in memory_of(store, row["id"])["text"]


def test_a_shell_task_outside_the_roots_fails_with_the_reason(task_settings, store, tmp_path):
    row = run_task(task_settings, store, {"type": "shell", "cmd": ["echo", "x"], "cwd": str(tmp_path)})
    assert row["state"] == "failed" and row["attempts"] == 1 and "watched roots" in row["error"]


def test_cancelling_a_running_shell_task_kills_its_command(task_settings, store):
    task_id = tasks.submit(store, task_settings, parse_task({"type": "shell", "cmd": ["sleep", "30"]})).id
    runner = TaskRunner(task_settings, store, ToolExecutor(task_settings, store))
    worker = threading.Thread(target=runner.run_one, args=(store.claim_task(1, 60),))
    worker.start()
    tasks.cancel(store, task_id)
    worker.join(15)
    assert not worker.is_alive()
    row = store.get_task(task_id)
    assert row["state"] == "cancelled" and row["result"]["cancelled"] and row["result"]["seconds"] < 10


def test_snapshot_and_files_rollback_tasks(task_settings, store, watched):
    (watched / "app.py").write_text("version = 1\n")
    snap = run_task(task_settings, store, {"type": "snapshot", "message": "before"})
    assert snap["state"] == "done" and snap["result"]["files"] == 1
    (watched / "app.py").write_text("version = 2\n")
    back = run_task(task_settings, store, {"type": "rollback", "target": "files", "snapshot": snap["result"]["id"]})
    assert back["state"] == "done" and (watched / "app.py").read_text() == "version = 1\n"
    assert memory_of(store, back["id"])["meta"]["by_gremlin"]
    bad = run_task(task_settings, store, {"type": "rollback", "target": "files", "snapshot": "ffff0000"})
    assert bad["state"] == "failed" and bad["error"]


def test_a_mutate_task_goes_through_the_kernel(task_settings, store, watched):
    (watched / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    patch = ("--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n"
             "+    return a + b\n")
    row = run_task(task_settings, store, {"type": "mutate", "patch": patch})
    assert row["state"] == "done" and row["result"]["kept"]
    assert (watched / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    memory = memory_of(store, row["id"])
    assert memory["meta"]["by_gremlin"] and "return a + b" in memory["text"]
    escape = run_task(task_settings, store, {"type": "mutate", "patch": patch.replace("calc.py", "../calc.py")})
    assert escape["state"] == "failed" and (watched / "calc.py").read_text().endswith("a + b\n")


def test_a_self_train_task_with_wait_ends_with_the_runs_outcome(task_settings, store):
    trainer = Trainer(task_settings, store)
    executor = ToolExecutor(task_settings, store, wake_trainer=lambda: threading.Thread(target=trainer.poll).start())
    row = run_task(task_settings, store, {"type": "self_train", "wait": True, "note": "from a test"}, executor)
    # an empty home has no history: the run is rejected for it, and the task carries that outcome
    assert row["state"] == "done" and row["result"]["outcome"] == "rejected"
    assert "not enough history" in row["result"]["reason"]
    run = store.get_run(row["result"]["run_id"])
    assert run["trigger"]["task_ids"] == [row["id"]] and run["trigger"]["force"]
    assert not trigger_path(task_settings).exists()


def test_a_self_train_task_without_wait_only_writes_the_trigger(task_settings, store):
    row = run_task(task_settings, store, {"type": "self_train"})
    written = json.loads(trigger_path(task_settings).read_text())
    assert row["state"] == "done" and written["task_ids"] == [row["id"]] and written["trigger"] == "task"
