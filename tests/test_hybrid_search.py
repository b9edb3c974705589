"""Hybrid search: SQLite FTS5 (BM25) kept in step with memories, fused with MiniLM by score."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_core.cli import main
from memory.errors import MemoryLayerError
from memory.fusion import hybrid_fusion
from memory.service import SEARCH_MODES, EmptyQuery, Memory, SearchModeError
from memory.store import MIGRATIONS, SCHEMA_VERSION, FileState, NewEvent, Store, utc_now
from tests.conftest import REPO

IDENTIFIER = "FLAG_ZQKV_ENABLED"
# Ten flags spelled almost like IDENTIFIER (MiniLM sees them as near twins) and one diff
# about invoices that names IDENTIFIER only in a comment (MiniLM sees an invoice).
LOOKALIKES = {f"flags{n}.py": f"modified flags{n}.py\n+FLAG_ZQKV{n}X_ENABLED = True" for n in range(10)}
TARGET = ("modified billing/invoice.py\n+def total(lines):\n+    subtotal = sum(l.price * l.qty for l in lines)\n"
          "+    tax = subtotal * VAT_RATE\n+    return round(subtotal + tax, 2)  # see FLAG_ZQKV_ENABLED\n")

HOSTILE = ['"', 'foo"bar', '""', "*", "foo*", ":", "text:foo", "-foo", "foo - bar", "AND", "OR", "NOT",
           "foo AND", "AND OR NOT", "(", ")", "(foo", "NEAR(foo bar)", "NEAR/3", "^foo", "{text}: foo",
           "+", "'; DROP TABLE memories; --", "", "   ", "!!!", "...", "___", "über café", "日本語のテキスト",
           "\x00", "\ud800 lone surrogate", "e\u0301", "🙂 emoji", "x" * 10_000, " ".join(["w"] * 5000),
           " OR ".join(f"w{i}" for i in range(500))]


@pytest.fixture
def memory(settings, store, embedder):
    return Memory(settings, store, embedder)


def _add(memory: Memory, kind: str, text: str, path: str, embed: bool = True) -> int:
    memory_id = memory.store.add_memory(kind, text, {"path": path, "label": path})
    if embed:
        memory.embed_memories([(memory_id, text)])
    return memory_id


def _fts_ids(store: Store, word: str) -> list[int]:
    return [i for i, _ in store.lexical_search(word, 100)]


def _fts_consistent(store: Store) -> bool:
    try:  # rank 1: also compare the index with the rows of `memories`
        with store.transaction() as conn:
            conn.execute("INSERT INTO memories_fts(memories_fts, rank) VALUES ('integrity-check', 1)")
    except sqlite3.DatabaseError:
        return False
    return True


def test_fts_follows_inserts_updates_and_deletes_in_the_same_transaction(store):
    first = store.add_memory("task", "rotate the frobnicator keys")
    p = "/p/a.py"
    [stored] = store.record_events([NewEvent(kind="modified", path=p, root="/p", time=utc_now(),
                                             state=FileState(p, "/p", "s", 1, 1), memory_kind="code_diff",
                                             memory_text="modified a.py\n+frobnicator = Frobnicator()")])
    assert sorted(_fts_ids(store, "frobnicator")) == [first, stored.memory_id]
    with store.transaction() as conn:
        conn.execute("UPDATE memories SET text = 'renew the widget certificates' WHERE id = ?", (first,))
    assert _fts_ids(store, "frobnicator") == [stored.memory_id] and _fts_ids(store, "widget") == [first]
    with store.transaction() as conn:
        conn.execute("DELETE FROM memories WHERE id = ?", (first,))
    assert _fts_ids(store, "widget") == [] and _fts_consistent(store)


def test_a_rolled_back_insert_leaves_no_fts_row(store):
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute("INSERT INTO memories (kind, text, created) VALUES ('task', 'ghostly zorblax', ?)",
                     (utc_now(),))
        assert len(conn.execute("SELECT rowid FROM memories_fts WHERE memories_fts MATCH 'zorblax'").fetchall()) == 1
        raise RuntimeError("crash before commit")
    assert _fts_ids(store, "zorblax") == [] and _fts_consistent(store)


@pytest.mark.parametrize("query", HOSTILE, ids=lambda q: ascii(q)[:24])
def test_hostile_queries_never_raise(store, query):
    store.add_memory("task", 'foo bar "quoted" text:foo NEAR AND OR NOT über café 日本語のテキスト')
    hits = store.lexical_search(query, 5)
    assert all(isinstance(i, int) and isinstance(score, float) for i, score in hits)
    if not any(ch.isalnum() for ch in query.replace("_", "")):
        assert hits == []


def test_hostile_queries_through_every_mode(memory):
    memory_id = _add(memory, "task", "foo bar AND text:foo (baz)", "/p/t")
    for query in ['"', "foo AND (", "NEAR(", "text:", "-", "*", "!!!", "über café"]:
        for mode in SEARCH_MODES:
            memory.search(query, k=3, mode=mode)  # none may raise
    for mode in SEARCH_MODES:
        for empty in ("", "  \n"):
            with pytest.raises(EmptyQuery, match="the query is empty"):
                memory.search(empty, k=3, mode=mode)
    assert [h.id for h in memory.search("foo AND (", k=3, mode="lexical")] == [memory_id]


def test_query_words_are_stemmed_and_folded(store):
    memory_id = store.add_memory("failure", "Connections TIMED OUT while Résumé uploading")
    for query in ["connection", "timeout timed", "resume", "UPLOADS"]:
        assert _fts_ids(store, query) == [memory_id], query


def test_kind_filter(memory, store):
    diff = _add(memory, "code_diff", "modified q.py\n+queue.put(job)", "/p/q.py")
    task = _add(memory, "task", "drain the job queue", "task")
    assert sorted(_fts_ids(store, "job queue")) == sorted([diff, task])
    assert [i for i, _ in store.lexical_search("job queue", 10, kind="task")] == [task]
    assert store.lexical_search("job queue", 10, kind="log") == []
    for mode in SEARCH_MODES:
        assert [h.id for h in memory.search("job queue", k=5, kind="code_diff", mode=mode)] == [diff]


def test_lexical_finds_an_exact_identifier_that_dense_ranks_low(memory):
    for path, text in LOOKALIKES.items():
        _add(memory, "code_diff", text, path)
    target = _add(memory, "code_diff", TARGET, "billing/invoice.py")
    dense = [h.id for h in memory.search(IDENTIFIER, k=11, mode="dense")]
    assert dense.index(target) >= 5  # the look-alike flags win on meaning
    lexical = memory.search(IDENTIFIER, k=11, mode="lexical")
    assert [h.id for h in lexical] == [target] and lexical[0].score > 0
    assert memory.search(IDENTIFIER, k=3)[0].id == target  # hybrid is the default


def test_hybrid_is_the_fused_union_and_finds_memories_without_a_vector(memory, store):
    ids = [_add(memory, "code_diff", text, path) for path, text in LOOKALIKES.items()]
    unembedded = _add(memory, "failure", f"KeyError: {IDENTIFIER} missing from settings", "log", embed=False)
    assert [i for i, _ in store.memories_without_vector(memory.model_id)] == [unembedded]
    dense = [(h.id, h.score) for h in memory.search(IDENTIFIER, k=50, mode="dense")]
    lexical = [(h.id, h.score) for h in memory.search(IDENTIFIER, k=50, mode="lexical")]
    assert unembedded not in dict(dense) and [i for i, _ in lexical] == [unembedded]
    hybrid = memory.search(IDENTIFIER, k=50, mode="hybrid")
    assert {h.id for h in hybrid} == set(ids) | {unembedded}
    expected = [i for i, _ in hybrid_fusion(lexical, dense, 0.5)]
    assert [h.id for h in hybrid] == expected
    # 0.5: the best of one ranking (a tie with dense's best, which lexical's wins); dense's last scores 0
    assert hybrid[0].score == hybrid[1].score == 0.5 and all(0 <= h.score <= 1 for h in hybrid)
    assert [h.id for h in memory.search(IDENTIFIER, k=3)] == expected[:3]


def test_scores_mean_what_each_mode_says(memory):
    only = _add(memory, "task", "compact the write-ahead log", "task")
    for n, chore in enumerate(["water the plants", "renew the certificates", "rotate the keys"]):
        _add(memory, "task", chore, f"chore{n}")  # BM25 is ~0 for words in half the memories
    dense, lexical, hybrid = (memory.search("compact write-ahead log", k=1, mode=m)[0] for m in
                              ("dense", "lexical", "hybrid"))
    assert dense.id == lexical.id == hybrid.id == only
    assert 0 < dense.score <= 1 and lexical.score > 0 and hybrid.score == 1.0  # first in both


def test_an_unknown_mode_is_a_clear_error(memory):
    with pytest.raises(SearchModeError, match="hybrid, dense, lexical") as caught:
        memory.search("anything", mode="fuzzy")
    assert isinstance(caught.value, MemoryLayerError) and "'fuzzy'" in str(caught.value)


def test_lexical_search_on_a_read_only_store(settings, store):
    memory_id = store.add_memory("log", "disk quota exceeded on /var")
    reader = Store(settings.memory.db, readonly=True)
    try:
        assert _fts_ids(reader, "quota") == [memory_id]
        assert reader.lexical_search('quota"', 5, kind="log")[0][0] == memory_id
    finally:
        reader.close()


def test_migration_2_indexes_memories_of_a_version_1_database(tmp_path: Path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.executemany("INSERT INTO memories (kind, text, created) VALUES (?, ?, ?)",
                     [("code_diff", "+def frobnicate(widget):", utc_now()), ("task", "restart nginx", utc_now())])
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert _fts_ids(store, "frobnicate") == [1] and _fts_ids(store, "nginx") == [2]
        assert _fts_consistent(store)
        new = store.add_memory("task", "restart nginx again")
        assert sorted(_fts_ids(store, "nginx")) == [2, new]
    finally:
        store.close()


def test_cli_lexical_search_without_a_daemon(home: Path, settings):
    store = Store(settings.memory.db)
    memory_id = store.add_memory("failure", f"KeyError: '{IDENTIFIER}'", {"path": "/p/settings.py"})
    for chore in ["water the plants", "renew the certificates", "rotate the keys"]:
        store.add_memory("task", chore)
    store.close()
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(home), "search", IDENTIFIER, "--mode", "lexical", "--json"],
                           catch_exceptions=False)
    hits = json.loads(result.output)
    assert [h["id"] for h in hits] == [memory_id] and hits[0]["score"] > 0
    plain = runner.invoke(main, ["--home", str(home), "search", "plants", "--mode", "lexical"]).output
    [line] = plain.splitlines()  # piped: one tab-separated line a hit
    score, kind, path, time, preview = line.split("\t")
    assert score.startswith("bm25=") and kind == "task" and preview == "water the plants"
    assert runner.invoke(main, ["--home", str(home), "search", "x", "--mode", "fuzzy"]).exit_code == 2


def test_an_exact_identifier_wins_a_tie_with_an_unrelated_dense_hit(memory):
    for n in range(55):  # flags MiniLM finds closer to the identifier than the exact match
        _add(memory, "code_diff", f"modified flags{n}.py\n+FEATURE_FLAG_{n}_ENABLED = True", f"flags{n}.py")
    target = _add(memory, "code_diff", "modified notes.md\n+Grandmother's apple pie: bake for forty minutes "
                  "until golden. FLAG_ZQKV_ENABLED", "notes.md")
    dense = [h.id for h in memory.search(IDENTIFIER, k=50, mode="dense")]
    lexical = [h.id for h in memory.search(IDENTIFIER, k=50, mode="lexical")]
    assert target not in dense and lexical == [target]  # first in one ranking each: a tie
    hybrid = memory.search(IDENTIFIER, k=2)
    assert hybrid[0].id == target and hybrid[0].score == hybrid[1].score == 0.5


def test_no_hits_say_why(home: Path, settings, memory):
    runner = CliRunner()

    def say(*args: str) -> str:
        return runner.invoke(main, ["--home", str(home), "search", *args], catch_exceptions=False).output

    assert "no memories yet" in say("anything", "--mode", "lexical")
    memory.store.add_memory("task", "rotate the frobnicator keys")
    lexical = say("zebra", "--mode", "lexical")
    assert "no memory contains a word of the query (1 searched)" in lexical and "--mode dense" in lexical
    dense = say("zebra", "--mode", "dense")
    assert "none of the 1 memories has its vector yet" in dense and "--mode lexical" in dense
    assert "no memories of kind log yet" in say("zebra", "--kind", "log")
    empty = runner.invoke(main, ["--home", str(home), "search", "  "])
    assert empty.exit_code == 2 and "the query is empty" in empty.output


def test_lexical_search_without_a_daemon_does_not_load_the_model(home: Path, settings):
    store = Store(settings.memory.db)
    store.add_memory("failure", f"KeyError: '{IDENTIFIER}'", {"path": "/p/settings.py"})
    store.close()
    code = ("import json, sys\nfrom agent_core.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sentence_transformers'))))")
    proc = subprocess.run([sys.executable, "-c", code, "--home", str(home), "search", IDENTIFIER, "--mode",
                           "lexical"], capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = proc.stdout.splitlines()
    assert lines[0].split("\t")[2] == "/p/settings.py" and json.loads(lines[-1]) == [], proc.stderr
