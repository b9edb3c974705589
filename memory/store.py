"""The one owner of Gremlin's SQLite schema and of every SQL statement.

WAL journal, one writer connection guarded by a lock, write transactions opened with
`BEGIN IMMEDIATE`, migrations numbered by `PRAGMA user_version`. Other packages call the
functions here; no SQL lives anywhere else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from config.settings import PRIVATE_DIR, PRIVATE_FILE
from memory.errors import StoreError, StoreNotReady

logger = logging.getLogger(__name__)

# Each entry moves the schema from version i to i + 1; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        root TEXT NOT NULL,
        old_sha TEXT,
        new_sha TEXT,
        size INTEGER,
        diff TEXT,
        meta TEXT NOT NULL DEFAULT '{}',
        old_path TEXT
    );
    CREATE INDEX events_path ON events(path, id);
    CREATE TABLE memories (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        replaceable INTEGER NOT NULL DEFAULT 1,
        created TEXT NOT NULL,
        event_id INTEGER REFERENCES events(id)
    );
    CREATE INDEX memories_kind ON memories(kind, id);
    CREATE TABLE vectors (
        model_id TEXT NOT NULL,
        memory_id INTEGER NOT NULL REFERENCES memories(id) ON DELETE CASCADE,
        vec BLOB NOT NULL,
        PRIMARY KEY (model_id, memory_id)
    ) WITHOUT ROWID;
    CREATE TABLE files (
        path TEXT PRIMARY KEY,
        root TEXT NOT NULL,
        sha TEXT,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL DEFAULT 0,
        head TEXT,
        updated TEXT NOT NULL
    );
    CREATE TABLE roots (
        path TEXT PRIMARY KEY,
        watched_since_ns INTEGER NOT NULL,
        first_seen TEXT NOT NULL,
        baselined TEXT
    );
    CREATE TABLE failures (
        signature TEXT PRIMARY KEY,
        event_id INTEGER NOT NULL REFERENCES events(id),
        title TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE own_writes (
        path TEXT NOT NULL,
        sha TEXT NOT NULL,
        expires TEXT NOT NULL,
        PRIMARY KEY (path, sha)
    );
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        payload TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        created TEXT NOT NULL,
        started TEXT,
        finished TEXT,
        claimed_by INTEGER,
        result TEXT,
        error TEXT
    );
    CREATE INDEX tasks_state ON tasks(state, id);
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        trigger TEXT NOT NULL DEFAULT '{}',
        spec TEXT NOT NULL DEFAULT '{}',
        metrics TEXT NOT NULL DEFAULT '{}',
        started TEXT NOT NULL,
        finished TEXT,
        error TEXT
    );
    CREATE TABLE models (
        id TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        created TEXT NOT NULL,
        status TEXT NOT NULL,
        lineage TEXT NOT NULL DEFAULT '{}'
    );
    """,
    # 2: full-text search over memories (BM25 for hybrid search), kept in step by triggers
    # inside the same transaction; the trainer's progress and the model a run produced.
    """
    CREATE VIRTUAL TABLE memories_fts USING fts5(
        text, content='memories', content_rowid='id', tokenize='porter unicode61'
    );
    INSERT INTO memories_fts(memories_fts) VALUES ('rebuild');
    CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END;
    CREATE TRIGGER memories_fts_update AFTER UPDATE OF text ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO memories_fts(rowid, text) VALUES (new.id, new.text);
    END;
    ALTER TABLE runs ADD COLUMN progress TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE runs ADD COLUMN updated TEXT;
    ALTER TABLE runs ADD COLUMN model_id TEXT;
    ALTER TABLE runs ADD COLUMN reason TEXT;
    CREATE TABLE markers (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 3: a commit is stored once per repository, even when two replays run at once. Copies
    # that concurrent replays stored before this version are dropped (the oldest one stays).
    """
    DELETE FROM memories WHERE event_id IN (SELECT id FROM events WHERE kind = 'commit' AND id NOT IN
        (SELECT min(id) FROM events WHERE kind = 'commit' GROUP BY path, json_extract(meta, '$.commit')));
    DELETE FROM events WHERE kind = 'commit' AND id NOT IN
        (SELECT min(id) FROM events WHERE kind = 'commit' GROUP BY path, json_extract(meta, '$.commit'));
    CREATE UNIQUE INDEX events_commit ON events(path, json_extract(meta, '$.commit')) WHERE kind = 'commit';
    """,
    # 4: the durable task queue (priorities, leases, retries with backoff, idempotency keys,
    # cancellation, the outcome's exit code and reward) and the planner's trials.
    """
    ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN priority_auto INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tasks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tasks ADD COLUMN not_before TEXT;
    ALTER TABLE tasks ADD COLUMN lease_until TEXT;
    ALTER TABLE tasks ADD COLUMN heartbeat TEXT;
    ALTER TABLE tasks ADD COLUMN idem_key TEXT;
    ALTER TABLE tasks ADD COLUMN source TEXT NOT NULL DEFAULT '';
    ALTER TABLE tasks ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN retry_of INTEGER;
    ALTER TABLE tasks ADD COLUMN exit_code INTEGER;
    ALTER TABLE tasks ADD COLUMN reward REAL;
    CREATE UNIQUE INDEX tasks_idem_key ON tasks(idem_key) WHERE idem_key IS NOT NULL;
    CREATE INDEX tasks_queue ON tasks(state, priority DESC, id);
    CREATE INDEX tasks_type_finished ON tasks(type, finished);
    CREATE TABLE planner_trials (
        id INTEGER PRIMARY KEY,
        run_id TEXT,
        params TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'proposed' CHECK (state IN ('proposed', 'complete', 'fail', 'skipped')),
        value REAL,
        decision TEXT,
        created TEXT NOT NULL,
        finished TEXT
    );
    """,
    # 5: what the dashboard lists by time, and an event's memory, without scanning the tables.
    """
    CREATE INDEX events_time ON events(time);
    CREATE INDEX memories_event ON memories(event_id);
    """,
    # 6: retention finds a kind's oldest memories (by creation time) without scanning the kind;
    # deleting a memory finds its vectors (ON DELETE CASCADE) without scanning every vector; and
    # listing or counting a model's vector ids reads this small index, not 1.5 KB rows of floats
    # (1.5 GB at a million memories: seconds of every start).
    """
    CREATE INDEX memories_kind_created ON memories(kind, created);
    CREATE INDEX vectors_memory ON vectors(memory_id, model_id);
    """,
    # 7: each model's hybrid-search fusion weight (the dense ranking's share), chosen by the
    # trainer on held-out data; NULL = not calibrated (equal weights, 0.5).
    """
    ALTER TABLE models ADD COLUMN fusion_weight REAL;
    """,
    # 8: hybrid search now fuses normalised scores, not reciprocal ranks (memory/fusion.py); a
    # weight calibrated for the old fusion means something else there, so each such model fuses
    # equally until the trainer calibrates its successor.
    """
    UPDATE models SET fusion_weight = NULL;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# File names are bytes, and Python hands an undecodable one over with surrogate escapes,
# which sqlite3 refuses to bind. Paths (and keys made of them) are therefore bound through
# `_T` with `_b`: such a value goes in as its exact bytes, cast to TEXT, and every text is
# read back with surrogatepass, so a path survives the round trip unchanged.
_T = "CAST(? AS TEXT)"
MODEL_HISTORY = "models.history"  # marker: the ids made current, in order (rollback's "before")
MAX_HISTORY = 100
DELETED_SHA = "0" * 64  # what `expect_own_write` is told for a file Gremlin deletes
BUSY_TIMEOUT_MS = 10_000
PAGE_SIZE = 8192
CACHE_KIB = 32_768  # page cache per connection, filled on demand: halves the p99 of re-scoring reads at 1M


def utc_now(now: datetime | None = None) -> str:
    """ISO-8601 UTC timestamp with milliseconds."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class FileState:
    """What Gremlin last saw of one watched file.

    `sha` is None when the content was not hashed (too large, a log). For a log, `size` is
    the offset read so far and `head` identifies its first bytes, to find it after rotation.
    """

    path: str
    root: str
    sha: str | None
    size: int
    mtime_ns: int
    inode: int = 0
    head: str | None = None


@dataclass(frozen=True)
class NewEvent:
    """One change to record: the event, the memory it becomes, the file's new state."""

    kind: str
    path: str
    root: str
    time: str
    state: FileState | None  # None: the file is gone
    old_sha: str | None = None
    new_sha: str | None = None
    size: int | None = None
    diff: str | None = None
    meta: dict = field(default_factory=dict)
    memory_kind: str | None = None
    memory_text: str | None = None
    memory_meta: dict = field(default_factory=dict)
    old_path: str | None = None  # a move: the path the file had before (its state is dropped)
    signature: str | None = None  # a failure: repeats of one signature are counted, not stored
    title: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    """Ids given to a recorded NewEvent; memory_id is None when it made no memory."""

    event_id: int
    memory_id: int | None
    event: NewEvent


class Store:
    """A connection to the Gremlin database; the writer migrates, readers may be read-only."""

    def __init__(self, path: Path, synchronous: str = "NORMAL", readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._conn = self._connect(synchronous)
        try:
            self._migrate() if not readonly else self._check_readable()
        except BaseException:
            self._conn.close()
            raise

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        try:
            if self.readonly:
                if not self.path.exists():
                    raise StoreError(f"no database at {self.path}; start the daemon once to create it")
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                       check_same_thread=False, isolation_level=None)
            else:
                self.path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_CREAT | os.O_RDONLY, PRIVATE_FILE))  # its -wal and -shm take its mode
                # The busy timeout from the first statement: processes opening a new file at once
                # wait for each other's page size and WAL switch instead of failing "locked".
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=BUSY_TIMEOUT_MS / 1000)
                # A new database only (a no-op on an existing one): with 4 KiB pages a 1.5 KiB vector
                # row spills into an overflow page, so each re-scoring read costs two page reads.
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.text_factory = _decode_text
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            conn.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise self._unusable(exc) from exc
        conn.row_factory = sqlite3.Row
        return conn

    def _unusable(self, exc: BaseException) -> StoreError:
        """A StoreError that says what is wrong with the database file and what to do."""
        text = str(exc)
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
            return StoreError(f"{self.path} is not a SQLite database (it is damaged, or another file took its "
                              "name); move it away and start the daemon to make a new one")
        if "readonly" in text or isinstance(exc, PermissionError):
            return StoreError(f"cannot write the database {self.path} ({text}); give this user write permission "
                              "on it and its folder, or set [memory] db to a writable place")
        return StoreError(f"cannot use the database {self.path}: {text}; check the file and its folder "
                          "(ls -l), and that the disk is not full")

    def _check_readable(self) -> None:
        """A reader needs a database the daemon has made (and finished migrating)."""
        try:
            version = self._query("PRAGMA user_version")[0][0]
            tables = {r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise self._unusable(exc) from exc
        if version >= SCHEMA_VERSION and not {"events", "memories", "markers"} <= tables:
            raise StoreError(f"{self.path} lacks Gremlin's tables (it is another program's database); "
                             "set [memory] db to another file, or move it away")
        if version < SCHEMA_VERSION:
            raise StoreNotReady(f"the database at {self.path} is not initialised yet (a daemon is "
                             "starting, or it was made by an older Gremlin); try again in a moment")

    def _migrate(self) -> None:
        with self._lock:
            try:
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(f"{self.path} has schema version {version}, newer than this "
                                     f"Gremlin ({SCHEMA_VERSION}); upgrade Gremlin")
                for number in range(version, SCHEMA_VERSION):
                    with self.transaction() as conn:
                        # another process may have migrated since we looked: read it again under the lock
                        if conn.execute("PRAGMA user_version").fetchone()[0] > number:
                            continue
                        for statement in _split_sql(MIGRATIONS[number]):
                            conn.execute(statement)
                        conn.execute(f"PRAGMA user_version={number + 1}")
                    logger.info("database migrated", extra={"db": str(self.path), "version": number + 1})
                with self.transaction() as conn:  # a write now, not at the first event: is it writable?
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except sqlite3.Error as exc:
                raise self._unusable(exc) from exc

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite on the last close)."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction started with BEGIN IMMEDIATE; commits or rolls back."""
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- events and memories ---------------------------------------------------------

    def record_events(self, events: Sequence[NewEvent], repeat_window_s: float = 0) -> list[StoredEvent]:
        """Commit events, their memories and the files' new states in one transaction.

        A failure whose signature was recorded less than `repeat_window_s` ago is not stored
        again: its count and last-seen time go up instead (the file state still advances). A
        commit already stored for its repository is left out of the result.
        """
        stored = []
        with self.transaction() as conn:
            for ev in events:
                _write_file_state(conn, ev.path, ev.state, ev.time)
                if ev.old_path:
                    _write_file_state(conn, ev.old_path, None, ev.time)
                if ev.signature and _count_repeat(conn, ev, repeat_window_s):
                    continue
                cursor = conn.execute(
                    "INSERT INTO events (time, kind, path, root, old_sha, new_sha, size, diff, meta, old_path)"
                    f" VALUES (?, ?, {_T}, {_T}, ?, ?, ?, ?, ?, {_T}) ON CONFLICT DO NOTHING",
                    (ev.time, ev.kind, _b(ev.path), _b(ev.root), ev.old_sha, ev.new_sha, ev.size,
                     ev.diff, json.dumps(ev.meta), _b(ev.old_path)))
                if not cursor.rowcount:  # the same commit of the same repository, stored before
                    continue
                event_id = cursor.lastrowid
                memory_id = None
                if ev.memory_kind:
                    memory_id = _insert_memory(conn, ev.memory_kind, ev.memory_text or "",
                                               ev.memory_meta, ev.time, event_id)
                if ev.signature:
                    conn.execute("INSERT OR REPLACE INTO failures (signature, event_id, title, first_seen,"
                                 " last_seen, count) VALUES (?, ?, ?, ?, ?, 1)",
                                 (ev.signature, event_id, ev.title or "", ev.time, ev.time))
                stored.append(StoredEvent(event_id, memory_id, ev))
        return stored

    def failure_counts(self, limit: int = 20) -> list[dict]:
        """Failure signatures seen most recently, with how often each repeated."""
        rows = self._query("SELECT signature, event_id, title, first_seen, last_seen, count FROM failures"
                           " ORDER BY last_seen DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def expect_own_write(self, path: str, sha: str, ttl_s: float = 300, now: datetime | None = None) -> None:
        """Announce that Gremlin itself is about to write `sha` to `path` (rollback, patch)."""
        now = now or datetime.now(timezone.utc)
        with self.transaction() as conn:
            conn.execute("DELETE FROM own_writes WHERE expires < ?", (utc_now(now),))
            conn.execute(f"INSERT OR REPLACE INTO own_writes (path, sha, expires) VALUES ({_T}, ?, ?)",
                         (_b(path), sha, utc_now(now + timedelta(seconds=ttl_s))))

    def is_own_write(self, path: str, sha: str | None, now: datetime | None = None) -> bool:
        """Whether this content of this path (None: its deletion) was announced as Gremlin's own write."""
        sha = sha or DELETED_SHA
        return bool(self._query(f"SELECT 1 FROM own_writes WHERE path = {_T} AND sha = ? AND expires >= ?",
                                (_b(path), sha, utc_now(now))))

    def add_memory(self, kind: str, text: str, meta: dict | None = None,
                   replaceable: bool = True, now: datetime | None = None) -> int:
        """Store a memory that has no file event behind it (a task, a retrain result)."""
        with self.transaction() as conn:
            return _insert_memory(conn, kind, text, meta or {}, utc_now(now), None, replaceable)

    def add_memories(self, items: Sequence[tuple[str, str, dict, str]]) -> list[int]:
        """Store many (kind, text, meta, created ISO time) memories in one transaction; their ids.
        For bulk loads (benchmarks, imports): one statement, ids assigned in order."""
        with self.transaction() as conn:
            first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM memories").fetchone()[0]
            conn.executemany("INSERT INTO memories (id, kind, text, meta, replaceable, created, event_id)"
                             " VALUES (?, ?, ?, ?, 1, ?, NULL)",
                             [(first + n, kind, text, json.dumps(meta), created)
                              for n, (kind, text, meta, created) in enumerate(items)])
        return list(range(first, first + len(items)))

    def get_memories(self, ids: Sequence[int]) -> dict[int, dict]:
        """Memories by id, with their event's time and kind; missing ids are left out."""
        rows = []
        for chunk in _chunks([int(i) for i in ids], 500):  # numpy ints would bind as blobs
            marks = ",".join("?" * len(chunk))
            rows += self._query(
                "SELECT m.id, m.kind, m.text, m.meta, m.replaceable, m.created, m.event_id,"
                " e.kind AS change FROM memories m LEFT JOIN events e ON e.id = m.event_id"
                f" WHERE m.id IN ({marks})", chunk)
        return {row["id"]: _memory_dict(row) for row in rows}

    def newest_memory_of(self, kind: str, after_id: int = 0) -> dict | None:
        """The newest memory of `kind` with an id above `after_id` (meta decoded), or None."""
        rows = self._query("SELECT * FROM memories WHERE kind = ? AND id > ? ORDER BY id DESC LIMIT 1",
                           (kind, after_id))
        return _memory_dict(rows[0]) if rows else None

    def memory_ids(self, kind: str | None = None) -> np.ndarray:
        """Ids of all memories, or of one kind, as int64."""
        sql, params = "SELECT id FROM memories", ()
        if kind:
            sql, params = sql + " WHERE kind = ?", (kind,)
        return np.array([r[0] for r in self._query(sql, params)], dtype=np.int64)

    def recent_events(self, limit: int = 10) -> list[dict]:
        """The newest events, newest first, without their diff text."""
        rows = self._query("SELECT id, time, kind, path, old_path, size, meta FROM events"
                           " ORDER BY id DESC LIMIT ?", (limit,))
        return [{**dict(r), "meta": json.loads(r["meta"])} for r in rows]

    def events_for_path(self, path: str) -> list[dict]:
        """Every event of one path, oldest first."""
        rows = self._query("SELECT id, time, kind, path, old_path, old_sha, new_sha, size, diff, meta"
                           f" FROM events WHERE path = {_T} ORDER BY id", (_b(path),))
        return [{**dict(r), "meta": json.loads(r["meta"])} for r in rows]

    def counts(self) -> dict[str, int]:
        """Row counts of the main tables."""
        tables = ("events", "memories", "vectors", "files", "failures", "tasks", "runs", "models")
        return {t: self._query(f"SELECT count(*) FROM {t}")[0][0] for t in tables}

    # -- lexical search --------------------------------------------------------------

    def lexical_search(self, query: str, k: int, kind: str | None = None,
                       budget: int | None = None) -> list[tuple[int, float]]:
        """(memory id, BM25 score: higher is better) of the k best full-text matches, best first.

        `budget` (default LEXICAL_BUDGET; 0 = none) bounds the work, see `_lexical_plan`.
        """
        words = query_words(query)
        if not words or k <= 0:
            return []
        words, newest = self._lexical_plan(words, LEXICAL_BUDGET if budget is None else budget)
        match, order = fts_match_expression(words), "memories_fts.rowid DESC" if newest else "bm25(memories_fts)"
        score = "0.0" if newest else "bm25(memories_fts)"
        if kind is None:
            sql, params = (f"SELECT rowid, {score} FROM memories_fts WHERE memories_fts MATCH ?"
                           f" ORDER BY {order} LIMIT ?", (match, k))
        else:
            sql, params = (f"SELECT m.id, {score} FROM memories_fts JOIN memories m ON m.id = memories_fts.rowid"
                           f" WHERE memories_fts MATCH ? AND m.kind = ? ORDER BY {order} LIMIT ?", (match, kind, k))
        # SQLite's bm25() is lower-is-better (negative); flip it so every search score rises. A
        # word found in half the memories or more scores ~0 (its IDF is floored at 1e-6).
        return [(int(r[0]), -float(r[1])) for r in self._query(sql, params)]

    def _lexical_plan(self, words: list[str], budget: int) -> tuple[list[str], bool]:
        """The words to score, and whether to list the newest matches instead of ranking by BM25.

        BM25 reads every posting of every query word (to score the rows, and to count a word's
        rows for its IDF), so a word held by half of a million memories costs hundreds of
        milliseconds while adding almost nothing to the ranking (its IDF is near zero). A
        word's cost is the rows holding each of its tokens, counted no further than the
        budget. When the words together cost more, the cheapest ones that fit are ranked by
        BM25 (rare words decide a BM25 ranking anyway); when even the cheapest does not fit,
        its newest matches are listed, score 0. Within the budget, as in any small memory,
        this is plain BM25 over every word.
        """
        if budget <= 0:
            return words, False
        cost = {w: sum(self._capped_matches(t, budget) for t in _TOKEN.findall(w)[:MAX_WORD_TOKENS])
                for w in words[:MAX_COSTED_WORDS]}
        if sum(cost.values()) <= budget and len(cost) == len(words):
            return words, False
        kept, total = [], 0
        for word in sorted(cost, key=cost.__getitem__):
            if kept and total + cost[word] > budget:
                break
            kept.append(word)
            total += cost[word]
        return kept, cost[kept[0]] > budget

    def _capped_matches(self, token: str, budget: int) -> int:
        """How many memories hold `token`, counted no further than `budget` + 1."""
        return self._query("SELECT count(*) FROM (SELECT 1 FROM memories_fts WHERE memories_fts MATCH ? LIMIT ?)",
                           (fts_match_expression([token]), budget + 1))[0][0]

    # -- watched files ---------------------------------------------------------------

    def file_state(self, path: str) -> FileState | None:
        """The last recorded state of one file."""
        rows = self._query(f"SELECT path, root, sha, size, mtime_ns, inode, head FROM files WHERE path = {_T}",
                           (_b(path),))
        return FileState(**dict(rows[0])) if rows else None

    def file_states_under(self, directory: str) -> dict[str, FileState]:
        """Recorded states of every file inside `directory` (a path prefix ending at a '/')."""
        prefix = directory.rstrip("/") + "/"
        rows = self._query("SELECT path, root, sha, size, mtime_ns, inode, head FROM files"
                           f" WHERE path >= {_T} AND path < {_T}", (_b(prefix), _b(prefix[:-1] + "0")))
        return {r["path"]: FileState(**dict(r)) for r in rows}

    def has_files_under(self, directory: str) -> bool:
        """Whether any file inside `directory` is recorded."""
        prefix = directory.rstrip("/") + "/"
        return bool(self._query(f"SELECT 1 FROM files WHERE path >= {_T} AND path < {_T} LIMIT 1",
                                (_b(prefix), _b(prefix[:-1] + "0"))))

    def file_shas(self) -> set[str]:
        """The content hashes of every recorded file (the shadow copies still needed)."""
        return {r[0] for r in self._query("SELECT DISTINCT sha FROM files WHERE sha IS NOT NULL")}

    def save_file_states(self, states: Iterable[FileState], now: datetime | None = None) -> None:
        """Record file states that produce no event (a baseline, a touched-only file)."""
        stamp = utc_now(now)
        with self.transaction() as conn:
            for state in states:
                _write_file_state(conn, state.path, state, stamp)

    def root_watched_since(self, root: str, now_ns: int, now: datetime | None = None) -> tuple[int, bool]:
        """When Gremlin first watched `root` (ns since the epoch; `now_ns` the first time asked),
        and whether its first full scan (the baseline) has completed."""
        with self.transaction() as conn:
            conn.execute(f"INSERT OR IGNORE INTO roots (path, watched_since_ns, first_seen) VALUES ({_T}, ?, ?)",
                         (_b(root), now_ns, utc_now(now)))
            since, done = conn.execute(f"SELECT watched_since_ns, baselined FROM roots WHERE path = {_T}",
                                       (_b(root),)).fetchone()
        return since, done is not None

    def mark_root_baselined(self, root: str, now: datetime | None = None) -> None:
        """The first full scan of `root` is complete: from now on every new file is a change."""
        with self.transaction() as conn:
            conn.execute(f"UPDATE roots SET baselined = ? WHERE path = {_T} AND baselined IS NULL",
                         (utc_now(now), _b(root)))

    # -- vectors ---------------------------------------------------------------------

    def add_vectors(self, model_id: str, ids: Sequence[int], vectors: np.ndarray,
                    shifts: Sequence[float | None] | None = None) -> None:
        """Store float32 vectors of memories for one model, and each memory's vector shift."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO vectors (model_id, memory_id, vec) VALUES (?, ?, ?)",
                             [(model_id, int(i), v.tobytes()) for i, v in zip(ids, vectors, strict=True)])
            if shifts is not None:
                conn.executemany("UPDATE memories SET meta = json_set(meta, '$.vector_shift', ?) WHERE id = ?",
                                 [(s, int(i)) for i, s in zip(ids, shifts, strict=True) if s is not None])

    def vector_ids(self, model_id: str) -> np.ndarray:
        """Ids of the memories that have a vector for this model."""
        rows = self._query("SELECT memory_id FROM vectors INDEXED BY vectors_memory WHERE model_id = ?"
                           " ORDER BY memory_id", (model_id,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def vector_fingerprint(self, model_id: str) -> tuple[int, int, int]:
        """`id_fingerprint` of this model's vector ids, computed in SQLite (no million-row list)."""
        row = self._query(f"SELECT count(*), coalesce(sum(memory_id), 0), coalesce(sum({_ID_HASH_SQL}), 0)"
                          " FROM vectors INDEXED BY vectors_memory WHERE model_id = ?", (model_id,))[0]
        return int(row[0]), int(row[1]), int(row[2])

    def vector_ids_among(self, model_id: str, ids: Sequence[int]) -> list[int]:
        """Those of `ids` that already have a vector for this model."""
        found = []
        for chunk in _chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            found += [r[0] for r in self._query(f"SELECT memory_id FROM vectors WHERE model_id = ?"
                                                f" AND memory_id IN ({marks})", [model_id, *chunk])]
        return found

    def vector_count(self, model_id: str, kind: str | None = None) -> int:
        """How many memories (of one kind, or all) have a vector for this model."""
        if kind is None:
            return self._query("SELECT count(*) FROM vectors INDEXED BY vectors_memory WHERE model_id = ?",
                               (model_id,))[0][0]
        return self._query("SELECT count(*) FROM vectors v JOIN memories m ON m.id = v.memory_id"
                           " WHERE v.model_id = ? AND m.kind = ?", (model_id, kind))[0][0]

    def memory_count(self, kind: str | None = None) -> int:
        """How many memories there are (of one kind, or all)."""
        if kind is None:
            return self._query("SELECT count(*) FROM memories")[0][0]
        return self._query("SELECT count(*) FROM memories WHERE kind = ?", (kind,))[0][0]

    def load_vectors(self, model_id: str, ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 matrix) of the stored vectors among `ids` for this model."""
        found, blobs = [], []
        for chunk in _chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            for row in self._query(f"SELECT memory_id, vec FROM vectors WHERE model_id = ?"
                                   f" AND memory_id IN ({marks})", [model_id, *chunk]):
                found.append(row[0])
                blobs.append(row[1])
        matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(found), dim)
        return np.array(found, dtype=np.int64), matrix

    def vectors_after(self, model_id: str, after_id: int, limit: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 matrix) of up to `limit` stored vectors for this model after `after_id`, by id."""
        rows = self._query("SELECT memory_id, vec FROM vectors WHERE model_id = ? AND memory_id > ?"
                           " ORDER BY memory_id LIMIT ?", (model_id, after_id, limit))
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return np.array([r[0] for r in rows], dtype=np.int64), matrix

    def ids_of_kind(self, ids: Sequence[int], kind: str) -> set[int]:
        """Those of `ids` whose memory is of `kind`."""
        found: set[int] = set()
        for chunk in _chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self._query(f"SELECT id FROM memories WHERE kind = ? AND id IN ({marks})",
                                                   [kind, *chunk]))
        return found

    def memories_without_vector(self, model_id: str, limit: int = 256, after_id: int = 0) -> list[tuple[int, str]]:
        """(id, text) of memories after `after_id` not yet embedded with this model, oldest first."""
        rows = self._query(
            "SELECT id, text FROM memories m WHERE id > ? AND NOT EXISTS (SELECT 1 FROM vectors v"
            " WHERE v.model_id = ? AND v.memory_id = m.id) ORDER BY id LIMIT ?", (after_id, model_id, limit))
        return [(r[0], r[1]) for r in rows]

    # -- models ----------------------------------------------------------------------

    def register_model(self, model_id: str, path: str, status: str, lineage: dict | None = None,
                       now: datetime | None = None, fusion_weight: float | None = None) -> None:
        """Record a model once (a later call with the same id changes nothing); `fusion_weight`
        is its calibrated hybrid-search weight (None: not calibrated)."""
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO models (id, path, created, status, lineage, fusion_weight)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (model_id, path, utc_now(now), status, json.dumps(lineage or {}), fusion_weight))

    def model_fusion_weight(self, model_id: str) -> float | None:
        """A model's calibrated fusion weight, or None (no row, or never calibrated)."""
        rows = self._query("SELECT fusion_weight FROM models WHERE id = ?", (model_id,))
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    # -- training runs -----------------------------------------------------------------

    def create_run(self, run_id: str, trigger: dict, spec: dict, now: datetime | None = None) -> None:
        """Record a new training run in state `idle` before any work starts."""
        stamp = utc_now(now)
        with self.transaction() as conn:
            conn.execute("INSERT INTO runs (id, state, trigger, spec, started, updated) VALUES (?, 'idle', ?, ?, ?, ?)",
                         (run_id, json.dumps(trigger), json.dumps(spec), stamp, stamp))

    def update_run(self, run_id: str, now: datetime | None = None, **fields) -> None:
        """Change a run's state, progress, metrics, model_id, reason, error or finished time."""
        allowed = {"state", "progress", "metrics", "model_id", "reason", "error", "finished"}
        unknown = set(fields) - allowed
        if unknown:
            raise StoreError(f"unknown run fields {sorted(unknown)}")
        values = {k: json.dumps(v) if k in ("progress", "metrics") else v for k, v in fields.items()}
        values["updated"] = utc_now(now)
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as conn:
            conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*values.values(), run_id))

    def get_run(self, run_id: str) -> dict | None:
        """One run with its JSON fields decoded, or None."""
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        return _run_dict(rows[0]) if rows else None

    def recent_runs(self, limit: int = 10) -> list[dict]:
        """The newest runs first."""
        return [_run_dict(r) for r in self._query("SELECT * FROM runs ORDER BY started DESC, id DESC LIMIT ?",
                                                  (limit,))]

    def runs_in_states(self, states: Sequence[str]) -> list[dict]:
        """Runs whose state is one of `states`, oldest first."""
        marks = ",".join("?" * len(states))
        return [_run_dict(r) for r in self._query(f"SELECT * FROM runs WHERE state IN ({marks}) ORDER BY started",
                                                  tuple(states))]

    def last_finished_run(self) -> dict | None:
        """The run that finished most recently, or None."""
        rows = self._query("SELECT * FROM runs WHERE finished IS NOT NULL ORDER BY finished DESC LIMIT 1")
        return _run_dict(rows[0]) if rows else None

    # -- models ------------------------------------------------------------------------

    def list_models(self) -> list[dict]:
        """Every model ever registered, newest first, lineage decoded."""
        return [_model_dict(r) for r in self._query("SELECT * FROM models ORDER BY created DESC, rowid DESC")]

    def get_model(self, model_id: str) -> dict | None:
        """One model by id (or by a unique prefix of its id), or None."""
        rows = self._query("SELECT * FROM models WHERE id = ?", (model_id,)) or \
            self._query("SELECT * FROM models WHERE id LIKE ? ESCAPE '\\'",
                        (model_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",))
        return _model_dict(rows[0]) if len(rows) == 1 else None

    def set_model_status(self, model_id: str, status: str) -> None:
        """Change a model's status (current, retired, accepted, rejected, pruned)."""
        with self.transaction() as conn:
            conn.execute("UPDATE models SET status = ? WHERE id = ?", (status, model_id))

    def make_current(self, model_id: str) -> None:
        """Mark one model current and the one that was current retired, in one transaction."""
        with self.transaction() as conn:
            conn.execute("UPDATE models SET status = 'retired' WHERE status = 'current' AND id != ?", (model_id,))
            conn.execute("UPDATE models SET status = 'current' WHERE id = ?", (model_id,))
            row = conn.execute("SELECT value FROM markers WHERE key = ?", (MODEL_HISTORY,)).fetchone()
            history = (json.loads(row[0]) if row else []) + [model_id]
            conn.execute("INSERT INTO markers (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                         " SET value = excluded.value", (MODEL_HISTORY, json.dumps(history[-MAX_HISTORY:])))

    def model_history(self) -> list[str]:
        """Ids of the models made current, oldest first (the last is current)."""
        row = self._query("SELECT value FROM markers WHERE key = ?", (MODEL_HISTORY,))
        return json.loads(row[0][0]) if row else []

    def history_version(self) -> tuple[int, int]:
        """(newest event id, finished tasks): changes whenever new training history arrives."""
        row = self._query("SELECT (SELECT coalesce(max(id), 0) FROM events),"
                          " (SELECT count(*) FROM tasks WHERE finished IS NOT NULL)")[0]
        return int(row[0]), int(row[1])

    def delete_vectors(self, model_id: str) -> int:
        """Drop every stored vector of one model (it was pruned); returns how many."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM vectors WHERE model_id = ?", (model_id,)).rowcount

    # -- feedback rules ----------------------------------------------------------------

    def get_marker(self, key: str) -> str | None:
        """One small piece of persistent state (a cursor, a time), or None."""
        rows = self._query(f"SELECT value FROM markers WHERE key = {_T}", (_b(key),))
        return rows[0][0] if rows else None

    def get_markers(self, prefix: str) -> dict[str, str]:
        """Every marker whose key starts with `prefix`."""
        rows = self._query("SELECT key, value FROM markers WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
        return {r[0]: r[1] for r in rows}

    def set_marker(self, key: str, value: str) -> None:
        """Set one marker."""
        self.set_markers({key: value})

    def set_markers(self, values: dict[str, str]) -> None:
        """Set several markers in one transaction."""
        with self.transaction() as conn:
            conn.executemany(f"INSERT INTO markers (key, value) VALUES ({_T}, ?)"
                             " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                             [(_b(k), str(v)) for k, v in values.items()])

    def events_after(self, event_id: int, limit: int = 1000) -> list[dict]:
        """(id, kind, path, meta) of the events after `event_id`, oldest first, without diffs."""
        rows = self._query("SELECT id, kind, path, meta FROM events WHERE id > ? ORDER BY id LIMIT ?",
                           (event_id, limit))
        return [{**dict(r), "meta": json.loads(r["meta"])} for r in rows]

    def memory_shifts_after(self, memory_id: int, limit: int) -> list[tuple[int, float]]:
        """(id, vector shift) of the newest `limit` memories after `memory_id` that have one, oldest first."""
        rows = self._query("SELECT id, json_extract(meta, '$.vector_shift') FROM memories WHERE id > ?"
                           " AND json_extract(meta, '$.vector_shift') IS NOT NULL ORDER BY id DESC LIMIT ?",
                           (memory_id, limit))
        return [(r[0], float(r[1])) for r in reversed(rows)]

    def newest_memory_id(self) -> int:
        """The highest memory id (0 when there are none)."""
        return self._query("SELECT coalesce(max(id), 0) FROM memories")[0][0]

    def insert_task(self, task_type: str, payload: dict | None = None, state: str = "queued",
                    result: dict | None = None, error: str | None = None, now: datetime | None = None) -> int:
        """Store a task row as given (a finished state also sets `finished`); return its id."""
        stamp = utc_now(now)
        finished = stamp if state in ("done", "failed", "cancelled") else None
        with self.transaction() as conn:
            return conn.execute(
                "INSERT INTO tasks (type, payload, state, created, finished, result, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (task_type, json.dumps(payload or {}), state, stamp, finished,
                 None if result is None else json.dumps(result), error)).lastrowid

    def tasks_finished_after(self, finished: str, task_id: int, limit: int = 1000) -> list[dict]:
        """Done or failed tasks after the cursor (finished time, id), in that order."""
        rows = self._query(
            "SELECT id, type, state, finished, result, error FROM tasks"
            " WHERE state IN ('done', 'failed') AND finished IS NOT NULL"
            " AND (finished > ? OR (finished = ? AND id > ?)) ORDER BY finished, id LIMIT ?",
            (finished, finished, task_id, limit))
        return [self._feedback_task(r) for r in rows]

    @staticmethod
    def _feedback_task(row: sqlite3.Row) -> dict:
        """A task row with its result decoded (an undecodable result reads as None)."""
        out = dict(row)
        try:
            out["result"] = json.loads(out["result"]) if out["result"] else None
        except ValueError:
            out["result"] = None
        return out

    # -- the task queue (agent_core.tasks) -----------------------------------------------

    def submit_task(self, task_type: str, payload: dict, priority: int | None = None, max_attempts: int = 1,
                    key: str | None = None, source: str = "", retry_of: int | None = None,
                    now: datetime | None = None) -> tuple[int, bool]:
        """Queue a task; returns (id, True), or (the existing id, False) when `key` was seen before."""
        with self.transaction() as conn:
            row = conn.execute(
                "INSERT INTO tasks (type, payload, state, created, priority, priority_auto, max_attempts,"
                " idem_key, source, retry_of) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (idem_key) WHERE idem_key IS NOT NULL DO NOTHING RETURNING id",
                (task_type, json.dumps(payload), utc_now(now), priority or 0, int(priority is None),
                 max_attempts, key, source, retry_of)).fetchone()
            if row is not None:
                return row[0], True
            return conn.execute("SELECT id FROM tasks WHERE idem_key = ?", (key,)).fetchone()[0], False

    def claim_task(self, worker: int, lease_s: float, now: datetime | None = None) -> dict | None:
        """Take the queued task due first (highest priority, then oldest) with a lease, or None.

        Runs whose lease ran out (their runner died) are queued again first, or failed once they
        have used all their attempts; all of it in one BEGIN IMMEDIATE transaction.
        """
        now = now or datetime.now(timezone.utc)
        stamp, until = utc_now(now), utc_now(now + timedelta(seconds=lease_s))
        with self.transaction() as conn:
            conn.execute("UPDATE tasks SET state = 'failed', finished = ?, lease_until = NULL,"
                         " error = 'its runner stopped (lease expired) on the last of ' || max_attempts || ' attempts'"
                         " WHERE state = 'running' AND lease_until < ? AND attempts >= max_attempts", (stamp, stamp))
            conn.execute("UPDATE tasks SET state = 'queued', lease_until = NULL, not_before = NULL,"
                         " error = 'its runner stopped (lease expired); queued again'"
                         " WHERE state = 'running' AND lease_until < ?", (stamp,))
            row = conn.execute(
                "UPDATE tasks SET state = 'running', claimed_by = ?, attempts = attempts + 1, started = ?,"
                " heartbeat = ?, lease_until = ? WHERE id = (SELECT id FROM tasks WHERE state = 'queued'"
                " AND (not_before IS NULL OR not_before <= ?) ORDER BY priority DESC, id LIMIT 1)"
                " RETURNING *", (worker, stamp, stamp, until, stamp)).fetchone()
        return _task_dict(row) if row else None

    def renew_lease(self, task_id: int, attempt: int, lease_s: float, now: datetime | None = None) -> bool | None:
        """Extend a running task's lease; None if it is no longer ours, else whether cancel was asked."""
        now = now or datetime.now(timezone.utc)
        with self.transaction() as conn:
            row = conn.execute("UPDATE tasks SET heartbeat = ?, lease_until = ? WHERE id = ? AND attempts = ?"
                               " AND state = 'running' RETURNING cancel_requested",
                               (utc_now(now), utc_now(now + timedelta(seconds=lease_s)), task_id, attempt)).fetchone()
        return None if row is None else bool(row[0])

    def finish_task(self, task_id: int, attempt: int, state: str, result: dict | None = None,
                    error: str | None = None, retry_at: datetime | None = None,
                    memory: tuple[str, str, dict] | None = None,
                    now: datetime | None = None) -> tuple[bool, int | None]:
        """End the attempt `attempt` of a running task: done, failed or cancelled (with its
        memory (kind, text, meta), in the same transaction), or queued again for `retry_at`.
        Returns (False, None) when the task is no longer ours (its lease ran out and it moved on)."""
        result = result or {}
        queued_again = retry_at is not None and state == "failed"
        stamp = utc_now(now)
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE tasks SET state = ?, finished = ?, not_before = ?, result = ?, error = ?, exit_code = ?,"
                " reward = ?, lease_until = NULL WHERE id = ? AND attempts = ? AND state = 'running'",
                ("queued" if queued_again else state, None if queued_again else stamp,
                 utc_now(retry_at) if queued_again else None, json.dumps(result), error,
                 _int_or_none(result.get("exit_code")), _float_or_none(result.get("reward")), task_id, attempt))
            if cur.rowcount != 1:
                return False, None
            if memory is None or queued_again:
                return True, None
            return True, _insert_memory(conn, memory[0], memory[1], memory[2], stamp, None, True)

    def cancel_task(self, task_id: int, now: datetime | None = None) -> str | None:
        """Cancel a queued task at once, or ask a running one to stop; returns its state then (None: no task)."""
        with self.transaction() as conn:
            conn.execute("UPDATE tasks SET state = 'cancelled', finished = ?, error = 'cancelled before it ran'"
                         " WHERE id = ? AND state = 'queued'", (utc_now(now), task_id))
            conn.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (task_id,))
            row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return row[0] if row else None

    def get_task(self, task_id: int) -> dict | None:
        """One task with its payload and result decoded, or None."""
        rows = self._query("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return _task_dict(rows[0]) if rows else None

    def list_tasks(self, states: Sequence[str] = (), task_type: str | None = None, limit: int = 50) -> list[dict]:
        """The newest tasks (optionally of some states and one type), newest first."""
        sql, params = "SELECT * FROM tasks WHERE 1", []
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params += list(states)
        if task_type:
            sql, params = sql + " AND type = ?", [*params, task_type]
        return [_task_dict(r) for r in self._query(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])]

    def task_counts(self) -> dict[str, int]:
        """How many tasks are in each state."""
        return {r[0]: r[1] for r in self._query("SELECT state, count(*) FROM tasks GROUP BY state")}

    def task_history(self, task_type: str, limit: int = 50) -> list[dict]:
        """The newest finished tasks of one type: seconds taken, reward, state (newest first)."""
        rows = self._query(
            "SELECT state, reward, (julianday(finished) - julianday(started)) * 86400.0 AS seconds"
            " FROM tasks WHERE type = ? AND state IN ('done', 'failed') AND finished IS NOT NULL"
            " ORDER BY finished DESC LIMIT ?", (task_type, limit))
        return [dict(r) for r in rows]

    def reward_by_type(self, limit_per_type: int = 50) -> dict[str, tuple[float, int]]:
        """Each task type's mean reward over its newest `limit_per_type` scored tasks, and how many."""
        rows = self._query(
            "SELECT type, avg(reward), count(*) FROM (SELECT type, reward, row_number() OVER"
            " (PARTITION BY type ORDER BY finished DESC) AS n FROM tasks WHERE reward IS NOT NULL)"
            " WHERE n <= ? GROUP BY type", (limit_per_type,))
        return {r[0]: (float(r[1]), int(r[2])) for r in rows}

    def set_auto_priorities(self, priorities: dict[str, int]) -> int:
        """Give queued tasks without a priority of their own the priority of their type."""
        with self.transaction() as conn:
            return sum(conn.execute("UPDATE tasks SET priority = ? WHERE state = 'queued' AND priority_auto = 1"
                                    " AND type = ? AND priority != ?", (p, t, p)).rowcount
                       for t, p in priorities.items())

    # -- the planner's trials (agents.planner_agent) ----------------------------------------

    def add_trial(self, params: dict, run_id: str | None = None, now: datetime | None = None) -> int:
        """Record a proposed spec; returns the trial id."""
        with self.transaction() as conn:
            return conn.execute("INSERT INTO planner_trials (run_id, params, created) VALUES (?, ?, ?)",
                                (run_id, json.dumps(params), utc_now(now))).lastrowid

    def update_trial(self, trial_id: int, now: datetime | None = None, **fields) -> None:
        """Set a trial's run_id, state, value or decision (a final state also sets `finished`)."""
        unknown = set(fields) - {"run_id", "state", "value", "decision"}
        if unknown:
            raise ValueError(f"not trial fields: {sorted(unknown)}")
        if fields.get("state") in ("complete", "fail", "skipped"):
            fields["finished"] = utc_now(now)
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as conn:
            conn.execute(f"UPDATE planner_trials SET {sets} WHERE id = ?", (*fields.values(), trial_id))

    def trials(self, states: Sequence[str] = ("proposed", "complete", "fail", "skipped")) -> list[dict]:
        """The planner's trials in some states, oldest first, params decoded."""
        rows = self._query(f"SELECT * FROM planner_trials WHERE state IN ({','.join('?' * len(states))})"
                           " ORDER BY id", list(states))
        return [{**dict(r), "params": _json_or(r["params"], {})} for r in rows]

    # -- the dashboard's reads (dashboard/) ---------------------------------------------

    def list_events(self, path_contains: str | None = None, kind: str | None = None, since: str | None = None,
                    by_gremlin: bool | None = None, before_id: int | None = None, limit: int = 50) -> list[dict]:
        """The newest events passing the filters, newest first, without their diff text: a path
        substring (the old path of a move too), a kind, a time floor, made by Gremlin or not."""
        sql, params = "SELECT id, time, kind, path, old_path, size, meta FROM events WHERE 1", []
        if path_contains:
            sql += f" AND (instr(path, {_T}) > 0 OR instr(coalesce(old_path, ''), {_T}) > 0)"
            params += [_b(path_contains), _b(path_contains)]
        if kind:
            sql, params = sql + " AND kind = ?", [*params, kind]
        if since:
            sql, params = sql + " AND time >= ?", [*params, since]
        if by_gremlin is not None:
            sql, params = sql + " AND coalesce(json_extract(meta, '$.by_gremlin'), 0) = ?", [*params, int(by_gremlin)]
        if before_id is not None:
            sql, params = sql + " AND id < ?", [*params, before_id]
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])
        return [{**dict(r), "meta": _json_or(r["meta"], {})} for r in rows]

    def get_event(self, event_id: int) -> dict | None:
        """One event with its diff and the memory it became (`memory`: None when it made none), or None."""
        rows = self._query("SELECT id, time, kind, path, root, old_path, old_sha, new_sha, size, diff, meta"
                           " FROM events WHERE id = ?", (event_id,))
        if not rows:
            return None
        memories = self._query("SELECT id, kind, text, meta, replaceable, created, event_id FROM memories"
                               " WHERE event_id = ? ORDER BY id LIMIT 1", (event_id,))
        return {**dict(rows[0]), "meta": _json_or(rows[0]["meta"], {}),
                "memory": _memory_dict(memories[0]) if memories else None}

    def activity_by_hour(self, since: str) -> dict[str, dict[str, int]]:
        """Events, memories and tasks made in each hour from `since` on: {"events": {"2024-05-01T13": 4}, ...}."""
        out = {}
        for table, column in (("events", "time"), ("memories", "created"), ("tasks", "created")):
            rows = self._query(f"SELECT substr({column}, 1, 13), count(*) FROM {table} WHERE {column} >= ?"
                               " GROUP BY 1", (since,))
            out[table] = {r[0]: r[1] for r in rows}
        return out

    # -- history and training pairs (self_training.replay, generate_dataset) -------------

    def commit_shas(self, root: str) -> set[str]:
        """The shas of the commits of one repository already stored as `commit` events."""
        # a commit event's path is its repository: the events_path index finds them
        rows = self._query(f"SELECT json_extract(meta, '$.commit') FROM events WHERE path = {_T} AND kind = 'commit'",
                           (_b(root),))
        return {r[0] for r in rows if r[0]}

    def dataset_events(self, after_id: int, limit: int, max_chars: int) -> list[dict]:
        """Events after `after_id`, oldest first, with their diff cut to `max_chars` characters."""
        rows = self._query("SELECT id, time, kind, path, root, substr(diff, 1, ?) AS diff, meta FROM events"
                           " WHERE id > ? ORDER BY id LIMIT ?", (max_chars, after_id, limit))
        return [{**dict(r), "meta": json.loads(r["meta"])} for r in rows]

    def event_id_floor(self, keep: int) -> int:
        """The id just below the newest `keep` events (0 when there are no more than that)."""
        rows = self._query("SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (keep,))
        return rows[0][0] if rows else 0

    def event_time(self, event_id: int) -> str | None:
        """The time of one event, or None if there is no such event."""
        rows = self._query("SELECT time FROM events WHERE id = ?", (event_id,))
        return rows[0][0] if rows else None

    def dataset_tasks(self, limit: int) -> list[dict]:
        """The newest `limit` done or failed tasks, oldest first, payload and result decoded."""
        rows = self._query("SELECT id, type, payload, state, created, started, finished, result, error"
                           " FROM tasks WHERE state IN ('done', 'failed') ORDER BY id DESC LIMIT ?", (limit,))
        tasks = []
        for row in reversed(rows):
            task = self._feedback_task(row)
            try:
                task["payload"] = json.loads(task["payload"] or "{}")
            except ValueError:
                task["payload"] = {}
            tasks.append(task)
        return tasks

    # -- retention (memory.retention) ------------------------------------------------------

    def evictable_memories(self, kind: str, max_count: int | None = None, older_than: str | None = None,
                           keep_events: Collection[int] = (), keep_tasks: Collection[int] = ()) -> list[int]:
        """Ids of the memories `evict_memories` would delete now, oldest first; deletes nothing."""
        with self._lock:
            return _evictable(self._conn, kind, max_count, older_than, keep_events, keep_tasks, -1)

    def evict_memories(self, kind: str, max_count: int | None = None, older_than: str | None = None,
                       keep_events: Collection[int] = (), keep_tasks: Collection[int] = (),
                       batch: int = 5000) -> list[int]:
        """Delete the memories of `kind` past its newest `max_count` or created before `older_than`
        (ISO UTC), except those `_EVICTABLE` keeps; `batch` rows per BEGIN IMMEDIATE transaction.

        `keep_events` and `keep_tasks` are the event and task ids training pairs refer to. A
        memory's full-text row goes with it (trigger), its vectors too (ON DELETE CASCADE);
        its event stays. Returns the deleted ids, oldest first.
        """
        evicted: list[int] = []
        while True:
            with self.transaction() as conn:  # short transactions: writers wait one batch at most
                ids = _evictable(conn, kind, max_count, older_than, keep_events, keep_tasks, batch)
                conn.executemany("DELETE FROM memories WHERE id = ?", [(i,) for i in ids])
            evicted += ids
            if len(ids) < batch:
                return evicted


# What retention may delete: a replaceable memory of the kind below the bound (see
# `_eviction_bound`) that no training pair names (its event, or the task in its meta, among
# :keep_events / :keep_tasks) and no queued or running task needs: the task it records is that
# task, or the one it retries (retry_of) or rewrites (payload `rewrites`), or the memory is the
# failure a mutate task was proposed for (payload `failure_id`). The memory with the highest id
# always stays: SQLite hands out max(id) + 1 next, and cursors and saved indexes rely on an id
# never coming back.
_EVICTABLE = """
WITH active AS (SELECT id, retry_of, CASE WHEN json_valid(payload) THEN payload END AS payload
                FROM tasks WHERE state IN ('queued', 'running')),
     task_refs(id) AS (SELECT value FROM json_each(:keep_tasks) UNION SELECT id FROM active
                       UNION SELECT retry_of FROM active UNION SELECT json_extract(payload, '$.rewrites') FROM active),
     memory_refs(id) AS (SELECT json_extract(payload, '$.failure_id') FROM active)
SELECT id FROM memories
WHERE kind = :kind AND (created, id) < (:created, :id) AND replaceable = 1
  AND id < (SELECT max(id) FROM memories)
  AND coalesce(event_id, -1) NOT IN (SELECT value FROM json_each(:keep_events))
  AND coalesce(json_extract(meta, '$.task_id'), -1) NOT IN (SELECT id FROM task_refs WHERE id IS NOT NULL)
  AND id NOT IN (SELECT id FROM memory_refs WHERE id IS NOT NULL)
ORDER BY created, id LIMIT :limit
"""


def _evictable(conn: sqlite3.Connection, kind: str, max_count: int | None, older_than: str | None,
               keep_events: Collection[int], keep_tasks: Collection[int], limit: int) -> list[int]:
    """Up to `limit` (-1: all) ids retention may delete now, oldest first."""
    bound = _eviction_bound(conn, kind, max_count, older_than)
    if bound is None:
        return []
    params = {"kind": kind, "created": bound[0], "id": bound[1], "limit": limit,
              "keep_events": json.dumps(sorted({int(i) for i in keep_events})),
              "keep_tasks": json.dumps(sorted({int(i) for i in keep_tasks}))}
    return [r[0] for r in conn.execute(_EVICTABLE, params).fetchall()]


def _eviction_bound(conn: sqlite3.Connection, kind: str, max_count: int | None,
                    older_than: str | None) -> tuple[str, int] | None:
    """(created, id) below which the memories of `kind` are past a limit; None when no limit applies.

    Below the newest `max_count` means below the max_count-th newest; older than a time means
    below (that time, 0). Past either limit is below the higher of the two bounds.
    """
    bounds = [(older_than, 0)] if older_than else []
    if max_count:
        row = conn.execute("SELECT created, id FROM memories WHERE kind = ? ORDER BY created DESC, id DESC"
                           " LIMIT 1 OFFSET ?", (kind, max_count - 1)).fetchone()
        if row is not None:
            bounds.append((row[0], row[1]))
    return max(bounds) if bounds else None


_WORD = re.compile(r"\w+")
MAX_QUERY_TERMS = 64  # a pasted traceback stays a bounded query
LEXICAL_BUDGET = 20_000  # postings one full-text search may read: its cost stops growing with memory
MAX_COSTED_WORDS = 16  # a longer query (a pasted traceback) is costed, and searched, by its first words
MAX_WORD_TOKENS = 4  # tokens of one word costed (`a_b_c_d_e` is a phrase of five)
_TOKEN = re.compile(r"[^\W_]+")  # what FTS5's unicode61 tokenizer keeps together
FTS_TOKENIZER = "porter unicode61"  # memories_fts's tokenizer (migration 2): rank_lexically uses the same


_ID_HASH_MUL, _ID_HASH_MOD = 2654435761, 4294967291
_ID_HASH_SQL = f"(memory_id * {_ID_HASH_MUL}) % {_ID_HASH_MOD}"


def id_fingerprint(ids: np.ndarray) -> tuple[int, int, int]:
    """(count, sum, sum of a multiplicative hash) of a set of ids: two sets that differ by
    adds or removes (the way an index falls behind its database) practically never match."""
    ids = np.asarray(ids, dtype=np.int64)
    return len(ids), int(ids.sum()), int(((ids * _ID_HASH_MUL) % _ID_HASH_MOD).sum())


def query_words(query: str) -> list[str]:
    """The distinct `\\w+` words of free text, at most MAX_QUERY_TERMS (FTS5 folds case itself)."""
    return list(dict.fromkeys(_WORD.findall(query)))[:MAX_QUERY_TERMS]


def fts_match_expression(words: Sequence[str]) -> str:
    """An FTS5 MATCH expression for words of free text: each quoted, OR-ed ('' if none).

    Quoting every word makes FTS5 operators (AND, NEAR, `*`, `:`, `-`, parentheses) plain
    words, so no user text can be a syntax error; `\\w+` words never hold a double quote.
    """
    return " OR ".join(f'"{w}"' for w in words)


def rank_lexically(corpus: Sequence[str], queries: Sequence[str], depth: int) -> list[list[int]]:
    """For each query, indices of `corpus` best first (see `score_lexically`)."""
    return [[i for i, _ in ranking] for ranking in score_lexically(corpus, queries, depth)]


def score_lexically(corpus: Sequence[str], queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
    """For each query, (index of `corpus`, BM25 score: higher is better) best first, ranked and
    scored as `Store.lexical_search` does memories: the same FTS5 tokenizer (migration 2's
    `memories_fts`), words and MATCH expression, in a throwaway in-memory table. No budget: a
    held-out corpus is small, and within the budget search is plain BM25 too."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"CREATE VIRTUAL TABLE corpus_fts USING fts5(text, tokenize='{FTS_TOKENIZER}')")
        conn.executemany("INSERT INTO corpus_fts (rowid, text) VALUES (?, ?)",
                         ((i + 1, text.encode("utf-8", "replace").decode("utf-8"))  # no lone surrogates
                          for i, text in enumerate(corpus)))
        return [_scored_rows(conn, query, depth) for query in queries]
    finally:
        conn.close()


def _scored_rows(conn: sqlite3.Connection, query: str, depth: int) -> list[tuple[int, float]]:
    """(0-based row of `corpus_fts`, -bm25) of the rows matching `query`, best first."""
    words = query_words(query)
    if not words or depth <= 0:
        return []
    rows = conn.execute("SELECT rowid, bm25(corpus_fts) FROM corpus_fts WHERE corpus_fts MATCH ?"
                        " ORDER BY bm25(corpus_fts) LIMIT ?", (fts_match_expression(words), depth)).fetchall()
    return [(int(r[0]) - 1, -float(r[1])) for r in rows]


def _b(value: str | None) -> str | bytes | None:
    """A parameter for `_T`: the text itself, or its exact bytes when it holds surrogate escapes."""
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")
    return value


def _decode_text(data: bytes) -> str:
    """Text read from the database (what `_b` wrote comes back as it was)."""
    return data.decode("utf-8", "surrogatepass")


def _insert_memory(conn: sqlite3.Connection, kind: str, text: str, meta: dict, created: str,
                   event_id: int | None, replaceable: bool = True) -> int:
    return conn.execute(
        "INSERT INTO memories (kind, text, meta, replaceable, created, event_id)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (kind, text, json.dumps(meta), int(replaceable), created, event_id)).lastrowid


def _write_file_state(conn: sqlite3.Connection, path: str, state: FileState | None, stamp: str) -> None:
    if state is None:
        conn.execute(f"DELETE FROM files WHERE path = {_T}", (_b(path),))
        return
    conn.execute(
        "INSERT INTO files (path, root, sha, size, mtime_ns, inode, head, updated)"
        f" VALUES ({_T}, {_T}, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET root = excluded.root,"
        " sha = excluded.sha, size = excluded.size, mtime_ns = excluded.mtime_ns,"
        " inode = excluded.inode, head = excluded.head, updated = excluded.updated",
        (_b(state.path), _b(state.root), state.sha, state.size, state.mtime_ns, state.inode, state.head, stamp))


def _count_repeat(conn: sqlite3.Connection, ev: NewEvent, window_s: float) -> bool:
    """Count a repeat of a recent failure signature; False when it must be stored anew."""
    row = conn.execute("SELECT last_seen FROM failures WHERE signature = ?", (ev.signature,)).fetchone()
    if row is None:
        return False
    age = (datetime.fromisoformat(ev.time) - datetime.fromisoformat(row[0])).total_seconds()
    if age >= window_s:
        return False
    conn.execute("UPDATE failures SET count = count + 1, last_seen = ? WHERE signature = ?",
                 (ev.time, ev.signature))
    return True


def _memory_dict(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["meta"] = json.loads(out["meta"])
    out["replaceable"] = bool(out["replaceable"])
    return out


def _task_dict(row: sqlite3.Row) -> dict:
    """A task row as a dict, payload and result decoded (an undecodable one reads as {} / None)."""
    out = dict(row)
    out["payload"], out["result"] = _json_or(out["payload"], {}), _json_or(out["result"], None)
    return out


def _json_or(text: str | None, empty):
    """Decoded JSON, or `empty` when the text is missing or not JSON."""
    try:
        return json.loads(text) if text else empty
    except ValueError:
        return empty


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _run_dict(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in ("trigger", "spec", "metrics", "progress"):
        out[key] = json.loads(out[key] or "{}")
    return out


def _model_dict(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["lineage"] = json.loads(out["lineage"] or "{}")
    return out


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script (executescript would commit mid-transaction).

    Triggers hold `;` inside BEGIN ... END, so statements end where SQLite says they do.
    """
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip().rstrip(";"))
            current = ""
    return [s for s in statements if s] + ([current.strip()] if current.strip() else [])


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
