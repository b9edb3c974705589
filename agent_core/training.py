"""Training and model commands for the CLI: through the daemon when it runs, here otherwise.

`gremlin train` queues a trigger (the daemon's trainer claims it); with no daemon, or
with `--now` and no daemon, the run happens in this process. `gremlin cycle` always runs
here, holding the trainer lock so the daemon's trainer waits. `gremlin models rollback`
asks the daemon to switch, so search answers throughout; with no daemon it switches the
pointer and builds the index here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone

from agent_core.control import DaemonUnavailable, request
from agent_core.daemon import running_pid
from memory.store import Store, utc_now
from self_training.feedback_loop import Trigger, manual_trigger, trigger_path, write_trigger_atomically
from self_training.finetune import TrainingSpec
from self_training.trainer import (
    OUTCOMES,
    RunOutcome,
    Trainer,
    TrainerBusy,
    TrainerLock,
    claimed_path,
    new_run_id,
    switch_model,
)

EXPERIMENTS = "experiments.jsonl"
# Exit codes of `gremlin train --wait` and `gremlin cycle` by how the run ended.
EXIT_CODES = {"promoted": 0, "accepted": 0, "rejected": 3, "failed": 1}


def queue_training(settings, note: str = "", force: bool = False) -> tuple[Trigger | dict, bool]:
    """Write a manual trigger (via the daemon when it runs); returns (trigger, daemon_took_it)."""
    trigger = manual_trigger(note or "requested with gremlin train", force=force)
    if running_pid(settings):
        try:
            return request(settings, "train", timeout=10, trigger=trigger.to_dict()), True
        except DaemonUnavailable:
            pass  # still starting: the file is enough, it polls it once ready
    return write_trigger_atomically(trigger_path(settings), trigger), False


def run_here(settings, trigger: Trigger | None = None, spec: TrainingSpec | None = None,
             promote: bool = True, progress: Callable[[dict], None] | None = None) -> RunOutcome:
    """Run one training cycle in this process, holding the trainer lock."""
    lock = TrainerLock(settings)
    if not lock.acquire():
        raise TrainerBusy(f"another process is training on this home ({lock.path} is locked); "
                          "wait for it (gremlin status) and try again")
    store = Store(settings.memory.db, settings.memory.synchronous)
    try:
        trainer = Trainer(settings, store)
        if progress:
            trainer.on_progress = progress
        if trigger is None:  # run the pending trigger, if any, else a manual one
            from self_training.feedback_loop import claim_trigger

            run_id = new_run_id()
            trigger = claim_trigger(trigger_path(settings), claimed_path(settings, run_id)) or \
                manual_trigger("gremlin train --now")
            return trainer.run(trigger, spec, promote, run_id=run_id)
        return trainer.run(trigger, spec, promote)
    finally:
        store.close()
        lock.release()


def wait_for_run(settings, since: str, progress: Callable[[dict], None] | None = None,
                 timeout_s: float = 24 * 3600, poll_s: float = 1.0) -> dict:
    """Wait for the first run started at or after `since` to end; returns its row."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = _run_since(settings, since)
        if run and run["state"] in OUTCOMES:
            return run
        if run and progress:
            progress({"state": run["state"], **run["progress"]})
        time.sleep(poll_s)
    raise TimeoutError(f"no training run ended within {timeout_s:.0f} s; see gremlin status")


def _run_since(settings, since: str) -> dict | None:
    if not settings.memory.db.exists():
        return None
    store = Store(settings.memory.db, readonly=True)
    try:
        runs = [r for r in store.recent_runs(20) if r["started"] >= since]
        return runs[-1] if runs else None
    finally:
        store.close()


def run_cycle(settings, seed: int, promote: bool = False,
              progress: Callable[[dict], None] | None = None) -> dict:
    """One deterministic dataset → train → evaluate → accept/reject cycle; logged to experiments.jsonl."""
    spec = TrainingSpec.from_settings(settings.training, seed=seed)
    trigger = manual_trigger(f"gremlin cycle --seed {seed}", force=True)
    outcome = run_here(settings, trigger, spec, promote=promote, progress=progress)
    record = {"time": utc_now(), "event": "cycle", "seed": seed, **outcome.to_dict(), "spec": spec.to_dict()}
    record.update(_dataset_facts(settings, outcome.run_id))
    path = settings.data_dir / EXPERIMENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def _dataset_facts(settings, run_id: str) -> dict:
    store = Store(settings.memory.db, readonly=True)
    try:
        run = store.get_run(run_id) or {}
    finally:
        store.close()
    return {"dataset": run.get("metrics", {}).get("dataset", {}),
            "decision": run.get("metrics", {}).get("decision", {})}


def list_models(settings) -> list[dict]:
    """Every model this home has registered, newest first."""
    if not settings.memory.db.exists():
        return []
    store = Store(settings.memory.db, readonly=True)
    try:
        return store.list_models()
    finally:
        store.close()


def show_model(settings, model_id: str) -> dict | None:
    """One model (by id or unique id prefix) with its lineage."""
    if not settings.memory.db.exists():
        return None
    store = Store(settings.memory.db, readonly=True)
    try:
        return store.get_model(model_id)
    finally:
        store.close()


def rollback(settings, model_id: str | None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Switch to a kept model (the previous one by default); via the daemon when it runs."""
    if running_pid(settings):
        return request(settings, "models.switch", timeout=3600, model_id=model_id)
    store = Store(settings.memory.db, settings.memory.synchronous)
    try:
        target = switch_model(settings, store, model_id, progress=progress)
        return {"id": target["id"], "path": target["path"]}
    finally:
        store.close()


def now_iso() -> str:
    """The current time in the store's timestamp format."""
    return utc_now(datetime.now(timezone.utc))
