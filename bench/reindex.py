"""Reindex after a promotion: how long re-embedding every memory takes, against plain encode.

A home gets N memories (unified diffs of generated modules, as the daemon stores
changes). Then, back to back on the same device and batch size:
- plain `model.encode` of the same text views (memory/text.py): the baseline;
- `build_index` as before this change: memories read and encoded 256 at a time;
- `build_index` now: chunks of max(2048, 16 x batch) memories, so the encoder sorts a
  whole chunk by length and pads little, then the index is built from the database.
Each `build_index` encodes every memory, commits its vector, and builds and saves the index
(exact below `[memory] ann_threshold`, IVF above). The table gives memories/s, the ratio
to plain encode and the time 100,000 memories take at that rate (measured when N is
100,000 or more, else projected, and marked so).

    python bench/reindex.py --memories 2000          # this CPU
    python bench/reindex.py --memories 100000        # a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench._common import machine, make_home, print_table, raw_library_model, verdict  # noqa: E402
from bench._vectors import diff_texts  # noqa: E402
from config.settings import load_settings  # noqa: E402
from memory.service import build_index  # noqa: E402
from memory.store import Store  # noqa: E402
from memory.text import embedding_text  # noqa: E402
from memory.vector_store.embedder import Embedder  # noqa: E402
from memory.vector_store.index import index_path, remove_index  # noqa: E402

TARGET_RATIO = 0.9  # reindexing should cost little more than encoding itself
REFERENCE = 100_000


def fill(store: Store, n: int) -> list[str]:
    """Store `n` diff memories; return their texts."""
    texts = diff_texts(n, seed=3)
    for start in range(0, n, 20_000):
        store.add_memories([("code_diff", t, {}, "2026-01-01T00:00:00+00:00") for t in texts[start:start + 20_000]])
    return texts


def timed_build(settings, store: Store, embedder: Embedder, batch: int) -> float:
    """Seconds for one build_index that encodes every memory from scratch."""
    store.delete_vectors(embedder.model_id)
    remove_index(index_path(settings.memory.index_dir, embedder.model_id))
    started = time.perf_counter()
    index = build_index(settings, store, embedder, batch=batch,
                        progress=lambda done, total: print(f"  {done:,}/{total:,}", end="\r", flush=True))
    seconds = time.perf_counter() - started
    print(f"  built a {index.describe()['kind']} index of {index.ntotal:,} in {seconds:.1f} s")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=2000, help="memories to re-embed")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gremlin-reindex-") as tmp:
        (Path(tmp) / "watched").mkdir()
        home = make_home(Path(tmp), Path(tmp) / "watched", {"model": {"device": args.device}})
        settings = load_settings(home)
        store = Store(settings.memory.db)
        texts = [embedding_text(t) for t in fill(store, args.memories)]
        embedder = Embedder.from_settings(settings)
        embedder.encode(texts[:64])  # load and warm up
        raw = raw_library_model(embedder)  # the baseline: plain SentenceTransformer.encode
        raw.encode(texts[:64], batch_size=embedder.batch_size)
        started = time.perf_counter()
        raw.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True)
        plain = time.perf_counter() - started
        print(f"  plain encode: {plain:.1f} s")
        before = timed_build(settings, store, embedder, 256)
        now = timed_build(settings, store, embedder, 0)
        store.close()
    n, kind = args.memories, "measured" if args.memories >= REFERENCE else "projected"
    rows = [[name, f"{seconds:.1f}", f"{n / seconds:.0f}", f"{plain / seconds:.2f}",
             f"{REFERENCE * seconds / n / 60:.1f} min ({kind})"]
            for name, seconds in (("plain model.encode, same texts", plain), ("build_index, 256 at a time (before)", before),
                                  ("build_index, large chunks (now)", now))]
    print_table(f"reindex of {n:,} memories on {embedder.device}, batch {embedder.batch_size} ({machine()})", rows,
                ("path", "seconds", "memories/s", "vs plain", f"{REFERENCE:,} memories"))
    return verdict(plain / now >= TARGET_RATIO,
                   f"reindex {n / now:.0f} memories/s = {plain / now:.2f} of plain encode (target ≥ {TARGET_RATIO}); "
                   f"{REFERENCE:,} memories in {REFERENCE * now / n / 60:.1f} min ({kind}) on {embedder.device}")


if __name__ == "__main__":
    sys.exit(main())
