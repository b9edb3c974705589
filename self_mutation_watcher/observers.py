"""Schedule watchdog watches that skip excluded directories, and keep them alive.

inotify needs one watch per directory, and watchdog's recursive watch takes every
directory below a root before any filter runs, so `.git/`, `node_modules/` or `.venv/`
would eat the watch budget. `plan_watches` splits a root into recursive watches over
subtrees that hold no excluded directory with subdirectories, plus non-recursive
watches on the folders above them. When inotify runs out of watches (ENOSPC; watchdog
raises it for a root but silently skips subdirectories, so the kernel's own count of
watches is checked too) or cannot be used, the affected root falls back to watchdog's
polling observer and the degraded state is reported. A dead observer is restarted.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileDeletedEvent, FileModifiedEvent, FileMovedEvent)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 2.0
# The events the watcher acts on. Asking inotify for no others leaves out opens and
# read-only closes (every read, the watcher's own included): two thirds of the events of
# a burst of edits, each parsed by watchdog in Python.
WATCHED_EVENTS = (FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileDeletedEvent, DirDeletedEvent,
                  FileMovedEvent, DirMovedEvent, FileClosedEvent)
INOTIFY_FIX = ("raise the limit: sudo sysctl fs.inotify.max_user_watches=524288 (and add it to "
               "/etc/sysctl.d/ to keep it), or exclude large folders in [watch] exclude")


@dataclass(frozen=True)
class PlannedWatch:
    """One watchdog schedule: a folder, recursive or not."""

    path: Path
    recursive: bool


def plan_watches(root: Path, accepts_dir: Callable[[Path], bool]) -> list[PlannedWatch]:
    """Watches covering `root` that leave out excluded folders which have subfolders."""
    return _plan(root, accepts_dir)[0]


def _plan(directory: Path, accepts_dir) -> tuple[list[PlannedWatch], bool]:
    children, clean = [], True
    for sub in _subdirs(directory):
        if not accepts_dir(sub):
            clean = clean and not _subdirs(sub)  # a leaf like __pycache__ costs one watch: keep it
            continue
        plan, sub_clean = _plan(sub, accepts_dir)
        children.append(plan)
        clean = clean and sub_clean
    if clean:
        return [PlannedWatch(directory, True)], True
    return [PlannedWatch(directory, False)] + [w for plan in children for w in plan], False


def _subdirs(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def count_dirs(watches: list[PlannedWatch]) -> int:
    """inotify watches the plan needs: one per folder of each recursive subtree."""
    total = 0
    for w in watches:
        total += 1
        if w.recursive:
            total += sum(len(dirs) for _, dirs, _ in os.walk(w.path))
    return total


def inotify_watch_count(pid: int | str = "self") -> int | None:
    """The kernel's count of this process's inotify watches (None when unreadable)."""
    total, found = 0, False
    try:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as handle:
                    lines = [line for line in handle if line.startswith("inotify wd:")]
            except OSError:
                continue
            if lines:
                found = True
                total += len(lines)
    except OSError:
        return None
    return total if found else 0


class ObserverSet:
    """The inotify observer (and a polling one for degraded roots), supervised."""

    def __init__(self, handler, accepts_dir: Callable[[Path, Path], bool], poll_interval_s: float = POLL_INTERVAL_S):
        self.handler = handler
        self.accepts_dir = accepts_dir
        self.poll_interval_s = poll_interval_s
        self.degraded: dict[str, str] = {}  # root -> why it is polled
        self.restarts = 0
        self._plans: dict[Path, list[PlannedWatch]] = {}
        self._watches: dict[Path, tuple[object, bool, Path]] = {}  # folder -> (watch, recursive, root)
        self._inotify = Observer()
        self._polling: PollingObserver | None = None
        self._lock = threading.RLock()

    def start(self, roots: list[Path]) -> None:
        """Schedule every root, falling back to polling per root, and start observing."""
        with self._lock:
            for root in roots:
                self._plans[root] = plan_watches(root, lambda d, r=root: self.accepts_dir(d, r))
                self._schedule_root(root)
            self._inotify.start()
            if self._polling:
                self._polling.start()
            self._check_kernel_count()

    def _schedule_root(self, root: Path) -> None:
        if not root.is_dir():  # gone for now: the watcher calls `rewatch` when it is back
            return
        try:
            for w in self._plans[root]:
                self._schedule(self._inotify, w.path, w.recursive, root)
        except OSError as exc:
            self._unschedule_root(root)
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            self._degrade(root, f"inotify: {exc.strerror}")

    def _schedule(self, observer, folder: Path, recursive: bool, root: Path) -> None:
        watch = observer.schedule(self.handler, str(folder), recursive=recursive, event_filter=list(WATCHED_EVENTS))
        self._watches[folder] = (watch, recursive, root)

    def _unschedule_root(self, root: Path) -> None:
        for folder, (watch, _, owner) in list(self._watches.items()):
            if owner == root:
                for observer in (self._inotify, self._polling):
                    if observer is not None:
                        try:
                            observer.unschedule(watch)
                        except KeyError:
                            pass
                del self._watches[folder]

    def _degrade(self, root: Path, why: str) -> None:
        """Watch `root` by polling from now on, and say so once, with the fix."""
        logger.error("cannot watch with inotify, polling instead (slower, higher CPU)",
                     extra={"root": str(root), "reason": why, "fix": INOTIFY_FIX})
        self.degraded[str(root)] = why
        if self._polling is None:
            self._polling = PollingObserver(timeout=self.poll_interval_s)
            if self._inotify.is_alive():
                self._polling.start()
        for w in self._plans[root]:
            self._schedule(self._polling, w.path, w.recursive, root)

    def _check_kernel_count(self) -> None:
        """watchdog skips subfolders it cannot watch without a word: compare with the kernel."""
        have = inotify_watch_count()
        if have is None:
            return
        inotify_roots = [r for r in self._plans if str(r) not in self.degraded]
        need = sum(count_dirs(self._plans[r]) for r in inotify_roots)
        if have < need:
            for root in inotify_roots:
                self._unschedule_root(root)
                self._degrade(root, f"inotify watch limit reached ({have} of {need} folders watched)")

    def rewatch(self, root: Path) -> None:
        """Watch a root afresh: it was moved away and back, or deleted and made again."""
        with self._lock:
            self._unschedule_root(root)
            self._plans[root] = plan_watches(root, lambda d: self.accepts_dir(d, root))
            if str(root) in self.degraded:
                for w in self._plans[root]:
                    self._schedule(self._polling, w.path, w.recursive, root)
            else:
                self._schedule_root(root)

    def ensure_watched(self, folder: Path, root: Path) -> bool:
        """Watch a folder that appeared under a non-recursive watch; True when a watch was added."""
        with self._lock:
            if self._covered(folder) or not folder.is_dir():
                return False
            observer = self._polling if str(root) in self.degraded else self._inotify
            try:
                for w in plan_watches(folder, lambda d: self.accepts_dir(d, root)):
                    self._schedule(observer, w.path, w.recursive, root)
            except OSError as exc:
                self._unschedule_root(root)
                self._degrade(root, f"inotify: {exc.strerror}")
            return True

    def forget(self, folder: Path) -> None:
        """Drop the watches of a folder that is gone."""
        with self._lock:
            for path, (watch, _, _) in list(self._watches.items()):
                if path == folder or folder in path.parents:
                    for observer in (self._inotify, self._polling):
                        try:
                            if observer is not None:
                                observer.unschedule(watch)
                        except KeyError:
                            pass
                    del self._watches[path]

    def _covered(self, folder: Path) -> bool:
        if folder in self._watches:
            return True
        return any(rec and (p in folder.parents) for p, (_, rec, _) in self._watches.items())

    def healthy(self) -> bool:
        """Whether every observer thread and its emitters are alive."""
        observers = [o for o in (self._inotify, self._polling) if o is not None]
        return all(o.is_alive() and all(e.is_alive() for e in o.emitters) for o in observers)

    def restart(self) -> None:
        """Replace dead observers with new ones watching the same plans."""
        with self._lock:
            self.restarts += 1
            logger.error("an observer thread died; restarting the watches", extra={"restarts": self.restarts})
            self.stop()
            degraded = dict(self.degraded)
            self._watches.clear()
            self.degraded.clear()
            self._inotify, self._polling = Observer(), None
            for root in self._plans:  # plan again: folders may have come and gone since
                self._plans[root] = plan_watches(root, lambda d, r=root: self.accepts_dir(d, r))
                if str(root) in degraded:
                    self._degrade(root, degraded[str(root)])
                else:
                    self._schedule_root(root)
            try:
                self._inotify.start()
            except OSError:  # a planned folder vanished while its watch was added: undo, let the caller retry
                for emitter in list(self._inotify.emitters):
                    emitter.stop()
                raise
            if self._polling and not self._polling.is_alive():
                self._polling.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop observing."""
        for observer in (self._inotify, self._polling):
            if observer is not None and observer.is_alive():
                observer.stop()
                observer.join(timeout)

    @property
    def watch_count(self) -> int:
        """Scheduled watchdog watches (a recursive one covers many folders)."""
        return len(self._watches)
