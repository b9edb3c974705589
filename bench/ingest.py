"""Ingest throughput: N file changes through the real pipeline vs plain model.encode.

The pipeline is the daemon's own path, in process: watchdog → debounce → GNU diff →
SQLite commit → batched encode → vectors committed → FAISS. The raw figure encodes the
very texts the pipeline stored, with the same model and batch size. Target: ratio ≥ 0.8.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from _common import cpu_count_note, make_home, print_table, verdict
from config.settings import load_settings
from memory.service import EmbedQueue, Memory
from memory.store import Store
from memory.vector_store.embedder import Embedder
from self_mutation_watcher.watcher import Watcher

WORDS = ("user order invoice payment retry timeout cache session token parse render index query "
         "config logger socket buffer stream batch vector model train score event handler").split()


def source_file(rng: random.Random, n_funcs: int) -> str:
    """A small Python-like module."""
    out = []
    for _ in range(n_funcs):
        name = "_".join(rng.sample(WORDS, 2))
        args = ", ".join(rng.sample(WORDS, rng.randint(1, 3)))
        body = "\n".join(f"    {rng.choice(WORDS)} = {rng.choice(WORDS)}({rng.choice(WORDS)}) + {rng.randint(0, 99)}"
                         for _ in range(rng.randint(2, 8)))
        out.append(f"def {name}({args}):\n{body}\n    return {rng.choice(WORDS)}\n")
    return "\n".join(out)


def edit(rng: random.Random, text: str) -> str:
    """Change a few lines: rewrite some, insert some."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(lines))
        lines[i] = f"    {rng.choice(WORDS)}_{rng.randint(0, 999)} = {rng.choice(WORDS)}({rng.choice(WORDS)})"
    for _ in range(rng.randint(0, 8)):
        lines.insert(rng.randrange(len(lines)), f"    # {' '.join(rng.sample(WORDS, 5))}")
    return "\n".join(lines) + "\n"


def run_pipeline(n: int, debounce_ms: int, seed: int, embedder: Embedder) -> tuple[float, list[str]]:
    """Seconds from the first write until all n memories are embedded, and their texts."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="gremlin-bench-") as tmp:
        watched = Path(tmp) / "project"
        watched.mkdir()
        originals = [source_file(rng, rng.randint(2, 5)) for _ in range(n)]
        for i, text in enumerate(originals):
            (watched / f"mod_{i:04d}.py").write_text(text)
        settings = load_settings(make_home(Path(tmp), watched, debounce_ms=debounce_ms))
        store = Store(settings.memory.db)
        memory = Memory(settings, store, embedder)
        embedding = EmbedQueue(memory)
        embedding.start()
        watcher = Watcher(settings, store, embedding.submit)  # wired as the daemon wires it
        watcher.start()
        watcher.wait_idle(120)  # the baseline scan
        edits = [edit(rng, text) for text in originals]
        start = time.perf_counter()
        for i, text in enumerate(edits):
            (watched / f"mod_{i:04d}.py").write_text(text)
        while store.vector_count(embedder.model_id) < n:
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        watcher.stop()
        embedding.stop()
        texts = [m["text"] for m in store.get_memories(store.memory_ids().tolist()).values()]
        store.close()
    return seconds, texts


def run_raw(texts: list[str], embedder: Embedder) -> float:
    """Seconds plain model.encode takes for the same texts (best of two)."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        embedder.model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300, help="file changes (default 300)")
    parser.add_argument("--debounce-ms", type=int, default=200, help="watch.debounce_ms (default 200)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    from memory.vector_store.embedder import resolve_model_path
    embedder = Embedder(resolve_model_path("", Path(".")), device="auto")
    embedder.encode(["warm up the model"] * 64)
    pipeline_s, texts = run_pipeline(args.n, args.debounce_ms, args.seed, embedder)
    raw_s = run_raw(texts, embedder)
    ratio = (args.n / pipeline_s) / (len(texts) / raw_s)
    print_table(f"ingest: {args.n} changes, debounce {args.debounce_ms} ms ({cpu_count_note()}, "
                f"device {embedder.device})",
                [("gremlin pipeline (write → embedded)", f"{pipeline_s:.2f}", f"{args.n / pipeline_s:.1f}"),
                 ("plain model.encode, same texts", f"{raw_s:.2f}", f"{len(texts) / raw_s:.1f}"),
                 ("ratio pipeline / raw", "", f"{ratio:.2f}")],
                ("what", "seconds", "changes/s"))
    verdict(ratio >= 0.8 and len(texts) == args.n, f"ratio {ratio:.2f} (target ≥ 0.80), {len(texts)} memories")


if __name__ == "__main__":
    main()
