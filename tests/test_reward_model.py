"""The reward model: pytest summaries (from a real pytest), built-in scores, plugins."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from config.settings import load_settings
from tests.conftest import write_config
from tools.reward_model import (
    Outcome,
    RewardModel,
    RewardPluginError,
    builtin_reward,
    load_plugin,
    parse_pytest_summary,
    speed_signal,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


# -- pytest summaries -----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("=== 3 failed, 10 passed, 1 skipped, 2 errors in 1.2s ===",
     {"passed": 10, "failed": 3, "skipped": 1, "errors": 2}),
    ("=================== 5 passed in 0.10s ===================", {"passed": 5, "failed": 0, "errors": 0}),
    ("5 passed in 0.1s", {"passed": 5}),
    ("no tests ran in 0.01s", {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}),
    ("===== 1 error in 0.12 seconds =====", {"errors": 1, "passed": 0}),
    ("1 passed, 2 warnings, 1 deselected in 65.43s (0:01:05)", {"passed": 1, "warnings": 2, "deselected": 1}),
    ("\x1b[32m======= \x1b[32m\x1b[1m2 passed\x1b[0m, \x1b[33m1 xfailed\x1b[0m\x1b[32m in 0.03s\x1b[0m =======",
     {"passed": 2, "xfailed": 1}),
])
def test_summary_line_variants(text, expected):
    counts = parse_pytest_summary(f"collected 9 items\n\ntests/test_x.py ..F\n{text}\n")
    assert counts is not None and {k: counts[k] for k in expected} == expected


@pytest.mark.parametrize("text", ["", "all tests passed", "3 passed the review in time", "build ok in 2s"])
def test_text_without_a_summary(text):
    assert parse_pytest_summary(text) is None


def test_last_summary_wins():
    assert parse_pytest_summary("1 failed in 0.1s\nretrying\n2 passed in 0.1s\n")["passed"] == 2


TINY_SUITE = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_one(): assert True
def test_two(): assert 1 + 1 == 2
def test_three(): assert 1 == 2
@pytest.mark.skip(reason="not today")
def test_four(): pass
def test_five(broken): pass
"""


@pytest.mark.parametrize("flags", [["-q"], ["-rA", "--color=yes"]])
def test_summary_of_a_real_pytest_run(tmp_path, flags):
    (tmp_path / "test_tiny.py").write_text(TINY_SUITE)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *flags, "test_tiny.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout
    counts = parse_pytest_summary(proc.stdout)
    assert counts == {"passed": 2, "failed": 1, "skipped": 1, "errors": 1}


def test_summary_of_a_real_run_with_no_tests(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5
    assert parse_pytest_summary(proc.stdout) == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


# -- the built-in model ---------------------------------------------------------------------

def score(outcome: Outcome, typical: float | None = 10.0) -> float:
    return builtin_reward(outcome, typical, 3.0)[0]


def test_pass_beats_slow_pass_beats_failure():
    fast = score(Outcome("shell", "done", 0, 5.0, "12 passed in 5.0s"))
    slow = score(Outcome("shell", "done", 0, 25.0, "12 passed in 25.0s"))
    failed = score(Outcome("shell", "failed", 1, 5.0, "1 failed, 11 passed in 5.0s"))
    assert 1.0 == fast > slow > 0.5 > failed >= 0.0


@pytest.mark.parametrize("outcome", [
    Outcome("shell", "failed", 1, 0.01, "12 passed in 0.01s", confidence=1.0),
    Outcome("shell", "failed", None, 0.01, confidence=1.0),
    Outcome("shell", "done", 2, 0.01, "12 passed in 0.01s", confidence=1.0),
    Outcome("self_train", "failed", None, 10_000.0),
])
def test_a_failure_scores_below_threshold_whatever_else(outcome):
    assert score(outcome) < 0.5


@pytest.mark.parametrize("outcome", [
    Outcome("shell", "done", 0, 10_000.0, confidence=0.0),
    Outcome("shell", "done", 0, 10_000.0, "1 passed in 9999s", confidence=0.0),
    Outcome("reindex", "done", None, 1.0),
])
def test_a_clean_pass_scores_above_threshold_whatever_else(outcome):
    assert score(outcome) > 0.5


def test_cancel_alone_is_neutral_and_other_signals_tip_it():
    assert score(Outcome("shell", "cancelled", None, 1.0)) == 0.5
    assert score(Outcome("shell", "cancelled", None, 1.0, "3 failed in 1s")) < 0.5
    assert score(Outcome("shell", "cancelled", None, 1.0, confidence=1.0)) > 0.5


def test_components_say_what_was_used():
    value, parts = builtin_reward(Outcome("shell", "done", 0, 20.0, "3 failed, 7 passed in 2s", 0.8), 10.0, 3.0)
    assert parts["status"] == 1.0 and parts["tests"] == pytest.approx(0.7)
    assert parts["speed"] == pytest.approx(0.5) and parts["confidence"] == 0.8
    assert parts["pytest"]["failed"] == 3 and parts["typical_seconds"] == 10.0
    assert value == pytest.approx((4 + 0.7 + 0.5 + 0.8) / 7)
    _, no_history = builtin_reward(Outcome("shell", "done", 0, 20.0), None, 3.0)
    assert "speed" not in no_history and "tests" not in no_history


def test_speed_falls_linearly():
    assert speed_signal(5, 10, 3) == 1.0 and speed_signal(10, 10, 3) == 1.0
    assert speed_signal(20, 10, 3) == pytest.approx(0.5) and speed_signal(30, 10, 3) == 0.0
    assert speed_signal(11, 10, 1) == 0.0


def test_out_of_range_confidence_is_clamped():
    value, parts = builtin_reward(Outcome("gate", "done", None, 1.0, confidence=7.0), None, 3.0)
    assert parts["confidence"] == 1.0 and 0.0 <= value <= 1.0
    _, nan = builtin_reward(Outcome("gate", "done", None, 1.0, confidence=math.nan), None, 3.0)
    assert "confidence" not in nan


def test_unknown_state_is_refused():
    with pytest.raises(ValueError, match="done, failed, cancelled"):
        Outcome("shell", "finished")


# -- scoring with history from the real store -----------------------------------------------

def finished_task(store, task_type: str, seconds: float, state: str = "done") -> None:
    """A task claimed at T0 and finished `seconds` later, as the queue records it."""
    task_id, _ = store.submit_task(task_type, {}, now=T0)
    task = store.claim_task(worker=1, lease_s=3600, now=T0)
    assert task["id"] == task_id
    store.finish_task(task_id, task["attempts"], state, {"exit_code": 0}, now=T0 + timedelta(seconds=seconds))


def test_typical_duration_comes_from_done_tasks_of_the_type(settings, store):
    model = RewardModel(settings)
    outcome = Outcome("shell", "done", 0, 40.0)
    assert "speed" not in model.score(outcome, store)[1]  # no history yet
    for seconds in (10, 20, 30):
        finished_task(store, "shell", seconds)
    finished_task(store, "shell", 1000, state="failed")  # failures do not set the pace
    finished_task(store, "reindex", 1)
    value, parts = model.score(outcome, store)
    assert parts["typical_seconds"] == pytest.approx(20.0, abs=0.01)
    assert parts["speed"] == pytest.approx(0.5, abs=0.01) and value == pytest.approx(4.5 / 5, abs=0.01)


# -- plugins --------------------------------------------------------------------------------

@pytest.fixture
def plugin(tmp_path: Path, monkeypatch, request):
    """Write a plugin module from source; returns its name (importable, forgotten afterwards)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(source)
        request.addfinalizer(lambda: sys.modules.pop(name, None))
        return name
    return write


def plugin_settings(home: Path, watched: Path, spec: str):
    write_config(home, watch={"roots": [str(watched)], "own_source": False}, reward={"plugin": spec})
    return load_settings(home)


def test_plugin_replaces_the_score_and_sees_the_outcome(plugin, home, watched, store):
    name = plugin("gremlin_reward_ok", "SEEN = []\n"
                                       "def score(outcome):\n"
                                       "    SEEN.append(outcome)\n"
                                       "    return 0.25 if outcome['state'] == 'done' else 0.75\n")
    model = RewardModel(plugin_settings(home, watched, f"{name}:score"))
    value, parts = model.score(Outcome("shell", "done", 0, 3.0, "2 passed in 1s"), store)
    assert value == 0.25 and parts["model"] == f"plugin:{name}:score" and parts["builtin_score"] == 1.0
    seen = sys.modules[name].SEEN[0]
    assert seen["task_type"] == "shell" and seen["output"] == "2 passed in 1s" and seen["typical_seconds"] is None


@pytest.mark.parametrize("body, problem", [
    ("def score(outcome):\n    return 'high'\n", "'high'"),
    ("def score(outcome):\n    return float('nan')\n", "nan"),
    ("def score(outcome):\n    return 1.5\n", "1.5"),
    ("def score(outcome):\n    return None\n", "None"),
    ("def score(outcome):\n    return True\n", "True"),
    ("def score(outcome):\n    raise KeyError('reward')\n", "KeyError"),
])
def test_plugin_garbage_falls_back_to_the_builtin_score(plugin, home, watched, store, caplog, body, problem):
    name = plugin(f"gremlin_reward_bad_{abs(hash(body))}", body)
    model = RewardModel(plugin_settings(home, watched, f"{name}:score"))
    outcome = Outcome("shell", "failed", 1, 3.0, "1 failed in 1s")
    with caplog.at_level(logging.WARNING, logger="tools.reward_model"):
        value, parts = model.score(outcome, store)
    assert (value, parts["model"]) == (builtin_reward(outcome, None, 3.0)[0], "builtin")
    assert problem in parts["plugin_error"]
    assert any(r.message == "reward plugin failed; using the built-in score" for r in caplog.records)


@pytest.mark.parametrize("spec, message", [
    ("gremlin_no_such_module_xyz:score", "cannot import module 'gremlin_no_such_module_xyz'"),
    ("os:no_such_function", "has no attribute 'no_such_function'"),
    ("os:sep", "not a function"),
    ("not a spec", "must look like"),
    ("", "must look like"),
])
def test_bad_plugin_spec_is_a_clear_error(spec, message):
    with pytest.raises(RewardPluginError, match=r"\[reward\] plugin") as info:
        load_plugin(spec)
    assert message in str(info.value)


def test_plugin_that_fails_to_import_is_reported(plugin):
    name = plugin("gremlin_reward_broken", "raise RuntimeError('half installed')\n")
    with pytest.raises(RewardPluginError, match="RuntimeError: half installed"):
        load_plugin(f"{name}:score")


def test_bad_plugin_fails_at_start_naming_the_config_file(home, watched):
    settings = plugin_settings(home, watched, "gremlin_no_such_module_xyz:score")
    with pytest.raises(RewardPluginError) as info:
        RewardModel(settings)
    assert str(settings.config_file) in str(info.value) and "[reward] plugin" in str(info.value)
