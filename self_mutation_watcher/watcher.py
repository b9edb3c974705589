"""Watch folders with watchdog, debounce per path, and record each change durably.

The watchdog handler only turns raw events into `Hint`s and enqueues them (inside
try/except: an exception in a handler would kill the observer thread silently). One
worker thread owns all change processing: it waits until a path has been quiet for the
debounce window, asks the ChangeDetector what changed, commits the events to SQLite and
only then hands them to the memory sink to be embedded. Because every check compares
the disk with the recorded state, a path seen twice never makes two events, and the
start-up scan (reconcile) finds whatever changed while Gremlin was not running.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pathspec
from watchdog.events import (EVENT_TYPE_CLOSED, EVENT_TYPE_CREATED, EVENT_TYPE_DELETED,
                             EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED, FileSystemEvent,
                             FileSystemEventHandler)

from config.errors import GremlinError
from memory.paths import display_path
from memory.store import FileState, NewEvent, StoredEvent, Store, utc_now
from self_mutation_watcher.diff_engine import ChangeDetector, ShadowStore
from self_mutation_watcher.observers import ObserverSet

logger = logging.getLogger(__name__)
audit = logging.getLogger("gremlin.audit")

BATCH_PATHS = 64  # small batches: encoding of one overlaps diffing of the next
RETRY_MAX_S = 30.0
RETRY_LIMIT = 5  # a file still changing after this many checks is recorded as it is
SHADOW_REDACTION = "shadow.redaction"  # marker: the fingerprint of the patterns the shadow is redacted with
RESTART_RETRY_S = 1.0  # a failed observer restart (the tree changed under it) is tried again after this
# Gremlin's own log files: watching them would make every event log a new event.
OWN_LOG_PREFIXES = ("gremlin.log", "bootstrap.log")
_CHANGE_TYPES = (EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_DELETED, EVENT_TYPE_MOVED,
                 EVENT_TYPE_CLOSED)


class WatchError(GremlinError):
    """A root cannot be watched."""


@dataclass(frozen=True)
class Hint:
    """A path worth checking; `scan` means a whole directory subtree; `moved_from` a rename."""

    path: str
    scan: bool = False
    moved_from: str | None = None


def hints_from_event(event: FileSystemEvent) -> list[Hint]:
    """The paths a raw watchdog event asks to check (none for opens and reads)."""
    if event.event_type not in _CHANGE_TYPES:
        return []
    src = os.fsdecode(event.src_path)
    dest = os.fsdecode(event.dest_path) if event.event_type == EVENT_TYPE_MOVED else None
    if event.is_directory:
        # A directory's own "modified" says nothing; created/moved/deleted ones may carry files.
        if event.event_type == EVENT_TYPE_MODIFIED:
            return []
        return [Hint(p, scan=True) for p in (src, dest) if p]
    return [Hint(src), Hint(dest, moved_from=src)] if dest else [Hint(src)]


class PathFilter:
    """Which paths under the roots are watched, and which of them are logs.

    Besides ordinary roots there are file roots: the folders of `[watch] log_files` that
    no ordinary root covers, where only the named files count and nothing below is entered.
    """

    def __init__(self, settings, roots: Sequence[Path]):
        w = settings.watch
        self.named_logs = frozenset(w.log_files)
        covered = outermost(roots)
        self.file_roots = frozenset(p.parent for p in self.named_logs
                                    if not any(r == p.parent or r in p.parents for r in covered))
        self.roots = tuple(outermost([*roots, *sorted(self.file_roots)]))
        self.include = pathspec.GitIgnoreSpec.from_lines(w.include)
        self.exclude = pathspec.GitIgnoreSpec.from_lines(w.exclude)
        self.logs = pathspec.GitIgnoreSpec.from_lines(w.log_globs)
        m = settings.memory
        self.ignored = (settings.run_dir, m.shadow_dir, m.index_dir)
        self.data_dir, self.log_dir = settings.data_dir, settings.logging.dir
        self.db_names = {m.db.name + s for s in ("", "-wal", "-shm", "-journal")}
        self.db_dir = m.db.parent
        # str forms of the above: the checks run for every event, and Path.parents is slow
        self._ignored_text = tuple(str(d) for d in self.ignored)
        self._db_dir_text, self._data_dir_text = str(self.db_dir), str(self.data_dir)
        self._log_dir_text, self._own_log_dir_text = str(self.log_dir), str(self.log_dir / "system")
        self.gitignored = {r: load_gitignore(r, self.exclude) for r in self.roots
                           if w.gitignore and r not in self.file_roots}

    def root_of(self, path: Path) -> Path | None:
        """The watched root that holds `path`."""
        text = str(path)
        return next((r for r in self.roots if _within(text, str(r))), None)

    def accepts_dir(self, path: Path, root: Path) -> bool:
        """Whether a scan should descend into this directory."""
        if root in self.file_roots:
            return path == root
        rel = _relative(path, root)
        return not self._own_state(path) and not (rel and self._ignored(rel + "/", root))

    def accepts(self, path: Path, root: Path) -> bool:
        """Whether a file's changes are recorded."""
        if root in self.file_roots:
            return path in self.named_logs
        rel = _relative(path, root)
        if not rel or self._own_state(path) or self._ignored(rel, root):
            return False
        return self.include.match_file(rel)

    def is_log(self, path: Path) -> bool:
        """Whether the file is followed as a log rather than diffed."""
        return path in self.named_logs or self.logs.match_file(path.name)

    def _ignored(self, rel: str, root: Path) -> bool:
        spec = self.gitignored.get(root)
        return self.exclude.match_file(rel) or bool(spec and spec.match_file(rel))

    def _own_state(self, path: Path) -> bool:
        """Gremlin's own runtime files (db, shadow copies, indexes, its own logs)."""
        text = str(path)
        if any(_within(text, d) for d in self._ignored_text):
            return True
        parent = os.path.dirname(text)
        if parent == self._db_dir_text and path.name in self.db_names:
            return True
        if parent == self._own_log_dir_text and path.name.startswith(OWN_LOG_PREFIXES):
            return True
        if _within(text, self._data_dir_text):
            log_side = _within(text, self._log_dir_text) or path in self.log_dir.parents
            return not log_side
        return False


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (both absolute, as str(Path) writes them)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def require_roots(settings, path_filter: PathFilter | None = None) -> None:
    """Raise WatchError naming the first watched path that is not a folder (checked before
    the daemon loads its model, so a typo costs no wait)."""
    path_filter = path_filter or PathFilter(settings, settings.watch_roots)
    for root in path_filter.roots:
        if root.is_dir():
            continue
        where = "log_files" if root in path_filter.file_roots else "roots"
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise WatchError(f"watched path {display_path(root)} {what}; give the folder to watch (create it if "
                         f"needed), or remove it from [watch] {where} in {settings.config_file} (or from --watch)")


def load_gitignore(root: Path, exclude: pathspec.GitIgnoreSpec) -> pathspec.GitIgnoreSpec:
    """Every .gitignore under `root` (and .git/info/exclude) as one spec relative to the root."""
    lines: list[str] = []
    info = root / ".git" / "info" / "exclude"
    if info.is_file():
        lines += info.read_text(errors="replace").splitlines()
    for top, dirs, files in os.walk(root):
        rel = Path(top).relative_to(root).as_posix()
        dirs[:] = [d for d in dirs if not exclude.match_file(f"{d}/" if rel == "." else f"{rel}/{d}/")]
        if ".gitignore" in files:
            text = (Path(top) / ".gitignore").read_text(errors="replace")
            lines += [_rebase_pattern(line, "" if rel == "." else rel) for line in text.splitlines()]
    return pathspec.GitIgnoreSpec.from_lines(line for line in lines if line)


def _rebase_pattern(line: str, folder: str) -> str:
    """A pattern of the .gitignore in `folder`, rewritten relative to the root."""
    line = line.rstrip()
    if not line or line.startswith("#") or not folder:
        return "" if line.startswith("#") else line
    negate, body = (True, line[1:]) if line.startswith("!") else (False, line)
    anchored = "/" in body.rstrip("/")  # a slash before the end ties it to its own folder
    body = f"{folder}/{body.lstrip('/')}" if anchored else f"{folder}/**/{body}"
    return ("!" if negate else "") + body


def outermost(roots: Sequence[Path]) -> list[Path]:
    """Roots in their given order, without duplicates or roots nested in another one."""
    unique = list(dict.fromkeys(Path(r) for r in roots))
    return [r for r in unique if not any(o in r.parents for o in unique)]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() if path != root else ""
    except ValueError:
        return ""


class _EnqueueHandler(FileSystemEventHandler):
    """Turns watchdog events into hints; never raises (that would kill the observer)."""

    def __init__(self, put: Callable[[Hint], None]):
        self._put = put

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            for hint in hints_from_event(event):
                self._put(hint)
        except Exception:  # noqa: BLE001 - the observer thread must survive anything
            logger.exception("could not enqueue a file event", extra={"event": repr(event)})


class _Item(NamedTuple):
    """One path to check, the root it belongs to, options for ChangeDetector.check."""

    path: Path
    root: Path
    options: dict
    gone: bool = False  # a scan expected it and did not find it


@dataclass
class WatchStats:
    """Counters shown by `gremlin status`."""

    events: int = 0
    checked: int = 0
    errors: int = 0
    skipped: int = 0  # changes the database refused, each logged
    retried: int = 0
    last_error: str | None = None
    reconciled: dict = field(default_factory=dict)
    reconcile_seconds: dict = field(default_factory=dict)


class _OverflowSignal(logging.Handler):
    """watchdog only logs a kernel queue overflow; turn that log line into a reconcile."""

    def __init__(self, on_overflow: Callable[[], None]):
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower():
            self.on_overflow()


class Watcher:
    """The observers, the debounce queue and the worker that records changes."""

    def __init__(self, settings, store: Store, sink: Callable[[list[StoredEvent]], object],
                 roots: Sequence[Path] | None = None):
        self.settings = settings
        self.store = store
        self.sink = sink
        self.filter = PathFilter(settings, roots if roots is not None else settings.watch_roots)
        self.shadow = ShadowStore(settings.memory.shadow_dir)
        self.detector = ChangeDetector(store, self.shadow, settings.watch, settings.memory.memory_chars,
                                       is_log=self.filter.is_log)
        w = settings.watch
        self.debounce_s, self.max_wait_s = w.debounce_ms / 1000, w.max_wait_ms / 1000
        self.reconcile_s = w.reconcile_interval_s
        self.stats = WatchStats()
        self.missing: dict[str, str] = {}  # root -> since when it is gone
        self._root_ids: dict[Path, tuple[int, int] | None] = {}
        self.observers = ObserverSet(_EnqueueHandler(self._put), self.filter.accepts_dir)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[Hint, tuple[float, float]] = {}  # hint -> (first seen, last seen)
        self._retries: dict[str, int] = {}
        self._worker = threading.Thread(target=self._run, name="gremlin-watcher", daemon=True)
        self._idle = threading.Event()
        self._started_ns = 0
        self._next_reconcile = float("inf")
        self._overflow = _OverflowSignal(self.request_reconcile)

    @property
    def roots(self) -> tuple[Path, ...]:
        """The roots actually watched."""
        return self.filter.roots

    def start(self) -> None:
        """Check the roots, start observing, then reconcile every root in the worker."""
        require_roots(self.settings, self.filter)
        self._redact_shadow_copies()
        self._started_ns = time.time_ns()
        self._root_ids = {root: root_identity(root) for root in self.roots}
        logging.getLogger("watchdog.observers.inotify").addHandler(self._overflow)
        try:
            self.observers.start(list(self.roots))
        except OSError as exc:
            raise WatchError(f"cannot watch {self.roots}: {exc}") from exc
        self.request_reconcile()  # after the observers: a change during the scan is not missed
        self._worker.start()

    def _redact_shadow_copies(self) -> None:
        """Redact shadow copies written before redaction covered them (or with other patterns)."""
        redactor = self.detector.redactor
        if not redactor.patterns or self.store.get_marker(SHADOW_REDACTION) == redactor.fingerprint:
            return
        changed = self.shadow.rewrite(self.detector.shadow_copy)
        self.store.set_marker(SHADOW_REDACTION, redactor.fingerprint)
        if changed:
            logger.info("secrets redacted from existing shadow copies", extra={"copies": changed})

    def stop(self, timeout: float = 30.0) -> None:
        """Stop observing, process every pending change at once, stop the worker."""
        self.observers.stop(timeout)
        logging.getLogger("watchdog.observers.inotify").removeHandler(self._overflow)
        self._queue.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker that records every change is running."""
        return self._worker.is_alive()

    def request_reconcile(self) -> None:
        """Compare every root with the recorded state soon (overflow, observer restart, schedule)."""
        for root in self.roots:
            self._put(Hint(str(root), scan=True))

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or pending (for tests and benchmarks)."""
        return self._idle.wait(timeout)

    @property
    def pending(self) -> int:
        """Paths waiting for their debounce window."""
        return len(self._pending)

    def describe(self) -> dict:
        """Watcher facts for `gremlin status`."""
        return {"events": self.stats.events, "checked": self.stats.checked, "errors": self.stats.errors,
                "skipped": self.stats.skipped,
                "last_error": self.stats.last_error, "pending": self.pending,
                "degraded": dict(self.observers.degraded), "missing": dict(self.missing),
                "observer_restarts": self.observers.restarts,
                "watches": self.observers.watch_count, "reconciled": dict(self.stats.reconciled),
                "reconcile_seconds": dict(self.stats.reconcile_seconds)}

    def _put(self, hint: Hint) -> None:
        self._queue.put(hint)

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        self._restart_after = 0.0
        self._next_reconcile = time.monotonic() + self.reconcile_s if self.reconcile_s else float("inf")
        while not (stopping and not self._pending):
            stopping = self._absorb(self._next_timeout()) or stopping
            due = []
            try:
                self._supervise(time.monotonic(), stopping)
                due = self._take_due(time.monotonic(), flush=stopping)
                if due:
                    self._process(due)
            except Exception as exc:  # noqa: BLE001 - this thread records every change: it must not die
                self._error(f"watcher step failed, checking its paths again: {exc}", exc)
                time.sleep(min(RETRY_MAX_S, 1.0 * self.stats.errors))
                for hint in due:  # checking is idempotent: the disk is compared with the record
                    self._queue.put(hint)
            if self._pending or not self._queue.empty():
                self._idle.clear()
            else:
                self._idle.set()
        logger.info("watcher stopped", extra={"events": self.stats.events})

    def _supervise(self, now: float, stopping: bool) -> None:
        """Restart dead observers, run the scheduled reconcile and prune shadow copies."""
        if stopping:
            return
        self._check_roots()
        if not self.observers.healthy() and now >= self._restart_after:
            try:
                self.observers.restart()
            except OSError as exc:  # the tree changed under the restart; plan and try again shortly
                self._restart_after = now + RESTART_RETRY_S
                logger.error("restarting the observers failed; trying again", extra={"error": str(exc)})
                return
            self.request_reconcile()
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.reconcile_s
            self.request_reconcile()
            removed = self.shadow.prune(self.store.file_shas())
            if removed:
                logger.info("pruned shadow copies no file refers to", extra={"removed": removed})

    def _check_roots(self) -> None:
        """A root that went away is left as recorded (no flood of deletes); once it is back,
        moved back or made again, it is watched afresh and reconciled."""
        for root in self.roots:
            now_id = root_identity(root)
            if now_id == self._root_ids.get(root):
                continue
            if now_id is None or self._looks_unmounted(root):
                self._root_ids[root] = None
                if str(root) not in self.missing:
                    self.missing[str(root)] = utc_now()
                    logger.warning("a watched root disappeared (or is an empty mount point now); its changes "
                                   "are recorded when it is back", extra={"root": str(root)})
                continue
            self._root_ids[root] = now_id
            self.missing.pop(str(root), None)
            logger.info("a watched root is there again; watching and reconciling it", extra={"root": str(root)})
            try:
                self.observers.rewatch(root)
            except OSError as exc:  # it went again meanwhile: the next check sees that
                self._root_ids[root] = None
                logger.warning("cannot watch the root yet", extra={"root": str(root), "error": str(exc)})
                continue
            self._put(Hint(str(root), scan=True))

    def _looks_unmounted(self, root: Path) -> bool:
        """An empty folder in place of a root whose files are recorded: an unmounted mount point
        (or a root made again, not yet filled). Recording every file as deleted would be wrong."""
        try:
            with os.scandir(root) as entries:
                if next(entries, None) is not None:
                    return False
        except OSError:
            return True
        return self.store.has_files_under(str(root))

    def _root_unchanged(self, root: Path) -> bool:
        """Whether `root` is still the folder being watched (not gone, not replaced)."""
        known = self._root_ids.get(root)
        return known is not None and root_identity(root) == known

    def _next_timeout(self) -> float:
        now = time.monotonic()
        due = self._next_reconcile
        if self._pending:
            due = min(due, min(min(last + self.debounce_s, first + self.max_wait_s)
                               for first, last in self._pending.values()))
        return max(0.0, min(1.0, due - now))
    def _absorb(self, timeout: float) -> bool:
        """Move queued hints into the pending map; True once the stop marker arrives."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        stop = False
        while True:
            if item is None:
                stop = True
            else:
                now = time.monotonic()
                first = self._pending.get(item, (now, now))[0]
                self._pending[item] = (first, now)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return stop

    def _take_due(self, now: float, flush: bool = False) -> list[Hint]:
        due = [h for h, (first, last) in self._pending.items()
               if flush or now - last >= self.debounce_s or now - first >= self.max_wait_s]
        for hint in due:
            del self._pending[hint]
        return due

    def _process(self, hints: list[Hint]) -> None:
        started = time.monotonic()
        checks: dict[str, _Item] = {}
        moves: dict[str, str] = {}
        baselines: list[Path] = []
        for hint in sorted(hints, key=lambda h: not h.scan):  # a file's own hint wins over a scan
            if hint.moved_from:
                moves[hint.path] = hint.moved_from
            try:
                checks.update((str(item.path), item) for item in self._expand(hint, baselines))
            except sqlite3.OperationalError:
                raise  # the database is busy or full: the whole step is tried again
            except Exception as exc:  # noqa: BLE001 - one bad path; the scheduled reconcile covers it
                self._error(f"cannot check {display_path(hint.path)}: {exc}", exc)
        for group in _batches(checks, moves):
            self._check_batch(group, moves)
        for hint in hints:
            if hint.scan and Path(hint.path) in self.roots:
                self.stats.reconcile_seconds[hint.path] = round(time.monotonic() - started, 3)
        for root in baselines:  # only once every file of the first scan is recorded
            self.store.mark_root_baselined(str(root))
            logger.info("baseline of a new root recorded", extra={"root": str(root)})

    def _expand(self, hint: Hint, baselines: list[Path]) -> Iterator[_Item]:
        """What to check for a hint: one file, or every file of a subtree."""
        path = Path(hint.path)
        root = self.filter.root_of(path)
        if root is None or not self._root_unchanged(root):  # a root coming back is reconciled whole
            return
        if not hint.scan:
            if self.filter.accepts(path, root):  # after RETRY_LIMIT tries, take it as it is
                yield _Item(path, root, {"accept_changing": self._retries.get(str(path), 0) > RETRY_LIMIT})
            return
        if path != root and path.is_dir():  # a folder appeared: watch it if no watch covers it
            self.observers.ensure_watched(path, root)
        elif path != root:  # a folder went away: drop its watches
            self.observers.forget(path)
        before = None
        if path == root:
            since, baselined = self.store.root_watched_since(str(root), self._started_ns)
            if not baselined:  # the first scan (again, if a crash cut it short): older files are a baseline
                before = since
                baselines.append(root)
        known = self.store.file_states_under(str(path))
        for file in self._walk(path, root):
            yield _Item(file, root, {"trust_stat": True, "baseline_before_ns": before,
                                     "prev": known.pop(str(file), None), "known": True})
        for gone, state in known.items():  # recorded but no longer on disk
            yield _Item(Path(gone), root, {"prev": state, "known": True}, gone=True)
        self.stats.reconciled[str(path)] = utc_now()

    def _walk(self, directory: Path, root: Path) -> Iterator[Path]:
        """Files under `directory` that the filter accepts; symlinks are not followed."""
        def warn(exc: OSError) -> None:
            logger.warning("cannot list directory, skipping it",
                           extra={"path": exc.filename, "error": exc.strerror})
        for top, dirs, files in os.walk(directory, onerror=warn):
            top_path = Path(top)
            dirs[:] = [d for d in dirs if self.filter.accepts_dir(top_path / d, root)]
            for name in files:
                if self.filter.accepts(top_path / name, root):
                    yield top_path / name

    def _check_batch(self, items: list[_Item], moves: dict[str, str]) -> None:
        events: list[NewEvent] = []
        states: list[FileState] = []
        outcomes = self.detector.check_many([(path, root, options) for path, root, options, _ in items])
        for (path, *_), outcome in zip(items, outcomes, strict=True):
            self.stats.checked += 1
            if isinstance(outcome, Exception):  # one bad file must not stop the watcher
                self._error(f"checking {display_path(path)} failed: {outcome}", outcome)
                continue
            if outcome.retry:
                self._retry(path)
            events.extend(outcome.events)
            if outcome.state:
                states.append(outcome.state)
        events = pair_moves(events, moves, self.detector.merge_move)
        # A root that went away (or was replaced) while its files were checked: its files
        # were not deleted. Nothing of it is recorded now; it is reconciled once it is back.
        moved = {e.root for e in events if e.kind == "deleted" and not self._root_unchanged(Path(e.root))}
        if moved:
            events = [e for e in events if e.root not in moved]
            states = [s for s in states if s.root not in moved]
        self._commit(events, states, [Hint(str(item.path)) for item in items])

    def _retry(self, path: Path) -> None:
        """Check a file that changed while being read again once it is quiet (a few times)."""
        tries = self._retries.get(str(path), 0) + 1
        self.stats.retried += 1
        self._retries[str(path)] = tries
        if tries > RETRY_LIMIT:
            logger.warning("file keeps changing while read; recording it as it is now",
                           extra={"path": str(path), "tries": tries})
        self._put(Hint(str(path)))

    def _commit(self, events: list[NewEvent], states: list[FileState], retry: list[Hint]) -> None:
        """Durable first: commit, then embed. A failed commit re-queues its paths; an event
        the database refuses by itself is skipped (logged and counted), never the batch."""
        try:
            stored = self._record(events, states)
        except sqlite3.OperationalError as exc:  # e.g. disk full, I/O error: retry later, lose nothing
            self._error(f"recording {len(events)} events failed, will retry: {exc}", exc)
            time.sleep(min(RETRY_MAX_S, 1.0 * self.stats.errors))
            for hint in retry:
                self._queue.put(hint)
            return
        except Exception:  # noqa: BLE001 - one bad item: record the others one by one
            stored = self._record_each(events, states)
        self.stats.events += len(stored)
        for ev in events:
            self._retries.pop(ev.path, None)
        for s in stored:
            audit.info("mutation stored", extra={"event_id": s.event_id, "memory_id": s.memory_id,
                                                 "change": s.event.kind, "path": s.event.path,
                                                 "sha": s.event.new_sha or s.event.old_sha})
        if stored:
            try:
                self.sink(stored)
            except Exception as exc:  # noqa: BLE001 - rows are safe; catch-up embeds them later
                self._error(f"embedding {len(stored)} memories failed: {exc}", exc)

    def _record(self, events: list[NewEvent], states: list[FileState]) -> list[StoredEvent]:
        if states:
            self.store.save_file_states(states)
        return self.store.record_events(events, self.settings.watch.log_repeat_window_s) if events else []

    def _record_each(self, events: list[NewEvent], states: list[FileState]) -> list[StoredEvent]:
        """Record events and states one at a time, skipping (and counting) those that fail: a
        skipped file keeps its old recorded state, so the next reconcile tries it again."""
        stored = []
        for ev in events:
            stored += self._record_or_skip([ev], [], ev.path)
        for state in states:
            self._record_or_skip([], [state], state.path)
        return stored

    def _record_or_skip(self, events: list[NewEvent], states: list[FileState], path: str) -> list[StoredEvent]:
        try:
            return self._record(events, states)
        except Exception as exc:  # noqa: BLE001 - logged with its path; the rest goes on
            self.stats.skipped += 1
            self._error(f"cannot record the change of {display_path(path)}; left for the next reconcile: {exc}", exc)
            return []

    def _error(self, message: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = message
        logger.error(message, exc_info=exc)


def root_identity(root: Path) -> tuple[int, int] | None:
    """(device, inode) of a root folder; None when it is not there."""
    try:
        st = os.stat(root)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _batches(checks: dict[str, _Item], moves: dict[str, str]) -> Iterator[list[_Item]]:
    """Check items in batches of BATCH_PATHS; whatever may pair into a move shares the first.

    That is both sides of each reported rename and, when a scan found files gone, those
    and the files it had never seen (a rename made while nobody watched pairs by content).
    """
    paired = {p for dest, src in moves.items() for p in (dest, src) if dest in checks and src in checks}
    if any(item.gone for item in checks.values()):
        paired |= {p for p, item in checks.items()
                   if item.gone or (item.options.get("known") and item.options.get("prev") is None)}
    head = [checks[p] for p in checks if p in paired]
    rest = [checks[p] for p in checks if p not in paired]
    if head:
        yield head
    for start in range(0, len(rest), BATCH_PATHS):
        yield rest[start:start + BATCH_PATHS]


def pair_moves(events: list[NewEvent], moves: dict[str, str],
               merge: Callable[[NewEvent, NewEvent], NewEvent]) -> list[NewEvent]:
    """Turn a delete and a create that are one rename into a single `moved` event.

    A rename watchdog reported pairs by path; any other delete and create of the same
    content in one batch (a rename while Gremlin was stopped) pairs by content hash.
    """
    deleted = {e.path: e for e in events if e.kind == "deleted"}
    created = {e.path: e for e in events if e.kind == "created"}
    merged: dict[str, NewEvent] = {}
    used: set[str] = set()
    for dest, src in moves.items():
        if dest in created and src in deleted:
            merged[dest] = merge(deleted[src], created[dest])
            used |= {dest, src}
    by_sha = {e.old_sha: e for e in deleted.values() if e.path not in used and e.old_sha}
    for dest, came in created.items():
        gone = by_sha.pop(came.new_sha, None) if dest not in used and came.new_sha else None
        if gone is not None:
            merged[dest] = merge(gone, came)
            used |= {dest, gone.path}
    return [merged.get(e.path, e) for e in events if e.path not in used or e.path in merged]
