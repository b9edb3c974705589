"""The dashboard under load, served by the real daemon.

1. Page latency with N memories (100,000 by default): a home is filled directly through the
   store (events with diffs, their memories, and a random unit vector each for the current
   model, so the daemon has nothing to encode), the daemon starts with its dashboard, and
   a second process requests the overview, changes, search (hybrid) and `/api/search`
   pages one after another, `--requests` times each (bounded in count and time), with
   a Bearer token. p50/p95/max per page.
2. Live tail and ingest: a fresh home; a writer changes watched files at `--rate` changes/s
   for `--seconds` while `--sse` clients follow `/logs/stream` and one more requests the
   overview in a loop. The daemon's ingest (events recorded per second while writing, and
   how long until every change is embedded) is measured with the dashboard under that load
   and, back to back, with `[dashboard] enabled = false` and no clients: the ratio.

Only loopback addresses are used; every loop stops by itself.

Usage: python bench/web.py [--memories 100000] [--requests 100] [--rate 100] [--seconds 30] [--sse 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import (BenchError, configure_logging, machine, make_home, percentile, poll, print_table, running_daemon,
                     verdict, wait_ready)
from config.settings import load_settings
from memory.store import NewEvent, Store, utc_now
from memory.vector_store.embedder import model_fingerprint, resolve_current_model

TARGET_P95_MS = 500.0  # every page, at 100,000 memories
TARGET_INGEST_RATIO = 0.9  # ingest with the dashboard under load vs without it
PAGES = {"overview": "/", "changes": "/changes", "search": "/search?q=retry+the+upload+timeout&mode=hybrid",
         "api search": "/api/search?q=retry+the+upload+timeout"}
WORDS = ("upload retry timeout cache parser config token session worker queue index socket invoice user "
         "render schema migrate vector search commit branch merge lint format").split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill(settings, n: int, batch: int = 2000) -> None:
    """n change events with diffs and memories, and a random unit vector for each."""
    store = Store(settings.memory.db)
    model_id = model_fingerprint(resolve_current_model(settings.model.path, settings.home))
    rng = np.random.default_rng(7)
    root = str(settings.watch.roots[0])
    try:
        for start in range(0, n, batch):
            events = [_event(root, i, rng) for i in range(start, min(n, start + batch))]
            stored = store.record_events(events)
            ids = [s.memory_id for s in stored]
            vectors = rng.standard_normal((len(ids), 384)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            store.add_vectors(model_id, ids, vectors)
    finally:
        store.close()


def _event(root: str, i: int, rng) -> NewEvent:
    words = " ".join(rng.choice(WORDS, 6))
    path = f"{root}/pkg{i % 97}/module_{i}.py"
    diff = f"--- a/module_{i}.py\n+++ b/module_{i}.py\n@@ -1,2 +1,2 @@\n-def f{i}(x):\n+def f{i}(x, {words.split()[0]}):\n" \
           f"     return x  # {words}\n"
    # no file state: these files do not exist, and the watcher must not find them "deleted"
    return NewEvent("modified", path, root, utc_now(), None, diff=diff, memory_kind="code_diff",
                    memory_text=f"modified module_{i}.py\n{diff}", memory_meta={"path": path, "change": "modified"})


class Client:
    """One keep-alive HTTP connection to the dashboard with the Bearer token."""

    def __init__(self, port: int, token: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{port}"}

    def get(self, path: str) -> float:
        """Seconds for one complete response (its body read); BenchError on a non-200."""
        started = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        response.read()
        if response.status != 200:
            raise BenchError(f"GET {path} answered {response.status}")
        return time.perf_counter() - started


def page_latencies(port: int, token: str, requests: int, budget_s: float) -> dict[str, list[float]]:
    """Per page, the seconds of each request, in a second process (this one only parses)."""
    script = f"""
import json, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from web_load import run
print(json.dumps(run({port}, {token!r}, {json.dumps(PAGES)}, {requests}, {budget_s})))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=budget_s * 2 + 60)
    if out.returncode != 0:
        raise BenchError(f"the load process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def sse_client(port: int, token: str, stop: threading.Event, counts: list[int], slot: int) -> None:
    """Follow /logs/stream until told to stop, counting the records received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # keep-alives come every 15 s
    conn.request("GET", "/logs/stream", headers={"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{port}",
                                                  "Accept": "text/event-stream"})
    response = conn.getresponse()
    if response.status != 200:
        raise BenchError(f"/logs/stream answered {response.status}")
    while not stop.is_set():
        try:
            line = response.fp.readline()
        except OSError:  # the stream ended under us (the daemon stopping): what was counted stands
            break
        if not line:
            break
        if line.startswith(b"data:"):
            counts[slot] += 1
    conn.close()


def ingest(tmp: Path, dashboard: bool, rate: float, seconds: float, sse: int) -> dict:
    """Change files at `rate`/s for `seconds` (with SSE and page load when `dashboard`)."""
    watched = tmp / ("project-on" if dashboard else "project-off")
    watched.mkdir()
    port = free_port()
    home = make_home(tmp / ("on" if dashboard else "off"), watched,
                     {"dashboard": {"enabled": dashboard, "port": port, "threads": sse + 8},
                      "training": {"enabled": False}, "shell": {"allow": ["echo"]}})
    settings = load_settings(home)
    files = [watched / f"f{i}.py" for i in range(200)]
    with running_daemon(home) as proc:
        wait_ready(settings, proc)
        for i, f in enumerate(files):  # created while watched: each is an event
            f.write_text(f"value = {i}\n")
        poll(lambda: _counts(settings)["events"] >= len(files), 300, 0.5, "the first files")
        _wait_embedded(settings, time.monotonic())
        stop, counts = threading.Event(), [0] * sse
        threads = []
        if dashboard:
            token = (settings.run_dir / "dashboard.token").read_text().strip()
            threads = [threading.Thread(target=sse_client, args=(port, token, stop, counts, i), daemon=True)
                       for i in range(sse)]
            threads.append(threading.Thread(target=_page_loop, args=(port, token, stop), daemon=True))
            threads.append(threading.Thread(target=_task_loop, args=(port, token, stop), daemon=True))
            for t in threads:
                t.start()
        before = _counts(settings)["events"]
        started = time.monotonic()
        _write_changes(files, rate, seconds)
        written_s = time.monotonic() - started
        recorded = poll(lambda: _settled(settings, before), 600, 0.5, "the changes to be recorded")
        recorded_s = time.monotonic() - started
        embedded_s = _wait_embedded(settings, started)
        stop.set()
        for t in threads:
            t.join(10)
    return {"events": recorded, "write_s": written_s, "recorded_s": recorded_s, "embedded_s": embedded_s,
            "sse_records": sum(counts), "sse_clients": sum(1 for c in counts if c)}


def _task_loop(port: int, token: str, stop: threading.Event) -> None:
    """Queue an `echo` task every half second through the API: log records for the tails to carry."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
    while not stop.is_set():
        conn.request("POST", "/api/tasks", body=json.dumps({"type": "shell", "cmd": ["echo", "tail me"]}),
                     headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status not in (200, 201):
            raise BenchError(f"POST /api/tasks answered {response.status}")
        stop.wait(0.5)


def _page_loop(port: int, token: str, stop: threading.Event) -> None:
    client = Client(port, token)
    while not stop.is_set():
        client.get("/")
        stop.wait(0.2)


def _write_changes(files: list[Path], rate: float, seconds: float) -> None:
    """Edit a random file every 1/rate s, for `seconds`."""
    deadline, n = time.monotonic() + seconds, 0
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        random.choice(files).write_text(f"value = {n}  # {' '.join(random.sample(WORDS, 4))}\n")
        n += 1
        next_at += 1.0 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))


def _counts(settings) -> dict:
    store = Store(settings.memory.db, readonly=True)
    try:
        return store.counts()
    finally:
        store.close()


def _settled(settings, before: int) -> int | None:
    """The events recorded since `before`, once no more arrive for 3 s."""
    first = _counts(settings)["events"]
    time.sleep(3)
    last = _counts(settings)["events"]
    return last - before if last == first and last > before else None


def _wait_embedded(settings, started: float) -> float:
    model_id = model_fingerprint(resolve_current_model(settings.model.path, settings.home))

    def done() -> bool:
        store = Store(settings.memory.db, readonly=True)
        try:
            return store.vector_count(model_id) >= store.counts()["memories"]
        finally:
            store.close()

    poll(done, 900, 0.5, "every change to be embedded")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=100, help="requests per page")
    parser.add_argument("--rate", type=float, default=100.0, help="changes per second in the ingest part")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long changes are written")
    parser.add_argument("--sse", type=int, default=20, help="live log tail clients")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    configure_logging(args.verbose)
    with tempfile.TemporaryDirectory(prefix="gremlin-bench-dashboard-") as tmp:
        tmp = Path(tmp)
        watched = tmp / "project"
        watched.mkdir()
        port = free_port()
        home = make_home(tmp / "big", watched, {"dashboard": {"enabled": True, "port": port}, "training": {"enabled": False}})
        settings = load_settings(home)
        t0 = time.monotonic()
        fill(settings, args.memories)
        fill_s = time.monotonic() - t0
        with running_daemon(home) as proc:
            wait_ready(settings, proc, timeout=600)
            token = (settings.run_dir / "dashboard.token").read_text().strip()
            latencies = page_latencies(port, token, args.requests, budget_s=300)
        rows = [(page, len(times), f"{statistics.median(times) * 1000:.1f}", f"{percentile(times, 95) * 1000:.1f}",
                 f"{max(times) * 1000:.1f}") for page, times in latencies.items()]
        print_table(f"dashboard pages at {args.memories:,} memories, ms ({machine()}; filled in {fill_s:.0f} s)",
                    rows, ("page", "requests", "p50", "p95", "max"))
        on = ingest(tmp, True, args.rate, args.seconds, args.sse)
        off = ingest(tmp, False, args.rate, args.seconds, 0)
    ingest_rows = []
    for name, r in (("dashboard + {} SSE clients + page loop".format(args.sse), on), ("no dashboard", off)):
        ingest_rows.append((name, r["events"], f"{r['events'] / r['recorded_s']:.1f}", f"{r['recorded_s']:.1f}",
                            f"{r['embedded_s']:.1f}", r["sse_records"], r["sse_clients"]))
    print_table(f"ingest while writing {args.rate:g} changes/s for {args.seconds:g} s", ingest_rows,
                ("daemon", "events", "events/s", "recorded after s", "embedded after s", "SSE records", "SSE clients"))
    ratio = (on["events"] / on["embedded_s"]) / (off["events"] / off["embedded_s"])
    worst = max(percentile(t, 95) for t in latencies.values()) * 1000
    ok = worst <= TARGET_P95_MS and ratio >= TARGET_INGEST_RATIO and on["sse_clients"] == args.sse
    return verdict(ok, f"worst page p95 {worst:.0f} ms (≤ {TARGET_P95_MS:g}) at {args.memories:,} memories; ingest "
                       f"with the dashboard under load / without: {ratio:.2f} (≥ {TARGET_INGEST_RATIO}); "
                       f"{on['sse_clients']}/{args.sse} SSE clients received records")


if __name__ == "__main__":
    raise SystemExit(main())
