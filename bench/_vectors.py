"""Realistic vectors at any scale without encoding millions of texts.

A few thousand generated diffs (the modules and edits of bench/ingest.py) are embedded
once with the real model, in the text view the daemon encodes, and cached. Each of the
N vectors is then one real embedding moved part of the way towards another real
embedding, plus Gaussian noise, normalised: vectors come in overlapping families (the
same file changed again and again) on the model's own manifold, so nearest neighbours
are close but not trivially separated. Queries come from the same process, with their
own randomness.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.ingest import edit, source_file
from memory.text import embedding_text
from memory.vector_store.embedder import Embedder

DEFAULT_BASES = 3000
NOISE = 0.25  # norm of the noise added to a unit vector
MIX = 0.5  # at most this far towards the second embedding


def diff_texts(n: int, seed: int = 7) -> list[str]:
    """`n` unified diffs of generated modules, as the daemon stores change memories."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        before = source_file(rng)
        after = edit(rng, before)
        name = f"pkg/mod_{i % 400}.py"
        body = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                            f"a/{name}", f"b/{name}"))
        out.append(f"modified {name}\n{body}")
    return out


def base_embeddings(embedder: Embedder, n: int, cache_dir: Path) -> np.ndarray:
    """Real embeddings of `n` generated diffs (their text view), cached per model."""
    cache = Path(cache_dir) / f"bases-{embedder.model_id}-{n}.npy"
    if cache.exists():
        return np.load(cache)
    vectors = embedder.encode([embedding_text(t) for t in diff_texts(n)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def synthetic(bases: np.ndarray, n: int, seed: int, chunk: int = 100_000) -> Iterator[np.ndarray]:
    """`n` normalised float32 vectors near the manifold of `bases`, in chunks."""
    rng = np.random.default_rng(seed)
    dim = bases.shape[1]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        first = bases[rng.integers(0, len(bases), m)]
        second = bases[rng.integers(0, len(bases), m)]
        mix = rng.uniform(0.0, MIX, (m, 1)).astype(np.float32)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (NOISE / np.sqrt(dim))
        vectors = first + mix * (second - first) + noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield np.ascontiguousarray(vectors, dtype=np.float32)
