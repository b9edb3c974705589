"""The SQLite store: schema, migrations, durable writes, read-only readers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from memory.errors import StoreError
from memory.store import SCHEMA_VERSION, FileState, NewEvent, Store, utc_now


def _event(path: str, kind: str = "created", text: str = "created a.py\n+x = 1", **kw) -> NewEvent:
    state = FileState(path, "/r", "sha-" + path, 5, 1)
    fields = {"new_sha": state.sha, "size": 5, "diff": "+x = 1", "meta": {"added": 1},
              "memory_kind": "code_diff", "memory_text": text, "memory_meta": {"path": path}}
    return NewEvent(kind=kind, path=path, root="/r", time=utc_now(), state=state, **{**fields, **kw})


def test_new_database_is_migrated_in_wal_mode(tmp_path: Path):
    store = Store(tmp_path / "g.db")
    conn = sqlite3.connect(tmp_path / "g.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "memories", "vectors", "files", "roots", "tasks", "runs", "models"} <= tables
    store.close()
    Store(tmp_path / "g.db").close()  # reopening migrates nothing and keeps the data


def test_a_newer_schema_is_refused(tmp_path: Path):
    Store(tmp_path / "g.db").close()
    conn = sqlite3.connect(tmp_path / "g.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="upgrade Gremlin"):
        Store(tmp_path / "g.db")


def test_event_memory_and_file_state_commit_together(store: Store):
    stored = store.record_events([_event("/r/a.py"), _event("/r/b.py")])
    assert [s.event_id for s in stored] == [1, 2]
    memories = store.get_memories([s.memory_id for s in stored])
    assert memories[stored[0].memory_id]["text"].startswith("created a.py")
    assert memories[stored[0].memory_id]["change"] == "created"
    assert store.file_state("/r/a.py").sha == "sha-/r/a.py"
    assert store.counts()["events"] == 2


def test_a_failing_event_rolls_back_the_whole_batch(store: Store):
    bad = _event("/r/bad.py", meta={"not json": object()})
    with pytest.raises(TypeError):
        store.record_events([_event("/r/ok.py"), bad])
    assert store.counts()["events"] == 0
    assert store.file_state("/r/ok.py") is None


def test_deleted_file_state_is_removed(store: Store):
    store.record_events([_event("/r/a.py")])
    gone = NewEvent(kind="deleted", path="/r/a.py", root="/r", time=utc_now(), state=None)
    store.record_events([gone])
    assert store.file_state("/r/a.py") is None


def test_files_under_a_directory_do_not_include_its_siblings(store: Store):
    states = [FileState(p, "/r", "s", 1, 1) for p in ("/r/d/a", "/r/d/sub/b", "/r/d2/c", "/r/d.txt")]
    store.save_file_states(states)
    assert set(store.file_states_under("/r/d")) == {"/r/d/a", "/r/d/sub/b"}


def test_vectors_round_trip_and_unembedded_memories_are_found(store: Store):
    stored = store.record_events([_event("/r/a.py"), _event("/r/b.py")])
    ids = [s.memory_id for s in stored]
    vec = np.arange(8, dtype=np.float32).reshape(1, 8)
    store.add_vectors("m1", ids[:1], vec)
    assert store.memories_without_vector("m1") == [(ids[1], "created a.py\n+x = 1")]
    found, matrix = store.load_vectors("m1", ids, 8)
    assert found.tolist() == ids[:1] and np.array_equal(matrix, vec)
    assert store.vector_count("m1") == 1 and store.vector_count("m2") == 0


def test_read_only_store_cannot_write_and_needs_a_database(tmp_path: Path):
    with pytest.raises(StoreError, match="start the daemon"):
        Store(tmp_path / "missing.db", readonly=True)
    Store(tmp_path / "g.db").close()
    reader = Store(tmp_path / "g.db", readonly=True)
    assert reader.counts()["events"] == 0
    with pytest.raises(StoreError, match="read-only"):
        reader.record_events([_event("/r/a.py")])


def test_a_corrupt_database_gives_a_clear_error(tmp_path: Path):
    (tmp_path / "g.db").write_bytes(b"this is not a database" * 100)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="g.db is not a SQLite database .* move it away"):
            Store(tmp_path / "g.db", readonly=readonly)


def test_another_programs_database_is_named_as_such(tmp_path: Path):
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE customers (name)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="lacks Gremlin's tables"):
        Store(tmp_path / "other.db", readonly=True)
    with pytest.raises(StoreError, match="newer than this Gremlin"):
        Store(tmp_path / "other.db")


def test_a_reader_of_a_database_still_being_created_gets_a_clear_error(tmp_path: Path):
    sqlite3.connect(tmp_path / "g.db").execute("CREATE TABLE t (x)").connection.close()  # not migrated
    with pytest.raises(StoreError, match="not initialised yet"):
        Store(tmp_path / "g.db", readonly=True)


def test_processes_opening_a_new_database_at_once_migrate_it_once(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    db = tmp_path / "fresh.db"
    opener = "import sys; from memory.store import Store; Store(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", opener, str(db)], cwd=REPO, stderr=subprocess.PIPE)
             for _ in range(6)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    store = Store(db)
    assert store._query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    store.close()


def test_bulk_added_memories_get_consecutive_ids_and_full_text_rows(store: Store):
    first = store.add_memory("task", "before")
    ids = store.add_memories([("code_diff", f"bulk entry {i}", {"n": i}, "2026-01-01T00:00:00+00:00")
                              for i in range(5)])
    assert ids == list(range(first + 1, first + 6))
    assert store.get_memories(ids[2:3])[ids[2]]["meta"] == {"n": 2}
    assert {i for i, _ in store.lexical_search("bulk", 10)} == set(ids)


def test_full_text_search_of_very_common_words_stays_within_its_budget(store: Store):
    common = store.add_memories([("log", f"common words everywhere {i}", {}, "2026-01-01T00:00:00+00:00")
                                 for i in range(100)])
    rare = store.add_memory("log", "common words and one zanzibar")
    # Within the budget nothing changes: every word is ranked by BM25.
    assert store.lexical_search("common zanzibar", 5, budget=1000)[0][0] == rare
    assert len(store.lexical_search("common zanzibar", 200, budget=1000)) == 101
    # "common" is in 101 memories, over a budget of 40: the rare word alone decides the ranking ...
    assert [i for i, _ in store.lexical_search("common zanzibar", 5, budget=40)] == [rare]
    # ... and a query of only over-common words lists their newest matches (score 0), newest first.
    found = store.lexical_search("common words", 3, budget=40)
    assert found == [(rare, 0.0), (common[-1], 0.0), (common[-2], 0.0)]
    assert [i for i, _ in store.lexical_search("everywhere", 2, kind="log", budget=40)] == common[:-3:-1]
    # A phrase word costs the rows of each of its tokens.
    assert [i for i, _ in store.lexical_search("common_words zanzibar", 5, budget=150)] == [rare]
