"""Change → searchable latency: write a file, poll the daemon's search until it finds it.

Runs the real daemon (a subprocess on a temporary home) and measures, for each of N
changes, the time from the write until `search` over the control socket lists the changed
file in its top 10. Target: p95 ≤ debounce_ms + 150 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import make_home, print_table, start_daemon, stop_daemon, verdict, wait_ready
from agent_core.control import request
from config.settings import load_settings

WORDS = ("apple harbor violin glacier tractor pepper lantern meadow rocket saddle thunder velvet walnut "
         "anchor biscuit canyon dolphin ember falcon garnet hammock igloo jasmine kettle lemon marble "
         "nectar orchid parrot quartz raven salmon tulip umbrella volcano willow yacht zebra bamboo "
         "cactus desert engine fossil guitar helmet island jungle koala ladder magnet needle oyster "
         "pillow quiver ribbon spider tiger uniform vendor wagon xylophone yogurt zipper").split()


def change_text(i: int, rng: random.Random) -> tuple[str, str]:
    """File content with a distinctive phrase of random words, and the phrase."""
    phrase = " ".join(rng.sample(WORDS, 6))
    body = f"def step_{i}():\n    \"\"\"{phrase}.\"\"\"\n    return {i}\n"
    return body, phrase


def measure(settings, watched: Path, n: int, poll_s: float, seed: int) -> list[float]:
    """Seconds from each write until search finds that file."""
    rng = random.Random(seed)
    latencies = []
    newest = 0  # event id of the last change found; a hit must be newer
    for i in range(n):
        path = watched / (f"new_{i:03d}.py" if i % 2 == 0 else f"edit_{i % 10}.py")
        body, phrase = change_text(i, rng)
        start = time.perf_counter()
        path.write_text(body)
        while True:
            hits = request(settings, "search", query=phrase, k=10)
            fresh = [h["event_id"] for h in hits if h["path"] == str(path) and h["event_id"] > newest]
            if fresh:
                newest = max(fresh)
                break
            if time.perf_counter() - start > 30:
                raise SystemExit(f"change {i} to {path} not found after 30 s")
            time.sleep(poll_s)
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100, help="changes (default 100)")
    parser.add_argument("--debounce-ms", type=int, default=None, help="override watch.debounce_ms")
    parser.add_argument("--poll-ms", type=float, default=5, help="search polling interval (default 5)")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gremlin-latency-") as tmp:
        watched = Path(tmp) / "project"
        watched.mkdir()
        for k in range(10):
            (watched / f"edit_{k}.py").write_text(f"value = {k}\n")
        extra = {"debounce_ms": args.debounce_ms} if args.debounce_ms is not None else {}
        home = make_home(Path(tmp), watched, **extra)
        settings = load_settings(home)
        proc = start_daemon(home)
        try:
            wait_ready(home, proc)
            latencies = measure(settings, watched, args.n, args.poll_ms / 1000, args.seed)
        finally:
            code = stop_daemon(proc)
    ms = sorted(x * 1000 for x in latencies)
    p50, p95 = statistics.median(ms), ms[max(0, round(0.95 * len(ms)) - 1)]
    target = settings.watch.debounce_ms + 150
    print_table(f"write → searchable, {len(ms)} changes, debounce {settings.watch.debounce_ms} ms",
                [("p50", f"{p50:.0f}"), ("p95", f"{p95:.0f}"), ("max", f"{ms[-1]:.0f}"),
                 ("min", f"{ms[0]:.0f}"), ("target p95", f"≤ {target}"), ("daemon exit code", code)],
                ("latency", "ms"))
    verdict(p95 <= target and code == 0, f"p95 {p95:.0f} ms (target ≤ {target} ms), daemon exit {code}")


if __name__ == "__main__":
    main()
