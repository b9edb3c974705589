"""Memory as one object: durable rows in SQLite, vectors from the embedder, FAISS search.

Order for every new memory: its row is already committed (by `Store.record_events`);
here it is encoded, its vector committed to the `vectors` table, then added to the
in-memory index. The index file is saved on an interval, so a crash costs at most a
rebuild from the `vectors` table, and a memory whose vector never got written is found
by `catch_up` on the next start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from memory.drift import DriftDetector
from memory.errors import MemoryLayerError
from memory.fusion import EQUAL_WEIGHT, hybrid_fusion
from memory.store import StoredEvent, Store
from memory.text import embedding_text
from memory.vector_store.embedder import Embedder
from memory.vector_store.index import IndexOptions, VectorIndex, index_path

logger = logging.getLogger(__name__)

PREVIEW_LINES = 3
PREVIEW_CHARS = 160
SEARCH_MODES = ("hybrid", "dense", "lexical")
HYBRID_DEPTH = 50  # each ranking fused in hybrid search is at least this deep ...
HYBRID_DEPTH_FACTOR = 5  # ... and at least this many times the results asked for
KIND_OVERFETCH = 8  # an approximate search for one kind first looks this many times deeper


class SearchModeError(MemoryLayerError):
    """A search was asked for in a mode that does not exist."""


class EmptyQuery(MemoryLayerError):
    """A search was asked for with no text."""


def check_query(query: str, mode: str) -> None:
    """Raise SearchModeError or EmptyQuery for a search that cannot be answered."""
    if mode not in SEARCH_MODES:
        raise SearchModeError(f"unknown search mode {mode!r}; use one of: {', '.join(SEARCH_MODES)}")
    if not query.strip():
        raise EmptyQuery("the query is empty; search for some words, an identifier or an error message")


def lexical_hits(store: Store, query: str, k: int = 10, kind: str | None = None,
                 budget: int | None = None) -> list[SearchHit]:
    """The k memories whose text best matches the words of `query` (BM25); needs no model."""
    check_query(query, "lexical")
    return _hits(store, store.lexical_search(query, k, kind, budget))


def _hits(store: Store, found: list[tuple[int, float]]) -> list[SearchHit]:
    rows = store.get_memories([i for i, _ in found])
    return [_hit(rows[i], score) for i, score in found if i in rows]


@dataclass(frozen=True)
class SearchHit:
    """One search result."""

    id: int
    score: float
    kind: str
    change: str | None
    path: str | None
    label: str | None
    time: str
    preview: str
    event_id: int | None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


class Memory:
    """The store, the embedder and the current model's index, used together."""

    def __init__(self, settings, store: Store, embedder: Embedder):
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.index = VectorIndex.open(settings.memory.index_dir, embedder.model_id, embedder.dim, store,
                                      IndexOptions.from_settings(settings.memory))
        self._rebuild: threading.Thread | None = None
        self.drift = DriftDetector(settings.watch.drift_window, settings.watch.drift_threshold)
        self._last_save = time.monotonic()
        # Encoding into the index is serialised (no memory is added twice across a model
        # swap); readers take the (embedder, index) pair under a short lock, so a search
        # started before a swap finishes on the old model and index.
        self._embed_lock = threading.RLock()
        self._swap_lock = threading.Lock()
        self._indexed = threading.Condition()  # notified whenever vectors join the live index
        if not store.readonly:
            store.register_model(embedder.model_id, str(embedder.path), "current",
                                 {"source": "base", "base_model": embedder.model_id})
        self.fusion_weight = self._fusion_weight_of(embedder.model_id)

    def _fusion_weight_of(self, model_id: str) -> float:
        """Hybrid search's dense share for a model: the configured one, else its calibrated one, else 0.5."""
        forced = self.settings.memory.forced_fusion_weight
        if forced is not None:
            return forced
        stored = self.store.model_fusion_weight(model_id)
        return EQUAL_WEIGHT if stored is None else stored

    @property
    def model_id(self) -> str:
        """Id of the model whose vectors this memory searches."""
        return self.embedder.model_id

    def ingest(self, stored: Sequence[StoredEvent]) -> int:
        """Embed and index the memories of freshly committed events; return how many."""
        return self.embed_memories(_pairs(stored))

    def embed_memories(self, pairs: Sequence[tuple[int, str]]) -> int:
        """Encode (id, text) pairs, commit vectors and vector shifts, then add them to the index.

        The shift of a memory is 1 - its similarity to the nearest memory indexed before it;
        it is stored in the memory's metadata and feeds the drift detector.
        """
        with self._embed_lock:
            embedder, index = self.current()
            known = set(self.store.vector_ids_among(embedder.model_id, [p[0] for p in pairs]))
            pairs = [p for p in pairs if p[0] not in known]
            if not pairs:
                return 0
            ids = np.array([p[0] for p in pairs], dtype=np.int64)
            vectors = embedder.encode([embedding_text(p[1]) for p in pairs])
            shifts = [None if s is None else round(1.0 - s, 4) for s in index.nearest_similarity(vectors)]
            self.store.add_vectors(embedder.model_id, ids, vectors, shifts)
            index.add(ids, vectors)
            self.drift.add(shifts)
        with self._indexed:
            self._indexed.notify_all()
        return len(ids)

    def wait_indexed(self, count: int, timeout: float) -> bool:
        """Wait until the live index holds at least `count` vectors (True) or `timeout` passed
        (False): what a caller timing ingest waits on, to the moment, without polling."""
        with self._indexed:
            return self._indexed.wait_for(lambda: self.current()[1].ntotal >= count, timeout)

    def current(self) -> tuple[Embedder, VectorIndex]:
        """The embedder and the index that belong together right now."""
        with self._swap_lock:
            return self.embedder, self.index

    def build_index(self, embedder: Embedder, batch: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> VectorIndex:
        """Embed every memory with `embedder` into its own index while search uses the live one."""
        return build_index(self.settings, self.store, embedder, batch, progress)

    def reindex(self, progress: Callable[[int, int], None] | None = None) -> dict:
        """Rebuild the current model's index from the database alone (the index is a cache),
        embedding memories that lack a vector; search uses the old index until it is done."""
        embedder, old = self.current()
        started = time.monotonic()
        index = build_index(self.settings, self.store, embedder, progress=progress, fresh=True)
        old.dirty = False  # it shares the new index's file: swap must not save it over the new one
        self.swap(embedder, index)
        return {"model_id": embedder.model_id, "before": old.ntotal, "after": index.ntotal,
                "seconds": round(time.monotonic() - started, 2)}

    def swap(self, embedder: Embedder, index: VectorIndex) -> None:
        """Serve from `embedder` and `index` from now on; memories added meanwhile are embedded."""
        weight = self._fusion_weight_of(embedder.model_id)  # looked up once per model, not per query
        with self._embed_lock:
            old_index = self.index
            with self._swap_lock:
                self.embedder, self.index, self.fusion_weight = embedder, index, weight
            if old_index.dirty and not self.store.readonly:
                old_index.save()  # kept on disk for an instant rollback
            self.catch_up()
        with self._indexed:
            self._indexed.notify_all()
        logger.info("search switched model", extra={"model_id": embedder.model_id, "index_size": index.ntotal,
                                                    "fusion_weight": weight})

    def catch_up(self, batch: int = 256, progress: Callable[[int], None] | None = None,
                 after_id: int = 0) -> int:
        """Embed every memory (after `after_id`) that has no vector for the current model."""
        if not after_id and self.store.vector_count(self.model_id) >= self.store.memory_count():
            return 0  # every memory has one (vectors cascade with their memory): no table scan
        done = 0
        while pairs := self.store.memories_without_vector(self.model_id, batch, after_id):
            after_id = pairs[-1][0]  # a memory that cannot be encoded is not retried in this pass
            done += self.embed_memories(pairs)
            if progress:
                progress(done)
        if done:
            logger.info("embedded memories that had no vector", extra={"count": done})
        return done

    def search(self, query: str, k: int = 10, kind: str | None = None, mode: str = "hybrid") -> list[SearchHit]:
        """The k memories best matching `query`, optionally of one kind, best first.

        `mode` picks the ranking and what `SearchHit.score` means: "dense" = cosine
        similarity of MiniLM vectors (meaning); "lexical" = BM25 of the SQLite full-text
        index, higher is better (exact words and identifiers); "hybrid" (default) = both
        fused (memory/fusion.py): each ranking's scores min-max scaled to [0, 1], then
        w · dense + (1 − w) · lexical with the model's fusion weight w (the dense share,
        calibrated by the trainer or set by [memory] fusion_weight); 1.0 = best in both.
        Memories not embedded yet are still found by "lexical" and "hybrid".
        """
        check_query(query, mode)
        if mode == "dense":
            found = self._dense(query, k, kind)
        elif mode == "lexical":
            found = self.store.lexical_search(query, k, kind, self.settings.memory.lexical_budget)
        else:
            found = self._hybrid(query, k, kind)
        return _hits(self.store, found)

    def _dense(self, query: str, k: int, kind: str | None, exact_scores: bool = True) -> list[tuple[int, float]]:
        embedder, index = self.current()  # one pair: a model swap may happen meanwhile
        vector = embedder.encode([query])[0]
        if kind is None:
            return index.search(vector, k, exact_scores=exact_scores)
        if not index.exact:  # a deeper unrestricted search, filtered, avoids listing a common kind's ids
            found = index.search(vector, k * KIND_OVERFETCH, exact_scores=exact_scores)
            ours = self.store.ids_of_kind([i for i, _ in found], kind)
            if len(ours) >= min(k, len(found)):
                return [(i, s) for i, s in found if i in ours][:k]
        return index.search(vector, k, self.store.memory_ids(kind))

    def _hybrid(self, query: str, k: int, kind: str | None) -> list[tuple[int, float]]:
        # Fuse deeper lists than asked for: a memory ranked 30th by one and 2nd by the other
        # belongs near the top.
        depth = max(HYBRID_DEPTH, HYBRID_DEPTH_FACTOR * k)
        # The model's fusion weight is read once (a swap may change it meanwhile).
        budget, weight = self.settings.memory.lexical_budget, self.fusion_weight
        lexical = self.store.lexical_search(query, depth, kind, budget)
        if len(lexical) > 1 and not any(score for _, score in lexical):  # over budget: newest matches, unscored
            lexical = [(i, -float(rank)) for rank, (i, _) in enumerate(lexical)]  # credit by recency
        dense = self._dense(query, depth, kind, exact_scores=False)
        return [(int(i), score) for i, score in hybrid_fusion(lexical, dense, weight, k)]

    def maintain_index(self) -> bool:
        """Start rebuilding the index in the background when it outgrew its kind (exact → IVF,
        or an IVF grown or shrunk well past its lists); True when a rebuild started."""
        if self.store.readonly or (self._rebuild is not None and self._rebuild.is_alive()):
            return False
        _, index = self.current()
        if not index.needs_rebuild():
            return False
        self._rebuild = threading.Thread(target=self._rebuild_index, args=(index,), name="gremlin-index-rebuild",
                                         daemon=True)
        self._rebuild.start()
        return True

    def _rebuild_index(self, old: VectorIndex) -> None:
        """Build a new index from SQLite while `old` serves, then switch to it."""
        started = time.monotonic()
        try:
            new = VectorIndex.build(old.path, old.model_id, old.dim, self.store, old.options)
            with self._embed_lock:
                if self.index is not old:
                    return  # a model swap or reindex replaced it meanwhile
                new.sync(self.store)  # what was added or removed during the build
                with self._swap_lock:
                    self.index = new
            new.save()
            logger.info("index rebuilt", extra={"model_id": new.model_id, **new.describe(),
                                                "seconds": round(time.monotonic() - started, 1)})
        except Exception:  # noqa: BLE001 - the old index keeps serving; the next check tries again
            logger.exception("index rebuild failed; the current index keeps serving",
                             extra={"model_id": old.model_id})

    def save_index(self, force: bool = False, now: float | None = None) -> bool:
        """Write the index file when it changed and the save interval has passed."""
        now = time.monotonic() if now is None else now
        due = now - self._last_save >= self.settings.memory.index_save_interval_s
        if not self.index.dirty or not (force or due) or self.store.readonly:
            return False
        self.index.save()
        self._last_save = now
        return True

    def describe(self) -> dict:
        """Model and index facts for `gremlin status`."""
        path = index_path(self.settings.memory.index_dir, self.model_id)
        return {"model_id": self.model_id, "model_path": str(self.embedder.path),
                "device": self.embedder.device, "index_size": self.index.ntotal,
                "index": {**self.index.describe(), "rebuilding": self._rebuild is not None and self._rebuild.is_alive()},
                "index_file": str(path), "index_saved": path.exists(),
                "drift": asdict(self.drift.state())}


def build_index(settings, store: Store, embedder: Embedder, batch: int = 0,
                progress: Callable[[int, int], None] | None = None, fresh: bool = False) -> VectorIndex:
    """The saved index of every memory for `embedder`'s model, encoding only what is missing.

    Memories without a vector are encoded first, their text views in large chunks (the
    encoder sorts each chunk by length, so batches pad little) and committed to SQLite;
    the index is then built from the database. Vectors already stored for this model (an
    interrupted reindex, a rollback to a kept model) are reused, never re-encoded. `fresh`
    ignores the saved index file.
    """
    total, done = store.memory_count(), store.vector_count(embedder.model_id)
    chunk = batch or max(REINDEX_CHUNK, 16 * embedder.batch_size)
    if progress:
        progress(min(done, total), total)  # the start: a rate and an ETA are measured from here
    after = 0  # each chunk starts after the last: no rescan of what is done (quadratic at 100k)
    while pairs := store.memories_without_vector(embedder.model_id, chunk, after):
        ids = np.array([p[0] for p in pairs], dtype=np.int64)
        store.add_vectors(embedder.model_id, ids, embedder.encode([embedding_text(p[1]) for p in pairs]))
        done, after = done + len(pairs), pairs[-1][0]
        if progress:
            progress(min(done, total), total)
    options = IndexOptions.from_settings(settings.memory)
    if fresh:
        index = VectorIndex.build(index_path(settings.memory.index_dir, embedder.model_id), embedder.model_id,
                                  embedder.dim, store, options)
    else:
        index = VectorIndex.open(settings.memory.index_dir, embedder.model_id, embedder.dim, store, options)
    index.save()
    return index


def _pairs(stored: Sequence[StoredEvent]) -> list[tuple[int, str]]:
    return [(s.memory_id, s.event.memory_text or "") for s in stored if s.memory_id is not None]


DRAIN_S = 10.0  # how long a stopping daemon keeps embedding its backlog
REINDEX_CHUNK = 2048  # memories encoded per call while rebuilding: long enough to sort by length
HOLD_S = 10.0  # a memory pooled this long is embedded next, however short its text
FILL_S = 0.05  # a partial batch waits this long for more of a burst before it is encoded


class EmbedQueue:
    """Embeds committed memories on its own thread, one encoder batch at a time.

    The watcher hands over events it has already committed and goes back to diffing, so
    diffing the next files overlaps with encoding these. What has arrived waits in a pool,
    and each step encodes the `batch_size` memories with the most tokens: memories handed
    over while a burst is encoded still share forward passes with ones of their own length
    (every text of a pass is padded to its longest). Memories whose encoding keeps failing
    stay in the database without a vector; `Memory.catch_up` embeds them later.
    """

    RETRIES = 3

    def __init__(self, memory: Memory, max_batch: int = 256):
        self.memory = memory
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gremlin-embed", daemon=True)
        self._count_lock = threading.Lock()
        self.waiting = 0
        self.errors = 0
        self._drain_until: float | None = None

    def start(self) -> None:
        """Start the encoding thread."""
        self._thread.start()

    def submit(self, stored: Sequence[StoredEvent]) -> None:
        """Queue the memories of committed events (the watcher's sink)."""
        self.submit_memories(_pairs(stored))

    def submit_memories(self, pairs: Sequence[tuple[int, str]]) -> None:
        """Queue committed memories given as (id, text)."""
        with self._count_lock:
            self.waiting += len(pairs)
        for pair in pairs:
            self._queue.put(pair)

    def stop(self, timeout: float = 120.0, drain_s: float = DRAIN_S) -> None:
        """Embed what is queued for up to `drain_s`, then stop. What is left keeps its memory in
        the database without a vector and is embedded by the next start's catch-up, so a stop
        never waits for a whole backlog."""
        self._drain_until = time.monotonic() + drain_s
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        pool: list[tuple[tuple[int, str], int, float]] = []  # (memory, tokens, pooled at), longest first
        stopping = False
        while pool or not stopping:
            stopping = self._absorb(pool, wait=not pool) or stopping
            if not stopping:
                stopping = self._fill(pool)
            if self._drain_until is not None and time.monotonic() > self._drain_until:
                self._leave(pool)
                return
            if pool:
                self._embed(self._next_batch(pool))
            if not pool and self._queue.empty():
                release_free_memory()  # a burst's activations would otherwise stay resident

    def _leave(self, pool: list) -> None:
        """Stop with `pool` and whatever is still queued left for the next start's catch-up."""
        left = len(pool)
        while True:
            try:
                left += self._queue.get_nowait() is not None
            except queue.Empty:
                break
        logger.info("embedding stopped; the rest is embedded at the next start", extra={"memories_left": left})

    def _absorb(self, pool: list, wait: bool, first: list | None = None) -> bool:
        """Move `first` (already taken off the queue) and up to `max_batch` queued memories
        into `pool`, waiting for one when `wait`; True once the stop marker came."""
        items = first or ([self._queue.get()] if wait else [])
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        pairs = [p for p in items if p is not None]
        if pairs:
            now = time.monotonic()
            pool += [(pair, tokens, now) for pair, tokens in zip(pairs, self._token_counts(pairs), strict=True)]
            pool.sort(key=lambda item: -item[1])  # longest first, as model.encode orders its input
        return len(pairs) < len(items)

    def _fill(self, pool: list) -> bool:
        """Give a partial batch up to FILL_S (from its oldest memory) to fill up while a burst
        is still being handed over: the first change of a burst is not encoded alone.
        True once the stop marker came."""
        size = self.memory.current()[0].batch_size
        while 0 < len(pool) < size:
            left = min(item[2] for item in pool) + FILL_S - time.monotonic()
            if left <= 0:
                return False
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if self._absorb(pool, wait=False, first=[item]):
                return True
        return False

    def _token_counts(self, pairs: list[tuple[int, str]]) -> list[int]:
        """Tokens of each memory's view (they order the pool, closer than its characters);
        its characters if counting fails."""
        views = [embedding_text(text) for _, text in pairs]
        try:
            return self.memory.current()[0].token_counts(views)
        except Exception:  # noqa: BLE001 - only an order; this thread must not die
            logger.exception("counting tokens failed; ordering by characters", extra={"memories": len(pairs)})
            return [len(view) for view in views]

    def _next_batch(self, pool: list) -> list[tuple[int, str]]:
        """Take one encoder batch out of the pool: its head (the longest), or the oldest
        memories once one has waited HOLD_S (a stream of long texts starves no short one)."""
        size = self.memory.current()[0].batch_size
        starved = min(item[2] for item in pool) < time.monotonic() - HOLD_S
        if starved:
            pool.sort(key=lambda item: item[0][0])  # memory ids grow with commit order
        batch = pool[:size]
        del pool[:size]
        if starved:
            pool.sort(key=lambda item: -item[1])
        return [pair for pair, _, _ in batch]

    def _embed(self, batch: list[tuple[int, str]]) -> None:
        for attempt in range(1, self.RETRIES + 1):
            try:
                started = time.perf_counter()
                self.memory.embed_memories(batch)
                logger.debug("embedded a batch", extra={"memories": len(batch),
                                                        "seconds": round(time.perf_counter() - started, 3)})
                break
            except Exception:  # noqa: BLE001 - the rows are safe; never let this thread die
                self.errors += 1
                logger.exception("embedding failed", extra={"memories": len(batch), "attempt": attempt,
                                                            "first_id": batch[0][0]})
                time.sleep(min(30.0, 2.0 ** attempt))
        with self._count_lock:
            self.waiting -= len(batch)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after a large encode)."""
    trim = getattr(_LIBC, "malloc_trim", None)  # glibc only; musl and others have none
    if trim is not None:
        trim(0)


def _hit(row: dict, score: float) -> SearchHit:
    meta = row["meta"]
    return SearchHit(id=row["id"], score=round(score, 4), kind=row["kind"], change=row.get("change"),
                     path=meta.get("path"), label=meta.get("label"), time=row["created"],
                     preview=make_preview(row["text"]), event_id=row["event_id"])


def make_preview(text: str, lines: int = PREVIEW_LINES) -> str:
    """The first changed lines of a diff memory (or its first lines), shortened."""
    body = text.splitlines()[1:]
    changed = [line for line in body if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    picked = (changed or [line for line in body if line.strip()] or text.splitlines())[:lines]
    return "\n".join(line[:PREVIEW_CHARS] for line in picked)
