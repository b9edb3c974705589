"""A training run leaves the daemon's memory where it was: training and the held-out
evaluation (both models encoded, fusion calibrated) run in the training process, so the
daemon never loads the candidate, and what a run frees goes back to the OS."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

from config.settings import load_settings
from memory.store import Store
from self_training.feedback_loop import claim_trigger, manual_trigger, trigger_path, write_trigger_atomically
from self_training.trainer import Trainer
from tests.conftest import start_daemon, wait_for
from tests.test_e2e import search, stop, wait_ready
from tests.test_e2e_training import home_with_history
from tests.test_trainer import training_home

# Measured on a 2-core CPU box (README, "Training in a child process"): a rejected run used to
# leave the daemon 86 MiB larger (the candidate loaded, both models' held-out activations);
# now it ends within 1-2 MiB of idle. 30 MiB leaves room for allocator noise, not for a second
# model (MiniLM's weights alone are ~87 MiB).
RSS_TOLERANCE_MIB = 30
FINISHED = ("promoted", "accepted", "rejected", "failed")


def rss_mib(pid: int) -> int:
    """The resident set size of process `pid`, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def settled_rss_mib(pid: int, seconds: float = 3.0) -> int:
    """The RSS once it has stopped moving by more than 2 MiB for `seconds` (after a burst of work)."""
    last, since = rss_mib(pid), time.monotonic()
    deadline = since + 60
    while time.monotonic() < deadline and time.monotonic() - since < seconds:
        time.sleep(0.5)
        now = rss_mib(pid)
        if abs(now - last) > 2:
            last, since = now, time.monotonic()
    return rss_mib(pid)


def sample_rss(pid: int, into: list[int], done: threading.Event) -> None:
    """Append the RSS of `pid` to `into` every 0.2 s until `done` is set."""
    while not done.wait(0.2):
        into.append(rss_mib(pid))


def finished_run(home: Path) -> dict | None:
    store = Store(home / "data" / "gremlin.db", readonly=True)
    try:
        runs = store.recent_runs(1)
    finally:
        store.close()
    return runs[0] if runs and runs[0]["state"] in FINISHED else None


def model_loads(home: Path, model_id: str) -> list[tuple[int, str]]:
    """(line number, where) of each "model loaded" record for `model_id`: inside the training
    process's lifetime (its forwarded records) or outside it (the daemon itself)."""
    lines = [json.loads(line) for line in (home / "data" / "logs" / "system" / "gremlin.log").read_text().splitlines()]
    where, found = "daemon", []
    for number, record in enumerate(lines):
        if record["msg"] == "training process started":
            where = "child"
        elif record["msg"] == "training process ended":
            where = "daemon"
        elif record["msg"] == "model loaded" and record.get("model_id") == model_id:
            found.append((number, where))
    return found


def test_a_rejected_run_leaves_the_daemon_at_its_idle_size_and_never_loads_the_candidate(tmp_path):
    home = home_with_history(tmp_path, min_gain=1.0, max_seq_length=32)  # no model gains 1.0 MRR: rejected
    settings = load_settings(home)
    proc = start_daemon(home)
    try:
        base = wait_ready(home, proc)["model_id"]
        search(home, "the billing handler")  # the model is loaded and has encoded once
        idle = settled_rss_mib(proc.pid)
        peak, done = [idle], threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, done))
        sampler.start()
        try:
            write_trigger_atomically(trigger_path(settings), manual_trigger("rss"))
            run = wait_for(lambda: finished_run(home), 300, 0.5, "the training run to end")
        finally:
            done.set()
            sampler.join()
        assert run["state"] == "rejected", run["reason"]
        after = settled_rss_mib(proc.pid)
        assert after <= idle + RSS_TOLERANCE_MIB, f"idle {idle} MiB, peak {max(peak)} MiB, after {after} MiB"
        candidate = model_loads(home, run["model_id"])
        assert candidate and all(where == "child" for _, where in candidate), candidate
        assert any(where == "child" for _, where in model_loads(home, base))  # the child scored the current model too
    finally:
        assert stop(proc, timeout=60) == 0


def test_a_stop_during_evaluation_ends_the_child_and_queues_the_trigger_again(tmp_path):
    settings = load_settings(training_home(tmp_path))
    store = Store(settings.memory.db)
    trainer = Trainer(settings, store)
    seen = []

    def stop_when_evaluating(progress: dict) -> None:
        if progress.get("state") == "evaluating" and not seen:
            seen.extend(child.pid for child in multiprocessing.active_children())
            trainer.stop_event.set()                    # what the daemon's SIGTERM handler does

    trainer.on_progress = stop_when_evaluating
    outcome = trainer.run(manual_trigger("stop in evaluation"))
    assert seen and outcome.outcome == "failed" and outcome.reason.startswith("Interrupted")
    assert multiprocessing.active_children() == [] and trainer.state == "idle"
    assert claim_trigger(trigger_path(settings), tmp_path / "claim.json").note == "stop in evaluation"
    assert not (settings.run_dir / "checkpoints" / "models" / outcome.run_id).exists()
    store.close()


def test_a_training_process_killed_during_evaluation_is_a_failed_run(tmp_path):
    settings = load_settings(training_home(tmp_path))
    store = Store(settings.memory.db)
    killed = []

    def kill_when_evaluating(progress: dict) -> None:
        if progress.get("state") == "evaluating" and not killed:
            killed.extend(child.pid for child in multiprocessing.active_children())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    trainer = Trainer(settings, store)
    trainer.on_progress = kill_when_evaluating
    outcome = trainer.run(manual_trigger("oom in evaluation"), promote=False)
    assert killed and outcome.outcome == "failed" and "killed by SIGKILL" in outcome.reason
    run = store.get_run(outcome.run_id)
    assert run["state"] == "failed" and run["model_id"] is None and trainer.state == "idle"
    store.close()
