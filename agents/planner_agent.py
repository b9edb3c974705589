"""The planner: chooses each training run's spec from past results, inside the [planner]
bounds, and orders queued tasks by the rewards their types have earned.

After each run it proposes the next spec with Optuna's TPE sampler. The study is Gremlin's
own: every trial is a row of `planner_trials` (memory/store.py), and before each proposal
an in-memory study is rebuilt from those rows (complete trials with their value, failed
ones as FAIL) and asked for one more. A trial's value is its run's gate gain (MRR@10 on
held-out pairs, after minus before). The first trial is the configured spec, so the
incumbent is measured like any other.

A spec is *adopted* (marker `planner.adopted`) only when the gate accepted its run and its
gain beats the adopted spec's recorded gain. Results on a tiny held-out set are noise: while
the last evaluated run had fewer than `min_heldout` held-out pairs the planner does not
explore (the run trains with the adopted spec) and such runs are skipped as trials.
Whatever is stored, a corrupted marker or trial row included, every spec it hands out lies
inside the bounds (`bounded_spec`).

Every proposal, result and decision is appended to `data/experiments.jsonl` as one line
`{"time", "event": "proposal|result|decision", "run_id", "trial", "params", "value",
"decision", "reason"}` (a proposal also carries the whole `spec`; a result the `gate`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from datetime import datetime
from pathlib import Path

from agent_core.tasks import TYPE_FIELDS
from config.settings import PlannerSettings
from memory.store import Store, utc_now
from self_training.finetune import TrainingSpec
from self_training.trainer import OUTCOMES

logger = logging.getLogger(__name__)

ADOPTED = "planner.adopted"  # marker: {"params", "value", "run_id", "trial", "time"}
EXPERIMENTS = "experiments.jsonl"
# The spec fields the planner searches; every other field comes from [training].
SEARCHED = ("learning_rate", "epochs", "batch_size", "max_seq_length", "mini_batch_size")
CACHED_MINI_BATCH = 16  # mini_batch_size 16 = CachedMNRL, 0 = plain MNRL; only below batch_size
STARTUP_TRIALS = 5  # random trials before TPE models the history: each trial is a whole training run
LOOKBACK_RUNS = 50  # how far back to look for the last run that reached evaluation
# Task priorities: a type's mean reward (0-1) is shrunk toward PRIOR_REWARD as if it had
# PRIOR_WEIGHT more tasks scored at that, so two lucky tasks do not jump the queue.
PRIOR_REWARD, PRIOR_WEIGHT = 0.5, 5
# How the trainer words a run stopped from outside (daemon stopping, process killed): such a
# failure says nothing about the spec, so its trial is skipped rather than failed.
INTERRUPTED = ("Interrupted:", "interrupted during")


# -- pure core ---------------------------------------------------------------------------

def bounded_spec(spec: TrainingSpec, bounds: PlannerSettings) -> TrainingSpec:
    """`spec` moved inside the bounds (nearest allowed value of each searched field) with the time limit."""
    batch = _nearest(spec.batch_size, bounds.batch_sizes)
    rate = _number(spec.learning_rate, bounds.learning_rate_min)
    mini = CACHED_MINI_BATCH if spec.mini_batch_size and CACHED_MINI_BATCH < batch else 0
    return dataclasses.replace(
        spec, batch_size=batch, mini_batch_size=mini,
        epochs=int(min(max(_number(spec.epochs, 1), 1), bounds.max_epochs)),
        learning_rate=float(min(max(rate, bounds.learning_rate_min), bounds.learning_rate_max)),
        max_seq_length=_nearest(spec.max_seq_length, bounds.max_seq_lengths),
        max_seconds=float(bounds.max_training_minutes * 60))


def _number(value, fallback: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else fallback


def _nearest(value, choices: tuple[int, ...]) -> int:
    """The allowed choice closest to `value` (the smaller on a tie; the smallest for a non-number)."""
    ordered = sorted(choices)
    return min(ordered, key=lambda c: abs(c - _number(value, ordered[0])))


def spec_params(spec: TrainingSpec) -> dict:
    """The searched fields of a spec."""
    return {key: getattr(spec, key) for key in SEARCHED}


def parse_params(raw) -> dict | None:
    """The searched fields of stored params with their types checked, or None when malformed."""
    if not isinstance(raw, dict):
        return None
    out = {}
    for key in SEARCHED:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        if key != "learning_rate" and value != int(value):
            return None
        out[key] = float(value) if key == "learning_rate" else int(value)
    return out


def search_space(bounds: PlannerSettings) -> dict:
    """The Optuna distributions of the searched fields."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    return {"learning_rate": FloatDistribution(bounds.learning_rate_min, bounds.learning_rate_max, log=True),
            "epochs": IntDistribution(1, bounds.max_epochs),
            "batch_size": CategoricalDistribution(tuple(sorted(set(bounds.batch_sizes)))),
            "max_seq_length": CategoricalDistribution(tuple(sorted(set(bounds.max_seq_lengths)))),
            "mini_batch_size": CategoricalDistribution((0, CACHED_MINI_BATCH))}


def study_history(rows: list[dict], space: dict) -> list:
    """Optuna trials of the complete and failed trial rows that fit the space; others are left out, logged."""
    import optuna

    frozen = []
    for row in rows:
        params, value = parse_params(row.get("params")), row.get("value")
        complete = row.get("state") == "complete"
        if params is None or (complete and _number(value, None) is None):
            logger.warning("planner trial unreadable; ignored",
                           extra={"trial": row.get("id"), "params": str(row.get("params"))[:200]})
            continue
        state = optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL
        try:
            frozen.append(optuna.trial.create_trial(params=params, distributions=space, state=state,
                                                    value=float(value) if complete else None))
        except ValueError:  # measured under other bounds: it says nothing about this space
            logger.info("planner trial outside the current bounds; ignored", extra={"trial": row.get("id")})
    return frozen


def propose(history: list, space: dict, first: dict | None, seed: int) -> dict:
    """One TPE proposal given past Optuna trials; `first` (when given) is the proposal instead."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.add_trials(history)
        if first is not None:
            study.enqueue_trial(first)
        return dict(study.ask(space).params)


def trial_result(run: dict, min_heldout: int) -> tuple[str, float | None, str]:
    """(trial state, value, why) of a finished run: complete with its gate gain, fail, or skipped."""
    metrics = run.get("metrics") or {}
    gate = metrics.get("decision")
    heldout = (metrics.get("dataset") or {}).get("heldout", 0)
    if run.get("state") == "failed":
        if str(run.get("reason") or "").startswith(INTERRUPTED):
            return "skipped", None, f"the run was interrupted: {run.get('reason')}"
        return "fail", None, f"the run failed: {run.get('reason')}"
    if not isinstance(gate, dict):
        return "skipped", None, f"the run ended before evaluation: {run.get('reason')}"
    if not isinstance(heldout, int) or heldout < min_heldout:
        return "skipped", None, f"too little held-out data: {heldout} pairs (min_heldout {min_heldout})"
    gain = _number(gate.get("gain"), None)
    if gain is None:
        return "skipped", None, "the run's gate decision holds no gain"
    return "complete", float(gain), str(gate.get("reason", ""))


def adoption(run: dict, state: str, value: float | None, best: float | None, why: str) -> tuple[bool, str]:
    """Whether a trial's spec replaces the adopted one (accepted by the gate AND a better gain), and why."""
    gate = (run.get("metrics") or {}).get("decision") or {}
    if state != "complete":
        return False, f"kept the adopted spec: the trial was {state} ({why})"
    if run.get("state") not in ("accepted", "promoted") or not gate.get("accepted"):
        return False, f"kept the adopted spec: the gate did not accept the run ({why})"
    if best is not None and value <= best:
        return False, f"kept the adopted spec: gain {value:+.4f} does not beat its {best:+.4f}"
    than = "the adopted spec had no measured gain" if best is None else f"better than {best:+.4f}"
    return True, f"adopted: the gate accepted the run with MRR@10 gain {value:+.4f} ({than})"


def reward_priority(mean: float, n: int) -> int:
    """A task type's priority, 0-10: ten times its mean reward shrunk toward 0.5 while it has few scores."""
    mean = min(max(_number(mean, PRIOR_REWARD), 0.0), 1.0)
    n = max(int(n), 0)
    return round(10 * (n * mean + PRIOR_WEIGHT * PRIOR_REWARD) / (n + PRIOR_WEIGHT))


def append_lines(path: Path, records: list[dict]) -> None:
    """Append JSON lines and fsync them, so a crash loses no decision already returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


# -- the planner ---------------------------------------------------------------------------

class Planner:
    """Proposes each training run's spec, decides which spec stays adopted, and ranks task types."""

    def __init__(self, settings, store: Store):
        self.settings = settings
        self.store = store
        self.bounds: PlannerSettings = settings.planner
        self.experiments = settings.data_dir / EXPERIMENTS

    def configured_spec(self) -> TrainingSpec:
        """The [training] spec, inside the bounds."""
        return bounded_spec(TrainingSpec.from_settings(self.settings.training), self.bounds)

    def spec_for(self, params: dict) -> TrainingSpec:
        """The [training] spec with the searched fields of `params`, inside the bounds."""
        return bounded_spec(TrainingSpec.from_settings(self.settings.training, **params), self.bounds)

    def adopted(self) -> tuple[TrainingSpec, float | None]:
        """The adopted spec and its recorded gain; the configured spec (no gain) until one is adopted."""
        raw = self.store.get_marker(ADOPTED)
        if raw is None:
            return self.configured_spec(), None
        try:
            data = json.loads(raw)
            params, value = parse_params(data.get("params")), data.get("value")
        except (ValueError, AttributeError):  # not JSON, or not an object
            params, value = None, None
        if params is None or (value is not None and _number(value, None) is None):
            logger.warning("adopted planner spec unreadable; using the configured spec",
                           extra={"marker": ADOPTED, "value": raw[:200]})
            return self.configured_spec(), None
        return self.spec_for(params), None if value is None else float(value)

    # -- proposing -------------------------------------------------------------------

    def next_spec(self, run_id: str, now: datetime | None = None) -> TrainingSpec:
        """The spec for the run about to start, recorded as its proposed trial; always inside the bounds."""
        if not self.bounds.enabled:
            return self.configured_spec()
        self._settle_stale(run_id, now)
        shortage = self._heldout_shortage()
        if shortage:
            spec, decision, reason = self.adopted()[0], "too little held-out data", shortage
        else:
            spec, decision, reason = self._explore()
        params = spec_params(spec)
        trial = self.store.add_trial(params, run_id, now)
        self._log(now, "proposal", run_id, trial, params, decision=decision, reason=reason, spec=spec.to_dict())
        logger.info("planner proposed a spec", extra={"run_id": run_id, "trial": trial, "params": params,
                                                      "decision": decision})
        return spec

    def _explore(self) -> tuple[TrainingSpec, str, str]:
        """A TPE proposal, or the configured spec while it has not been measured."""
        space, rows = search_space(self.bounds), self._trials()
        history = study_history([r for r in rows if r["state"] in ("complete", "fail")], space)
        configured = spec_params(self.configured_spec())
        measured = any(t.params == configured for t in history)
        seed = (self.settings.training.seed + len(rows)) % 2**32  # a new draw each time, reproducible
        asked = propose(history, space, None if measured else configured, seed)
        if not measured and asked == configured:
            return self.spec_for(asked), "configured spec first", "the configured spec is measured first"
        return self.spec_for(asked), "proposed by TPE", f"TPE over {len(history)} measured trials"

    def _heldout_shortage(self) -> str | None:
        """Why exploring would be noise (too few held-out pairs in the last evaluated run), or None."""
        for run in self.store.recent_runs(LOOKBACK_RUNS):
            metrics = run["metrics"] if isinstance(run["metrics"], dict) else {}
            if run["finished"] and isinstance(metrics.get("decision"), dict):
                heldout = (metrics.get("dataset") or {}).get("heldout", 0)
                if isinstance(heldout, int) and heldout >= self.bounds.min_heldout:
                    return None
                return (f"too little held-out data: run {run['id']} had {heldout} held-out pairs "
                        f"(min_heldout {self.bounds.min_heldout})")
        return "too little held-out data: no run has been evaluated yet"

    def _settle_stale(self, run_id: str, now: datetime | None) -> None:
        """Observe proposed trials whose run ended without being observed (the process stopped)."""
        for trial in self._trials(("proposed",)):
            if trial["run_id"] == run_id:
                continue
            run = self.store.get_run(trial["run_id"]) if trial["run_id"] else None
            if run is None:
                self.store.update_trial(trial["id"], state="skipped", now=now,
                                        decision=json.dumps({"reason": "its run never started"}))
            elif run["state"] in OUTCOMES and run["finished"]:
                self.observe(run, now)

    def _trials(self, states: tuple[str, ...] = ("proposed", "complete", "fail", "skipped")) -> list[dict]:
        try:
            return self.store.trials(states)
        except ValueError as exc:  # a row whose params are not JSON: the store cannot decode the table
            logger.warning("planner trials unreadable; planning without them", extra={"error": str(exc)})
            return []

    # -- observing -------------------------------------------------------------------

    def observe(self, run: dict | None, now: datetime | None = None) -> dict:
        """Record a finished run as its trial's result; adopt its spec only if the gate says it improved."""
        if not run:
            return {"run_id": None, "trial": None, "adopted": False, "reason": "no such run"}
        trial = next((t for t in reversed(self._trials(("proposed",))) if t["run_id"] == run["id"]), None)
        if trial is None:
            return {"run_id": run["id"], "trial": None, "adopted": False,
                    "reason": "no proposed planner trial for this run (none, or already observed)"}
        state, value, why = trial_result(run, self.bounds.min_heldout)
        decision = self._decide(run, trial, state, value, why, now)
        self.store.update_trial(trial["id"], state=state, value=value, decision=json.dumps(decision), now=now)
        self._log(now, "result", run["id"], trial["id"], trial["params"], value=value, decision=state, reason=why,
                  gate=(run.get("metrics") or {}).get("decision"))
        self._log(now, "decision", run["id"], trial["id"], decision["params"], value=decision["adopted_value"],
                  decision="adopt" if decision["adopted"] else "keep", reason=decision["reason"])
        logger.info("planner observed a run", extra={k: decision[k] for k in ("run_id", "trial", "state", "adopted")})
        return decision

    def _decide(self, run: dict, trial: dict, state: str, value: float | None, why: str,
                now: datetime | None) -> dict:
        """The decision dict; an adoption is stored in the marker before the trial ends (a crash re-observes)."""
        spec, best = self.adopted()
        params = parse_params(trial["params"])
        adopt, reason = adoption(run, state, value, best, why)
        if adopt and params is None:
            adopt, reason = False, "kept the adopted spec: the trial's stored params are unreadable"
        if adopt:
            spec, best = self.spec_for(params), value
            self.store.set_marker(ADOPTED, json.dumps({"params": spec_params(spec), "value": value, "run_id": run["id"],
                                                       "trial": trial["id"], "time": utc_now(now)}))
        return {"run_id": run["id"], "trial": trial["id"], "state": state, "value": value, "adopted": adopt,
                "reason": reason, "params": spec_params(spec), "adopted_value": best}

    def _log(self, now: datetime | None, event: str, run_id: str, trial: int, params, value=None,
             decision=None, reason: str = "", **more) -> None:
        record = {"time": utc_now(now), "event": event, "run_id": run_id, "trial": trial, "params": params,
                  "value": value, "decision": decision, "reason": reason, **more}
        try:
            append_lines(self.experiments, [record])
        except OSError as exc:  # the log is a record; the trials table is what the planner relies on
            logger.warning("experiments log not written", extra={"file": str(self.experiments), "error": str(exc)})

    # -- task priorities ---------------------------------------------------------------

    def task_priorities(self) -> dict[str, int]:
        """Each task type's automatic priority (0-10) from its reward history; 5 for a type without one."""
        priorities = dict.fromkeys(TYPE_FIELDS, reward_priority(PRIOR_REWARD, 0))
        for task_type, (mean, count) in self.store.reward_by_type().items():
            priorities[task_type] = reward_priority(mean, count)
        return priorities

    def order_queue(self) -> int:
        """Give queued tasks without a priority of their own their type's; returns how many changed."""
        changed = self.store.set_auto_priorities(self.task_priorities())
        if changed:
            logger.info("queued tasks reordered by reward", extra={"changed": changed})
        return changed
