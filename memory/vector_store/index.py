"""A FAISS index per model id, keyed by memory id, saved atomically, rebuilt from SQLite.

The index is a cache: the vectors themselves are committed to the `vectors` table first,
so a missing, stale or corrupt index file is rebuilt from the database without
re-encoding anything. Each file has its sha256 beside it (`<id>.faiss.sha256`, written
after the file), so damaged bytes are found at load, not served as silently wrong vectors.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import faiss
import numpy as np

from memory.atomic import write_bytes_atomically
from memory.store import Store

logger = logging.getLogger(__name__)


CHECKSUM_SUFFIX = ".sha256"
READ_CHUNK = 1 << 20


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

    def __init__(self, path: Path, model_id: str, dim: int, index=None):
        self.path = Path(path)
        self.model_id = model_id
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = threading.RLock()
        self.dirty = index is None

    @classmethod
    def open(cls, index_dir: Path, model_id: str, dim: int, store: Store) -> VectorIndex:
        """Load the saved index when it is readable, then bring it in step with the database."""
        path = index_path(index_dir, model_id)
        index = cls(path, model_id, dim, _read_index(path, dim))
        index.sync(store)
        return index

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """Memory ids held by the index."""
        with self._lock:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def sync(self, store: Store) -> tuple[int, int]:
        """Add vectors the database has and the index lacks, drop the ones it no longer has."""
        have, want = self.ids(), store.vector_ids(self.model_id)
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

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The k nearest memory ids with their cosine scores, best first."""
        if k <= 0 or self.ntotal == 0 or (allowed is not None and not len(allowed)):
            return []
        params = None
        if allowed is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)))
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        with self._lock:
            scores, ids = self._index.search(query, min(k, self.ntotal), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i != -1]

    def nearest_similarity(self, vectors: np.ndarray) -> list[float | None]:
        """Cosine similarity of each vector to its nearest indexed neighbour (None: index empty)."""
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
    if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
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

