"""Runs one claimed task by its type, scores it, and turns it into a memory.

One handler per type (DESIGN.md task contract): `self_train`, `shell`, `snapshot`,
`rollback` (files or model), `reindex`, `mutate` (a unified diff through the kernel) and
`replay`. A handler returns (state, result, error); the executor adds the reward model's
score and the memory the outcome becomes: a `task` memory, or a `failure` memory when it
failed. Result text is redacted before it is stored, so secrets a command printed stay out
of the database. Paths from tasks stay inside the watched roots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable

from agent_core.kernel import Kernel
from agent_core.snapshot import Snapshots
from agent_core.tasks import RunningTask, TaskError, TaskOutcome
from config.errors import GremlinError
from self_mutation_watcher.redact import Redactor
from self_training.feedback_loop import Trigger, iso_utc, trigger_path, write_trigger_atomically
from self_training.replay import replay_repository
from self_training.trainer import switch_model
from tools.reward_model import Outcome, RewardModel, parse_pytest_summary
from tools.shell_executor import confine_cwd, run_command

logger = logging.getLogger(__name__)

RUN_ENDED = ("promoted", "accepted", "rejected", "failed")
WAIT_POLL_S = 1.0
RESULT_TEXT_KEYS = ("stdout", "stderr", "reason", "error")

Handler = Callable[[RunningTask], tuple[str, dict, str | None]]


class ToolExecutor:
    """The daemon's task executor: `executor(task)` runs it and returns its TaskOutcome."""

    def __init__(self, settings, store, memory=None, wake_trainer: Callable[[], None] | None = None,
                 rewards: RewardModel | None = None):
        self.settings = settings
        self.store = store
        self.memory = memory
        self.wake_trainer = wake_trainer or (lambda: None)
        self.rewards = rewards or RewardModel(settings)  # a bad reward plugin fails here, at start
        self.snapshots = Snapshots(settings, store)
        self.kernel = Kernel(settings, store, self.snapshots)
        self.redactor = Redactor.build(settings.watch.redact, settings.watch.redact_patterns)
        self.handlers: dict[str, Handler] = {
            "self_train": self.self_train, "shell": self.shell, "snapshot": self.snapshot,
            "rollback": self.rollback, "reindex": self.reindex, "mutate": self.mutate, "replay": self.replay}

    def __call__(self, task: RunningTask) -> TaskOutcome:
        """Run the task's handler, then score and describe what happened."""
        started = time.monotonic()
        handler = self.handlers.get(task.row["type"])
        if handler is None:
            raise TaskError(f"task {task.id}: no handler for type {task.row['type']!r}")
        try:
            state, result, error = handler(task)
        except GremlinError as exc:  # refused: a clear reason, no retry
            state, result, error = "failed", {}, str(exc)
        if task.stop.is_set() and task.why_stopped and state != "done":
            state, error = ("cancelled" if task.why_stopped == "cancelled" else "failed"), error or task.why_stopped
        result = self._redacted({**result, "seconds": round(time.monotonic() - started, 3)})
        error = self.redactor.redact(error)[0] if error else error
        result["reward"], result["reward_components"] = self._score(task, state, result)
        return TaskOutcome(state, result, error, memory=self._memory(task, state, result, error))

    # -- handlers: each returns (state, result, error) ----------------------------------

    def self_train(self, task: RunningTask) -> tuple[str, dict, str | None]:
        """Write a forced trigger naming this task; with `wait`, end when its run ends."""
        if not self.settings.training.enabled:
            raise GremlinError("training is off ([training] enabled = false in the config); turn it on to "
                               "run self_train tasks")
        note = task.row["payload"].get("note") or f"self_train task {task.id}"
        trigger = Trigger("task", iso_utc(), note, (), True, (task.id,))
        written = write_trigger_atomically(trigger_path(self.settings), trigger)
        self.wake_trainer()
        if not task.row["payload"].get("wait"):
            return "done", {"trigger": written.to_dict()}, None
        run = self._wait_for_run(task)
        if run is None:
            return "failed", {"trigger": written.to_dict()}, task.why_stopped or "the run did not end"
        result = {"run_id": run["id"], "outcome": run["state"], "reason": run.get("reason"),
                  "model_id": run.get("model_id"), **_run_metrics(run)}
        return ("failed" if run["state"] == "failed" else "done"), result, run.get("error")

    def _wait_for_run(self, task: RunningTask) -> dict | None:
        """The finished run whose trigger carried this task, or None when told to stop first."""
        while not task.stop.wait(WAIT_POLL_S):
            for run in self.store.recent_runs(20):
                if task.id in (run.get("trigger") or {}).get("task_ids", []) and run["state"] in RUN_ENDED:
                    return run
        return None

    def shell(self, task: RunningTask) -> tuple[str, dict, str | None]:
        """Run the command (allowlist, confined cwd, timeout, capped output)."""
        payload = task.row["payload"]
        ran = run_command(payload["cmd"], self.settings, payload.get("cwd"), payload.get("timeout_s"), task.stop)
        result = ran.to_dict()
        tests = parse_pytest_summary(ran.stdout + "\n" + ran.stderr)
        if tests:
            result["tests"] = tests
        if ran.ok:
            return "done", result, None
        why = ("timed out" if ran.timed_out else "cancelled" if ran.cancelled
               else f"exited with code {ran.exit_code}")
        return "failed", result, f"{' '.join(ran.argv)} {why}"

    def snapshot(self, task: RunningTask) -> tuple[str, dict, str | None]:
        """Snapshot the watched roots and the current-model pointer."""
        info = self.snapshots.create(task.row["payload"].get("message") or f"task {task.id}")
        return "done", info.to_dict(), None

    def rollback(self, task: RunningTask) -> tuple[str, dict, str | None]:
        """Restore a snapshot's files (undoable), or switch to a kept model."""
        payload = task.row["payload"]
        if payload["target"] == "files":
            return "done", self.snapshots.restore(payload["snapshot"]).to_dict(), None
        target = switch_model(self.settings, self.store, payload.get("model"), self.memory)
        return "done", {"model_id": target["id"], "path": target["path"]}, None

    def reindex(self, task: RunningTask) -> tuple[str, dict, str | None]:
        """Rebuild the live index from the database while search keeps answering."""
        if self.memory is None:
            raise GremlinError("reindex needs the daemon's memory; run it as a queued task")
        return "done", self.memory.reindex(), None

    def mutate(self, task: RunningTask) -> tuple[str, dict, str | None]:
        """Apply a patch through the kernel: snapshot, apply, verify, keep or roll back."""
        payload = task.row["payload"]
        outcome = self.kernel.apply(payload["patch"], payload.get("verify"), task.stop)
        result = outcome.to_dict()
        return ("done", result, None) if outcome.kept else ("failed", result, outcome.reason)

    def replay(self, task: RunningTask) -> tuple[str, dict, str | None]:
        """Store a repository's history (the repository must lie inside the watched roots)."""
        payload = task.row["payload"]
        repo = confine_cwd(payload["repo"], self.settings)
        done = replay_repository(self.store, self.settings, repo, payload.get("since"),
                                 merges=payload.get("merges", True), branches=payload.get("branches"))
        return "done", dataclasses.asdict(done), None

    # -- scoring and memory ------------------------------------------------------------

    def _score(self, task: RunningTask, state: str, result: dict) -> tuple[float, dict]:
        output = f"{result.get('stdout', '')}\n{result.get('stderr', '')}"
        verify = result.get("verify") or {}
        if verify:
            output += f"\n{verify.get('stdout', '')}\n{verify.get('stderr', '')}"
        gain = result.get("gain")
        confidence = None if gain is None else min(1.0, max(0.0, 0.5 + 5 * gain))
        outcome = Outcome(task.row["type"], state, result.get("exit_code", verify.get("exit_code")),
                          float(result.get("seconds", 0.0)), output, confidence)
        reward, components = self.rewards.score(outcome, self.store)
        return round(float(reward), 4), components

    def _memory(self, task: RunningTask, state: str, result: dict, error: str | None) -> tuple[str, str, dict]:
        """(kind, text, meta) of the memory this outcome becomes."""
        row = task.row
        payload = {k: v for k, v in row["payload"].items() if k != "patch"}
        head = f"{row['type']} task {task.id} {state}: {json.dumps(payload, sort_keys=True, ensure_ascii=False)}"
        if error:
            head += f"\nerror: {error}"
        body = _summary(result)
        if row["type"] == "mutate":
            body = f"{body}\npatch:\n{row['payload']['patch']}"
        text = self.redactor.redact(f"{head}\n{body}")[0][:self.settings.tasks.keep_memory_chars]
        meta = {"task_id": task.id, "type": row["type"], "state": state, "reward": result.get("reward"),
                "label": f"task {task.id} ({row['type']}, {state})"}
        if row["type"] in ("mutate", "rollback"):
            meta["by_gremlin"] = True
        if row["type"] == "mutate":
            meta["files"] = result.get("files", [])
        return ("failure" if state == "failed" else "task"), text, meta

    def _redacted(self, result: dict) -> dict:
        """The result with secrets in its text fields (and the verify command's) replaced."""
        out = dict(result)
        for key in RESULT_TEXT_KEYS:
            if isinstance(out.get(key), str):
                out[key] = self.redactor.redact(out[key])[0]
        if isinstance(out.get("argv"), list):
            out["argv"] = [self.redactor.redact(a)[0] for a in out["argv"]]
        if isinstance(out.get("verify"), dict):
            out["verify"] = self._redacted(out["verify"])
        return out


def _run_metrics(run: dict) -> dict:
    """The gate's numbers of a finished run (empty when it never got that far)."""
    metrics = run.get("metrics") or {}
    decision = metrics.get("decision") or {}
    out = {"metrics_before": metrics.get("before"), "metrics_after": metrics.get("after")}
    if "gain" in decision:
        out["gain"] = decision["gain"]
    return out


def _summary(result: dict) -> str:
    """The part of a result a person searching memory wants: output tails and key numbers."""
    parts = []
    for key in ("stdout", "stderr"):
        text = (result.get(key) or "").strip()
        if text:
            parts.append(f"{key}:\n{text[-800:]}")
    verify = result.get("verify") or {}
    for key in ("stdout", "stderr"):
        text = (verify.get(key) or "").strip()
        if text:
            parts.append(f"verify {key}:\n{text[-800:]}")
    small = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) and k not in ("stdout", "stderr")
             and len(str(v)) < 200}
    parts.insert(0, json.dumps(small, sort_keys=True, ensure_ascii=False, default=str))
    return "\n".join(parts)
