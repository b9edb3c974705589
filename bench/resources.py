"""Daemon footprint: RSS with the model loaded, and CPU use while idle.

Starts the real daemon on a temporary home watching a folder of a few hundred files,
waits until it is ready and idle, then reads VmRSS from /proc/PID/status and the CPU
time it uses over a window (utime + stime from /proc/PID/stat).
Targets: RSS < 600 MB, idle CPU < 1 %.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import make_home, print_table, start_daemon, stop_daemon, verdict, wait_ready


def rss_mb(pid: int) -> float:
    """Resident set size in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="idle window (default 60)")
    parser.add_argument("--files", type=int, default=300, help="files in the watched folder (default 300)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gremlin-resources-") as tmp:
        watched = Path(tmp) / "project"
        for i in range(args.files):
            sub = watched / f"pkg{i % 10}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
        home = make_home(Path(tmp), watched)
        proc = start_daemon(home)
        try:
            wait_ready(home, proc)
            time.sleep(2)
            rss = rss_mb(proc.pid)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu_pct = 100 * (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            rss_end = rss_mb(proc.pid)
        finally:
            code = stop_daemon(proc)
    print_table(f"daemon footprint ({args.files} watched files, {args.seconds:.0f} s idle window)",
                [("RSS after start (model loaded)", f"{rss:.0f} MB", "< 600 MB"),
                 ("RSS at end of window", f"{rss_end:.0f} MB", ""),
                 ("idle CPU", f"{cpu_pct:.2f} %", "< 1 %"),
                 ("exit code after SIGTERM", str(code), "0")],
                ("measure", "value", "target"))
    verdict(rss < 600 and cpu_pct < 1 and code == 0, f"RSS {rss:.0f} MB, idle CPU {cpu_pct:.2f} %")


if __name__ == "__main__":
    main()
