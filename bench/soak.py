"""Soak and faults: the real daemon over a changing tree, killed with SIGKILL about every minute.

A writer thread changes a temporary `project/` folder at 2-5 operations a second: new
files (some in new folders), edits (rewrites and appends), deletes, renames within the
tree, and appends to `project/logs/app.log` (followed as a log), half of them a Python
traceback with a unique message. Every written content is unique, and a file is touched at
most every MIN_GAP_S seconds (more than max_wait_ms), so debouncing never legitimately
merges two operations of a running daemon. Once or twice a `gremlin replay` of a git
repository made here (some commits with an empty diff, some messages with the bytes 0x1e, 0x1f and
non-UTF-8 bytes) runs as a subprocess; the first one
is usually SIGKILLed as soon as its first batch of commits is stored. A last replay runs to
completion at the end.

Meanwhile the main loop kills the daemon with SIGKILL at a random moment (every
--kill-every seconds after it became ready, +-50 %), restarts it at once and measures
restart -> ready and restart -> first search answer; it samples the daemon's RSS and open
descriptors every SAMPLE_S seconds. At the end the writer stops, the daemon is waited on
until idle and stopped with SIGTERM, and its database is read directly (read-only) and
checked against the benchmark's own ledger of operations:

- lost: an operation made while the daemon was steady (ready for STEADY_S, and not killed
  within SETTLE_S after it) without its event (its content as new_sha of its path; a
  `deleted` event; a rename as `moved` or as delete + create), and any traceback (written
  at any time: logs are followed by offset) with no `log` event. Traceback messages count in
  letters, not digits: failure signatures ignore digits, and a repeat is counted, not stored.
- final state: the `files` table against the disk (log files skipped) after the last idle.
- duplicated: the same transition twice in a row for one path (kind and new_sha), a
  traceback stored more than once, a commit stored more than once.
- memories without a vector of the current model after the last idle.
- commit events of the repository = its commits with a non-empty diff (computed with git).

Self-training is off by default (`--set training.enabled=true` turns it on): a fine-tune
on the CPU would take over the machine and is not what this measures.

PASS: nothing lost or duplicated, no final-state mismatch, no memory without its vector,
the commits as expected, search answered after every restart, no unexpected daemon exit,
and exit code 0 after the last SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from _common import (BenchError, add_common_options, configure_logging, console, daemon_output, machine,
                     make_home, parse_env, parse_sets, print_table, start_daemon, stop_daemon, try_status,
                     verdict, wait_ready)
from agent_core.control import DaemonUnavailable, request
from config.errors import GremlinError
from config.settings import load_settings

logger = logging.getLogger(__name__)

SEED_FILES = 240
MIN_GAP_S = 3.0  # a file is touched at most this often (> max_wait_ms 2 s)
STEADY_S = 3.0  # a daemon counts as steady this long after it first answered "ready"...
SETTLE_S = 5.0  # ...until this long before it was killed
SAMPLE_S = 5.0
START_TIMEOUT_S = 300.0
REPO_COMMITS = 150
EMPTY_EVERY = 25  # every 25th commit of the repository has no diff
SEARCH_QUERY = "soak failure in the worker"
OP_WEIGHTS = {"create": 24, "modify": 34, "delete": 8, "rename": 12, "log": 22}
EXCEPTIONS = ("ValueError", "KeyError", "RuntimeError", "ConnectionError")
WORDS = ("alpha beta gamma delta parse render cache queue token retry buffer index walrus lagoon kayak "
         "glacier saffron nebula origami quasar lantern harbor compass feather orbit pretzel").split()
SUFFIXES = (".py", ".md", ".txt", ".cfg")
GIT_IDENT = "Ada Lovelace <ada@example.com>"
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Ada Lovelace",
           "GIT_AUTHOR_EMAIL": "ada@example.com", "GIT_COMMITTER_NAME": "Ada Lovelace",
           "GIT_COMMITTER_EMAIL": "ada@example.com"}


@dataclass(frozen=True)
class Op:
    """One operation of the workload: the content a path has after it (None: gone)."""

    time: float
    kind: str  # create | modify | delete | rename | log
    path: str
    sha: str | None
    old_path: str | None = None  # a rename: where the file was
    title: str | None = None  # a log append with a traceback: its exception line


@dataclass
class Incarnation:
    """One daemon process, from its start to its kill (or the final stop)."""

    pid: int
    started: float
    ready: float | None = None
    searched: float | None = None
    hits: int | None = None
    ended: float | None = None
    end: str = "running"  # killed | exit N | died N
    rss_mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    pending_max: int = 0

    def steady_at(self, t: float) -> bool:
        """Whether an operation at `t` happened while this daemon was up and steady."""
        end = self.ended if self.ended is not None else float("inf")
        margin = 0.0 if self.end.startswith("exit") else SETTLE_S  # a clean stop processes everything
        return self.ready is not None and self.ready + STEADY_S <= t <= end - margin


@dataclass
class ReplayRun:
    """One `gremlin replay` subprocess (times in seconds from the workload's start)."""

    started: float
    seconds: float
    rc: int | None
    killed: bool
    final: bool = False
    commit_events: int = 0  # of the repository, in the database right after it ended

    def describe(self, soak: Soak) -> str:
        """When it ran, how it ended, whether a daemon was up meanwhile."""
        t = soak.t0 + self.started
        up = any(inc.started <= t and (inc.ended is None or t <= inc.ended) for inc in soak.incarnations)
        end = (f"SIGKILLed after its first batch ({self.seconds:.1f} s)" if self.killed
               else f"rc {self.rc} in {self.seconds:.1f} s")
        return (f"{'final' if self.final else f'at {self.started:.0f} s'}: {end}, daemon {'up' if up else 'down'}, "
                f"{self.commit_events} commit events after it")


@dataclass
class Soak:
    """Everything one soak run shares between its threads and its report."""

    args: argparse.Namespace
    base: Path
    settings: object
    repo: Path
    t0: float = 0.0
    ops: list[Op] = field(default_factory=list)
    incarnations: list[Incarnation] = field(default_factory=list)
    replays: list[ReplayRun] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = None
    workload_error: str | None = None

    @property
    def project(self) -> Path:
        """The watched folder."""
        return self.base / "project"

    def steady(self, t: float) -> bool:
        """Whether some daemon was steady at `t`."""
        return any(inc.steady_at(t) for inc in self.incarnations)


def sha256(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def letters(n: int) -> str:
    """`n` spelled in letters: log failure signatures ignore digits, so messages differ in words."""
    out = ""
    for _ in range(4):
        n, digit = divmod(n, 26)
        out = chr(ord("a") + digit) + out
    return out


class Workload:
    """The writer: unique contents, each file touched at most every MIN_GAP_S."""

    def __init__(self, project: Path, rng: random.Random, ops: list[Op]):
        self.project, self.rng, self.ops = project, rng, ops
        self.counter = 0
        self.current: dict[str, str] = {}  # live path -> sha
        self.alive: list[str] = []
        self.touched: dict[str, float] = {}
        self.dirs = [project / d for d in ("src", "src/core", "docs", "conf")]
        self.log = project / "logs" / "app.log"
        self.error: str | None = None  # why the writer stopped early, if it did

    def seed(self, files: int) -> None:
        """The tree the daemon first sees (its baseline) and the start of the log."""
        for d in self.dirs + [self.log.parent]:
            d.mkdir(parents=True, exist_ok=True)
        for _ in range(files):
            self._write_new(self.rng.choice(self.dirs), seed=True)
        self.log.write_text("2024-01-01 00:00:00 INFO app: started\n", encoding="utf-8")

    def run(self, stop: threading.Event) -> None:
        """Operations at 2-5 a second until `stop` is set (which it sets itself if one fails)."""
        while not stop.is_set():
            try:
                self.step()
            except OSError as exc:  # the benchmark's own fault: end the run and say so
                logger.exception("workload operation failed")
                self.error = f"{type(exc).__name__}: {exc}"
                stop.set()
            stop.wait(self.rng.uniform(0.2, 0.5))

    def step(self) -> None:
        """One operation of a random kind (a create when no file is free)."""
        kind = self.rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
        if kind == "log":
            self.append_log()
            return
        path = self._idle_file() if kind != "create" else None
        if path is None:
            folder = self.project / f"pkg_{self.counter:05d}" if self.rng.random() < 0.1 else None
            self._write_new(folder or self.rng.choice(self.dirs))
        else:
            {"modify": self.modify, "delete": self.delete, "rename": self.rename}[kind](path)

    def _content(self, name: str) -> bytes:
        self.counter += 1
        lines = [f"# {name}: revision {self.counter}"]
        lines += [f"{self.rng.choice(WORDS)}_{j} = {self.rng.randint(0, 999)}  # "
                  f"{' '.join(self.rng.sample(WORDS, 4))}" for j in range(self.rng.randint(3, 30))]
        return ("\n".join(lines) + "\n").encode()

    def _idle_file(self) -> str | None:
        now = time.time()
        for _ in range(50):
            path = self.rng.choice(self.alive) if self.alive else None
            if path and now - self.touched.get(path, 0) >= MIN_GAP_S:
                return path
        return None

    def _record(self, kind: str, path: str, sha: str | None, old_path: str | None = None,
                title: str | None = None) -> None:
        self.ops.append(Op(time.time(), kind, path, sha, old_path, title))
        if kind != "log":
            self._track(path, sha)

    def _track(self, path: str, sha: str | None) -> None:
        self.touched[path] = time.time()
        if sha is None:
            self.current.pop(path, None)
            self.alive.remove(path)
        else:
            if path not in self.current:
                self.alive.append(path)
            self.current[path] = sha

    def _write_new(self, folder: Path, seed: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"file_{self.counter:05d}{self.rng.choice(SUFFIXES)}"
        data = self._content(path.name)
        path.write_bytes(data)
        if folder not in self.dirs:
            self.dirs.append(folder)
        self._record("seed" if seed else "create", str(path), sha256(data))

    def modify(self, path: str) -> None:
        """Rewrite the file, or append to it."""
        data = self._content(Path(path).name)
        if self.rng.random() < 0.3:
            with open(path, "ab") as handle:
                handle.write(data)
            data = Path(path).read_bytes()
        else:
            Path(path).write_bytes(data)
        self._record("modify", path, sha256(data))

    def delete(self, path: str) -> None:
        """Remove the file."""
        os.unlink(path)
        self._record("delete", path, None)

    def rename(self, path: str) -> None:
        """os.rename to a new name, in the same folder or another one of the tree."""
        self.counter += 1
        folder = Path(path).parent if self.rng.random() < 0.5 else self.rng.choice(self.dirs)
        target = folder / f"moved_{self.counter:05d}{Path(path).suffix}"
        sha = self.current[path]
        os.rename(path, target)
        self._track(path, None)  # the two sides are one operation in the ledger
        self._record("rename", str(target), sha, old_path=path)

    def append_log(self) -> None:
        """A few INFO lines, half the time followed by a traceback with a unique message."""
        self.counter += 1
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{stamp} INFO worker: batch {self.counter}.{i} done\n"
                       for i in range(self.rng.randint(1, 3)))
        title = None
        if self.rng.random() < 0.5:
            title = f"{self.rng.choice(EXCEPTIONS)}: soak failure {letters(self.counter)}"
            text += traceback_text(title, stamp)
        with open(self.log, "a", encoding="utf-8") as handle:  # one write() call
            handle.write(text)
        self._record("log", str(self.log), None, title=title)


def traceback_text(title: str, stamp: str) -> str:
    """A logged Python traceback ending in `title`."""
    return (f"{stamp} INFO worker: handling a request\nTraceback (most recent call last):\n"
            '  File "/srv/app/worker.py", line 42, in handle\n    process(item)\n'
            '  File "/srv/app/worker.py", line 88, in process\n    raise failure(item)\n'
            f"{title}\n")


# -- the git repository ------------------------------------------------------------------

def git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    """stdout of git in `repo`, with no user or system config."""
    return subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, check=True,
                          env={**os.environ, **GIT_ENV}, timeout=120).stdout.decode()


def make_repo(repo: Path, commits: int, rng: random.Random) -> None:
    """A linear history (every EMPTY_EVERY-th commit without a diff, some messages with separator
    bytes and Latin-1), via fast-import."""
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    stream, files = [], [f"lib/module_{k}.py" for k in range(12)]
    for i in range(commits):
        message = f"Tune the {rng.choice(WORDS)} handling of {rng.choice(WORDS)} (change {i})\n".encode()
        if i % 10 == 3:  # bytes real histories carry: log-format separators, Latin-1
            message += b"Fields \x1e and \x1f, caf\xe9.\n"
        stream.append(f"commit refs/heads/main\nmark :{i + 1}\n"
                      f"author {GIT_IDENT} {1700000000 + 3600 * i} +0000\n"
                      f"committer {GIT_IDENT} {1700000000 + 3600 * i} +0000\n"
                      f"data {len(message)}\n".encode() + message)
        if i:
            stream.append(f"from :{i}\n".encode())
        if i == 0 or i % EMPTY_EVERY:
            for name in rng.sample(files, rng.randint(1, 3)):
                body = f"# {name} at change {i}\nVALUE = {rng.randint(0, 10**6)}\n".encode()
                stream.append(f"M 100644 inline {name}\ndata {len(body)}\n".encode() + body)
        stream.append(b"\n")
    git(repo, "fast-import", "--quiet", stdin=b"".join(stream))


def commits_with_diff(repo: Path) -> set[str]:
    """First-parent commits whose tree differs from their parent's (git's own view)."""
    trees, wanted = {}, []
    for line in git(repo, "log", "--first-parent", "--format=%H %T %P", "main").splitlines():
        sha, tree, *parents = line.split()
        trees[sha] = tree
        wanted.append((sha, tree, parents[0] if parents else None))
    empty = git(repo, "hash-object", "-t", "tree", "--stdin", stdin=b"").strip()
    return {sha for sha, tree, parent in wanted if tree != (trees[parent] if parent else empty)}


def run_replay(soak: Soak, kill_partway: bool, final: bool = False) -> None:
    """One `gremlin replay` subprocess; SIGKILLed once it has stored its first batch if `kill_partway`."""
    started, before = time.time(), count_commit_events(soak.settings.memory.db, soak.repo)
    with open(soak.base / "replay.out", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent_core.cli", "--home", str(soak.settings.home),
                                 "replay", str(soak.repo)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
    killed = False
    while kill_partway and proc.poll() is None:
        if count_commit_events(soak.settings.memory.db, soak.repo) > before:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    stored = count_commit_events(soak.settings.memory.db, soak.repo)
    soak.replays.append(ReplayRun(started - soak.t0, time.time() - started, proc.returncode, killed, final, stored))
    logger.info("replay done: rc %s, killed %s, %d commit events", proc.returncode, killed, stored)


def replay_loop(soak: Soak, rng: random.Random, duration: float) -> None:
    """One or two replays at random moments of the run; the first one mostly killed partway."""
    windows = [(0.15, 0.45), (0.55, 0.85)][:rng.choice((1, 2))]
    for i, (low, high) in enumerate(windows):
        if soak.stop.wait(max(0.0, soak.t0 + rng.uniform(low, high) * duration - time.time())):
            return
        run_replay(soak, i == 0 and rng.random() < 0.75)


# -- the daemon's lives ------------------------------------------------------------------

def sample(inc: Incarnation, soak: Soak) -> None:
    """RSS, open descriptors and pending changes of the daemon now."""
    try:
        status = Path(f"/proc/{inc.pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{inc.pid}/fd"))
    except OSError:
        return
    rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if rss is not None:
        inc.rss_mib.append(int(rss) / 1024)
        inc.fds.append(fds)
    live = try_status(soak.settings)
    if live:
        inc.pending_max = max(inc.pending_max, int(live.get("pending", 0)))


def start_incarnation(soak: Soak) -> Incarnation:
    """Start a daemon and wait until it is ready and has answered a search (or died)."""
    soak.proc = start_daemon(soak.settings.home, parse_env(soak.args.env))
    inc = Incarnation(soak.proc.pid, time.time())
    soak.incarnations.append(inc)
    deadline = inc.started + START_TIMEOUT_S
    while inc.searched is None and time.time() < deadline:  # resources are sampled once it answers
        if soak.proc.poll() is not None:
            inc.ended, inc.end = time.time(), f"died {soak.proc.returncode}"
            return inc
        probe_start(soak, inc)
        time.sleep(0.1)
    return inc


def probe_start(soak: Soak, inc: Incarnation) -> None:
    """One step of the start: note the first "ready", then the first search answer."""
    if inc.ready is None:
        status = try_status(soak.settings)
        if status and status.get("state") == "ready":
            inc.ready = time.time()
        return
    try:
        hits = request(soak.settings, "search", query=SEARCH_QUERY, k=5, kind=None, mode="hybrid")
    except (DaemonUnavailable, GremlinError) as exc:
        logger.info("search not answered yet: %s", exc)
        return
    inc.searched, inc.hits = time.time(), len(hits)


def live_until(soak: Soak, inc: Incarnation, until: float) -> bool:
    """Sample the daemon every SAMPLE_S until `until`; False if it exited on its own meanwhile."""
    while time.time() < until and not soak.stop.is_set():
        if soak.proc.poll() is not None:
            inc.ended, inc.end = time.time(), f"died {soak.proc.returncode}"
            logger.error("daemon %s exited on its own with %s", inc.pid, soak.proc.returncode)
            return False
        sample(inc, soak)
        time.sleep(max(0.0, min(SAMPLE_S, until - time.time())))
    return True


def kill_daemon(soak: Soak, inc: Incarnation) -> None:
    """SIGKILL, and reap it (the lock is the kernel's flock: free once it is gone)."""
    os.kill(inc.pid, signal.SIGKILL)
    inc.ended, inc.end = time.time(), "killed"
    soak.proc.wait()
    logger.info("killed daemon %s at %.0f s", inc.pid, inc.ended - soak.t0)


def supervise(soak: Soak, rng: random.Random, deadline: float) -> None:
    """Kill the daemon at random moments and restart it at once, until the deadline."""
    inc = soak.incarnations[-1]
    while time.time() < deadline and not soak.stop.is_set():
        since = inc.ready or time.time()
        due = since + soak.args.kill_every * rng.uniform(0.5, 1.5)
        if not live_until(soak, inc, min(due, deadline)):
            inc = start_incarnation(soak)
            continue
        if time.time() >= deadline or soak.stop.is_set():
            return
        kill_daemon(soak, inc)
        inc = start_incarnation(soak)


# -- reading the database back -------------------------------------------------------------

def read_db(db: Path) -> tuple[list[dict], dict[str, str | None]]:
    """Every event (meta parsed) and the files table (path -> sha), read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        events = [{**dict(r), "meta": json.loads(r["meta"])} for r in conn.execute(
            "SELECT id, time, kind, path, old_path, old_sha, new_sha, meta FROM events ORDER BY id")]
        files = {r["path"]: r["sha"] for r in conn.execute("SELECT path, sha FROM files")}
    finally:
        conn.close()
    return events, files


def count_commit_events(db: Path, repo: Path) -> int:
    """Commit events of `repo` in the database now (read-only, beside the writers)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM events WHERE kind = 'commit' AND path = ?",
                            (str(repo),)).fetchone()[0]
    finally:
        conn.close()


def memories_without_vectors(db: Path, model_id: str) -> int:
    """Memories with no vector of the model `model_id`."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM memories m WHERE NOT EXISTS (SELECT 1 FROM vectors v"
                            " WHERE v.memory_id = m.id AND v.model_id = ?)", (model_id,)).fetchone()[0]
    finally:
        conn.close()


@dataclass
class Audit:
    """What the checks found; each list holds one readable line per problem."""

    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    tracebacks: dict[str, int] = field(default_factory=dict)
    commits: dict[str, int] = field(default_factory=dict)
    moves_paired: int = 0
    steady_ops: int = 0
    files_compared: int = 0


class EventIndex:
    """Events grouped the ways the checks look them up."""

    def __init__(self, events: list[dict]):
        self.by_path: dict[str, list[dict]] = defaultdict(list)
        self.moved_from: dict[str, dict] = {}
        for ev in events:
            self.by_path[ev["path"]].append(ev)
            if ev["kind"] == "moved" and ev["old_path"]:
                self.moved_from[ev["old_path"]] = ev

    def has_content(self, path: str, sha: str) -> bool:
        """Some event left `path` with content `sha`."""
        return any(ev["new_sha"] == sha for ev in self.by_path.get(path, ()))

    def has_gone(self, path: str) -> bool:
        """A `deleted` event for `path`, or a move away from it."""
        return path in self.moved_from or any(ev["kind"] == "deleted" for ev in self.by_path.get(path, ()))


def op_recorded(op: Op, index: EventIndex) -> bool:
    """Whether the daemon recorded this operation (see the module docstring)."""
    if op.kind in ("create", "modify"):
        return index.has_content(op.path, op.sha)
    if op.kind == "delete":
        return index.has_gone(op.path)
    return index.has_content(op.path, op.sha) and index.has_gone(op.old_path)


def check_ops(soak: Soak, index: EventIndex, audit: Audit) -> None:
    """Lost: steady file operations without their event."""
    for op in soak.ops:
        if op.kind not in ("create", "modify", "delete", "rename") or not soak.steady(op.time):
            continue
        audit.steady_ops += 1
        if op.kind == "rename" and op_recorded(op, index):
            audit.moves_paired += index.moved_from.get(op.old_path, {}).get("path") == op.path
        if not op_recorded(op, index):
            seen = [(ev["id"], ev["kind"], (ev["new_sha"] or "-")[:8]) for ev in index.by_path.get(op.path, ())]
            source = f" from {rel(soak, op.old_path)} (gone recorded: {index.has_gone(op.old_path)})" \
                if op.old_path else ""
            audit.lost.append(f"{op.kind} {rel(soak, op.path)}{source} at {op.time - soak.t0:.1f} s "
                              f"(sha {(op.sha or '-')[:8]}); events of the path: {seen}")


def check_duplicates(events: list[dict], soak: Soak, audit: Audit) -> None:
    """Duplicated: the same file transition twice in a row for one path."""
    last: dict[str, tuple] = {}
    for ev in events:
        if ev["kind"] in ("log", "commit"):
            continue
        key = (ev["kind"], ev["new_sha"])
        if last.get(ev["path"]) == key:
            audit.duplicated.append(f"{ev['kind']} {rel(soak, ev['path'])} sha {(ev['new_sha'] or '-')[:8]} "
                                    f"twice in a row (event {ev['id']})")
        last[ev["path"]] = key


def check_tracebacks(soak: Soak, events: list[dict], audit: Audit) -> None:
    """Each traceback written becomes exactly one `log` event with its message as title."""
    written = {op.title: op for op in soak.ops if op.title}
    stored = Counter(ev["meta"].get("title") for ev in events if ev["kind"] == "log")
    missing = [t for t in written if not stored[t]]
    for title in missing:
        state = "steady" if soak.steady(written[title].time) else "daemon down or unsteady"
        audit.lost.append(f"traceback {title!r} written at {written[title].time - soak.t0:.1f} s ({state}): "
                          "no log event")
    for title, n in stored.items():
        if n > 1:
            audit.duplicated.append(f"traceback {title!r} stored {n} times")
    audit.tracebacks = {"written": len(written), "stored": sum(stored[t] for t in written),
                        "missing": len(missing), "unexpected": sum(n for t, n in stored.items() if t not in written)}


def check_commits(soak: Soak, events: list[dict], audit: Audit) -> None:
    """Commit events of the repository against its commits with a diff."""
    expected = commits_with_diff(soak.repo)
    got = [ev["meta"].get("commit") for ev in events if ev["kind"] == "commit" and ev["path"] == str(soak.repo)]
    counts = Counter(got)
    audit.commits = {"events": len(got), "expected": len(expected), "missing": len(expected - set(got)),
                     "extra": len(set(got) - expected), "duplicated": len(got) - len(counts)}
    audit.lost += [f"commit {sha[:12]} never stored" for sha in sorted(expected - set(got))][:5]
    audit.duplicated += [f"commit {sha[:12]} stored {n} times" for sha, n in counts.items() if n > 1]


def check_final_state(soak: Soak, files: dict[str, str | None], audit: Audit) -> None:
    """The files table against the disk (log files skipped: followed by offset, no sha)."""
    disk = {str(p): sha256(p.read_bytes()) for p in soak.project.rglob("*")
            if p.is_file() and p.suffix != ".log"}
    recorded = {p: sha for p, sha in files.items() if p.startswith(f"{soak.project}/") and not p.endswith(".log")}
    audit.files_compared = len(disk.keys() | recorded.keys())
    for path in sorted(disk.keys() | recorded.keys()):
        if disk.get(path) != recorded.get(path):
            audit.mismatched.append(f"{rel(soak, path)}: disk {(disk.get(path) or 'absent')[:8]}, "
                                    f"files table {(recorded.get(path) or 'absent')[:8]}")


def rel(soak: Soak, path: str | None) -> str:
    """A path relative to the temp folder, for messages."""
    return str(Path(path).relative_to(soak.base)) if path and path.startswith(str(soak.base)) else str(path)


def audit_db(soak: Soak) -> tuple[Audit, Counter]:
    """Every check against the stopped daemon's database."""
    events, files = read_db(soak.settings.memory.db)
    audit = Audit()
    check_ops(soak, EventIndex(events), audit)
    check_duplicates(events, soak, audit)
    check_tracebacks(soak, events, audit)
    check_commits(soak, events, audit)
    check_final_state(soak, files, audit)
    return audit, Counter(ev["kind"] for ev in events)


# -- the run -------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="workload duration (default 20)")
    parser.add_argument("--kill-every", type=float, default=60.0,
                        help="seconds between ready and SIGKILL, +-50%% jitter (default 60)")
    parser.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and say where it is")
    add_common_options(parser)
    return parser.parse_args()


def config_sections(args: argparse.Namespace) -> dict[str, dict]:
    """The temp home's config: self-training off unless --set says otherwise."""
    sections: dict[str, dict] = {"training": {"enabled": False}}
    for section, values in parse_sets(args.set).items():
        sections.setdefault(section, {}).update(values)
    return sections


def finish(soak: Soak) -> tuple[dict | None, int, str]:
    """Replay to the end, wait for idle, SIGTERM: (last status, exit code, note)."""
    run_replay(soak, False, final=True)
    inc, note, status = soak.incarnations[-1], "", None
    time.sleep(soak.settings.watch.max_wait_ms / 1000 + 1.0)  # let the last changes reach the queue
    try:
        status = wait_ready(soak.settings, soak.proc, timeout=600)
    except BenchError as exc:
        note = f"never idle at the end: {exc}".splitlines()[0]
    sample(inc, soak)
    code = stop_daemon(soak.proc)
    if inc.ended is None:
        inc.ended, inc.end = time.time(), f"exit {code}"
    return status, code, note


def run(soak: Soak, rng: random.Random) -> tuple[dict | None, int, str]:
    """Seed, start, soak with kills, finish; returns what `finish` returns."""
    workload = Workload(soak.project, random.Random(rng.random()), soak.ops)
    workload.seed(SEED_FILES)
    make_repo(soak.repo, REPO_COMMITS, random.Random(rng.random()))
    soak.t0 = time.time()
    inc = start_incarnation(soak)
    if inc.searched is None:
        raise BenchError(f"the first daemon never answered a search:\n{daemon_output(soak.settings.home)}")
    wait_ready(soak.settings, soak.proc)  # the baseline is recorded before anything changes
    duration = soak.args.minutes * 60
    soak.t0 = time.time()
    threads = (threading.Thread(target=workload.run, args=(soak.stop,), name="writer"),
               threading.Thread(target=replay_loop, args=(soak, random.Random(rng.random()), duration),
                                name="replays"))
    for thread in threads:
        thread.start()
    try:
        supervise(soak, rng, soak.t0 + duration)
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join()
        soak.workload_error = workload.error
    return finish(soak)


def main() -> int:
    """Run the soak and print its tables."""
    args = parse_args()
    configure_logging(args.verbose)
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="gremlin-bench-soak-")).resolve()
    soak = None
    try:
        (base / "project").mkdir()
        settings = load_settings(make_home(base, base / "project", config_sections(args)))
        soak = Soak(args, base, settings, base / "repo")
        final = run(soak, rng)
        audit, kinds = audit_db(soak)
        return report(soak, audit, kinds, final)
    finally:
        if soak and soak.proc and soak.proc.poll() is None:  # after an error
            stop_daemon(soak.proc)
        if args.keep:
            console.print(f"kept {base}", highlight=False)
        else:
            shutil.rmtree(base, ignore_errors=True)


# -- the report ----------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """min / median / max, or '-' without values."""
    if not values:
        return "-"
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def daemon_errors(soak: Soak) -> tuple[int, int, list[str]]:
    """ERROR+ records in gremlin.log, tracebacks in daemon.out, and a few distinct messages."""
    log = soak.settings.logging.dir / "system" / "gremlin.log"
    records = []
    for line in (log.read_text(errors="replace").splitlines() if log.exists() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("ERROR", "CRITICAL"):
            records.append(record.get("msg", ""))
    out = soak.settings.home / "daemon.out"
    tracebacks = out.read_text(errors="replace").count("Traceback (most recent call last)") if out.exists() else 0
    return len(records), tracebacks, sorted(set(records))[:5]


def restarts_rows(soak: Soak) -> list[tuple]:
    """One row per daemon start: how it came, how fast it answered."""
    rows = []
    for i, inc in enumerate(soak.incarnations):
        prev = soak.incarnations[i - 1] if i else None
        cause = "first start" if prev is None else f"{prev.end} at {prev.ended - soak.t0:.1f} s"
        ready = f"{inc.ready - inc.started:.1f}" if inc.ready else "never"
        search = f"{inc.searched - inc.started:.1f}" if inc.searched else "never"
        rows.append((i, cause, inc.pid, ready, search, inc.hits if inc.hits is not None else "-",
                     f"{(inc.ended or time.time()) - inc.started:.0f}", inc.end))
    return rows


def resource_rows(soak: Soak) -> list[tuple]:
    """RSS and descriptors per daemon, then the trend first -> last."""
    rows = [(i, inc.pid, len(inc.rss_mib), spread(inc.rss_mib), spread([float(f) for f in inc.fds]),
             inc.pending_max) for i, inc in enumerate(soak.incarnations)]
    sampled = [inc for inc in soak.incarnations if inc.rss_mib]
    if len(sampled) >= 2:
        first, last = sampled[0], sampled[-1]
        rss = statistics.median(last.rss_mib) - statistics.median(first.rss_mib)
        fds = statistics.median(last.fds) - statistics.median(first.fds)
        rows.append(("trend", "first -> last", "", f"median {rss:+.0f} MiB", f"median {fds:+.0f}", ""))
    return rows


def summary_rows(soak: Soak, audit: Audit, kinds: Counter, final: tuple[dict | None, int, str],
                 no_vectors: int | None) -> list[tuple]:
    """The summary table."""
    status, code, note = final
    ops = Counter(op.kind for op in soak.ops if op.kind != "seed")
    kills = sum(inc.end == "killed" for inc in soak.incarnations)
    died = sum(inc.end.startswith("died") for inc in soak.incarnations)
    answered = sum(inc.searched is not None for inc in soak.incarnations)
    errors, tracebacks, messages = daemon_errors(soak)
    last_op = max((op.time for op in soak.ops if op.kind != "seed"), default=soak.t0)
    tb, cm = audit.tracebacks, audit.commits
    return [
        ("workload duration", f"{last_op - soak.t0:.0f} s (asked {soak.args.minutes * 60:.0f} s)"),
        ("operations", f"{sum(ops.values())}: " + ", ".join(f"{k} {ops[k]}" for k in OP_WEIGHTS)),
        ("  file operations checked one by one (daemon steady)",
         f"{audit.steady_ops} of {sum(ops[k] for k in ('create', 'modify', 'delete', 'rename'))} "
         "(the rest: final state only)"),
        ("  renames seen as one moved event", audit.moves_paired),
        ("SIGKILLs / unexpected daemon exits", f"{kills} / {died}"),
        ("replays", "; ".join(r.describe(soak) for r in soak.replays) or "none"),
        ("events recorded", f"{sum(kinds.values())}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))),
        ("lost", len(audit.lost)),
        ("duplicated", len(audit.duplicated)),
        ("final-state mismatches (files table vs disk)", f"{len(audit.mismatched)} of {audit.files_compared}"),
        ("tracebacks written / stored / missing / unexpected",
         f"{tb['written']} / {tb['stored']} / {tb['missing']} / {tb['unexpected']}"),
        ("commit events / expected (missing, extra, duplicated)",
         f"{cm['events']} / {cm['expected']} ({cm['missing']}, {cm['extra']}, {cm['duplicated']})"),
        ("memories without vectors (current model)",
         no_vectors if no_vectors is not None else f"NOT CHECKED ({note or 'no final status'})"),
        ("search answered after each start", f"{answered} of {len(soak.incarnations)}"),
        ("ERROR records in gremlin.log / tracebacks in daemon.out", f"{errors} / {tracebacks}"
         + (f": {'; '.join(m[:80] for m in messages)}" if messages else "")),
        ("daemon exit code after the last SIGTERM", code),
        ("workload", f"FAILED: {soak.workload_error}" if soak.workload_error else "ran to the end"),
        ("memories / index at the end", f"{status['counts']['memories']} / {status['index_size']}"
         if status else "-"),
        ("machine", machine()),
    ]


def print_details(title: str, lines: list[str], limit: int = 12) -> None:
    """The first problems of one kind, one line each."""
    if lines:
        console.print(f"[bold]{title}[/] ({len(lines)}):", highlight=False)
        for line in lines[:limit]:
            console.print(f"  {line}", highlight=False, soft_wrap=True)


def report(soak: Soak, audit: Audit, kinds: Counter, final: tuple[dict | None, int, str]) -> int:
    """Print the tables and the verdict."""
    status, code, _ = final
    no_vectors = memories_without_vectors(soak.settings.memory.db, status["model_id"]) if status else None
    print_table(f"soak: {soak.args.minutes:g} min, SIGKILL every {soak.args.kill_every:g} s +-50 %, "
                f"seed {soak.args.seed}", summary_rows(soak, audit, kinds, final, no_vectors), ("what", "value"))
    print_table("starts and restarts", restarts_rows(soak),
                ("#", "after", "pid", "start -> ready s", "start -> search s", "hits", "lived s", "end"))
    print_table(f"daemon resources (sampled every {SAMPLE_S:g} s)", resource_rows(soak),
                ("#", "pid", "samples", "RSS MiB min / median / max", "open fds min / median / max",
                 "max pending"))
    print_details("lost", audit.lost)
    print_details("duplicated", audit.duplicated)
    print_details("final-state mismatches", audit.mismatched)
    answered = all(inc.searched is not None for inc in soak.incarnations)
    died = sum(inc.end.startswith("died") for inc in soak.incarnations)
    cm = audit.commits
    ok = (not audit.lost and not audit.duplicated and not audit.mismatched and no_vectors == 0 and answered
          and died == 0 and code == 0 and cm["events"] == cm["expected"] and not cm["extra"]
          and not soak.workload_error)
    return verdict(ok, f"{len(audit.lost)} lost, {len(audit.duplicated)} duplicated, {len(audit.mismatched)} "
                       f"final-state mismatches, "
                       f"{no_vectors if no_vectors is not None else 'unchecked'} memories without vectors, "
                       f"commits {cm['events']}/{cm['expected']}, search after {'every' if answered else 'NOT every'}"
                       f" start, {died} unexpected exits, exit code {code}")


if __name__ == "__main__":
    raise SystemExit(main())
