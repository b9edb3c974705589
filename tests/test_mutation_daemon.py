"""The mutation daemon with a real proposer process: it reads the failure as JSON on stdin,
prints a patch, and the patch runs through the kernel as a mutate task."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent_core import tasks
from agent_core.tasks import TaskRunner, parse_task
from agent_core.tool_executor import ToolExecutor
from config.errors import ConfigError
from config.settings import load_settings
from self_mutation_watcher.mutation_daemon import MutationDaemon
from tests.conftest import write_config
from tools.shell_executor import run_command

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
PROPOSER = '''
import json, sys
request = json.load(sys.stdin)
with open(sys.argv[1], "w") as seen:
    json.dump(request, seen)
if "ZeroDivisionError" in request["failure"]["text"]:
    print("--- a/div.py\\n+++ b/div.py\\n@@ -1,2 +1,2 @@\\n def ratio(a, b):\\n-    return a / b\\n"
          "+    return a / b if b else 0.0\\n")
'''


@pytest.fixture
def mutation_settings(home: Path, watched: Path, tmp_path: Path):
    script = tmp_path / "proposer.py"
    script.write_text(PROPOSER)
    write_config(home, watch={"roots": [str(watched)], "own_source": False},
                 shell={"allow": [sys.executable]},
                 mutation={"enabled": True, "proposer": [sys.executable, str(script), str(tmp_path / "request.json")],
                           "min_interval_s": 600, "neighbours": 2})
    return load_settings(home)


def make_daemon(settings, store, submitted: list):
    def run(argv, data: bytes):
        ran = run_command(argv, settings, input_bytes=data)
        return ran.ok, ran.stdout, ran.stderr

    def submit(raw: dict) -> int:
        submitted.append(raw)
        return tasks.submit(store, settings, parse_task(raw), "mutation").id

    return MutationDaemon(settings, store, lambda q, k: [{"id": 999, "preview": "a neighbour"}], run, submit)


def test_a_failure_becomes_a_proposed_patch_that_the_kernel_keeps(mutation_settings, store, watched, tmp_path):
    (watched / "div.py").write_text("def ratio(a, b):\n    return a / b\n")
    failure = store.add_memory("failure", "ZeroDivisionError: division by zero in ratio()", {"path": "div.py"})
    submitted: list = []
    task_id = make_daemon(mutation_settings, store, submitted).check(NOW)
    request = json.loads((tmp_path / "request.json").read_text())
    assert request["failure"]["id"] == failure and request["neighbours"] == [{"id": 999, "preview": "a neighbour"}]
    assert request["roots"] == [str(watched)]
    assert submitted[0]["type"] == "mutate" and task_id
    TaskRunner(mutation_settings, store, ToolExecutor(mutation_settings, store)).run_one(store.claim_task(1, 60))
    row = store.get_task(task_id)
    assert row["state"] == "done" and row["result"]["kept"]
    assert (watched / "div.py").read_text() == "def ratio(a, b):\n    return a / b if b else 0.0\n"


def test_proposals_are_rate_limited_and_never_for_gremlins_own_failures(mutation_settings, store, watched):
    (watched / "div.py").write_text("def ratio(a, b):\n    return a / b\n")
    daemon = make_daemon(mutation_settings, store, submitted := [])
    store.add_memory("failure", "ZeroDivisionError in ratio", {})
    assert daemon.check(NOW) is not None
    store.add_memory("failure", "ZeroDivisionError again", {})
    assert daemon.check(NOW + timedelta(seconds=60)) is None  # within min_interval_s
    store.add_memory("failure", "ZeroDivisionError from a patch", {"type": "mutate", "by_gremlin": True})
    assert daemon.check(NOW + timedelta(hours=1)) is None  # a failure its own mutation caused
    assert daemon.check(NOW + timedelta(hours=2)) is None  # nothing new since
    assert len(submitted) == 1


def test_a_proposer_that_prints_nothing_submits_nothing(mutation_settings, store):
    store.add_memory("failure", "KeyError: 'user'", {})
    assert make_daemon(mutation_settings, store, submitted := []).check(NOW) is None and not submitted


def test_enabled_without_a_proposer_is_a_config_error(home):
    write_config(home, mutation={"enabled": True})
    with pytest.raises(ConfigError, match=r"\[mutation\] enabled = true needs a proposer"):
        load_settings(home)


@pytest.mark.parametrize("section, values, words", [
    ("planner", {"learning_rate_min": 0.01, "learning_rate_max": 0.001}, "learning_rate_min (0.01) is above"),
    ("planner", {"batch_sizes": [32, 1]}, "[planner] batch_sizes must be a non-empty list of integers from 2"),
    ("planner", {"max_seq_lengths": []}, "non-empty list"),
    ("reward", {"plugin": "not a plugin"}, 'must look like "package.module:function"'),
    ("shell", {"allow": ["pytest", " "]}, "has an empty item"),
    ("tasks", {"lease_s": 1}, "[tasks] lease_s must be a number from 5"),
])
def test_bad_task_settings_are_refused_naming_the_key(home, section, values, words):
    write_config(home, **{section: values})
    with pytest.raises(ConfigError) as caught:
        load_settings(home)
    assert words in str(caught.value)


def test_a_daemon_with_a_bad_reward_plugin_or_verify_command_stops_with_one_line(home, watched):
    from tests.conftest import gremlin

    write_config(home, watch={"roots": [str(watched)], "own_source": False}, reward={"plugin": "nowhere.at_all:score"})
    bad = gremlin("daemon", home=home, check=False, timeout=120)
    assert bad.returncode == 1 and "[reward] plugin" in bad.stderr and "nowhere" in bad.stderr
    write_config(home, watch={"roots": [str(watched)], "own_source": False}, mutation={"verify": ["rm", "-rf", "."]})
    bad = gremlin("daemon", home=home, check=False, timeout=120)
    assert bad.returncode == 1 and "[mutation] verify" in bad.stderr and "[shell] allow" in bad.stderr
