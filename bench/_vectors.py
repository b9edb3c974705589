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

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.ingest import source_file, statement
from memory.text import embedding_text
from memory.vector_store.embedder import Embedder

DEFAULT_BASES = 3000
NOISE = 0.25  # norm of the noise added to a unit vector
MIX = 0.5  # at most this far towards the second embedding


def diff_texts(n: int, seed: int = 7) -> list[str]:
    """`n` git-style unified diffs of generated modules (one hunk: 1-3 lines rewritten as 1-4
    statements, three context lines each side), as the daemon stores change memories."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = f"pkg/mod_{i % 400}.py"
        lines = source_file(rng).splitlines()
        at = rng.randrange(4, len(lines) - 1)
        before, removed = lines[at - 3:at], lines[at:at + rng.randint(1, 3)]
        after = lines[at + len(removed):at + len(removed) + 3]
        added = [line for _ in range(rng.randint(1, 4)) for line in statement(rng).splitlines()]
        function = next((line for line in reversed(lines[:at]) if line.startswith("def ")), "")
        body = ([f" {line}" for line in before] + [f"-{line}" for line in removed] + [f"+{line}" for line in added]
                + [f" {line}" for line in after])
        out.append(f"modified {name}\ndiff --git a/{name} b/{name}\n--- a/{name}\n+++ b/{name}\n"
                   f"@@ -{at - 2},{len(before) + len(removed) + len(after)} +{at - 2},"
                   f"{len(before) + len(added) + len(after)} @@ {function}\n" + "\n".join(body) + "\n")
    return out


def base_embeddings(embedder: Embedder, n: int, cache_dir: Path) -> np.ndarray:
    """Real embeddings of `n` generated diffs (their text view), cached per model."""
    cache = Path(cache_dir) / f"bases-git-{embedder.model_id}-{n}.npy"
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
