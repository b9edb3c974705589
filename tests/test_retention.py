"""Retention: per-kind limits evict old memories (rows, full-text rows, vectors, index entries)
in batches, and never what training pairs, active tasks or training results still need.
Real SQLite homes, the real FAISS index, the real CLI and daemon."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from agent_core import tasks
from agent_core.daemon import dataset_files
from config.errors import ConfigError
from config.settings import load_settings
from memory.retention import LAST_SUMMARY, apply_policy, dataset_references, last_summary
from memory.service import Memory
from memory.store import NewEvent, Store, utc_now
from tests.conftest import gremlin, start_daemon, wait_for, write_config

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def policy(home: Path, watched: Path, max_count: dict | None = None, max_age_days: dict | None = None,
           **retention) -> object:
    """The home's settings with these [retention] limits."""
    write_config(home, watch={"roots": [str(watched)], "own_source": False}, retention=retention,
                 **{"retention.max_count": max_count or {}, "retention.max_age_days": max_age_days or {}})
    return load_settings(home)


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def add(store: Store, kind: str, text: str, age_days: float, meta: dict | None = None,
        replaceable: bool = True) -> int:
    """A memory created `age_days` before NOW; its id."""
    return store.add_memory(kind, text, meta or {}, replaceable=replaceable, now=days_ago(age_days))


def add_change(store: Store, text: str, age_days: float) -> tuple[int, int]:
    """A code_diff memory of a file event created `age_days` before NOW; (event id, memory id)."""
    event = NewEvent(kind="modified", path=f"/project/{text}.py", root="/project", time=utc_now(days_ago(age_days)),
                     state=None, diff=f"+{text}", memory_kind="code_diff", memory_text=text)
    stored = store.record_events([event])[0]
    return stored.event_id, stored.memory_id


def kept(store: Store, kind: str | None = None) -> set[int]:
    return {int(i) for i in store.memory_ids(kind)}


def test_max_count_keeps_the_newest_of_each_kind_by_creation_time(home, watched, store):
    settings = policy(home, watched, max_count={"code_diff": 2})
    diffs = [add(store, "code_diff", f"change {age}", age) for age in (50, 40, 30, 20)]
    replayed = add(store, "code_diff", "an old replayed commit", 90)  # a high id, an old time
    failures = [add(store, "failure", f"failure {age}", age) for age in (300, 200)]  # no limit of their own
    summary = apply_policy(settings, store, now=NOW)
    assert kept(store, "code_diff") == set(diffs[2:]) and replayed not in kept(store)
    assert kept(store, "failure") == set(failures)
    assert summary["evicted"] == {"code_diff": 3} and summary["total"] == 3 and not summary["dry_run"]
    assert apply_policy(settings, store, now=NOW)["total"] == 0  # at the limit: nothing more


def test_max_age_evicts_only_memories_older_than_the_limit(home, watched, store):
    settings = policy(home, watched, max_age_days={"failure": 30, "task": 0.5})
    old = [add(store, "failure", "old failure", 31), add(store, "task", "task from yesterday", 1)]
    young = [add(store, "failure", "recent failure", 29), add(store, "task", "task an hour ago", 1 / 24)]
    other = add(store, "code_diff", "an ancient change", 3000)
    summary = apply_policy(settings, store, now=NOW)
    assert kept(store) == {*young, other} and not set(old) & kept(store)
    assert summary["evicted"] == {"failure": 1, "task": 1}
    assert summary["limits"] == {"failure": {"max_count": None, "max_age_days": 30.0},
                                 "task": {"max_count": None, "max_age_days": 0.5}}


def test_both_limits_of_one_kind_apply_together(home, watched, store):
    settings = policy(home, watched, max_count={"log": 3}, max_age_days={"log": 10})
    ids = [add(store, "log", f"log line {age}", age) for age in (40, 30, 9, 8, 7, 6)]
    apply_policy(settings, store, now=NOW)
    assert kept(store) == set(ids[3:])  # the count leaves 3; 9 days old is within the age limit


def test_memories_that_are_not_replaceable_are_never_evicted(home, watched, store):
    settings = policy(home, watched, max_count={"code_diff": 1}, max_age_days={"code_diff": 1})
    result = add(store, "code_diff", "a training result kept as a change", 500, replaceable=False)
    retrain = add(store, "retrain", "model 7 promoted", 500, replaceable=False)
    evicted = add(store, "code_diff", "plain old change", 400)
    add(store, "code_diff", "newest change", 0)
    apply_policy(settings, store, now=NOW)
    assert {result, retrain} <= kept(store) and evicted not in kept(store)


def test_a_retrain_limit_or_an_unknown_kind_is_refused_naming_the_key(home, watched):
    with pytest.raises(ConfigError, match=r"\[retention.max_count\] retrain: retrain memories .* never evicted"):
        policy(home, watched, max_count={"retrain": 5})
    with pytest.raises(ConfigError, match=r"\[retention.max_age_days\] diffs: unknown memory kind 'diffs'"):
        policy(home, watched, max_age_days={"diffs": 5})


def test_memories_training_pairs_refer_to_are_kept(home, watched, store, caplog):
    settings = policy(home, watched, max_age_days={"code_diff": 10, "task": 10, "failure": 10})
    (paired_event, paired), (_, unpaired) = add_change(store, "fix parser", 100), add_change(store, "tidy", 100)
    (held_event, held), _ = add_change(store, "held out", 100), add_change(store, "newest", 0)
    task_memory = add(store, "task", "shell task 12 done", 100, {"task_id": 12})
    failure_memory = add(store, "failure", "shell task 11 failed", 100, {"task_id": 11})
    other_task = add(store, "task", "shell task 13 done", 100, {"task_id": 13})
    add(store, "log", "the newest memory", 0)
    train, heldout = dataset_files(settings)
    train.write_text("\n".join([
        json.dumps({"input": "q", "output": "d", "source": "commit", "event_ids": [paired_event], "time": "t"}),
        "{half a line",
        json.dumps({"input": "q", "output": "d", "source": "x", "event_ids": "not a list"}),
        json.dumps({"input": "q", "output": "d", "source": "task_rewrite", "event_ids": [], "task_ids": [11, 12]}),
        ""]) + "\n")
    heldout.write_text(json.dumps({"input": "q", "output": "d", "event_ids": [held_event], "time": "t"}) + "\n")
    summary = apply_policy(settings, store, dataset_files=dataset_files(settings), now=NOW)
    assert {paired, held, task_memory, failure_memory} <= kept(store)
    assert not {unpaired, other_task} & kept(store)
    assert summary["skipped_lines"] == 2 and summary["kept_for_training"] == {"events": 2, "tasks": 2}
    assert any("malformed dataset lines skipped" in r.getMessage() for r in caplog.records)


def test_missing_dataset_files_protect_nothing(tmp_path: Path):
    refs = dataset_references([tmp_path / "auto_generated.jsonl", tmp_path / "heldout.jsonl"])
    assert (refs.event_ids, refs.task_ids, refs.skipped_lines) == (set(), set(), 0)


def test_memories_queued_or_running_tasks_refer_to_are_kept_until_those_end(home, watched, store):
    settings = policy(home, watched, max_age_days={"task": 10, "failure": 10})
    done, failed = store.insert_task("shell", state="done"), store.insert_task("shell", state="failed")
    retried = add(store, "task", "the task a retry repeats", 100, {"task_id": done})
    rewritten = add(store, "failure", "the task a rewrite fixes", 100, {"task_id": failed})
    proposal_for = add(store, "failure", "the failure a patch is proposed for", 100)
    unrelated = [add(store, "task", "a task nobody needs", 100, {"task_id": 999}), add(store, "failure", "old", 100)]
    add(store, "task", "newest", 0)
    retry = tasks.retry(store, settings, done, now=NOW).id
    store.submit_task("shell", {"cmd": ["true"], "rewrites": failed}, priority=10)
    assert store.claim_task(worker=1, lease_s=60)["payload"]["cmd"] == ["true"]  # the retry waits, the rewrite runs
    mutate = tasks.submit(store, settings, tasks.parse_task({"type": "mutate", "patch": "x", "failure_id": proposal_for}))
    store.submit_task("shell", {"cmd": ["echo"]})  # an active task that refers to nothing protects nothing
    apply_policy(settings, store, now=NOW)
    assert {retried, rewritten, proposal_for} <= kept(store) and not set(unrelated) & kept(store)
    for task_id in (retry, mutate.id):
        store.cancel_task(task_id)
    apply_policy(settings, store, now=NOW)
    assert retried not in kept(store) and proposal_for not in kept(store) and rewritten in kept(store)


def test_eviction_removes_full_text_rows_and_every_models_vectors(home, watched, store):
    settings = policy(home, watched, max_count={"code_diff": 1})
    old = [add(store, "code_diff", f"zebracorn handler {n}", 10 - n) for n in range(3)]
    newest = add(store, "code_diff", "zebracorn newest", 0)
    ids = [*old, newest]
    for model in ("model-a", "model-b"):
        store.add_vectors(model, ids, np.eye(4, 8, dtype=np.float32))
    apply_policy(settings, store, now=NOW)
    conn = sqlite3.connect(settings.memory.db)
    try:
        assert [r[0] for r in conn.execute("SELECT rowid FROM memories_fts WHERE memories_fts MATCH 'zebracorn'")] \
            == [newest]
        assert conn.execute("SELECT model_id, memory_id FROM vectors ORDER BY model_id").fetchall() \
            == [("model-a", newest), ("model-b", newest)]
        conn.execute("INSERT INTO memories_fts(memories_fts) VALUES ('integrity-check')")  # raises if out of step
    finally:
        conn.close()
    assert [i for i, _ in store.lexical_search("zebracorn handler", 10)] == [newest]


def test_evicted_memories_leave_the_live_index(home, watched, store, embedder):
    settings = policy(home, watched, max_age_days={"failure": 30})
    ids = [add(store, "failure", f"failure {age}", age) for age in (90, 60, 10, 1)]
    vectors = np.random.default_rng(0).standard_normal((4, embedder.dim)).astype(np.float32)
    store.add_vectors(embedder.model_id, ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    memory = Memory(settings, store, embedder)
    index = memory.current()[1]
    assert set(index.ids()) == set(ids)
    apply_policy(settings, store, memory, now=NOW)
    assert set(index.ids()) == set(ids[2:]) and index.ntotal == 2
    assert ids[0] not in [i for i, _ in index.search(vectors[0], 4)]


def test_a_dry_run_counts_and_deletes_nothing(home, watched, store):
    settings = policy(home, watched, max_count={"task": 1})
    ids = [add(store, "task", f"task {n}", 5 - n) for n in range(4)]
    summary = apply_policy(settings, store, dry_run=True, now=NOW)
    assert summary["evicted"] == {"task": 3} and summary["dry_run"]
    assert kept(store) == set(ids) and store.get_marker(LAST_SUMMARY) is None
    assert store.evictable_memories("task", max_count=1) == ids[:3]


def test_deletes_in_batches_each_its_own_immediate_transaction(home, watched, store):
    settings = policy(home, watched, max_count={"log": 1}, batch=2)
    ids = [add(store, "log", f"log {n}", 10 - n) for n in range(6)]
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)  # the store's real connection, traced
    try:
        summary = apply_policy(settings, store, now=NOW)
    finally:
        store._conn.set_trace_callback(None)
    assert summary["evicted"] == {"log": 5} and kept(store) == {ids[-1]}
    assert statements.count("BEGIN IMMEDIATE") == 3 + 1  # 2 + 2 + 1 evicted, then the summary marker


def test_the_newest_memory_stays_so_no_id_is_handed_out_twice(home, watched, store):
    settings = policy(home, watched, max_age_days={"code_diff": 1, "task": 1})
    ids = [add(store, "code_diff", "old change", 10), add(store, "task", "old task", 10)]
    apply_policy(settings, store, now=NOW)
    assert kept(store) == {ids[1]}  # evictable by age, but it holds the highest id
    assert add(store, "code_diff", "a new change", 0) > max(ids)


def test_no_limits_evict_nothing(home, watched, store):
    settings = policy(home, watched)
    ids = [add(store, "code_diff", "ancient", 10_000), add(store, "task", "ancient", 10_000), add(store, "log", "x", 0)]
    summary = apply_policy(settings, store, now=NOW)
    assert kept(store) == set(ids) and summary["configured"] is False and summary["evicted"] == {}
    assert last_summary(store) is None


def test_the_cli_applies_the_policy_without_a_daemon(home, watched, store):
    settings = policy(home, watched, max_count={"failure": 1})
    ids = [add(store, "failure", f"failure {n}", 3 - n) for n in range(3)]
    dry = json.loads(gremlin("retention", "--dry-run", "--json", home=home).stdout)
    assert dry["evicted"] == {"failure": 2} and dry["daemon"] is False and kept(store) == set(ids)
    assert gremlin("retention", home=home).stdout == "failure\t2\n"  # piped: one plain line a kind
    assert kept(store) == {ids[-1]}
    status = gremlin("status", home=home).stdout
    assert "retention" in status and "2 evicted" in status and "(failure 2)" in status
    assert json.loads(gremlin("status", "--json", home=home).stdout)["retention"]["evicted"] == {"failure": 2}
    assert last_summary(store)["total"] == 2 and settings.retention.max_count == {"failure": 1}


def test_the_cli_says_when_no_limit_is_set_and_names_a_bad_key(home, watched):
    policy(home, watched)
    assert "no retention limits set" in gremlin("retention", home=home).stdout
    (home / "config" / "gremlin.toml").write_text("[retention.max_age_days]\ncode_diff = 0\n")
    failed = gremlin("retention", home=home, check=False)
    assert failed.returncode == 1
    assert "[retention.max_age_days] code_diff must be a number from 0.001" in failed.stderr


def test_the_daemon_applies_the_policy_on_its_schedule_and_through_the_cli(tmp_path, home, watched):
    settings = policy(home, watched, max_age_days={"task": 7}, interval_s=1)
    store = Store(settings.memory.db)
    ids = [store.add_memory("task", f"task {n}", {}, now=datetime.now(timezone.utc) - timedelta(days=30 - n))
           for n in range(3)]
    store.add_memory("task", "fresh", {})
    proc = start_daemon(home, "--quiet")
    try:
        wait_for(lambda: not set(ids) & kept(store), 180, 0.5, "the scheduled retention")
        wait_for(lambda: json.loads(gremlin("status", "--json", home=home).stdout)["state"] == "ready", 60, 0.5,
                 "the daemon to answer")
        assert set(json.loads(gremlin("status", "--json", home=home).stdout)["retention"]["evicted"]) == {"task"}
        again = json.loads(gremlin("retention", "--json", home=home).stdout)  # waits its turn with the schedule
        assert again["daemon"] is True and again["evicted"] == {"task": 0} and len(kept(store)) == 1
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        store.close()
