"""Memory with the real MiniLM: ingest, search, catch-up after a crash, saved index."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from config.settings import load_settings
from memory.service import Memory, make_preview
from memory.store import FileState, NewEvent, Store, utc_now
from tests.conftest import make_home, write_config

DIFFS = {
    "/p/auth.py": "+def check_password(user, password):\n+    return bcrypt.verify(password, user.hash)",
    "/p/db.py": "+def connect(url):\n+    return sqlite3.connect(url, timeout=30)",
    "/p/ui.css": "+.button { color: red; border-radius: 4px; }",
    "/p/retry.py": "+for attempt in range(5):\n+    time.sleep(2 ** attempt)  # exponential backoff",
}


def _events(diffs: dict[str, str]) -> list[NewEvent]:
    return [NewEvent(kind="modified", path=p, root="/p", time=utc_now(), state=FileState(p, "/p", p, 1, 1),
                     diff=d, memory_kind="code_diff", memory_text=f"modified {p}\n{d}",
                     memory_meta={"path": p, "label": p}) for p, d in diffs.items()]


@pytest.fixture
def memory(settings, store, embedder):
    return Memory(settings, store, embedder)


def test_search_ranks_the_matching_diff_first(memory, store):
    stored = store.record_events(_events(DIFFS))
    assert memory.ingest(stored) == 4
    assert memory.search("verify the user's password hash")[0].path == "/p/auth.py"
    assert memory.search("wait longer between retries")[0].path == "/p/retry.py"
    hit = memory.search("open the database")[0]
    assert hit.path == "/p/db.py" and hit.change == "modified" and 0 < hit.score <= 1
    assert "+def connect(url):" in hit.preview


def test_kind_filter_only_returns_that_kind(memory, store):
    memory.ingest(store.record_events(_events(DIFFS)))
    task_id = store.add_memory("task", "run the password checks")
    memory.embed_memories([(task_id, "run the password checks")])
    assert [h.id for h in memory.search("password", k=5, kind="task")] == [task_id]
    assert all(h.kind == "code_diff" for h in memory.search("password", k=5, kind="code_diff"))


def test_catch_up_embeds_memories_whose_vector_was_lost(settings, store, embedder):
    store.record_events(_events(DIFFS))  # committed, then "crashed" before embedding
    memory = Memory(settings, store, embedder)
    assert memory.index.ntotal == 0
    assert memory.catch_up(batch=3) == 4
    assert store.memories_without_vector(embedder.model_id) == []
    assert memory.search("css button colour")[0].path == "/p/ui.css"


def test_saved_index_reopens_with_the_same_results(settings, store, embedder):
    memory = Memory(settings, store, embedder)
    memory.ingest(store.record_events(_events(DIFFS)))
    assert memory.save_index(force=True)
    assert not memory.save_index(force=True)  # nothing changed since
    again = Memory(settings, store, embedder)
    assert again.index.ntotal == 4
    assert [h.id for h in again.search("backoff", k=4)] == [h.id for h in memory.search("backoff", k=4)]


def test_index_is_saved_only_when_the_interval_has_passed(settings, store, embedder):
    slow = dataclasses.replace(settings, memory=dataclasses.replace(settings.memory, index_save_interval_s=60))
    memory = Memory(slow, store, embedder)
    memory.ingest(store.record_events(_events(DIFFS)))
    assert not memory.save_index(now=memory._last_save + 1)
    assert memory.save_index(now=memory._last_save + 61)


def test_preview_shows_changed_lines():
    text = "modified a.py\n--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-old line\n+new line\n context"
    assert make_preview(text) == "-old line\n+new line"
    assert make_preview("deleted big.bin (binary, 10 bytes)") == "deleted big.bin (binary, 10 bytes)"


def test_embed_queue_embeds_everything_submitted_before_stop(settings, store, embedder):
    from memory.service import EmbedQueue

    memory = Memory(settings, store, embedder)
    queue = EmbedQueue(memory, max_batch=2)
    queue.start()
    queue.submit(store.record_events(_events(DIFFS)))
    queue.stop()
    assert store.vector_count(embedder.model_id) == 4 and memory.index.ntotal == 4
    assert queue.waiting == 0 and queue.errors == 0


def test_wait_indexed_wakes_when_the_queue_has_indexed_enough_and_times_out_otherwise(settings, store, embedder):
    from memory.service import EmbedQueue

    memory = Memory(settings, store, embedder)
    assert memory.wait_indexed(0, timeout=0.01) and not memory.wait_indexed(1, timeout=0.05)
    queue = EmbedQueue(memory)
    queue.start()
    try:
        queue.submit(store.record_events(_events(DIFFS)))
        assert memory.wait_indexed(4, timeout=60) and memory.index.ntotal == 4
        assert not memory.wait_indexed(5, timeout=0.05)
    finally:
        queue.stop()


def _spied_queue(memory, monkeypatch, texts: list[str]):
    """A started EmbedQueue given `texts` all at once, and the batches it encodes (in order)."""
    from memory import service

    batches = []
    real = memory.embed_memories
    monkeypatch.setattr(memory, "embed_memories", lambda pairs: batches.append([t for _, t in pairs]) or real(pairs))
    queue = service.EmbedQueue(memory)
    events = [NewEvent("created", f"/p/f{i}.py", "/p", utc_now(), None, memory_kind="code_diff", memory_text=text)
              for i, text in enumerate(texts)]
    queue.submit(memory.store.record_events(events))  # all queued before the thread starts: one pool
    queue.start()
    queue.stop()
    return batches


def test_embed_queue_encodes_pooled_memories_longest_first_one_encoder_batch_at_a_time(settings, store, embedder,
                                                                                        monkeypatch):
    texts = [f"created f{i}.py\n" + "+x = compute(x)\n" * (1 + (i * 7) % 23) for i in range(40)]
    batches = _spied_queue(Memory(settings, store, embedder), monkeypatch, texts)
    assert [len(b) for b in batches] == [16, 16, 8]  # embedder.batch_size each, the rest last
    tokens = [embedder.token_counts(b) for b in batches]
    assert all(min(a) >= max(b) for a, b in zip(tokens, tokens[1:]))  # no pass pads a short text to a long one
    assert store.vector_count(embedder.model_id) == 40


def test_embed_queue_takes_memories_that_waited_too_long_first(settings, store, embedder, monkeypatch):
    from memory import service

    monkeypatch.setattr(service, "HOLD_S", -1.0)  # every pooled memory has waited too long: first come, first served
    texts = [f"created f{i}.py\n" + "+y = 1\n" * (1 if i < 16 else 20) for i in range(32)]
    batches = _spied_queue(Memory(settings, store, embedder), monkeypatch, texts)
    assert batches == [texts[:16], texts[16:]]


def test_embed_queue_lets_a_partial_batch_fill_up_from_a_burst(settings, store, embedder, monkeypatch):
    from memory import service

    monkeypatch.setattr(service, "FILL_S", 3.0)
    memory = Memory(settings, store, embedder)
    batches = []
    real = memory.embed_memories
    monkeypatch.setattr(memory, "embed_memories", lambda pairs: batches.append(len(pairs)) or real(pairs))
    queue = service.EmbedQueue(memory)
    queue.start()
    stored = store.record_events(_events(DIFFS))
    queue.submit(stored[:1])
    time.sleep(0.5)  # the first memory of a burst alone: it waits for the rest
    queue.submit(stored[1:])
    queue.stop()
    assert batches == [len(stored)] and store.vector_count(embedder.model_id) == len(stored)


def test_vector_shift_is_stored_and_feeds_the_drift_detector(settings, store, embedder):
    memory = Memory(settings, store, embedder)
    first = store.record_events(_events({"/p/a.py": DIFFS["/p/auth.py"]}))
    memory.ingest(first)
    assert "vector_shift" not in store.get_memories([first[0].memory_id])[first[0].memory_id]["meta"]
    same = store.record_events(_events({"/p/b.py": DIFFS["/p/auth.py"]}))  # the same change again
    other = store.record_events(_events({"/p/c.css": DIFFS["/p/ui.css"]}))
    memory.ingest(same)
    memory.ingest(other)
    shifts = {m: store.get_memories([m])[m]["meta"]["vector_shift"] for m in (same[0].memory_id, other[0].memory_id)}
    assert shifts[same[0].memory_id] < 0.2 < shifts[other[0].memory_id]  # near-copy vs something new
    state = memory.drift.state()
    assert state.samples == 2 and state.mean_shift == pytest.approx(sum(shifts.values()) / 2, abs=1e-3)


def test_drift_is_reported_only_for_a_full_window_over_the_threshold():
    from memory.drift import DriftDetector

    d = DriftDetector(window=3, threshold=0.3)
    assert not d.add([0.9, None, 0.9]).drifting  # two samples: not enough to say
    assert d.add([0.9]).drifting
    assert not d.add([0.0, 0.0, 0.1]).drifting  # the window moved on


def test_a_stopping_embed_queue_leaves_a_backlog_to_the_next_catch_up(settings, store, embedder):
    import time

    from memory.service import EmbedQueue

    memory = Memory(settings, store, embedder)
    queue = EmbedQueue(memory, max_batch=4)
    queue.start()
    events = [NewEvent("created", f"/p/f{i}.py", "/p", utc_now(), None, memory_kind="code_diff",
                       memory_text=f"created f{i}.py\n+value_{i} = compute_{i}()") for i in range(200)]
    queue.submit(store.record_events(events))
    started = time.monotonic()
    queue.stop(drain_s=0.3)
    assert time.monotonic() - started < 10  # a stop does not wait for the whole backlog
    assert 0 < store.vector_count(embedder.model_id) < 200
    left = 200 - store.vector_count(embedder.model_id)
    assert memory.catch_up() == left and store.vector_count(embedder.model_id) == 200


def _random_memories(store, model_id: str, n: int, seed: int) -> tuple[list[int], np.ndarray]:
    """`n` memories (every third a task) with random unit vectors stored for `model_id`."""
    ids = [store.add_memory("task" if i % 3 == 0 else "code_diff", f"entry {seed}-{i}") for i in range(n)]
    x = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    vectors = x / np.linalg.norm(x, axis=1, keepdims=True)
    store.add_vectors(model_id, ids, vectors)
    return ids, vectors


def test_an_index_that_outgrows_exact_search_is_rebuilt_in_the_background(tmp_path, embedder):
    home = make_home(tmp_path)
    write_config(home, memory={"ann_threshold": 1000, "ann_nprobe": 64})
    settings = load_settings(home)
    store = Store(settings.memory.db)
    _random_memories(store, embedder.model_id, 900, seed=1)
    memory = Memory(settings, store, embedder)
    assert memory.index.exact and not memory.maintain_index()
    ids, vectors = _random_memories(store, embedder.model_id, 300, seed=2)
    memory.index.add(np.array(ids), vectors)
    assert memory.maintain_index()
    memory._rebuild.join(60)
    assert not memory.index.exact and memory.index.ntotal == 1200
    assert memory.describe()["index"]["kind"] == "ivf-sq8"
    assert memory.index.search(vectors[7], 1)[0][0] == ids[7]
    hits = memory.search("entry", k=5, kind="task", mode="dense")  # filtered on an approximate index
    assert len(hits) == 5 and all(h.kind == "task" for h in hits)
    reopened = Memory(settings, store, embedder)  # the rebuilt index was saved
    assert not reopened.index.exact and reopened.index.ntotal == 1200
    store.close()
