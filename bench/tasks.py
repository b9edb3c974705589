"""The task queue and the shell executor, against the raw libraries doing the same work.

1. Queue throughput of no-op tasks (claim + complete per second, one worker):
   - raw sqlite3: the same claim (`UPDATE … RETURNING` inside `BEGIN IMMEDIATE`) and
     complete statements on the same schema, no Gremlin code;
   - `Store.claim_task` + `Store.finish_task` (lease expiry sweep, fencing, result JSON);
   - `TaskRunner.run_one` (adds the heartbeat thread and the outcome bookkeeping).
2. Submit → start latency through a running TaskRunner (p50/p95), woken on submit as
   `gremlin task add` does, and by polling alone (`[tasks] inbox_poll_s`).
3. Shell task overhead: `run_command(["true"])` (allowlist, confined cwd, scrubbed env, new
   process group, capped output, `setpriv --pdeathsig`) and a whole `shell` task through the
   executor (reward, redaction, memory) against a bare `subprocess.run(["true"])`,
   interleaved; then the same for a command that does 50 ms of work (`sleep 0.05`). For a
   no-op command the ratio is all overhead, so the target is on the added milliseconds.

Usage: python bench/tasks.py [--tasks 2000] [--latency 200] [--shell 200]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _common import configure_logging, machine, make_home, percentile, print_table, verdict
from agent_core.tasks import RunningTask, TaskOutcome, TaskRunner
from agent_core.tool_executor import ToolExecutor
from config.settings import load_settings
from memory.store import Store
from tools.shell_executor import run_command

TARGET_THROUGHPUT = 100.0  # tasks/s: far above what real tasks (seconds each) ever need
TARGET_P95_MS = 50.0  # a woken runner starts a task within this
TARGET_SHELL_MS = 3.0  # what run_command may add to a bare subprocess.run, per command


def _noop(task: RunningTask) -> TaskOutcome:
    return TaskOutcome("done", {"ok": True})


def _fill(store: Store, n: int) -> None:
    for i in range(n):
        store.submit_task("snapshot", {"n": i})


def raw_sqlite_rate(db: Path, n: int) -> float:
    """Claim + complete with plain sqlite3 statements on the same schema."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    started = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("UPDATE tasks SET state = 'running', attempts = attempts + 1 WHERE id = (SELECT id FROM"
                           " tasks WHERE state = 'queued' ORDER BY priority DESC, id LIMIT 1) RETURNING id").fetchone()
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE tasks SET state = 'done', result = '{}' WHERE id = ?", (row[0],))
        conn.execute("COMMIT")
    conn.close()
    return n / (time.perf_counter() - started)


def store_rate(store: Store, n: int) -> float:
    """Claim + complete through the Store."""
    started = time.perf_counter()
    for _ in range(n):
        row = store.claim_task(1, 60)
        store.finish_task(row["id"], row["attempts"], "done", {"ok": True})
    return n / (time.perf_counter() - started)


def runner_rate(settings, store: Store, n: int) -> float:
    """Claim + run (heartbeat thread, outcome) + complete through TaskRunner.run_one."""
    runner = TaskRunner(settings, store, _noop)
    started = time.perf_counter()
    for _ in range(n):
        runner.run_one(store.claim_task(1, 60))
    return n / (time.perf_counter() - started)


def latencies(settings, store: Store, n: int, wake: bool) -> list[float]:
    """Submit → started (ms) for n tasks submitted 20 ms apart to a running TaskRunner."""
    runner = TaskRunner(settings, store, _noop)
    runner.start()
    ids = []
    try:
        for i in range(n):
            ids.append(store.submit_task("snapshot", {"n": i})[0])
            if wake:
                runner.wake()
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        while store.task_counts().get("queued", 0) + store.task_counts().get("running", 0) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
    rows = [store.get_task(i) for i in ids]
    return [(_t(r["started"]) - _t(r["created"])) * 1000 for r in rows if r["started"]]


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def shell_times(settings, store: Store, n: int, argv: list[str]) -> tuple[list[float], list[float], list[float]]:
    """Seconds per run: bare subprocess.run, run_command, and a whole shell task, interleaved."""
    executor = ToolExecutor(settings, store)
    runner = TaskRunner(settings, store, executor)
    bare, ours, task = [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True)
        t1 = time.perf_counter()
        run_command(argv, settings)
        t2 = time.perf_counter()
        store.submit_task("shell", {"cmd": argv})
        runner.run_one(store.claim_task(1, 60))
        t3 = time.perf_counter()
        bare.append(t1 - t0)
        ours.append(t2 - t1)
        task.append(t3 - t2)
    return bare, ours, task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="no-op tasks per throughput measurement")
    parser.add_argument("--latency", type=int, default=200, help="tasks for the submit → start latency")
    parser.add_argument("--shell", type=int, default=200, help="runs of `true` per shell measurement")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    configure_logging(args.verbose)
    with tempfile.TemporaryDirectory(prefix="gremlin-bench-tasks-") as tmp:
        watched = Path(tmp) / "project"
        watched.mkdir()
        home = make_home(Path(tmp), watched, {"shell": {"allow": ["true", "sleep"]}, "tasks": {"inbox_poll_s": 1.0}})
        settings = load_settings(home)
        store = Store(settings.memory.db)
        rates = {}
        for name in ("raw sqlite3", "Store", "TaskRunner"):
            _fill(store, args.tasks)
            rates[name] = (raw_sqlite_rate(settings.memory.db, args.tasks) if name == "raw sqlite3"
                           else store_rate(store, args.tasks) if name == "Store"
                           else runner_rate(settings, store, args.tasks))
        woken = latencies(settings, store, args.latency, wake=True)
        polled = latencies(settings, store, min(args.latency, 50), wake=False)
        shells = {"true": shell_times(settings, store, args.shell, ["true"]),
                  "sleep 0.05": shell_times(settings, store, max(20, args.shell // 4), ["sleep", "0.05"])}
        store.close()
    raw = rates["raw sqlite3"]
    print_table(f"queue throughput, no-op tasks, one worker ({machine()})",
                [(name, f"{rate:,.0f}", f"{rate / raw:.2f}") for name, rate in rates.items()],
                ("claim + complete", "tasks/s", "ratio vs raw sqlite3"))
    print_table("submit → start latency (ms)",
                [("woken on submit", len(woken), f"{statistics.median(woken):.1f}", f"{percentile(woken, 95):.1f}"),
                 ("polling only (inbox_poll_s 1.0)", len(polled), f"{statistics.median(polled):.1f}",
                  f"{percentile(polled, 95):.1f}")],
                ("runner", "tasks", "p50", "p95"))
    rows, added = [], 0.0
    for command, (bare, ours, task) in shells.items():
        b = statistics.median(bare)
        for path, times in (("subprocess.run (raw)", bare), ("run_command", ours),
                            ("shell task (executor, reward, memory)", task)):
            m = statistics.median(times)
            rows.append((command, path, f"{m * 1000:.2f}", f"{(m - b) * 1000:+.2f}", f"{m / b:.2f}"))
        added = max(added, (statistics.median(ours) - b) * 1000)
    print_table("shell overhead, median per command", rows, ("command", "path", "ms", "added ms", "ratio vs raw"))
    ok = (rates["TaskRunner"] >= TARGET_THROUGHPUT and percentile(woken, 95) <= TARGET_P95_MS
          and added <= TARGET_SHELL_MS)
    return verdict(ok, f"runner {rates['TaskRunner']:,.0f} tasks/s (≥ {TARGET_THROUGHPUT:g}), woken p95 "
                       f"{percentile(woken, 95):.1f} ms (≤ {TARGET_P95_MS:g}), run_command adds "
                       f"{added:.2f} ms to subprocess.run (≤ {TARGET_SHELL_MS:g})")


if __name__ == "__main__":
    raise SystemExit(main())
