"""A FAISS index per model id, keyed by memory id, saved atomically, rebuilt from SQLite.

Two kinds, chosen by size (bench/ann_choice.py measured the candidates):
- below `[memory] ann_threshold` vectors: exact search (flat inner product behind an id map);
- from there on: IVF with 8-bit scalar-quantised codes (a quarter of float32's memory) whose
  k × `ann_rerank` candidates are re-scored exactly with their float32 vectors from SQLite,
  so scores stay exact cosines and recall is that of the candidate list, not of the codes.
  IVF removes ids natively (deletes need no tombstones). An index that outgrew its kind
  is rebuilt in the background by `memory.service.Memory` while this one serves.

The index is a cache: the vectors themselves are committed to the `vectors` table first,
so a missing, stale or corrupt index file is rebuilt from the database without
re-encoding anything. Each file has its sha256 beside it (`<id>.faiss.sha256`, written
after the file), so damaged bytes are found at load, not served as silently wrong vectors.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from memory.atomic import write_bytes_atomically
from memory.store import Store, id_fingerprint

logger = logging.getLogger(__name__)


CHECKSUM_SUFFIX = ".sha256"
READ_CHUNK = 1 << 20
BUILD_CHUNK = 50_000  # vectors read from SQLite at a time while building
TRAIN_PER_LIST = 64  # IVF training sample: this many vectors per list
REBUILD_GROWTH = 4  # an IVF index is rebuilt once its size calls for this many times its lists


@dataclass(frozen=True)
class IndexOptions:
    """When search turns approximate, and how it is tuned (`[memory] ann_*`)."""

    ann_threshold: int = 50_000
    nprobe: int = 128
    rerank: int = 2

    @classmethod
    def from_settings(cls, memory) -> IndexOptions:
        """The options of a `[memory]` settings section."""
        return cls(memory.ann_threshold, memory.ann_nprobe, memory.ann_rerank)


def ivf_lists(n: int) -> int:
    """IVF list count for `n` vectors: about 4·√n, a power of two between 64 and 16384."""
    return int(min(16384, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def index_path(index_dir: Path, model_id: str) -> Path:
    """Where the index of one model lives."""
    return Path(index_dir) / f"{model_id}.faiss"


def checksum_path(path: Path) -> Path:
    """The file holding the sha256 of an index file."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def remove_index(path: Path) -> None:
    """Delete an index file and its checksum."""
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


class VectorIndex:
    """Inner-product search over normalised vectors (cosine), ids are memory ids."""

    def __init__(self, path: Path, model_id: str, dim: int, index=None, store: Store | None = None,
                 options: IndexOptions | None = None):
        self.path = Path(path)
        self.model_id = model_id
        self.dim = dim
        self.store = store  # where an approximate index re-scores its candidates
        self.options = options or IndexOptions()
        self._index = index if index is not None else _flat(dim)
        if not self.exact:
            faiss.extract_index_ivf(self._index).nprobe = self.options.nprobe
        self._lock = threading.RLock()
        self.dirty = index is None

    @classmethod
    def open(cls, index_dir: Path, model_id: str, dim: int, store: Store,
             options: IndexOptions | None = None) -> VectorIndex:
        """Load the saved index when it is readable and bring it in step with the database;
        without one, build it from the database."""
        path = index_path(index_dir, model_id)
        saved = _read_index(path, dim)
        if saved is None:
            return cls.build(path, model_id, dim, store, options)
        index = cls(path, model_id, dim, saved, store, options)
        index.sync(store)
        return index

    @classmethod
    def build(cls, path: Path, model_id: str, dim: int, store: Store, options: IndexOptions | None = None,
              progress: Callable[[int, int], None] | None = None) -> VectorIndex:
        """A new index of every vector the database holds for this model, read in chunks:
        exact below the threshold, else IVF trained on a sample of them."""
        options = options or IndexOptions()
        ids = store.vector_ids(model_id)
        raw = _flat(dim) if len(ids) < options.ann_threshold else _trained_ivf(store, model_id, dim, ids)
        index = cls(path, model_id, dim, raw, store, options)
        index.dirty = True
        _fill(index, store, len(ids), progress)
        return index

    @property
    def exact(self) -> bool:
        """Whether search compares the query with every vector (a small index)."""
        return isinstance(self._index, faiss.IndexIDMap2)

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._index.ntotal)

    def describe(self) -> dict:
        """Kind and tuning, for status."""
        if self.exact:
            return {"kind": "exact", "size": self.ntotal}
        ivf = faiss.extract_index_ivf(self._index)
        return {"kind": "ivf-sq8", "size": self.ntotal, "lists": int(ivf.nlist), "nprobe": int(ivf.nprobe),
                "rerank": self.options.rerank}

    def needs_rebuild(self) -> bool:
        """Whether the index is of the wrong kind or size for what it holds now."""
        n, threshold = self.ntotal, self.options.ann_threshold
        if self.exact:
            return n >= threshold
        return n < threshold // 2 or ivf_lists(n) >= REBUILD_GROWTH * faiss.extract_index_ivf(self._index).nlist

    def ids(self) -> np.ndarray:
        """Memory ids held by the index."""
        with self._lock:
            if self.exact:
                return faiss.vector_to_array(self._index.id_map).astype(np.int64)
            lists = faiss.extract_index_ivf(self._index).invlists
            parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                     for i in range(lists.nlist) if lists.list_size(i)]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def sync(self, store: Store) -> tuple[int, int]:
        """Add vectors the database has and the index lacks, drop the ones it no longer has."""
        have = self.ids()
        if id_fingerprint(have) == store.vector_fingerprint(self.model_id):
            return 0, 0  # the usual start: compared in SQLite, not through a million-id list
        want = store.vector_ids(self.model_id)
        missing = np.setdiff1d(want, have, assume_unique=True)
        extra = np.setdiff1d(have, want, assume_unique=True)
        if len(extra):
            self.remove(extra)
        for start in range(0, len(missing), 10_000):
            ids, vectors = store.load_vectors(self.model_id, missing[start:start + 10_000], self.dim)
            self.add(ids, vectors)
        if len(missing) or len(extra):
            logger.info("index synced with database", extra={
                "model_id": self.model_id, "added": int(len(missing)), "removed": int(len(extra))})
        return int(len(missing)), int(len(extra))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace) vectors under their memory ids."""
        if not len(ids):
            return
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            self._index.remove_ids(ids)
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            self.dirty = True

    def remove(self, ids: np.ndarray) -> None:
        """Drop vectors by memory id."""
        with self._lock:
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))
            self.dirty = True

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None,
               exact_scores: bool = True) -> list[tuple[int, float]]:
        """The k nearest memory ids with their cosine scores, best first. Without `exact_scores`
        an IVF index skips re-scoring (for a ranking that only its order feeds, as in hybrid)."""
        if k <= 0 or self.ntotal == 0 or (allowed is not None and not len(allowed)):
            return []
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        sel = None if allowed is None else faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
        if self.exact:
            params = None if sel is None else faiss.SearchParameters(sel=sel)
            return self._raw_search(query, min(k, self.ntotal), params)
        params = faiss.SearchParametersIVF(sel=sel, nprobe=self.options.nprobe)
        if not exact_scores:
            return self._raw_search(query, min(k, self.ntotal), params)
        found = self._raw_search(query, min(k * max(1, self.options.rerank), self.ntotal), params)
        return self._rescored(query[0], found, k)

    def _raw_search(self, query: np.ndarray, k: int, params) -> list[tuple[int, float]]:
        with self._lock:
            scores, ids = self._index.search(query, k, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i != -1]

    def _rescored(self, query: np.ndarray, found: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
        """The best k of `found` by exact cosine with their stored vectors (code scores without a store)."""
        if self.store is None or not found:
            return found[:k]
        ids, vectors = self.store.load_vectors(self.model_id, [i for i, _ in found], self.dim)
        scores = vectors @ query
        best = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in best]

    def nearest_similarity(self, vectors: np.ndarray) -> list[float | None]:
        """Cosine similarity of each vector to its nearest indexed neighbour (None: index empty);
        approximate (from 8-bit codes) for an IVF index."""
        if self.ntotal == 0 or not len(vectors):
            return [None] * len(vectors)
        with self._lock:
            scores, ids = self._index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return [float(s) if i != -1 else None for s, i in zip(scores[:, 0], ids[:, 0], strict=True)]

    def save(self) -> None:
        """Write the index atomically (serialised under the lock, written outside it)."""
        with self._lock:
            data = faiss.serialize_index(self._index)
            self.dirty = False
        write_bytes_atomically(self.path, memoryview(data))
        # After the file: a crash in between leaves a mismatch, which means "rebuild", never a wrong index.
        write_bytes_atomically(checksum_path(self.path), hashlib.sha256(memoryview(data)).hexdigest().encode())


def _flat(dim: int):
    """An empty exact index keyed by memory id."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _trained_ivf(store: Store, model_id: str, dim: int, ids: np.ndarray):
    """An empty IVF index with 8-bit codes, trained on a random sample of the stored vectors."""
    lists = ivf_lists(len(ids))
    sample = np.random.default_rng(0).choice(ids, min(len(ids), TRAIN_PER_LIST * lists), replace=False)
    _, vectors = store.load_vectors(model_id, np.sort(sample), dim)
    index = faiss.index_factory(dim, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(vectors))
    return index


def _fill(index: VectorIndex, store: Store, total: int, progress: Callable[[int, int], None] | None) -> None:
    """Add every stored vector of the index's model, in chunks."""
    after = 0
    while True:
        ids, vectors = store.vectors_after(index.model_id, after, BUILD_CHUNK, index.dim)
        if not len(ids):
            return
        with index._lock:
            index._index.add_with_ids(vectors, ids)
        after = int(ids[-1])
        if progress:
            progress(index.ntotal, total)


def _read_index(path: Path, dim: int):
    """The saved index, or None when it is missing, unreadable or of another size."""
    if not path.exists():
        return None
    problem = _checksum_problem(path)
    if problem:
        logger.warning("index file cannot be trusted, rebuilding it from the database",
                       extra={"path": str(path), "problem": problem})
        return None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        logger.warning("index file unreadable, rebuilding it from the database",
                       extra={"path": str(path), "error": str(exc).splitlines()[0]})
        return None
    if index.d != dim or not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVF)):
        logger.warning("index file does not match the model, rebuilding it",
                       extra={"path": str(path), "dim": index.d, "expected_dim": dim})
        return None
    return index


def _checksum_problem(path: Path) -> str | None:
    """Why the file cannot be trusted (no checksum, or bytes that do not match it), or None."""
    try:
        expected = checksum_path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "has no readable checksum (written by an older Gremlin, or cut short)"
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None if digest.hexdigest() == expected else "does not match its checksum (its bytes were damaged)"

