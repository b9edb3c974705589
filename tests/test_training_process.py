"""Fine-tuning runs in a spawned child process: the trainer gets its steps, logs and result
back, a killed child is a failed run with a clear reason, a stop ends the child, and the
process that asked for the run never imports the training-only stack."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

from config.settings import load_settings
from memory.store import Store
from self_training.feedback_loop import claim_trigger, manual_trigger, trigger_path
from self_training.trainer import Trainer

from tests.conftest import REPO, wait_for
from tests.test_trainer import training_home

# A run in a fresh interpreter, so that no other test's imports hide what the trainer imports.
RUN_IN_FRESH_PROCESS = textwrap.dedent("""
    import json, logging, os, sys
    from config.settings import load_settings
    from memory.store import Store
    from self_training.feedback_loop import manual_trigger
    from self_training.trainer import Trainer

    finished = []
    class Keep(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "fine-tuning finished":
                finished.append(record.process)
    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    settings = load_settings(sys.argv[1])
    store = Store(settings.memory.db)
    steps = []
    trainer = Trainer(settings, store)
    trainer.on_progress = lambda p: steps.append(p.get("step")) if p.get("phase") == "training" else None
    outcome = trainer.run(manual_trigger("in a child"), promote=False)
    run = store.get_run(outcome.run_id)
    heavy = ("datasets", "accelerate", "tensorboard", "torch.utils.tensorboard", "transformers.trainer")
    print(json.dumps({"outcome": outcome.outcome, "reason": outcome.reason, "pid": os.getpid(),
                      "trained_in": finished, "steps": steps, "progress": run["progress"],
                      "state": trainer.state, "loaded": [m for m in heavy if m in sys.modules],
                      "tensorboard": sorted(os.listdir(settings.data_dir / "runs"))}))
""")


def test_training_runs_in_another_process_and_the_parent_never_imports_the_training_stack(tmp_path):
    home = training_home(tmp_path, tensorboard=True)
    proc = subprocess.run([sys.executable, "-c", RUN_IN_FRESH_PROCESS, str(home)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["outcome"] == "accepted", result["reason"]       # the test gate accepts anything
    assert result["trained_in"] and result["pid"] not in result["trained_in"]  # the child's log record came back
    assert result["steps"] == [1, 2] and result["progress"]["step"] == 2  # every step reached the trainer
    assert result["state"] == "idle" and result["tensorboard"]     # TensorBoard was written by the child
    # `import sentence_transformers` (serving) pulls in datasets/accelerate/transformers.trainer by itself,
    # so what the parent must never load is what only training loads: TensorBoard's writer.
    assert "tensorboard" not in result["loaded"] and "torch.utils.tensorboard" not in result["loaded"]


def _children() -> list[int]:
    return [child.pid for child in multiprocessing.active_children()]


def test_a_killed_training_process_is_a_failed_run_with_a_clear_reason(tmp_path):
    settings = load_settings(training_home(tmp_path, max_steps=400))
    store = Store(settings.memory.db)
    killed = []

    def kill_the_child(progress: dict) -> None:
        if progress.get("phase") == "training" and not killed:
            killed.extend(_children())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)              # what the OOM killer does

    trainer = Trainer(settings, store)
    trainer.on_progress = kill_the_child
    outcome = trainer.run(manual_trigger("oom"), promote=False)
    assert killed and outcome.outcome == "failed"
    assert "killed by SIGKILL" in outcome.reason and "batch_size" in outcome.reason
    assert store.get_run(outcome.run_id)["state"] == "failed" and trainer.state == "idle"
    assert not (settings.run_dir / "checkpoints" / "models" / outcome.run_id).exists()
    assert _children() == []
    store.close()


def test_stopping_mid_training_ends_the_child_and_queues_the_trigger_again(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    settings = load_settings(training_home(tmp_path, max_steps=400))
    store = Store(settings.memory.db)
    trainer = Trainer(settings, store)
    seen = []

    def stop_after_a_step(progress: dict) -> None:
        if progress.get("phase") == "training" and not seen:
            seen.extend(_children())
            trainer.stop_event.set()                    # what the daemon's SIGTERM handler does

    trainer.on_progress = stop_after_a_step
    outcome = trainer.run(manual_trigger("stop me"))
    assert seen and outcome.outcome == "failed" and outcome.reason.startswith("Interrupted")
    assert _children() == [] and trainer.state == "idle"
    for pid in seen:
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, what=f"training process {pid} to be gone")
    requeued = claim_trigger(trigger_path(settings), tmp_path / "claim.json")
    assert requeued is not None and requeued.note == "stop me"
    ended = [r for r in caplog.records if r.getMessage() == "training process ended"]
    assert ended and ended[-1].exitcode == -signal.SIGTERM    # SIGTERM was enough
    store.close()
