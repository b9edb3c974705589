"""The FAISS index: search, atomic save/load, rebuild from SQLite when missing or stale."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from memory.store import Store
from memory.vector_store.index import IndexOptions, VectorIndex, index_path, ivf_lists

DIM = 16


def _unit(rows: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def filled(tmp_path: Path):
    """A store with 20 memories and their vectors for model m1."""
    store = Store(tmp_path / "g.db")
    ids = [store.add_memory("code_diff", f"memory {i}") for i in range(20)]
    vectors = _unit(20)
    store.add_vectors("m1", ids, vectors)
    yield store, np.array(ids), vectors
    store.close()


def test_search_finds_the_nearest_vector_first(tmp_path: Path, filled):
    store, ids, vectors = filled
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    assert index.ntotal == 20
    hits = index.search(vectors[7], 3)
    assert hits[0][0] == ids[7] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert hits[0][1] >= hits[1][1] >= hits[2][1]


def test_search_can_be_restricted_to_some_ids(tmp_path: Path, filled):
    store, ids, vectors = filled
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    hits = index.search(vectors[7], 5, allowed=ids[10:12])
    assert sorted(i for i, _ in hits) == sorted(ids[10:12].tolist())
    assert index.search(vectors[7], 5, allowed=np.array([], dtype=np.int64)) == []


def test_save_is_atomic_and_load_gives_the_same_answers(tmp_path: Path, filled):
    store, ids, vectors = filled
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    index.save()
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["m1.faiss", "m1.faiss.sha256"]
    loaded = VectorIndex(index_path(tmp_path / "idx", "m1"), "m1", DIM,
                         faiss.read_index(str(tmp_path / "idx" / "m1.faiss")))
    assert loaded.search(vectors[3], 4) == index.search(vectors[3], 4)


def test_a_stale_index_is_brought_in_step_with_the_database(tmp_path: Path, filled):
    store, ids, vectors = filled
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    index.add(np.array([999]), _unit(1, seed=5))  # a vector the database does not have
    index.save()
    new_id = store.add_memory("code_diff", "newer")  # the database moved on after the save
    store.add_vectors("m1", [new_id], _unit(1, seed=9))
    reopened = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    assert sorted(reopened.ids().tolist()) == sorted([*ids.tolist(), new_id])


def test_missing_or_corrupt_index_files_are_rebuilt(tmp_path: Path, filled):
    store, ids, vectors = filled
    path = index_path(tmp_path / "idx", "m1")
    path.parent.mkdir()
    path.write_bytes(b"garbage" * 50)
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    assert index.ntotal == 20 and index.search(vectors[0], 1)[0][0] == ids[0]


def test_an_index_whose_vector_bytes_were_overwritten_is_rebuilt(tmp_path: Path, filled, caplog):
    store, ids, vectors = filled
    VectorIndex.open(tmp_path / "idx", "m1", DIM, store).save()
    path = index_path(tmp_path / "idx", "m1")
    data = bytearray(path.read_bytes())
    middle = len(data) // 3  # inside the float32 vectors; the ids at the end stay intact
    data[middle:middle + 64] = b"\x7f" * 64
    path.write_bytes(bytes(data))
    assert faiss.read_index(str(path)).ntotal == 20  # FAISS itself reads it without a word
    with caplog.at_level("WARNING"):
        index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    assert "its bytes were damaged" in caplog.records[0].problem
    for i in range(20):
        [(found, score)] = index.search(vectors[i], 1)
        assert found == ids[i] and score == pytest.approx(1.0, abs=1e-5)
    index.save()
    caplog.clear()
    with caplog.at_level("WARNING"):
        VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    assert caplog.text == ""  # a good file with its checksum loads quietly


def test_an_index_without_its_checksum_is_rebuilt(tmp_path: Path, filled, caplog):
    store, ids, vectors = filled
    VectorIndex.open(tmp_path / "idx", "m1", DIM, store).save()
    (tmp_path / "idx" / "m1.faiss.sha256").unlink()
    with caplog.at_level("WARNING"):
        assert VectorIndex.open(tmp_path / "idx", "m1", DIM, store).ntotal == 20
    assert "no readable checksum" in caplog.records[0].problem


def test_an_index_of_another_dimension_is_rebuilt(tmp_path: Path, filled):
    store, ids, vectors = filled
    other = VectorIndex(index_path(tmp_path / "idx", "m1"), "m1", DIM * 2)
    other.add(np.array([1]), np.ones((1, DIM * 2), dtype=np.float32))
    other.save()
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store)
    assert index.dim == DIM and index.ntotal == 20


def test_vectors_of_other_models_never_enter_the_index(tmp_path: Path, filled):
    store, ids, vectors = filled
    store.add_vectors("m2", ids[:5], _unit(5, seed=3))
    assert VectorIndex.open(tmp_path / "idx", "m2", DIM, store).ntotal == 5
    assert VectorIndex.open(tmp_path / "idx", "m1", DIM, store).ntotal == 20


# -- the approximate (IVF) index of a large memory ------------------------------------

SMALL_ANN = IndexOptions(ann_threshold=1000, nprobe=16, rerank=4)


def _clustered(rows: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in 60 loose families, so an IVF index has structure to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 60, rows)] + 0.3 * rng.standard_normal((rows, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def large(tmp_path: Path):
    """A store with 3000 memories (above SMALL_ANN's threshold) and their vectors for model m1."""
    store = Store(tmp_path / "g.db")
    ids = [store.add_memory("log" if i % 3 else "code_diff", f"memory {i}") for i in range(3000)]
    vectors = _clustered(3000)
    store.add_vectors("m1", ids, vectors)
    yield store, np.array(ids), vectors
    store.close()


def _exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return ids[np.argsort(-(vectors @ query), kind="stable")[:k]].tolist()


def test_a_large_memory_gets_an_ivf_index_with_exact_scores_and_high_recall(tmp_path: Path, large):
    store, ids, vectors = large
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store, SMALL_ANN)
    assert not index.exact and index.describe()["kind"] == "ivf-sq8" and index.ntotal == 3000
    queries = _clustered(50, seed=1)
    found = [index.search(q, 10) for q in queries]
    recall = np.mean([len({i for i, _ in f} & set(_exact_top(vectors, ids, q, 10))) / 10
                      for f, q in zip(found, queries, strict=True)])
    assert recall >= 0.9
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    for i, score in found[0]:  # re-scored with the stored float32 vectors: exact cosines
        assert score == pytest.approx(float(by_id[i] @ queries[0]), abs=1e-5)
    assert [s for _, s in found[0]] == sorted((s for _, s in found[0]), reverse=True)


def test_the_ivf_index_removes_ids_and_survives_a_save_and_reload(tmp_path: Path, large):
    store, ids, vectors = large
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store, SMALL_ANN)
    assert index.search(vectors[5], 1)[0][0] == ids[5]
    index.remove(ids[5:6])
    assert ids[5] not in [i for i, _ in index.search(vectors[5], 10)]
    assert index.ntotal == 2999 and ids[5] not in set(index.ids().tolist())
    index.save()
    reopened = VectorIndex.open(tmp_path / "idx", "m1", DIM, store, SMALL_ANN)
    # The database still has the vector: the reloaded IVF index takes it back in.
    assert not reopened.exact and reopened.ntotal == 3000
    assert reopened.search(vectors[5], 1)[0][0] == ids[5]


def test_the_ivf_index_search_can_be_restricted_to_some_ids(tmp_path: Path, large):
    store, ids, vectors = large
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store, SMALL_ANN)
    allowed = ids[100:400]
    hits = index.search(vectors[150], 10, allowed=allowed)
    assert hits[0][0] == ids[150] and {i for i, _ in hits} <= set(allowed.tolist())


def test_an_index_that_crossed_the_threshold_asks_for_a_rebuild(tmp_path: Path, large):
    store, ids, vectors = large
    small = VectorIndex.open(tmp_path / "idx", "m1", DIM, store, IndexOptions(ann_threshold=5000))
    assert small.exact and not small.needs_rebuild()
    small.save()
    assert VectorIndex.open(tmp_path / "idx", "m1", DIM, store, SMALL_ANN).needs_rebuild()  # a flat file, now too big
    shrunk = VectorIndex.build(tmp_path / "b.faiss", "m1", DIM, store, SMALL_ANN)
    shrunk.remove(ids[:2600])
    assert not shrunk.exact and shrunk.needs_rebuild()  # far below the threshold: exact is faster again


def test_ivf_list_counts_grow_with_the_square_root_of_the_size():
    assert ivf_lists(1_000) == 128 and ivf_lists(50_000) == 1024 and ivf_lists(1_000_000) == 4096
    assert ivf_lists(10) == 64 and ivf_lists(10**10) == 16384


def test_an_ivf_ranking_without_re_scoring_reads_no_stored_vectors(tmp_path: Path, large):
    store, ids, vectors = large
    index = VectorIndex.open(tmp_path / "idx", "m1", DIM, store, SMALL_ANN)
    ranked = index.search(vectors[9], 10, exact_scores=False)
    store.close()  # the codes alone answer: a closed store would fail a re-scoring read
    assert ranked[0][0] == ids[9] and len(ranked) == 10
    assert ranked[0][1] == pytest.approx(1.0, abs=0.05)  # 8-bit codes: close to, not exactly, the cosine
