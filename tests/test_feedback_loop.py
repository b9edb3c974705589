"""Retrain trigger rules, the trigger file contract, and the loop over a real store."""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from config.settings import TrainingSettings
from memory.store import FileState, NewEvent, Store, utc_now
from self_training.feedback_loop import (
    FeedbackLoop,
    Signals,
    Trigger,
    TriggerError,
    claim_trigger,
    decide,
    is_logic_event,
    manual_trigger,
    parse_trigger,
    recover_claim,
    requeue_trigger,
    trigger_path,
    write_trigger_atomically,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
CFG = TrainingSettings(min_logic_changes=20, confidence_threshold=0.70, confidence_window=4,
                       reward_threshold=0.5, cooldown_s=3600, min_new_pairs=16)
DRIFT = 0.30
ENOUGH = {"new_pairs": 16}


def _ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).isoformat()


# -- rules -----------------------------------------------------------------------------------


def test_nothing_new_triggers_nothing():
    assert decide(Signals(**ENOUGH), CFG, DRIFT, NOW) is None


def test_mutation_rule_fires_at_the_threshold_and_not_below():
    assert decide(Signals(logic_event_ids=tuple(range(19)), **ENOUGH), CFG, DRIFT, NOW) is None
    trigger = decide(Signals(logic_event_ids=tuple(range(100, 123)), since_event_id=99, **ENOUGH), CFG, DRIFT, NOW)
    assert trigger.trigger == "mutation_watcher" and not trigger.force
    assert "23 logic-file changes since event 99 (threshold 20)" in trigger.note
    assert trigger.event_ids == tuple(range(100, 123))
    assert trigger.time == "2024-05-01T12:00:00.000+00:00"


def test_drift_rule_low_confidence_needs_a_full_window():
    low = (0.4, 0.4, 0.4, 0.4)  # mean top-1 similarity 0.6 < 0.7
    assert decide(Signals(shifts=low[:3], **ENOUGH), CFG, DRIFT, NOW) is None
    trigger = decide(Signals(shifts=(0.0, 0.0, *low), **ENOUGH), CFG, DRIFT, NOW)
    assert trigger.trigger == "semantic_drift"
    assert "mean top-1 similarity 0.600 over the last 4 new memories (threshold 0.7)" in trigger.note
    # Familiar memories: confidence 0.9, shift 0.1.
    assert decide(Signals(shifts=(0.1,) * 4, **ENOUGH), CFG, DRIFT, NOW) is None


def test_drift_rule_vector_shift_over_threshold_and_detector_flag():
    cfg = TrainingSettings(confidence_threshold=0.5, confidence_window=4, min_new_pairs=0)
    trigger = decide(Signals(shifts=(0.35,) * 4), cfg, DRIFT, NOW)  # confidence 0.65 passes 0.5
    assert trigger.trigger == "semantic_drift" and "mean vector shift 0.350" in trigger.note
    trigger = decide(Signals(drifting=True), cfg, DRIFT, NOW)
    assert trigger.trigger == "semantic_drift" and "drift detector" in trigger.note


@pytest.mark.parametrize("field, words", [
    ("failed_task_ids", "1 failed task(s) (7)"),
    ("nonzero_shell_ids", "1 shell command(s) exited non-zero (7)"),
    ("low_reward_ids", "1 reward(s) below 0.5 (7)"),
])
def test_feedback_rule_fires_on_any_bad_result(field, words):
    trigger = decide(Signals(**{field: (7,)}, **ENOUGH), CFG, DRIFT, NOW)
    assert trigger.trigger == "feedback" and words in trigger.note


def test_cooldown_blocks_rules():
    busy = Signals(logic_event_ids=tuple(range(30)), **ENOUGH, last_trigger_time=_ago(3599))
    assert decide(busy, CFG, DRIFT, NOW) is None
    assert decide(dataclasses.replace(busy, last_trigger_time=_ago(3600)), CFG, DRIFT, NOW)


def test_too_few_new_pairs_blocks_rules():
    storm = Signals(logic_event_ids=tuple(range(30)), new_pairs=15)
    assert decide(storm, CFG, DRIFT, NOW) is None
    assert "16 new training pairs (minimum 16)" in decide(Signals(logic_event_ids=tuple(range(30)), new_pairs=16),
                                                          CFG, DRIFT, NOW).note


def test_logic_files_match_by_name_or_full_path_and_skip_gremlins_own_writes():
    assert is_logic_event("/p/src/a.py", "modified", {}, ("*.py",))
    assert is_logic_event("/p/src/rules.yaml", "modified", {}, ("*/src/*.yaml",))
    assert not is_logic_event("/p/README.md", "modified", {}, ("*.py",))
    assert not is_logic_event("/p/a.py", "modified", {"by_gremlin": True}, ("*.py",))
    assert not is_logic_event("/p/app.py", "log", {}, ("*.py",))


# -- the trigger file ------------------------------------------------------------------------


def test_trigger_round_trips_through_the_contract(tmp_path: Path):
    path = tmp_path / "retrain_trigger.json"
    written = write_trigger_atomically(path, Trigger("manual", "2024-05-01T14:00:00+02:00", "hi", (3, 1)))
    raw = json.loads(path.read_text())
    assert raw == {"trigger": "manual", "time": "2024-05-01T12:00:00.000+00:00", "note": "hi", "event_ids": [1, 3]}
    assert parse_trigger(path.read_text(), path) == written
    with pytest.raises(TriggerError, match="key 'trigger'"):
        write_trigger_atomically(path, Trigger("whim", NOW.isoformat()))
    assert Trigger("task", NOW.isoformat(), force=True).to_dict()["force"] is True
    assert not list(tmp_path.glob("*.tmp"))


def test_two_writes_coalesce(tmp_path: Path):
    path = tmp_path / "retrain_trigger.json"
    write_trigger_atomically(path, Trigger("mutation_watcher", _ago(60), "storm", (5, 6)))
    written = write_trigger_atomically(path, Trigger("task", _ago(0), "asked", (6, 9), force=True))
    assert written == Trigger("mutation_watcher", "2024-05-01T11:59:00.000+00:00", "storm; asked", (5, 6, 9), True)
    assert parse_trigger(path.read_text(), path) == written


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"trigger": "whim"}', "key 'trigger' must be one of mutation_watcher"),
    ('{"trigger": "manual", "time": "yesterday"}', "key 'time' must be an ISO-8601"),
    ('{"trigger": "manual", "event_ids": [1, "2"]}', "key 'event_ids' must be a list of integer"),
    ('{"trigger": "manual", "event_ids": [true]}', "key 'event_ids'"),
    ('{"trigger": "manual", "force": "yes"}', "key 'force' must be true or false"),
])
def test_parse_errors_name_the_file_and_the_key(tmp_path: Path, text: str, words: str):
    path = tmp_path / "retrain_trigger.json"
    with pytest.raises(TriggerError, match="retrain_trigger.json") as info:
        parse_trigger(text, path)
    assert words in str(info.value)


def test_a_missing_time_means_now(tmp_path: Path):
    assert parse_trigger('{"trigger": "manual"}', tmp_path / "t.json", now=NOW).time == "2024-05-01T12:00:00.000+00:00"


def test_a_trigger_is_claimed_exactly_once(tmp_path: Path):
    path, claim = tmp_path / "retrain_trigger.json", tmp_path / "claimed.json"
    trigger = write_trigger_atomically(path, manual_trigger("go", now=NOW))
    assert claim_trigger(path, claim) == trigger
    assert claim_trigger(path, tmp_path / "other.json") is None  # a second claimer gets nothing
    assert not path.exists()


def test_a_claim_may_go_into_a_folder_not_made_yet(tmp_path: Path):
    path, claim = tmp_path / "retrain_trigger.json", tmp_path / "claimed" / "run-1.json"
    assert claim_trigger(path, claim) is None  # nothing pending
    trigger = write_trigger_atomically(path, manual_trigger("go", now=NOW))
    assert claim_trigger(path, claim) == trigger and claim.exists()


def test_concurrent_claimers_get_one_trigger_between_them(tmp_path: Path):
    path = tmp_path / "retrain_trigger.json"
    write_trigger_atomically(path, manual_trigger("go", now=NOW))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: claim_trigger(path, tmp_path / f"claim{i}.json"), range(8)))
    assert sum(g is not None for g in got) == 1


def test_nothing_more_is_claimed_while_a_run_holds_its_claim(tmp_path: Path):
    path, claim = tmp_path / "retrain_trigger.json", tmp_path / "claimed.json"
    first = write_trigger_atomically(path, manual_trigger("first", now=NOW))
    assert claim_trigger(path, claim) == first
    second = write_trigger_atomically(path, manual_trigger("second", now=NOW))
    assert claim_trigger(path, claim) is None  # the run is in progress: the new one waits
    assert parse_trigger(claim.read_text(), claim) == first  # and the claim is not overwritten
    claim.unlink()  # the run finished
    assert claim_trigger(path, claim) == second


def test_a_malformed_trigger_is_moved_aside_logged_and_the_next_one_works(tmp_path: Path, caplog):
    path, claim = tmp_path / "retrain_trigger.json", tmp_path / "claimed.json"
    path.write_text('{"trigger": "whim"}')
    with caplog.at_level(logging.ERROR, logger="self_training.feedback_loop"):
        assert claim_trigger(path, claim) is None
    rejected = list((tmp_path / "rejected").glob("retrain_trigger.*.json"))
    assert len(rejected) == 1 and rejected[0].read_text() == '{"trigger": "whim"}'
    record = caplog.records[-1]
    assert record.levelno == logging.ERROR and "key 'trigger'" in record.error and str(rejected[0]) in record.message
    assert not claim.exists()
    trigger = write_trigger_atomically(path, manual_trigger(now=NOW))
    assert claim_trigger(path, claim) == trigger


def test_a_malformed_pending_file_is_replaced_by_the_next_write(tmp_path: Path, caplog):
    path = tmp_path / "retrain_trigger.json"
    path.write_bytes(b"\xff\xfe garbage")
    with caplog.at_level(logging.ERROR, logger="self_training.feedback_loop"):
        written = write_trigger_atomically(path, manual_trigger("fresh", now=NOW))
    assert written.note == "fresh" and parse_trigger(path.read_text(), path) == written
    assert len(list((tmp_path / "rejected").iterdir())) == 1
    assert "UTF-8" in caplog.records[-1].error


def test_requeue_puts_a_claimed_trigger_back_first(tmp_path: Path):
    path, claim = tmp_path / "retrain_trigger.json", tmp_path / "claimed.json"
    first = write_trigger_atomically(path, Trigger("mutation_watcher", _ago(100), "old", (1,)))
    claimed = claim_trigger(path, claim)
    write_trigger_atomically(path, Trigger("feedback", _ago(10), "new", (2,)))
    back = requeue_trigger(path, claimed)
    assert (back.trigger, back.time, back.note, back.event_ids) == ("mutation_watcher", first.time, "old; new", (1, 2))


def test_a_claim_left_by_a_crash_is_recovered(tmp_path: Path):
    path, claim = tmp_path / "retrain_trigger.json", tmp_path / "claimed.json"
    assert recover_claim(path, claim) is None  # nothing to recover
    write_trigger_atomically(path, Trigger("manual", _ago(100), "crashed run", (1,)))
    claim_trigger(path, claim)  # ... and the trainer died before finishing
    write_trigger_atomically(path, Trigger("feedback", _ago(10), "later", (2,)))
    assert recover_claim(path, claim).note == "crashed run; later"
    assert not claim.exists()
    again = claim_trigger(path, claim)
    assert (again.trigger, again.note, again.event_ids) == ("manual", "crashed run; later", (1, 2))


# -- the loop over a real store --------------------------------------------------------------


def _edit(i: int, name: str = "logic.py", **meta) -> NewEvent:
    path = f"/p/{name}"
    return NewEvent(kind="modified", path=path, root="/p", time=utc_now(NOW),
                    state=FileState(path, "/p", f"s{i}", 1, i), diff=f"+x = {i}", meta=meta)


@pytest.fixture
def loop_settings(settings):
    training = dataclasses.replace(settings.training, min_logic_changes=20, cooldown_s=3600, min_new_pairs=5)
    return dataclasses.replace(settings, training=training)


def test_an_edit_storm_writes_one_trigger_and_the_cooldown_holds(loop_settings, store: Store):
    asked = []
    loop = FeedbackLoop(loop_settings, store, lambda after: asked.append(after) or 50)
    store.record_events([_edit(i) for i in range(100)] + [_edit(i, "notes.md") for i in range(5)]
                        + [_edit(i, "gen.py", by_gremlin=True) for i in range(5)])
    trigger = loop.check(NOW)
    assert trigger.trigger == "mutation_watcher" and len(trigger.event_ids) == 100
    assert "100 logic-file changes since event 0" in trigger.note and asked == [0]
    path = trigger_path(loop_settings)
    assert parse_trigger(path.read_text(), path) == trigger

    store.record_events([_edit(i) for i in range(100, 130)])  # the storm goes on
    assert loop.check(NOW + timedelta(minutes=30)) is None  # cooldown: no second trigger
    assert parse_trigger(path.read_text(), path) == trigger  # the file is unchanged
    later = loop.check(NOW + timedelta(hours=1, seconds=1))  # the same 30 edits, counted once
    assert later.event_ids == tuple(range(111, 141)) and "since event 110" in later.note
    assert asked == [0, 110]
    assert loop.check(NOW + timedelta(hours=3)) is None  # nothing new since


def test_task_results_feed_the_rules(loop_settings, store: Store):
    loop = FeedbackLoop(loop_settings, store, lambda after: 50)
    store.insert_task("shell", {"cmd": ["pytest"]}, state="done", result={"exit_code": 0, "reward": 0.9})
    assert loop.check(NOW) is None
    bad = store.insert_task("shell", {"cmd": ["pytest"]}, state="done", result={"exit_code": 1})
    trigger = loop.check(NOW)
    assert trigger.trigger == "feedback" and f"exited non-zero ({bad})" in trigger.note
    store.insert_task("shell", state="failed", error="boom")
    assert loop.check(NOW + timedelta(minutes=1)) is None  # cooldown; the failure stays pending ...
    assert "1 failed task(s)" in loop.check(NOW + timedelta(hours=2)).note  # ... and fires after it


def test_a_queued_self_train_task_is_left_to_the_task_runner(loop_settings, store: Store):
    # the runner writes its forced trigger when it runs it: a task cancelled before then trains nothing
    loop = FeedbackLoop(loop_settings, store, lambda after: 0)
    store.insert_task("self_train")
    assert loop.check(NOW) is None
    assert not trigger_path(loop_settings).exists()


def test_task_ids_survive_parsing_and_coalescing(tmp_path):
    path = tmp_path / "retrain_trigger.json"
    write_trigger_atomically(path, Trigger("task", "2024-01-01T00:00:00.000+00:00", "a", (), True, (7,)))
    merged = write_trigger_atomically(path, Trigger("manual", "2024-01-02T00:00:00.000+00:00", "b", (), False, (9,)))
    assert merged.task_ids == (7, 9) and merged.force
    assert parse_trigger(path.read_text(), path).task_ids == (7, 9)
    with pytest.raises(TriggerError, match="'task_ids' must be a list of integer task ids"):
        parse_trigger('{"trigger": "task", "task_ids": ["7"]}', path)


def test_low_similarity_of_new_memories_triggers_drift(loop_settings, store: Store):
    settings = dataclasses.replace(loop_settings, training=dataclasses.replace(
        loop_settings.training, confidence_window=3, min_new_pairs=0))
    loop = FeedbackLoop(settings, store, lambda after: 0)
    ids = [store.add_memory("log", f"m{i}") for i in range(3)]
    store.add_vectors("m", ids, np.zeros((3, 2)), shifts=[0.5, 0.5, 0.5])
    assert loop.check(NOW).trigger == "semantic_drift"
    assert loop.check(NOW + timedelta(hours=2)) is None  # those memories were spent on that trigger


def test_disabled_training_does_nothing(loop_settings, store: Store):
    off = dataclasses.replace(loop_settings, training=dataclasses.replace(loop_settings.training, enabled=False))
    store.insert_task("self_train")
    assert FeedbackLoop(off, store, lambda after: 0).check(NOW) is None
    assert not trigger_path(off).exists()


def test_unreadable_markers_start_afresh_without_a_crash(loop_settings, store: Store, caplog):
    store.set_markers({"feedback.state": "[1, 2]", "feedback.last_event_id": "7"})
    assert store.get_marker("feedback.last_event_id") == "7"
    with caplog.at_level(logging.ERROR, logger="self_training.feedback_loop"):
        assert FeedbackLoop(loop_settings, store, lambda after: 0).check(NOW) is None
    assert "starting afresh" in caplog.text
    assert store.get_marker("feedback.last_event_id") == "0"
