"""A 10,000-file checkout through the real daemon, then a restart over the unchanged tree.

1. Start the daemon on an empty folder, write N source files at once (as `git checkout`
   would) and time until every one is searchable (recorded and embedded); report the
   daemon's peak RSS (VmHWM) and events/s against plain `model.encode` of the very same
   memory texts (target ratio ≥ 0.8).
2. Stop it, start it again: the reconcile of the unchanged tree must take < 5 s and
   re-embed nothing (no new events, no new vectors).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import make_home, print_table, raw_library_model, start_daemon, stop_daemon, verdict, wait_ready
from agent_core.control import request
from config.settings import load_settings
from ingest import source_file
from memory.store import Store
from memory.vector_store.embedder import Embedder


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def checkout(watched: Path, n: int, seed: int) -> None:
    """Write n small modules in 100 folders, as fast as a checkout does."""
    rng = random.Random(seed)
    for i in range(n):
        folder = watched / f"pkg{i % 100:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"mod{i:05d}.py").write_text(source_file(rng, rng.randint(1, 3)))


def wait_searchable(settings, n: int, timeout: float) -> dict:
    """Poll the daemon until n events are recorded and embedded; returns its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = request(settings, "status")
        if info["counts"]["events"] >= n and info["index_size"] >= n:
            return info
        time.sleep(0.5)
    raise SystemExit(f"not all {n} files searchable after {timeout} s")


def raw_texts_per_second(settings, texts: list[str], sample: int, seed: int) -> float:
    """Plain model.encode throughput on a sample of the same texts, same model and batch
    size; the best of two runs (this shared CPU's speed drifts by 20 % between minutes)."""
    embedder = Embedder.from_settings(settings)
    model = raw_library_model(embedder)  # plain SentenceTransformer, not Gremlin's lean encoder
    model.encode(["warm up"] * 32)
    chosen = random.Random(seed).sample(texts, min(sample, len(texts)))
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        model.encode(chosen, batch_size=embedder.batch_size, normalize_embeddings=True)
        best = min(best, time.perf_counter() - start)
    return len(chosen) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000, help="files in the checkout (default 10000)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for all of them")
    parser.add_argument("--raw-sample", type=int, default=2000, help="texts for the raw encode (default 2000)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gremlin-checkout-") as tmp:
        watched = Path(tmp) / "repo"
        watched.mkdir()
        home = make_home(Path(tmp), watched)
        settings = load_settings(home)
        proc = start_daemon(home)
        try:
            wait_ready(home, proc)
            start = time.perf_counter()
            checkout(watched, args.files, args.seed)
            written = time.perf_counter() - start
            info = wait_searchable(settings, args.files, args.timeout)
            searchable = time.perf_counter() - start
            peak = peak_rss_mb(proc.pid)
        finally:
            first_exit = stop_daemon(proc)
        store = Store(settings.memory.db, readonly=True)
        texts = [m["text"] for m in store.get_memories(store.memory_ids().tolist()).values()]
        vectors_before, events_before = store.vector_count(info["model_id"]), store.counts()["events"]
        store.close()
        proc = start_daemon(home)
        try:
            restart = time.perf_counter()
            wait_ready(home, proc)
            while str(watched) not in (status := request(settings, "status"))["watcher"]["reconcile_seconds"]:
                time.sleep(0.05)
            reconcile_s = status["watcher"]["reconcile_seconds"][str(watched)]
            ready_s = time.perf_counter() - restart
            after = status["counts"]
        finally:
            second_exit = stop_daemon(proc)
        raw_rate = raw_texts_per_second(settings, texts, args.raw_sample, args.seed)
    ratio = (args.files / searchable) / raw_rate
    unchanged = after["events"] == events_before and after["vectors"] == vectors_before
    print_table(f"checkout of {args.files} files through the daemon ({sys.platform}, CPU)", [
        ("files written by the checkout", f"{written:.1f} s", ""),
        ("all searchable after", f"{searchable:.1f} s", ""),
        ("pipeline events/s", f"{args.files / searchable:.1f}", ""),
        (f"plain model.encode texts/s (best of 2, {min(args.raw_sample, len(texts))} of the texts)",
         f"{raw_rate:.1f}", ""),
        ("ratio pipeline / raw", f"{ratio:.2f}", "≥ 0.80"),
        ("daemon peak RSS (VmHWM)", f"{peak:.0f} MB", ""),
        ("restart: reconcile of the unchanged tree", f"{reconcile_s:.2f} s", "< 5 s"),
        ("restart: start until reconciled", f"{ready_s:.1f} s", ""),
        ("restart: new events / new vectors", f"{after['events'] - events_before} / "
         f"{after['vectors'] - vectors_before}", "0 / 0"),
        ("exit codes", f"{first_exit}, {second_exit}", "0, 0"),
    ], ("measure", "value", "target"))
    verdict(ratio >= 0.8 and reconcile_s < 5 and unchanged and first_exit == second_exit == 0,
            f"ratio {ratio:.2f}, reconcile {reconcile_s:.2f} s, re-embedded nothing: {unchanged}")


if __name__ == "__main__":
    main()
