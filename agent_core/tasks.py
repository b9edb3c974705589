"""The durable task queue: validate, submit, claim with a lease, run once, retry, cancel.

A task is one JSON object, `{"type": "...", ...}` (DESIGN.md). It is validated when it is
submitted (by `gremlin task add`, the dashboard, or a `*.json` file dropped into
`run/queue/inbox/`), so a malformed one is refused with one line naming the field and never
reaches a runner. Runners claim the due task with the highest priority in one `BEGIN
IMMEDIATE; UPDATE … RETURNING` and hold a lease they renew while it runs; a task whose
runner died (its lease ran out) is claimed again, and a runner that lost its lease cannot
record a result over the new attempt's (`finish_task` is fenced by the attempt number).
An inbox file is removed only after its task is committed; one that fails moves to
`run/queue/rejected/` beside a `.error` file saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from config.errors import GremlinError
from memory.atomic import fsync_dir
from memory.store import Store
from tools.shell_executor import ShellRefused, check_command

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
MAX_KEY_CHARS = 200
MAX_TASK_BYTES = 4 * 1024 * 1024  # a patch may be large; a task file bigger than this is refused
PRIORITIES = (-100, 100)
HEARTBEAT_S = 1.0

# Fields every task may carry, whatever its type: name -> (kind, required).
COMMON_FIELDS: dict[str, tuple[str, bool]] = {
    "type": ("str", True), "priority": ("int", False), "key": ("str", False), "max_attempts": ("int", False),
    "note": ("str", False), "rewrites": ("int", False),
}
# Each type's own fields. Kinds: str, int, number, bool, argv (a non-empty list of strings).
TYPE_FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "self_train": {"wait": ("bool", False)},
    "shell": {"cmd": ("argv", True), "cwd": ("str", False), "timeout_s": ("number", False)},
    "snapshot": {"message": ("str", False)},
    "rollback": {"target": ("str", True), "snapshot": ("str", False), "model": ("str", False)},
    "reindex": {},
    "mutate": {"patch": ("str", True), "verify": ("argv", False), "failure_id": ("int", False)},
    "replay": {"repo": ("str", True), "since": ("str", False), "merges": ("bool", False),
               "branches": ("bool", False)},
}
KIND_TEXT = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
             "argv": 'a non-empty list of strings (e.g. ["pytest", "-q"])'}


class TaskError(GremlinError):
    """A task is malformed, unknown, or cannot be found or changed."""


@dataclass(frozen=True)
class TaskSpec:
    """A validated task: its type, its payload (the type's fields and note/rewrites), and
    how it is queued."""

    type: str
    payload: dict
    priority: int | None = None
    key: str | None = None
    max_attempts: int | None = None


@dataclass(frozen=True)
class Submitted:
    """What submitting a task did: its id, and False in `created` when its key was seen before."""

    id: int
    created: bool

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"id": self.id, "created": self.created}


# -- validation ------------------------------------------------------------------------


def parse_task(raw: object, where: str = "task") -> TaskSpec:
    """Validate a decoded task object; raise TaskError naming the field and the fix."""
    if not isinstance(raw, dict):
        raise TaskError(f'{where}: must be a JSON object such as {{"type": "self_train"}} '
                        f"(got {type(raw).__name__})")
    task_type = raw.get("type")
    if task_type not in TYPE_FIELDS:
        raise TaskError(f"{where}: field 'type' must be one of {', '.join(TYPE_FIELDS)} (got {task_type!r})")
    fields = {**COMMON_FIELDS, **TYPE_FIELDS[task_type]}
    for name, value in raw.items():
        if name not in fields:
            raise TaskError(f"{where}: unknown field '{name}' for a {task_type} task; "
                            f"its fields are {', '.join(fields)}")
        _check_field(name, value, fields[name][0], where)
    for name, (_, required) in fields.items():
        if required and name not in raw:
            raise TaskError(f"{where}: field '{name}' is missing; a {task_type} task needs it "
                            f"({KIND_TEXT[fields[name][0]]})")
    _check_type_rules(task_type, raw, where)
    payload = {k: v for k, v in raw.items() if k not in ("type", "priority", "key", "max_attempts")}
    return TaskSpec(task_type, payload, raw.get("priority"), raw.get("key"), raw.get("max_attempts"))


def parse_task_text(text: str | bytes, where: str = "task") -> TaskSpec:
    """Validate a task given as JSON text."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TaskError(f'{where}: not valid JSON ({exc}); write one object such as {{"type": "self_train"}}') from exc
    return parse_task(raw, where)


def _check_field(name: str, value: object, kind: str, where: str) -> None:
    if not _is_kind(value, kind):
        raise TaskError(f"{where}: field '{name}' must be {KIND_TEXT[kind]} (got {json.dumps(value)[:80]})")
    if name == "priority" and not PRIORITIES[0] <= value <= PRIORITIES[1]:
        raise TaskError(f"{where}: field 'priority' must be from {PRIORITIES[0]} to {PRIORITIES[1]} (got {value})")
    if name == "max_attempts" and not 1 <= value <= 100:
        raise TaskError(f"{where}: field 'max_attempts' must be from 1 to 100 (got {value})")
    if name == "key" and not 0 < len(value) <= MAX_KEY_CHARS:
        raise TaskError(f"{where}: field 'key' must be 1 to {MAX_KEY_CHARS} characters")
    if name == "timeout_s" and not value > 0:
        raise TaskError(f"{where}: field 'timeout_s' must be above 0 (got {value})")


def _is_kind(value: object, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind == "argv":
        return (isinstance(value, list) and bool(value) and all(isinstance(v, str) and "\0" not in v for v in value)
                and bool(value[0].strip()))
    return isinstance(value, str) and "\0" not in value


def _check_type_rules(task_type: str, raw: dict, where: str) -> None:
    if task_type == "rollback":
        if raw["target"] not in ("files", "model"):
            raise TaskError(f"{where}: field 'target' must be \"files\" or \"model\" (got {raw['target']!r})")
        if raw["target"] == "files" and "snapshot" not in raw:
            raise TaskError(f"{where}: field 'snapshot' is missing; a files rollback names the snapshot to "
                            "restore (see `gremlin snapshot list`)")
    if task_type == "mutate" and not raw["patch"].strip():
        raise TaskError(f"{where}: field 'patch' is empty; give a unified diff")


# -- submitting ------------------------------------------------------------------------


def submit(store: Store, settings, spec: TaskSpec, source: str = "cli", key: str | None = None,
           retry_of: int | None = None, now: datetime | None = None) -> Submitted:
    """Queue a validated task (a key seen before returns the task it made, unchanged).

    What can be checked now is: a command outside `[shell] allow` is refused at once,
    not when a runner gets to it.
    """
    check_allowed(spec, settings)
    task_id, created = store.submit_task(
        spec.type, spec.payload, spec.priority, spec.max_attempts or settings.tasks.max_attempts,
        spec.key or key, source, retry_of, now=now)
    logger.info("task queued" if created else "task already queued under its key",
                extra={"task_id": task_id, "type": spec.type, "source": source})
    return Submitted(task_id, created)


def check_allowed(spec: TaskSpec, settings) -> None:
    """Refuse (TaskError naming the field) a command the shell executor would refuse."""
    for name in ("cmd", "verify"):
        if name in spec.payload:
            try:
                check_command(spec.payload[name], settings)
            except ShellRefused as exc:
                raise TaskError(f"task field '{name}': {exc}") from None


def retry(store: Store, settings, task_id: int, now: datetime | None = None) -> Submitted:
    """Queue a finished task again as a new task (same type and payload, `retry_of` its id)."""
    task = get(store, task_id)
    if task["state"] not in FINAL:
        raise TaskError(f"task {task_id} is {task['state']}; only a done, failed or cancelled task can be retried")
    spec = TaskSpec(task["type"], task["payload"], None if task["priority_auto"] else task["priority"],
                    None, task["max_attempts"])
    return submit(store, settings, spec, "retry", retry_of=task_id, now=now)


def cancel(store: Store, task_id: int, now: datetime | None = None) -> str:
    """Cancel a queued task, or ask a running one to stop; returns the task's state now."""
    state = store.cancel_task(task_id, now)
    if state is None:
        raise TaskError(f"no task {task_id}; see `gremlin task list`")
    logger.info("task cancel requested", extra={"task_id": task_id, "state": state})
    return state


def get(store: Store, task_id: int) -> dict:
    """One task, or TaskError naming the id."""
    task = store.get_task(task_id)
    if task is None:
        raise TaskError(f"no task {task_id}; see `gremlin task list`")
    return task


# -- the inbox -------------------------------------------------------------------------


@dataclass
class InboxResult:
    """What one pass over the inbox did."""

    queued: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def inbox_dir(settings) -> Path:
    """Where task files are dropped."""
    return settings.queue_dir / "inbox"


def rejected_dir(settings) -> Path:
    """Where task files that failed are kept, each beside a `.error` file."""
    return settings.queue_dir / "rejected"


def scan_inbox(store: Store, settings, now: datetime | None = None) -> InboxResult:
    """Queue every `*.json` file in the inbox (oldest first); quarantine those that fail.

    Writers should write a temporary name and rename it to `*.json` when complete. A file's
    task gets the key `inbox:<name>:<sha256>:<mtime>` unless it names one, so a file seen
    again after a crash (committed, not yet removed) is queued once.
    """
    result = InboxResult()
    folder = inbox_dir(settings)
    try:
        entries = sorted((e for e in os.scandir(folder) if e.name.endswith(".json") and not e.name.startswith(".")),
                         key=lambda e: (e.stat(follow_symlinks=False).st_mtime_ns, e.name))
    except FileNotFoundError:
        return result
    for entry in entries:
        _take_inbox_file(store, settings, Path(entry.path), result, now)
    if result.queued or result.duplicates or result.rejected:
        fsync_dir(folder)
    return result


def _take_inbox_file(store: Store, settings, path: Path, result: InboxResult, now: datetime | None) -> None:
    try:
        st = path.lstat()
        if not path.is_file() or path.is_symlink():
            raise TaskError(f"{path.name}: not a regular file; drop a JSON file, not a link or folder")
        if st.st_size > MAX_TASK_BYTES:
            raise TaskError(f"{path.name}: {st.st_size} bytes, above the {MAX_TASK_BYTES} a task may have")
        data = path.read_bytes()
        spec = parse_task_text(data, f"task file {path.name}")
        key = f"inbox:{path.name}:{hashlib.sha256(data).hexdigest()[:16]}:{st.st_mtime_ns}"
        submitted = submit(store, settings, spec, "inbox", key=key, now=now)
    except FileNotFoundError:
        return  # taken by another pass meanwhile
    except (TaskError, OSError) as exc:
        result.rejected.append(quarantine(settings, path, str(exc)))
        return
    path.unlink(missing_ok=True)
    (result.queued if submitted.created else result.duplicates).append(submitted.id)


def quarantine(settings, path: Path, reason: str) -> str:
    """Move an inbox file to `rejected/` beside `<name>.error` holding `reason`; returns its new name."""
    folder = rejected_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    if target.exists() or target.with_name(target.name + ".error").exists():
        target = folder / f"{path.stem}.{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}{path.suffix}"
    target.with_name(target.name + ".error").write_text(reason + "\n", encoding="utf-8")
    os.replace(path, target)
    fsync_dir(folder)
    logger.warning("task file rejected", extra={"file": path.name, "moved_to": str(target), "reason": reason})
    return target.name


# -- running ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskOutcome:
    """How one attempt of a task ended: its final state (done, failed, cancelled), its result,
    an error text, whether a failure may be retried, and the memory it becomes."""

    state: str
    result: dict = field(default_factory=dict)
    error: str | None = None
    retryable: bool = False
    memory: tuple[str, str, dict] | None = None


@dataclass
class RunningTask:
    """A claimed task as its handler sees it: the row, and an event set when it must stop
    (cancelled, timed out, or the daemon is stopping)."""

    row: dict
    stop: threading.Event = field(default_factory=threading.Event)
    why_stopped: str = ""

    @property
    def id(self) -> int:
        """The task id."""
        return self.row["id"]

    def request_stop(self, why: str) -> None:
        """Ask the handler to stop (the first reason wins)."""
        if not self.stop.is_set():
            self.why_stopped = why
            self.stop.set()


Execute = Callable[[RunningTask], TaskOutcome]


def retry_time(settings, attempts: int, now: datetime | None = None) -> datetime:
    """When a failed attempt runs again: retry_backoff_s, doubling with each attempt."""
    now = now or datetime.now(timezone.utc)
    return now + timedelta(seconds=settings.tasks.retry_backoff_s * 2 ** max(0, attempts - 1))


class TaskRunner:
    """Worker threads that claim tasks, keep their leases, run them and record the outcome."""

    def __init__(self, settings, store: Store, execute: Execute, stop: threading.Event | None = None,
                 on_finished: Callable[[dict, TaskOutcome, int | None], None] | None = None):
        self.settings = settings
        self.store = store
        self.execute = execute
        self.stop_event = stop or threading.Event()
        self.on_finished = on_finished
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.running: dict[int, RunningTask] = {}
        self.worker_id = os.getpid()

    def start(self) -> None:
        """Start the configured number of worker threads."""
        for n in range(self.settings.tasks.workers):
            thread = threading.Thread(target=self._loop, name=f"gremlin-task-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """A task was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask running tasks to stop, and wait for the workers (a stopped task runs again later)."""
        self.stop_event.set()
        for task in list(self.running.values()):
            task.request_stop("the daemon is stopping")
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def describe(self) -> dict:
        """Counts by state and the tasks running now, for status."""
        return {"counts": self.store.task_counts(),
                "running": [{"id": t.id, "type": t.row["type"], "started": t.row["started"]}
                            for t in list(self.running.values())]}

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                row = self.store.claim_task(self.worker_id, self.settings.tasks.lease_s)
            except Exception:  # noqa: BLE001 - a locked or failing database: back off, try again
                logger.exception("claiming a task failed")
                row = None
                self.stop_event.wait(5.0)
            if row is None:
                self._wake.wait(self.settings.tasks.inbox_poll_s)
                self._wake.clear()
                continue
            self.run_one(row)

    def run_one(self, row: dict) -> TaskOutcome:
        """Run one claimed task with a heartbeat, then record its outcome (fenced by attempt)."""
        task = RunningTask(row)
        self.running[task.id] = task
        logger.info("task started", extra={"task_id": task.id, "type": row["type"], "attempt": row["attempts"]})
        beat = threading.Thread(target=self._heartbeat, args=(task,), name=f"gremlin-lease-{task.id}", daemon=True)
        beat.start()
        try:
            outcome = self._execute(task)
        finally:
            self.running.pop(task.id, None)
            task.stop.set()  # ends the heartbeat
            beat.join()
        self._record(task, outcome)
        return outcome

    def _execute(self, task: RunningTask) -> TaskOutcome:
        try:
            outcome = self.execute(task)
        except GremlinError as exc:  # refused on purpose: a retry would be refused too
            outcome = TaskOutcome("failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - an unexpected error: recorded, retried, never fatal
            logger.exception("task raised", extra={"task_id": task.id, "type": task.row["type"]})
            outcome = TaskOutcome("failed", error=f"{type(exc).__name__}: {exc}", retryable=True)
        if task.why_stopped == "the daemon is stopping" and outcome.state != "done":
            # not the task's fault: it runs again when the daemon is back
            outcome = TaskOutcome("failed", outcome.result, "interrupted: the daemon stopped", retryable=True,
                                  memory=outcome.memory)
        return outcome

    def _record(self, task: RunningTask, outcome: TaskOutcome) -> None:
        row = task.row
        retry_at = None
        if outcome.state == "failed" and outcome.retryable and row["attempts"] < row["max_attempts"]:
            retry_at = retry_time(self.settings, row["attempts"])
        if task.why_stopped == "the daemon is stopping" and outcome.retryable:
            retry_at = datetime.now(timezone.utc)  # not an attempt that counts against backoff
        ours, memory_id = self.store.finish_task(task.id, row["attempts"], outcome.state, outcome.result,
                                                 outcome.error, retry_at, outcome.memory)
        if not ours:
            logger.warning("task result dropped: its lease ran out and it was claimed again",
                           extra={"task_id": task.id, "attempt": row["attempts"]})
            return
        state = "queued" if retry_at else outcome.state
        logger.info("task ended", extra={"task_id": task.id, "type": row["type"], "state": state,
                                         "error": outcome.error, "reward": outcome.result.get("reward"),
                                         "retry_at": retry_at.isoformat() if retry_at else None})
        if self.on_finished and not retry_at:
            self.on_finished(row, outcome, memory_id)

    def _heartbeat(self, task: RunningTask) -> None:
        """Renew the lease every second (well inside lease_s), which also notices a cancel
        request soon; stop the task when cancelled, lost or running too long."""
        cfg = self.settings.tasks
        deadline = time.monotonic() + cfg.timeout_s
        while not task.stop.wait(min(cfg.lease_s / 3, HEARTBEAT_S)):
            try:
                cancel = self.store.renew_lease(task.id, task.row["attempts"], cfg.lease_s)
            except Exception:  # noqa: BLE001 - try again at the next beat; the lease has slack
                logger.exception("renewing a task lease failed", extra={"task_id": task.id})
                continue
            if cancel is None:
                task.request_stop("its lease was lost")
            elif cancel:
                task.request_stop("cancelled")
            elif time.monotonic() > deadline:
                task.request_stop(f"timed out after [tasks] timeout_s = {cfg.timeout_s:g} s")
