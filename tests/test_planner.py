"""The planner on a real home: TPE proposals inside the bounds, adoption only on a gated
improvement, noisy runs skipped, the experiments log, corrupted state, task priorities."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from agents.planner_agent import ADOPTED, Planner, reward_priority, spec_params
from config.settings import PlannerSettings, load_settings
from memory.store import Store, utc_now
from self_training.finetune import TrainingSpec

from tests.conftest import write_config

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
BEFORE = {"mrr@10": 0.52, "recall@1": 0.41, "recall@10": 0.83}


@pytest.fixture
def planner_settings(home):
    """A home whose [training] spec lies partly outside the [planner] bounds."""
    write_config(home, watch={"roots": [], "own_source": False},
                 training={"epochs": 9, "learning_rate": 1e-3, "batch_size": 30, "max_seq_length": 256,
                           "mini_batch_size": 8},
                 planner={"max_epochs": 3, "max_training_minutes": 20.0, "min_heldout": 20,
                          "learning_rate_min": 1e-5, "learning_rate_max": 3e-4, "batch_sizes": [16, 32, 64],
                          "max_seq_lengths": [128, 256]})
    return load_settings(home)


@pytest.fixture
def planner(planner_settings, store):
    return Planner(planner_settings, store)


def finish_run(store: Store, run_id: str, state: str, gain: float | None = None, heldout: int = 40,
               accepted: bool | None = None, minute: int = 0, spec: dict | None = None) -> dict:
    """A finished run row as the trainer leaves it; `gain` None: rejected before training."""
    now = T0 + timedelta(minutes=minute)
    store.create_run(run_id, {"trigger": "manual", "time": utc_now(now), "note": "test", "event_ids": [],
                              "force": False}, spec or TrainingSpec().to_dict(), now=now)
    metrics = {"promote": True, "dataset": {"train": heldout * 4, "heldout": heldout, "sha256": "ab" * 32,
                                            "counts": {"commit": heldout * 5}}}
    reason = "not enough history: 3 training and 1 held-out pairs (need 16 and 8)"
    if gain is not None:
        accepted = state in ("accepted", "promoted") if accepted is None else accepted
        after = {k: round(v + gain, 4) for k, v in BEFORE.items()}
        reason = f"MRR@10 {BEFORE['mrr@10']:.4f} → {after['mrr@10']:.4f} (gain {gain:+.4f} ≥ 0.01)"
        metrics.update(before=BEFORE, after=after, decision={"accepted": accepted, "gain": gain, "reason": reason})
    store.update_run(run_id, state=state, metrics=metrics, reason=reason, finished=utc_now(now + timedelta(seconds=30)),
                     model_id=f"m-{run_id}" if gain is not None else None, now=now)
    return store.get_run(run_id)


def assert_in_bounds(spec: TrainingSpec, bounds: PlannerSettings) -> None:
    assert isinstance(spec.epochs, int) and 1 <= spec.epochs <= bounds.max_epochs
    assert bounds.learning_rate_min <= spec.learning_rate <= bounds.learning_rate_max
    assert spec.batch_size in bounds.batch_sizes and spec.max_seq_length in bounds.max_seq_lengths
    assert spec.mini_batch_size == 0 or spec.mini_batch_size < spec.batch_size
    assert 0 < spec.max_seconds <= bounds.max_training_minutes * 60


def experiments(settings) -> list[dict]:
    return [json.loads(line) for line in (settings.data_dir / "experiments.jsonl").read_text().splitlines()]


def test_the_first_proposal_is_the_configured_spec_inside_the_bounds(planner, planner_settings, store):
    finish_run(store, "r0", "promoted", 0.04)                     # enough held-out pairs to explore
    spec = planner.next_spec("r1")
    assert spec_params(spec) == {"epochs": 3, "learning_rate": 3e-4, "batch_size": 32, "max_seq_length": 256,
                                 "mini_batch_size": 16}
    assert spec.max_seconds == 20 * 60 and spec.warmup_ratio == planner_settings.training.warmup_ratio
    [trial] = store.trials()
    assert trial["run_id"] == "r1" and trial["state"] == "proposed" and trial["params"] == spec_params(spec)
    finish_run(store, "r1", "promoted", 0.05, minute=1, spec=spec.to_dict())
    assert planner.observe(store.get_run("r1"))["adopted"]
    second = planner.next_spec("r2")                              # now TPE explores
    assert_in_bounds(second, planner_settings.planner)
    assert experiments(planner_settings)[-1]["decision"] == "proposed by TPE"


def test_a_spec_is_adopted_only_when_the_gate_accepts_and_it_beats_the_adopted_one(planner, store):
    finish_run(store, "r0", "accepted", 0.02)
    runs = [("r1", "accepted", 0.05, None), ("r2", "rejected", 0.08, False),   # better, but the gate said no
            ("r3", "accepted", 0.03, None), ("r4", "promoted", 0.09, None)]    # accepted but worse; then better
    decisions, specs = [], {}
    for minute, (run_id, state, gain, accepted) in enumerate(runs, start=1):
        specs[run_id] = planner.next_spec(run_id)
        finish_run(store, run_id, state, gain, accepted=accepted, minute=minute, spec=specs[run_id].to_dict())
        decisions.append(planner.observe(store.get_run(run_id)))
    assert [d["adopted"] for d in decisions] == [True, False, False, True]
    assert decisions[1]["params"] == decisions[2]["params"] == spec_params(specs["r1"])
    assert "did not accept" in decisions[1]["reason"] and "does not beat" in decisions[2]["reason"]
    spec, value = planner.adopted()
    assert spec == specs["r4"] and value == 0.09
    assert [(t["state"], t["value"]) for t in store.trials()] == [("complete", g) for _, _, g, _ in runs]


def test_runs_with_too_little_held_out_data_train_the_adopted_spec_and_are_skipped(planner, store):
    adopted = {"epochs": 2, "learning_rate": 5e-5, "batch_size": 64, "max_seq_length": 128, "mini_batch_size": 16}
    store.set_marker(ADOPTED, json.dumps({"params": adopted, "value": 0.04}))
    spec = planner.next_spec("r1")                               # no run evaluated yet
    assert spec_params(spec) == adopted
    finish_run(store, "r1", "promoted", 0.30, heldout=5, spec=spec.to_dict())   # a big gain, on 5 pairs
    decision = planner.observe(store.get_run("r1"))
    assert decision["state"] == "skipped" and not decision["adopted"] and "too little held-out" in decision["reason"]
    assert spec_params(planner.next_spec("r2")) == adopted        # the last evaluated run was too small
    finish_run(store, "r2", "rejected", minute=1)                # rejected for lack of history
    assert planner.observe(store.get_run("r2"))["state"] == "skipped"
    assert [t["state"] for t in store.trials()] == ["skipped", "skipped"]
    assert planner.adopted() == (planner.spec_for(adopted), 0.04)
    proposals = [r for r in experiments(planner.settings) if r["event"] == "proposal"]
    assert [r["decision"] for r in proposals] == ["too little held-out data"] * 2


def test_a_failed_run_fails_its_trial_and_the_next_proposal_still_comes(planner, planner_settings, store):
    finish_run(store, "r0", "accepted", 0.02)
    spec = planner.next_spec("r1")
    store.create_run("r1", {"trigger": "manual"}, spec.to_dict(), now=T0 + timedelta(minutes=1))
    store.update_run("r1", state="failed", reason="RuntimeError: CUDA out of memory", finished=utc_now(T0))
    assert planner.observe(store.get_run("r1"))["state"] == "fail"
    nxt = planner.next_spec("r2")
    assert spec_params(nxt) != spec_params(spec)                   # the configured spec is not retried
    assert_in_bounds(nxt, planner_settings.planner)


def test_an_interrupted_run_skips_its_trial_and_the_configured_spec_is_tried_again(planner, store):
    finish_run(store, "r0", "accepted", 0.02)
    spec = planner.next_spec("r1")
    store.create_run("r1", {"trigger": "manual"}, spec.to_dict(), now=T0 + timedelta(minutes=1))
    store.update_run("r1", state="failed", reason="Interrupted: the daemon is stopping", finished=utc_now(T0))
    assert planner.observe(store.get_run("r1"))["state"] == "skipped"
    assert planner.next_spec("r2") == spec


def test_a_run_ended_without_being_observed_is_settled_before_the_next_proposal(planner, store):
    finish_run(store, "r0", "accepted", 0.02)
    spec = planner.next_spec("r1")
    finish_run(store, "r1", "accepted", 0.06, minute=1, spec=spec.to_dict())   # the daemon stopped before observe
    planner.next_spec("r2")
    assert [(t["run_id"], t["state"]) for t in store.trials()] == [("r1", "complete"), ("r2", "proposed")]
    assert planner.adopted()[1] == 0.06


def test_every_proposal_result_and_decision_is_a_json_line(planner, planner_settings, store):
    finish_run(store, "r0", "accepted", 0.02)
    spec = planner.next_spec("r1", now=T0)
    finish_run(store, "r1", "accepted", 0.05, minute=1, spec=spec.to_dict())
    planner.observe(store.get_run("r1"), now=T0)
    lines = experiments(planner_settings)
    assert [r["event"] for r in lines] == ["proposal", "result", "decision"]
    for record in lines:
        assert {"time", "run_id", "trial", "params", "value", "decision", "reason"} <= set(record)
        assert record["run_id"] == "r1" and record["trial"] == 1 and record["time"] == utc_now(T0)
    assert lines[0]["spec"]["max_seconds"] == 1200 and lines[1]["value"] == 0.05 and lines[1]["decision"] == "complete"
    assert lines[1]["gate"]["accepted"] is True and lines[2]["decision"] == "adopt"


def test_corrupted_marker_and_trial_rows_are_ignored_with_a_warning(planner, planner_settings, store, caplog):
    finish_run(store, "r0", "accepted", 0.02)
    store.set_marker(ADOPTED, "{not json")
    assert planner.adopted() == (planner.configured_spec(), None)
    assert any("adopted planner spec unreadable" in r.getMessage() for r in caplog.records)
    for params, value in (({"epochs": "many"}, 0.1), ([1, 2], 0.2), (spec_params(planner.configured_spec()), "abc")):
        store.update_trial(store.add_trial(params), state="complete", value=value)
    assert_in_bounds(planner.next_spec("r1"), planner_settings.planner)
    assert sum("planner trial unreadable" in r.getMessage() for r in caplog.records) == 3
    conn = sqlite3.connect(planner_settings.memory.db)           # a row no JSON parser can read
    conn.execute("UPDATE planner_trials SET params = '{' WHERE id = 1")
    conn.commit()
    conn.close()
    assert_in_bounds(planner.next_spec("r2"), planner_settings.planner)


def test_an_adopted_spec_outside_new_bounds_is_brought_inside(planner, planner_settings, store):
    wild = {"epochs": 40, "learning_rate": 0.5, "batch_size": 1000, "max_seq_length": 4096, "mini_batch_size": 16}
    store.set_marker(ADOPTED, json.dumps({"params": wild, "value": 0.1}))
    spec = planner.next_spec("r1")
    assert_in_bounds(spec, planner_settings.planner)
    assert (spec.epochs, spec.batch_size, spec.max_seq_length) == (3, 64, 256)


def test_a_disabled_planner_hands_out_the_configured_spec_and_records_nothing(home, store):
    write_config(home, planner={"enabled": False, "max_epochs": 2})
    planner = Planner(load_settings(home), store)
    finish_run(store, "r0", "accepted", 0.02)
    spec = planner.next_spec("r1")
    assert spec == planner.configured_spec() and spec.max_seconds == 30 * 60
    assert store.trials() == [] and planner.observe(store.get_run("r0"))["trial"] is None


params_strategy = st.fixed_dictionaries({
    "learning_rate": st.floats(1e-9, 1.0), "epochs": st.integers(0, 20),
    "batch_size": st.sampled_from([8, 16, 24, 32, 64, 128]), "max_seq_length": st.sampled_from([64, 128, 256, 512]),
    "mini_batch_size": st.sampled_from([0, 16])})
trial_strategy = st.tuples(params_strategy, st.sampled_from(["complete", "fail", "skipped", "proposed"]),
                           st.one_of(st.none(), st.floats(-1.0, 1.0)))


@st.composite
def bounds_strategy(draw) -> PlannerSettings:
    low = draw(st.floats(1e-7, 1e-2))
    return PlannerSettings(max_epochs=draw(st.integers(1, 6)), min_heldout=20,
                           max_training_minutes=draw(st.floats(0.1, 600.0)), learning_rate_min=low,
                           learning_rate_max=min(1.0, low * draw(st.floats(1.0, 100.0))),
                           batch_sizes=tuple(draw(st.lists(st.integers(2, 256), min_size=1, max_size=4))),
                           max_seq_lengths=tuple(draw(st.lists(st.integers(8, 1024), min_size=1, max_size=3))))


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bounds=bounds_strategy(), history=st.lists(trial_strategy, max_size=12), configured=params_strategy,
       marker=st.one_of(st.none(), st.text(max_size=20), params_strategy.map(lambda p: json.dumps({"params": p}))),
       heldout=st.sampled_from([5, 40]))
def test_proposals_stay_inside_random_bounds_whatever_the_history(settings, bounds, history, configured,
                                                                   marker, heldout):
    with tempfile.TemporaryDirectory() as tmp:
        run_settings = dataclasses.replace(settings, home=Path(tmp), planner=bounds,
                                           training=dataclasses.replace(settings.training, **configured))
        store = Store(Path(tmp) / "gremlin.db")
        try:
            for params, state, value in history:
                store.update_trial(store.add_trial(params), state=state, value=value)
            if marker is not None:
                store.set_marker(ADOPTED, marker)
            finish_run(store, "r0", "accepted", 0.02, heldout=heldout)
            planner = Planner(run_settings, store)
            assert_in_bounds(planner.next_spec("r1"), bounds)
            finish_run(store, "r1", "accepted", 0.05, minute=1)
            planner.observe(store.get_run("r1"))
            assert_in_bounds(planner.next_spec("r2"), bounds)
        finally:
            store.close()


def test_reward_priority_shrinks_small_samples_toward_the_middle():
    assert reward_priority(1.0, 0) == reward_priority(0.0, 0) == 5
    assert reward_priority(1.0, 1) < reward_priority(1.0, 50) == 10
    assert reward_priority(0.0, 50) == 0 and reward_priority(7.0, 50) == 10   # out-of-range rewards are clamped


def test_task_types_that_paid_off_run_first_and_explicit_priorities_stay(planner, store):
    for task_type, rewards in (("shell", [1.0] * 6), ("snapshot", [0.0] * 6), ("replay", [1.0])):
        for reward in rewards:
            store.submit_task(task_type, {})
            task = store.claim_task(worker=1, lease_s=60)
            assert store.finish_task(task["id"], task["attempts"], "done", {"reward": reward})[0]
    priorities = planner.task_priorities()
    assert priorities["shell"] > priorities["replay"] > priorities["reindex"] == 5 > priorities["snapshot"]
    snapshot, _ = store.submit_task("snapshot", {})
    shell, _ = store.submit_task("shell", {"cmd": ["true"]})
    explicit, _ = store.submit_task("shell", {"cmd": ["false"]}, priority=1)
    reindex, _ = store.submit_task("reindex", {})
    assert planner.order_queue() == 3
    assert store.get_task(explicit)["priority"] == 1
    claimed = [store.claim_task(worker=1, lease_s=60)["id"] for _ in range(4)]
    assert claimed == [shell, reindex, snapshot, explicit]
