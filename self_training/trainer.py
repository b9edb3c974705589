"""The trainer: a `transitions` state machine that turns a retrain trigger into a proven model.

    idle → building_dataset → training → evaluating → promoting → reindexing → idle
                 └──────────────┴──► rejected / failed ──► idle

One run at a time: the trigger file is claimed by rename, a trigger that arrives during a
run waits in the file (coalescing with any other) until the run ends. Every state change
is committed to the `runs` table first, so after a crash or `kill -9` the interrupted run
is ended as failed with its reason and its trigger is queued again (`recover`). A model
is promoted only when the gate (evaluate.py) says it beats the current one on held-out
pairs that training never saw; promotion switches `run/checkpoints/current_model.json`
atomically and re-embeds memory into a new index while search answers from the old one.

An optional planner (agents/planner_agent.py, handed in by the daemon: this package never
imports agents) chooses each polled run's spec and is told how the run ended; a planner
that fails is logged and the run goes on with the configured spec.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from transitions import Machine

from config.errors import GremlinError
from memory.atomic import write_json_atomically
from memory.errors import ModelError
from memory.service import build_index, release_free_memory
from memory.store import Store, utc_now
from memory.text import embedding_text
from memory.vector_store.embedder import (
    Embedder,
    adapter_base_path,
    current_model_file,
    is_adapter,
    model_fingerprint,
    resolve_current_model,
)
from memory.vector_store.index import index_path, remove_index
from self_training.evaluate import gate
from self_training.feedback_loop import (
    Trigger,
    claim_trigger,
    parse_trigger,
    recover_claim,
    requeue_trigger,
    trigger_path,
)
from self_training.finetune import HeldOutCheck, TrainingSpec, fine_tune_in_child
from self_training.generate_dataset import build_dataset, with_file_pairs

logger = logging.getLogger(__name__)

# The machine's states and transition table (plain data, DESIGN.md "Trainer").
STATES = ("idle", "building_dataset", "training", "evaluating", "promoting", "reindexing",
          "rejected", "failed")
ACTIVE = ("building_dataset", "training", "evaluating", "promoting", "reindexing")
TRANSITIONS = (
    {"trigger": "build", "source": "idle", "dest": "building_dataset"},
    {"trigger": "train", "source": "building_dataset", "dest": "training"},
    {"trigger": "evaluate", "source": "training", "dest": "evaluating"},
    {"trigger": "promote", "source": "evaluating", "dest": "promoting"},
    {"trigger": "reindex", "source": "promoting", "dest": "reindexing"},
    {"trigger": "reject", "source": ["building_dataset", "evaluating"], "dest": "rejected"},
    {"trigger": "fail", "source": list(ACTIVE), "dest": "failed"},
    {"trigger": "finish", "source": ["evaluating", "reindexing", "rejected", "failed"], "dest": "idle"},
)
# How a finished run ended (the `runs.state` it keeps).
OUTCOMES = ("promoted", "accepted", "rejected", "failed")
PROGRESS_EVERY_S = 2.0


class TrainerBusy(GremlinError):
    """Another process is training on this home right now."""


class Interrupted(GremlinError):
    """The daemon is stopping; the run ends as failed and its trigger is queued again."""


@dataclass(frozen=True)
class CurrentModel:
    """A model by id and folder, not loaded: all a run needs of the current model and the candidate."""

    model_id: str
    path: Path


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended."""

    run_id: str
    outcome: str
    reason: str
    model_id: str | None = None
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"run_id": self.run_id, "outcome": self.outcome, "reason": self.reason,
                "model_id": self.model_id, "metrics_before": self.metrics_before,
                "metrics_after": self.metrics_after, "seconds": self.seconds}


def models_dir(settings) -> Path:
    """Where every trained model gets its own versioned folder."""
    return settings.run_dir / "checkpoints" / "models"


def claimed_path(settings, run_id: str) -> Path:
    """Where a claimed trigger lies while its run lasts."""
    return settings.run_dir / "checkpoints" / "claimed" / f"{run_id}.json"


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id such as 20261124-171942-a3f0."""
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


class TrainerLock:
    """An flock on run/trainer.lock: one trainer per home, across the daemon and the CLI."""

    def __init__(self, settings):
        self.path = settings.run_dir / "trainer.lock"
        self._handle = None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; False when another process holds it (and not blocking)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="ascii")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        """Drop the lock."""
        if self._handle:
            self._handle.close()
            self._handle = None


def recover_interrupted_runs(settings, store: Store, now: datetime | None = None) -> list[str]:
    """End runs a dead process left active as failed, put back their triggers and the model pointer.

    A run is active in the table only while its process holds the trainer lock, so this
    takes the lock first: a run of a live `gremlin cycle` is never mistaken for a dead one.
    """
    lock = TrainerLock(settings)
    if not lock.acquire():
        return []
    try:
        return _recover(settings, store, now)
    finally:
        lock.release()


def _recover(settings, store: Store, now: datetime | None) -> list[str]:
    recovered = []
    for run in store.runs_in_states(ACTIVE + ("idle",)):
        promoting = run["metrics"].get("promote", True)  # a `gremlin cycle` run is not re-queued
        reason = (f"interrupted during {run['state']}: the process stopped (crash, kill -9 or power "
                  "loss) before the run ended" + ("; its trigger was queued again" if promoting else ""))
        previous = run["metrics"].get("previous_model")
        if run["state"] in ("promoting", "reindexing") and previous:
            _restore_previous(settings, store, previous)
        if run["trigger"] and promoting:
            requeue_trigger(trigger_path(settings), _trigger_from_dict(run["trigger"]))
        claimed_path(settings, run["id"]).unlink(missing_ok=True)
        if not run["model_id"]:
            shutil.rmtree(models_dir(settings) / run["id"], ignore_errors=True)  # half-written weights
        store.update_run(run["id"], state="failed", reason=reason, finished=utc_now(now), now=now)
        logger.error("training run interrupted", extra={"run_id": run["id"], "state": run["state"]})
        recovered.append(run["id"])
    for leftover in sorted(claimed_path(settings, "x").parent.glob("*.json")):
        recover_claim(trigger_path(settings), leftover)  # claimed, then the process died before its run row
    return recovered


def _restore_previous(settings, store: Store, previous: dict) -> None:
    """Point back at the model that was current before a promotion that did not finish."""
    write_json_atomically(current_model_file(settings.home), previous)
    store.make_current(previous["id"])


def model_pairs(pairs) -> list[tuple[str, str]]:
    """(input, output) texts as the model sees them when it embeds memories (memory/text.py)."""
    return [(embedding_text(p.input), embedding_text(p.output)) for p in pairs]


def _trigger_from_dict(data: dict) -> Trigger:
    return parse_trigger(json.dumps(data), Path("<runs table>"))


class Trainer:
    """Runs one training cycle at a time; `memory` is the live memory to promote into (or None).

    `planner`, when set, is any object with `next_spec(run_id) -> TrainingSpec` and
    `observe(run: dict)`; polled runs take their spec from it and report back to it.
    """

    def __init__(self, settings, store: Store, memory=None, stop: threading.Event | None = None):
        self.settings = settings
        self.store = store
        self.memory = memory
        self.stop_event = stop or threading.Event()
        self.run_id: str | None = None
        self.progress: dict = {}
        self.on_progress: Callable[[dict], None] | None = None  # a terminal's progress bar
        self.planner = None  # duck-typed: next_spec(run_id) and observe(run dict)
        self._last_progress_write = 0.0
        self._reindex_from = (0.0, 0)  # (monotonic time, memories done) when reindexing began
        self.machine = Machine(model=self, states=list(STATES), transitions=list(TRANSITIONS),
                               initial="idle", auto_transitions=False, after_state_change="_persist_state")

    # -- scheduling ------------------------------------------------------------------

    def poll(self, now: datetime | None = None) -> RunOutcome | None:
        """Claim a pending trigger and run it, unless busy or within the cooldown."""
        if self.state != "idle" or not self.settings.training.enabled:
            return None
        path = trigger_path(self.settings)
        if not path.exists() or self._cooling_down(path, now):
            return None
        lock = TrainerLock(self.settings)
        if not lock.acquire():
            return None  # a `gremlin cycle` or `train --now` is running; the trigger waits
        try:
            _recover(self.settings, self.store, now)  # a run left by a process that died meanwhile
            run_id = new_run_id(now)
            trigger = claim_trigger(path, claimed_path(self.settings, run_id))
            if trigger is None:
                return None
            outcome = self.run(trigger, self._planned_spec(run_id), run_id=run_id)
            self._tell_planner(run_id)
            return outcome
        finally:
            lock.release()

    def _planned_spec(self, run_id: str) -> TrainingSpec | None:
        """The planner's spec for this run; None (the configured spec) without a planner or when it fails."""
        if self.planner is None:
            return None
        try:
            return self.planner.next_spec(run_id)
        except Exception:  # noqa: BLE001 - planning is advice; the run must not depend on it
            logger.exception("planner failed to propose a spec; using the configured one", extra={"run_id": run_id})
            return None

    def _tell_planner(self, run_id: str) -> None:
        """Hand the ended run's row to the planner; its failure never fails the run or the poll."""
        if self.planner is None:
            return
        try:
            self.planner.observe(self.store.get_run(run_id))
        except Exception:  # noqa: BLE001 - the run has ended and is recorded whatever the planner does
            logger.exception("planner failed to observe a run", extra={"run_id": run_id})

    def _cooling_down(self, path: Path, now: datetime | None) -> bool:
        """True while the last run ended less than cooldown_s ago (a forced trigger skips it)."""
        last = self.store.last_finished_run()
        if last is None:
            return False
        try:
            if parse_trigger(path.read_text(encoding="utf-8"), path).force:
                return False
        except (OSError, GremlinError):
            return False  # let claim_trigger move a malformed file aside now
        now = now or datetime.now(timezone.utc)
        age = (now - datetime.fromisoformat(last["finished"])).total_seconds()
        return age < self.settings.training.cooldown_s

    # -- one run ---------------------------------------------------------------------

    def run(self, trigger: Trigger, spec: TrainingSpec | None = None, promote: bool = True,
            run_id: str | None = None, now: datetime | None = None) -> RunOutcome:
        """Dataset → fine-tune → gate → (promote → reindex); never raises for a failed run."""
        spec = spec or TrainingSpec.from_settings(self.settings.training)
        self.run_id = run_id or new_run_id(now)
        self.progress = {}
        started = time.monotonic()
        self.store.create_run(self.run_id, trigger.to_dict(), spec.to_dict(), now=now)
        self._set_metrics(promote=promote)  # recovery re-queues only runs that were to promote
        self._swapped = False
        logger.info("training run started", extra={"run_id": self.run_id, "trigger": trigger.trigger,
                                                   "note": trigger.note})
        try:
            try:
                outcome = self._cycle(trigger, spec, promote)
            except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the daemon goes on
                outcome = self._failed(exc, trigger)
            outcome = RunOutcome(**{**outcome.to_dict(), "seconds": round(time.monotonic() - started, 1)})
            self._end(outcome, now)
        finally:  # whatever happened, the next trigger must find the machine idle
            if self.state != "idle":
                self.machine.set_state("idle")
            _release_memory()
        return outcome

    def _cycle(self, trigger: Trigger, spec: TrainingSpec, promote: bool) -> RunOutcome:
        self.build()
        dataset = build_dataset(self.store, self.settings)
        cfg = self.settings.training
        self._set_metrics(dataset={"train": len(dataset.train), "heldout": len(dataset.heldout),
                                   "sha256": dataset.sha256, "counts": dataset.counts})
        if len(dataset.train) < cfg.min_train_pairs or len(dataset.heldout) < cfg.min_heldout_pairs:
            self.reject()
            return RunOutcome(self.run_id, "rejected", (
                f"not enough history: {len(dataset.train)} training and {len(dataset.heldout)} held-out "
                f"pairs (need {cfg.min_train_pairs} and {cfg.min_heldout_pairs}); it will try again "
                "after more changes"))
        self.train()
        current = self._current_model()  # its id and path only: this process never loads a candidate
        out_dir = models_dir(self.settings) / self.run_id
        train = with_file_pairs(dataset.train) if spec.file_pairs else dataset.train
        report = fine_tune_in_child(model_pairs(train), spec, current.path, out_dir,
                                    progress=self._on_step, tensorboard_dir=self._tensorboard_dir(),
                                    mlflow_uri=cfg.mlflow_uri, stop=self.stop_event,
                                    check=self._heldout_check(dataset, current, spec), on_evaluating=self.evaluate)
        if self.state == "training":  # the child always announces its check; this only guards the FSM
            self.evaluate()
        before, after = report.before, report.after
        decision = gate(before, after, cfg.min_gain, cfg.tolerance)
        lineage = self._lineage(trigger, spec, dataset, report.result, current, before, after, decision)
        lineage.update(report.fusion)
        candidate = CurrentModel(model_fingerprint(out_dir), out_dir)  # before a rejection drops the weights
        self._save_model(out_dir, candidate.model_id, spec, lineage, decision.accepted)
        outcome = RunOutcome(self.run_id, "accepted" if decision.accepted else "rejected", decision.reason,
                             candidate.model_id, before, after)
        self._remember(outcome, trigger)
        if not decision.accepted:
            self.reject()
            return outcome
        if not promote:
            return outcome
        self._promote(candidate, current)
        return RunOutcome(**{**outcome.to_dict(), "outcome": "promoted"})

    def _promote(self, candidate: CurrentModel, current: CurrentModel) -> None:
        self.promote()
        self._set_metrics(previous_model={"id": current.model_id, "path": str(current.path)})
        write_json_atomically(current_model_file(self.settings.home),
                              {"id": candidate.model_id, "path": str(candidate.path), "time": utc_now()})
        self.store.make_current(candidate.model_id)
        self.reindex()
        serving = Embedder(candidate.path, self.settings.model.device, self.settings.model.batch_size,
                           self.settings.model.max_seq_length)  # the first model this process loads in a run
        if self.memory is not None:
            index = self.memory.build_index(serving, progress=self._on_reindex)
            self.memory.swap(serving, index)  # the memory held the old embedder's only reference
            self._swapped = True
        else:  # a foreground run: the index is ready when the daemon next starts
            build_index(self.settings, self.store, serving, progress=self._on_reindex)
        try:
            prune_models(self.settings, self.store)
        except OSError:
            logger.exception("pruning old models failed; they stay on disk", extra={"run_id": self.run_id})

    def _failed(self, exc: Exception, trigger: Trigger) -> RunOutcome:
        interrupted = isinstance(exc, Interrupted)
        if interrupted:
            requeue_trigger(trigger_path(self.settings), trigger)
            logger.warning("training run interrupted; trigger queued again", extra={"run_id": self.run_id})
        else:
            logger.exception("training run failed", extra={"run_id": self.run_id, "state": self.state})
        if self.state in ACTIVE:
            self._restore_pointer()
            self.fail()
        if not (self.store.get_run(self.run_id) or {}).get("model_id"):
            shutil.rmtree(models_dir(self.settings) / self.run_id, ignore_errors=True)  # half-written weights
        return RunOutcome(self.run_id, "failed", f"{type(exc).__name__}: {exc}")

    def _restore_pointer(self) -> None:
        """A run that failed after switching the pointer switches it back."""
        previous = (self.store.get_run(self.run_id) or {}).get("metrics", {}).get("previous_model")
        if self.state in ("promoting", "reindexing") and previous and not self._swapped:
            _restore_previous(self.settings, self.store, previous)

    def _end(self, outcome: RunOutcome, now: datetime | None) -> None:
        self.store.update_run(self.run_id, state=outcome.outcome, reason=outcome.reason,
                              model_id=outcome.model_id, finished=utc_now(now), now=now,
                              error=outcome.reason if outcome.outcome == "failed" else None)
        claimed_path(self.settings, self.run_id).unlink(missing_ok=True)
        if self.state != "idle":
            self.finish()
        logger.info("training run ended", extra=outcome.to_dict())

    # -- pieces ----------------------------------------------------------------------

    def _current_model(self) -> CurrentModel:
        """The id and folder of the model serving now (without loading it, nor keeping the embedder)."""
        if self.memory is not None:
            embedder = self.memory.current()[0]
            return CurrentModel(embedder.model_id, embedder.path)
        path = resolve_current_model(self.settings.model.path, self.settings.home)
        return CurrentModel(model_fingerprint(path), path)

    def _heldout_check(self, dataset, current: CurrentModel, spec: TrainingSpec) -> HeldOutCheck:
        """What the training process scores after training: metrics on the held-out pairs as the model
        sees them, and `_fusion`'s calibration on their full texts."""
        m = self.settings.model
        return HeldOutCheck(model_pairs(dataset.heldout), self._fusion(dataset), current.path, spec.device,
                            m.batch_size, m.max_seq_length)

    def _tensorboard_dir(self) -> Path | None:
        return self.settings.data_dir / "runs" / self.run_id if self.settings.training.tensorboard else None

    def _lineage(self, trigger, spec, dataset, result, current, before, after, decision) -> dict:
        return {"source": trigger.trigger, "epoch": spec.epochs, "confidence_gain": decision.gain,
                "base_model": current.model_id, "base_path": str(current.path),
                "dataset_sha256": dataset.sha256, "heldout_sha256": dataset.heldout_sha256,
                "n_pairs": len(dataset.train), "n_heldout": len(dataset.heldout), "sources": dataset.counts,
                "spec": spec.to_dict(), "metrics_before": before, "metrics_after": after,
                "decision": decision.to_dict(), "device": result.device, "precision": result.precision,
                "steps": result.steps, "pairs_per_s": result.pairs_per_s, "train_loss": result.train_loss,
                "seconds": result.seconds, "time_limited": result.time_limited, "run_id": self.run_id,
                "trigger": trigger.to_dict()}

    @staticmethod
    def _fusion(dataset) -> list[tuple[str, str]]:
        """The pairs on which the training process calibrates lineage `fusion` (the candidate's hybrid-search
        weight, chosen on the older half, and MRR@10 on the newer half) and `fusion_before` (the current's)."""
        return [(p.input, p.output) for p in dataset.heldout]  # time-ordered; lexical search sees full texts

    def _save_model(self, out_dir: Path, model_id: str, spec: TrainingSpec, lineage: dict, accepted: bool) -> None:
        """Write spec and lineage beside the weights; a rejected model keeps only its numbers."""
        write_json_atomically(out_dir / "spec.json", spec.to_dict())
        write_json_atomically(out_dir / "lineage.json", lineage)
        self.store.register_model(model_id, str(out_dir), "accepted" if accepted else "rejected", lineage,
                                  fusion_weight=lineage.get("fusion", {}).get("weight"))
        if not accepted:
            _drop_weights(out_dir)
        self._set_metrics(before=lineage["metrics_before"], after=lineage["metrics_after"],
                          decision=lineage["decision"])
        self.store.update_run(self.run_id, model_id=model_id)

    def _remember(self, outcome: RunOutcome, trigger: Trigger) -> None:
        """A retrain memory (never evicted) so search can answer "when did the model change?"."""
        text = (f"retrain {outcome.outcome}: {outcome.reason}. trigger {trigger.trigger}: {trigger.note}. "
                f"before {outcome.metrics_before} after {outcome.metrics_after}")
        meta = {"run_id": self.run_id, "model_id": outcome.model_id, "label": f"retrain {self.run_id}",
                "metrics_before": outcome.metrics_before, "metrics_after": outcome.metrics_after}
        self.store.add_memory("retrain", text, meta, replaceable=False)

    def _set_metrics(self, **values) -> None:
        metrics = (self.store.get_run(self.run_id) or {}).get("metrics", {})
        self.store.update_run(self.run_id, metrics={**metrics, **values})

    def _on_step(self, step: int, total: int, loss: float | None) -> None:
        self._report(phase="training", step=step, total=total, loss=None if loss is None else round(loss, 4))

    def _on_reindex(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.progress or self.progress.get("phase") != "reindexing":
            self._reindex_from = (now, done)  # the rate counts only what this run encodes
        since, first = self._reindex_from
        rate = (done - first) / (now - since) if now > since and done > first else None
        self._report(phase="reindexing", step=done, total=total, per_s=None if rate is None else round(rate, 1),
                     eta_s=None if rate is None else round((total - done) / rate))

    def _report(self, **progress) -> None:
        """Keep progress for status (written at most every 2 s); stop early when asked."""
        self.progress = progress
        if self.on_progress:
            self.on_progress({"state": self.state, **progress})
        if time.monotonic() - self._last_progress_write >= PROGRESS_EVERY_S or progress["step"] == progress["total"]:
            self._last_progress_write = time.monotonic()
            self.store.update_run(self.run_id, progress=progress)
        if self.stop_event.is_set():
            raise Interrupted("the daemon is stopping")

    def _persist_state(self) -> None:
        if self.on_progress:
            self.on_progress({"state": self.state})
        if self.run_id and self.state in ACTIVE:
            self.store.update_run(self.run_id, state=self.state)
            logger.info("trainer state", extra={"run_id": self.run_id, "state": self.state})

    def describe(self) -> dict:
        """State and progress for `gremlin status`."""
        return {"state": self.state, "run_id": self.run_id if self.state != "idle" else None,
                "progress": self.progress if self.state != "idle" else {},
                "last_run": last_run(self.store)}


def _release_memory() -> None:
    """Free what a run left behind (a swapped-out model's tensors sit in reference cycles) and
    hand the freed heap back to the OS, so a long-running daemon returns to its idle size."""
    gc.collect()
    release_free_memory()


def last_run(store: Store) -> dict | None:
    """The newest run, summarised for `gremlin status`."""
    runs = store.recent_runs(1)
    return {k: runs[0].get(k) for k in ("id", "state", "started", "finished", "reason", "model_id")} if runs else None


def _drop_weights(out_dir: Path) -> None:
    """Delete a model's weights and tokenizer, keeping spec.json and lineage.json."""
    if not out_dir.is_dir():
        return  # removed by hand already
    for child in out_dir.iterdir():
        if child.name not in ("spec.json", "lineage.json"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def prune_models(settings, store: Store) -> list[str]:
    """Keep the newest `keep_models` trained models besides the current one; drop the rest."""
    trained = [m for m in store.list_models() if Path(m["path"]).parent == models_dir(settings)]
    keep = settings.training.keep_models
    needed = _adapter_bases(m for m in store.list_models() if m["status"] in ("current", "retired", "accepted"))
    pruned = []
    for status in ("retired", "accepted"):  # unpromoted cycle models never push out rollback targets
        for model in [m for m in trained if m["status"] == status][keep:]:
            if Path(model["path"]).resolve() in needed:
                continue  # a kept LoRA model is an adapter over these weights
            _drop_weights(Path(model["path"]))
            store.delete_vectors(model["id"])
            remove_index(index_path(settings.memory.index_dir, model["id"]))
            store.set_model_status(model["id"], "pruned")
            pruned.append(model["id"])
    if pruned:
        logger.info("old models pruned", extra={"models": pruned})
    return pruned


def _adapter_bases(models) -> set[Path]:
    """The base folders that the LoRA models among `models` load their weights from."""
    bases = set()
    for model in models:
        path = Path(model["path"])
        try:
            if is_adapter(path):
                bases.add(adapter_base_path(path).resolve())
        except ModelError:
            logger.warning("LoRA model has lost its base", extra={"model_id": model["id"], "path": str(path)})
    return bases


def switch_model(settings, store: Store, model_id: str | None = None, memory=None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Roll back (or forward) to a kept model: the one used before the current one when no id is given.

    Holds the trainer lock, so no run can promote over it meanwhile; the index is complete
    before the pointer moves, so a failure leaves everything on the old model.
    """
    lock = TrainerLock(settings)
    if not lock.acquire():
        raise TrainerBusy("a training run is in progress on this home; wait for it to end "
                          "(gremlin status) and try again")
    try:
        return _switch(settings, store, _rollback_target(store, model_id), memory, progress)
    finally:
        lock.release()


def _switch(settings, store: Store, target: dict, memory, progress) -> dict:
    path = Path(target["path"])
    if not (path / "config.json").is_file():
        raise GremlinError(f"model {target['id']} has no weights at {path} (it was rejected or pruned); "
                           "pick one from `gremlin models list` whose status is retired or accepted")
    if model_fingerprint(path) != target["id"]:
        raise GremlinError(f"the files in {path} no longer match model {target['id']}; it cannot be used")
    embedder = Embedder(path, settings.model.device, settings.model.batch_size, settings.model.max_seq_length)
    index = memory.build_index(embedder, progress=progress) if memory is not None else \
        build_index(settings, store, embedder, progress=progress)
    write_json_atomically(current_model_file(settings.home),
                          {"id": target["id"], "path": str(path), "time": utc_now()})
    store.make_current(target["id"])
    if memory is not None:
        memory.swap(embedder, index)
    logger.info("model switched", extra={"model_id": target["id"]})
    return target


def _rollback_target(store: Store, model_id: str | None) -> dict:
    if model_id:
        target = store.get_model(model_id)
        if target is None:
            raise GremlinError(f"no model '{model_id}' (or the prefix is ambiguous); see `gremlin models list`")
        return target
    models = {m["id"]: m for m in store.list_models()}
    current = next((m["id"] for m in models.values() if m["status"] == "current"), None)
    for used in reversed(store.model_history()):           # the most recently used one first
        if used != current and models.get(used, {}).get("status") in ("retired", "accepted"):
            return models[used]
    retired = [m for m in models.values() if m["status"] == "retired"]
    if not retired:
        raise GremlinError("there is no earlier model to roll back to; see `gremlin models list`")
    return retired[0]
