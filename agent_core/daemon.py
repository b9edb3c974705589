"""Start and stop everything: lock, store, model, memory, watcher, control socket.

Signals only set a flag. The main thread waits on it, saving the index now and then;
on stop it tells systemd `STOPPING=1`, closes the control socket, lets the watcher
record every pending change, saves the index, closes the database and exits 0.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from agent_core.control import ControlServer
from agent_core.service import Notifier, plan_reload
from agent_core import tasks as task_queue
from agent_core.tasks import TaskOutcome, TaskRunner, scan_inbox
from agent_core.tool_executor import ToolExecutor
from agents.planner_agent import Planner
from config.errors import GremlinError
from config.settings import is_loopback, load_settings, notify_socket, secure_home, watchdog_interval_s
from memory.retention import apply_policy, last_summary
from memory.service import EmbedQueue, Memory
from memory.store import Store, utc_now
from memory.vector_store.embedder import Embedder
from self_mutation_watcher.mutation_daemon import MutationDaemon
from self_mutation_watcher.watcher import Watcher, require_roots
from self_training.feedback_loop import FeedbackLoop, parse_trigger, trigger_path, write_trigger_atomically
from self_training.generate_dataset import DATASET_DIR, HELDOUT_FILE, TRAIN_FILE, NewPairCounter
from self_training.replay import GitSync
from self_training.trainer import Trainer, TrainerLock, recover_interrupted_runs, switch_model
from tools.reward_model import RewardModel
from tools.shell_executor import ShellRefused, check_command, run_command

logger = logging.getLogger(__name__)

LOCK_NAME = "gremlin.pid"
RECENT_EVENTS = 5
CATCH_UP_INTERVAL_S = 60.0  # memories other processes added (replay, cycle) get embedded


class AlreadyRunning(GremlinError):
    """Another daemon holds this home's lock."""


class RetentionBusy(GremlinError):
    """A training run, model switch or reindex is under way; retention waits for it."""


def lock_path(settings) -> Path:
    """The lock file that also holds the running daemon's pid."""
    return settings.run_dir / LOCK_NAME


class PidLock:
    """An exclusive flock on `run/gremlin.pid`; released by the kernel if the process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise AlreadyRunning naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="ascii")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            handle.close()
            raise AlreadyRunning(
                f"a Gremlin daemon (pid {pid}) is already running on this home ({self.path.parent.parent}); "
                f"stop it first (kill {pid}), or start this one with another --home") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Empty the pid file and drop the lock."""
        if self._handle:
            self._handle.truncate(0)
            self._handle.close()
            self._handle = None


def running_pid(settings) -> int | None:
    """The pid of the daemon holding this home's lock, or None when none runs."""
    path = lock_path(settings)
    try:
        handle = open(path, encoding="ascii")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def sd_notify(message: str) -> bool:
    """Send a notification to systemd when run as a Type=notify service."""
    address = notify_socket()
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        logger.warning("systemd notification failed", extra={"error": str(exc)})
        return False


class Daemon:
    """One daemon process on one home."""

    def __init__(self, settings, extra_roots: tuple[Path, ...] = ()):
        self.settings = settings
        self.extra_roots = tuple(extra_roots)  # `--watch`: kept across a reload of the config
        self.state = "starting"
        self.started = utc_now()
        self._stop = threading.Event()
        self._signals = 0
        self.store: Store | None = None
        self.memory: Memory | None = None
        self.watcher: Watcher | None = None
        self.embedding: EmbedQueue | None = None
        self.trainer: Trainer | None = None
        self.tasks: TaskRunner | None = None
        self.scheduler = None
        self.feedback: FeedbackLoop | None = None
        self.mutations: MutationDaemon | None = None
        self.notifier = Notifier(sd_notify, watchdog_interval_s(), active=notify_socket() is not None)
        self._reload = threading.Event()
        self._retention_lock = threading.Lock()  # the schedule and `gremlin retention` take turns

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: ask the main loop to stop; a second signal forces an exit."""
        self._signals += 1
        if self._signals > 1:
            raise SystemExit(128 + (signum or signal.SIGINT))
        logger.info("stop requested", extra={"signal": signum})
        self._stop.set()

    def request_reload(self, signum=None, frame=None) -> None:
        """SIGHUP handler: ask the main loop to read the config again."""
        self._reload.set()

    def reload(self) -> None:
        """Read the config again: apply what can change live, log what needs a restart; a bad one is refused."""
        self._reload.clear()
        self.notifier.reloading()
        try:
            new = load_settings(self.settings.home).with_extra_roots(self.extra_roots)
            check_commands(new)
            RewardModel(new)  # a config the next start would refuse is refused now
        except GremlinError as exc:
            logger.error("config reload refused; the running config stays", extra={"error": str(exc)})
        else:
            self._apply_settings(new)
        finally:
            self.notifier.ready(self._status_line())  # systemd leaves "reloading" whatever happened

    def _apply_settings(self, new) -> None:
        """Hand the reloaded settings to every part that reads them as it runs."""
        plan = plan_reload(self.settings, new)
        executor = self.tasks.execute
        for part in (self, self.trainer, self.planner, self.tasks, executor, executor.kernel, executor.snapshots,
                     self.feedback, self.feedback.count_new_pairs, self.mutations):
            if part is not None:
                part.settings = plan.settings
        self.planner.bounds = plan.settings.planner
        logger.info("config reloaded", extra={"applied": list(plan.applied), "file": str(new.config_file)})
        if plan.pending:
            logger.warning("needs a restart: %s", ", ".join(plan.pending), extra={"keys": list(plan.pending)})
        logging.getLogger().setLevel(plan.settings.logging.level)  # last: a quieter level still logs the reload

    def healthy(self) -> bool:
        """Whether the parts that must never stop still run: the watcher's worker and the scheduler."""
        return bool(self.watcher is not None and self.watcher.alive and self.scheduler is not None
                    and self.scheduler.running)

    def _status_line(self) -> str:
        """The one line `systemctl status` shows: roots, trainer state, queue."""
        queued = self.store.task_counts().get("queued", 0)
        return f"watching {len(self.watcher.roots)} roots; trainer {self.trainer.state}; {queued} tasks queued"

    def _tick(self) -> None:
        """Once a second in the main loop: reload when asked, tell systemd we are alive and what we do."""
        if self._reload.is_set():
            self.reload()
        self.notifier.tick(self.healthy(), self._status_line)

    def run(self) -> int:
        """Start everything, serve until stopped, shut down cleanly; returns the exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)  # before the slow start: an early HUP must not kill it
        os.umask(0o077)  # whatever it writes (models, datasets, indexes) is its user's alone
        with ExitStack() as stack:
            lock = PidLock(lock_path(self.settings))
            lock.acquire()
            stack.callback(lock.release)
            self._start(stack)
            if not self._stop.is_set():
                self.state = "ready"
                self.notifier.ready(self._status_line())
                logger.info("daemon ready", extra={"pid": os.getpid(),
                                                   "roots": [str(r) for r in self.watcher.roots]})
            while not self._stop.wait(1.0):
                self.memory.save_index()
                self.memory.maintain_index()
                self._tick()
            self.state = "stopping"
            sd_notify("STOPPING=1")
            logger.info("daemon stopping")
        logger.info("daemon stopped")
        return 0

    def _start(self, stack: ExitStack) -> None:
        s = self.settings
        t0 = time.monotonic()
        require_roots(s)  # before the model loads: a typo in a root costs no wait
        check_commands(s)
        rewards = RewardModel(s)  # a bad [reward] plugin stops the start before the model loads
        tightened = secure_home(s)
        if tightened:
            logger.warning("made the home private: folders 0700, files 0600 (other users could read them)",
                           extra={"paths": len(tightened), "examples": [str(p) for p in tightened[:5]]})
        self.store = Store(s.memory.db, s.memory.synchronous)
        stack.callback(self.store.close)
        recover_interrupted_runs(s, self.store)  # before the model pointer is read
        embedder = Embedder.from_settings(s)
        self.memory = Memory(s, self.store, embedder)
        stack.callback(self.memory.save_index, force=True)
        logger.info("model and index ready", extra={"model_id": embedder.model_id,
                                                    "index_size": self.memory.index.ntotal,
                                                    "seconds": round(time.monotonic() - t0, 2)})
        self._caught_up_to = self.store.newest_memory_id()
        self.memory.catch_up()
        self.embedding = EmbedQueue(self.memory)
        self.embedding.start()
        stack.callback(self.embedding.stop)  # after the watcher has handed over its last events
        self.watcher = Watcher(s, self.store, self.embedding.submit)
        self.watcher.start()
        stack.callback(self.watcher.stop)
        self.trainer = Trainer(s, self.store, self.memory, stop=self._stop)
        self.planner = Planner(s, self.store)
        self.trainer.planner = self.planner
        executor = ToolExecutor(s, self.store, self.memory, wake_trainer=self._wake_trainer, rewards=rewards)
        self.tasks = TaskRunner(s, self.store, executor, on_finished=self._task_finished)
        self._start_scheduler(stack)
        self.tasks.start()
        stack.callback(self.tasks.stop)  # before the scheduler and the store: a stopped task runs again later
        ops = {"status": self.status, "search": self.search, "train": self.train,
               "models.switch": self.switch_model, "tasks.wake": self.tasks.wake, "retention": self.retention}
        control = ControlServer(s, ops)
        control.start()
        stack.callback(control.stop)
        if s.dashboard.enabled:
            self._start_dashboard(stack, ops)

    def _start_dashboard(self, stack: ExitStack, ops: dict) -> None:
        """Serve the web dashboard with the control socket's ops; one that cannot start never stops the daemon."""
        cfg = self.settings.dashboard
        if not is_loopback(cfg.host):
            logger.warning("the dashboard listens beyond this machine (allow_remote = true): anyone who can reach "
                           "it and has the token can run tasks", extra={"host": cfg.host, "port": cfg.port})
        try:
            from dashboard.server import DashboardServer  # the daemon composes the process; the dashboard sits above

            server = DashboardServer(self.settings, ops)
            server.start()
        except (GremlinError, OSError) as exc:
            logger.error("dashboard not started; the daemon runs on without it", extra={"error": str(exc)})
            return
        except Exception:  # noqa: BLE001 - a broken dashboard (say, an install without its files) is not fatal
            logger.exception("dashboard not started; the daemon runs on without it")
            return
        stack.callback(server.stop)  # first to stop: it calls the other parts
        logger.info("dashboard ready: %s", server.url, extra={"port": self.settings.dashboard.port})

    def _start_scheduler(self, stack: ExitStack) -> None:
        """APScheduler jobs: the trainer polls its trigger, the rules run, git commits are synced."""
        from apscheduler.schedulers.background import BackgroundScheduler

        cfg, store = self.settings.training, self.store
        feedback = self.feedback = FeedbackLoop(self.settings, store, NewPairCounter(store, self.settings),
                                                self.memory.drift.state)
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        jobs = (("trainer.poll", self.trainer.poll, cfg.poll_interval_s),
                ("feedback.check", feedback.check, cfg.check_interval_s),
                ("git.sync", GitSync(store, self.settings).run, cfg.check_interval_s),
                ("memory.catch_up", self._catch_up_new, CATCH_UP_INTERVAL_S),
                ("tasks.inbox", self._take_inbox, self.settings.tasks.inbox_poll_s),
                ("planner.order_queue", self.planner.order_queue, cfg.check_interval_s),
                ("memory.retention", self._retention_job, self.settings.retention.interval_s))
        if self.settings.mutation.enabled:
            mutations = self.mutations = MutationDaemon(self.settings, store, self._search_dicts,
                                                        self._run_proposer, self._submit)
            jobs += (("mutation.propose", mutations.check, cfg.check_interval_s),)
        for job_id, func, seconds in jobs:
            self.scheduler.add_job(_guarded(job_id, func), "interval", seconds=seconds, id=job_id, name=job_id)
        self.scheduler.start()
        stack.callback(self.scheduler.shutdown)  # waits for a running job; the trainer stops at its next step

    def _take_inbox(self) -> None:
        """Queue the task files dropped into run/queue/inbox/ and wake a runner."""
        if scan_inbox(self.store, self.settings).queued:
            self.tasks.wake()

    def _task_finished(self, row: dict, outcome: TaskOutcome, memory_id: int | None) -> None:
        """Embed the memory a finished task became."""
        if memory_id is not None and outcome.memory:
            self.embedding.submit_memories([(memory_id, outcome.memory[1])])

    def _search_dicts(self, query: str, k: int) -> list[dict]:
        return [hit.to_dict() for hit in self.memory.search(query, k)]

    def _run_proposer(self, argv, request: bytes) -> tuple[bool, str, str]:
        """Run the mutation proposer (allowlisted, in a watched root) with the request on stdin."""
        ran = run_command(argv, self.settings, timeout_s=self.settings.mutation.proposer_timeout_s, input_bytes=request)
        return ran.ok, ran.stdout, "" if ran.ok else f"exit {ran.exit_code}: {ran.stderr[-500:]}"

    def _submit(self, raw: dict) -> int:
        """Queue a task made inside the daemon, and wake a runner."""
        submitted = task_queue.submit(self.store, self.settings, task_queue.parse_task(raw), "mutation")
        self.tasks.wake()
        return submitted.id

    def _wake_trainer(self) -> None:
        """Have the trainer look for its trigger now rather than at its next poll."""
        if self.scheduler is not None:
            self.scheduler.modify_job("trainer.poll", next_run_time=datetime.now(timezone.utc))

    def _catch_up_new(self) -> None:
        """Embed memories other processes added since the last pass (the start-up pass saw the rest)."""
        newest = self.store.newest_memory_id()
        self.memory.catch_up(after_id=self._caught_up_to)
        self._caught_up_to = newest

    def train(self, trigger: dict) -> dict:
        """Control op: queue a retrain trigger and wake the trainer."""
        written = write_trigger_atomically(trigger_path(self.settings),
                                           parse_trigger(json.dumps(trigger), Path("<control request>")))
        self._wake_trainer()
        return written.to_dict()

    def switch_model(self, model_id: str | None = None) -> dict:
        """Control op: roll back (or forward) to a kept model; search answers throughout."""
        if self.trainer.state != "idle":
            raise GremlinError(f"a training run is in progress ({self.trainer.state}); "
                               "wait for it to end (gremlin status) and try again")
        target = switch_model(self.settings, self.store, model_id, self.memory)
        return {"id": target["id"], "path": target["path"]}

    def search(self, query: str, k: int = 10, kind: str | None = None, mode: str = "hybrid") -> list[dict]:
        """Control op: search memory with the loaded model, live index and full-text index."""
        return [hit.to_dict() for hit in self.memory.search(query, int(k), kind, mode)]

    def status(self) -> dict:
        """Control op: live state for `gremlin status`."""
        w = self.watcher
        return {
            "running": True, "pid": os.getpid(), "state": self.state, "started": self.started,
            "home": str(self.settings.home), "roots": [str(r) for r in w.roots],
            "pending": w.pending, "embedding": self.embedding.waiting, "watcher": w.describe(),
            "counts": self.store.counts(), **self.memory.describe(),
            "recent_events": self.store.recent_events(RECENT_EVENTS),
            "failures": self.store.failure_counts(RECENT_EVENTS),
            "training": self.trainer.describe(),
            "tasks": self.tasks.describe(),
            "retention": last_summary(self.store),
        }

    def retention(self, dry_run: bool = False) -> dict:
        """Control op: apply [retention] now (dry_run: only count); the live index drops the evicted ids."""
        if not dry_run and any(t["type"] == "reindex" for t in self.tasks.describe()["running"]):
            raise RetentionBusy("a reindex task is running; retention waits for it to end (gremlin task list)")
        with self._retention_lock:
            return apply_retention(self.settings, self.store, self.memory, bool(dry_run))

    def _retention_job(self) -> None:
        """Scheduled: apply [retention] when it sets a limit; while the trainer is busy, wait for the next time."""
        if not self.settings.retention.limited_kinds:
            return
        try:
            self.retention()
        except RetentionBusy as exc:
            logger.info("retention put off to its next interval", extra={"reason": str(exc)})
        except Exception:  # noqa: BLE001 - nothing more is evicted this time; the daemon goes on
            logger.exception("retention failed; memories are kept until its next interval. See the cause "
                             "below, check [retention] in the config, and try `gremlin retention --dry-run`")


def dataset_files(settings) -> tuple[Path, Path]:
    """The dataset files (train, held out) whose pairs' memories retention keeps."""
    folder = settings.data_dir / DATASET_DIR
    return folder / TRAIN_FILE, folder / HELDOUT_FILE


def apply_retention(settings, store: Store, memory: Memory | None = None, dry_run: bool = False) -> dict:
    """Apply [retention] now, holding the trainer lock: no run embeds memories meanwhile (a vector
    stored for a memory just deleted would fail it). A dry run deletes nothing and needs no lock."""
    if dry_run:
        return apply_policy(settings, store, memory, dataset_files(settings), dry_run=True)
    lock = TrainerLock(settings)
    if not lock.acquire():
        raise RetentionBusy(f"a training run or model switch holds {lock.path}; retention waits for it to end "
                            "(gremlin status), then try again")
    try:
        return apply_policy(settings, store, memory, dataset_files(settings))
    finally:
        lock.release()


def check_commands(settings) -> None:
    """The configured verify and proposer commands must be allowed (a clear error at start)."""
    named = [("verify", settings.mutation.verify)]
    if settings.mutation.enabled:
        named.append(("proposer", settings.mutation.proposer))
    for key, argv in named:
        if argv:
            try:
                check_command(argv, settings)
            except ShellRefused as exc:
                raise GremlinError(f"[mutation] {key}: {exc}") from None


def _guarded(job_id: str, func):
    """A scheduler job that logs its failure and lets the next run try again."""
    def job():
        try:
            func()
        except Exception:  # noqa: BLE001 - one bad run of a job never stops the daemon
            logger.exception("scheduled job failed", extra={"job": job_id})
    return job
