"""Memory and idle CPU of the real daemon.

Starts `gremlin daemon` as a subprocess on a temporary home watching a temporary folder
of a few hundred small files and waits until it is ready and idle (model loaded, baseline
scanned, nothing pending). It then makes a few changes and searches, so that the model
has actually run (a daemon that never encoded anything is much smaller than one in use),
waits until idle again and lets it settle. Then it reads the resident memory (VmRSS, and
the peak VmHWM) from /proc/PID/status and measures CPU time over a window from
/proc/PID/stat (utime + stime, in clock ticks). The daemon is stopped with SIGTERM.

Targets: RSS < 500 MB (after use, the larger of the readings), idle CPU < 1 %.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (BenchError, LoadMeter, add_common_options, configure_logging, is_idle, machine, make_home,
                     parse_env, parse_sets, poll, print_table, running_daemon, try_status, verdict,
                     wait_ready)
from agent_core.control import request
from agent_core.daemon import running_pid
from config.settings import load_settings

logger = logging.getLogger(__name__)

TARGET_RSS_MB = 500  # decimal megabytes, as issue 13 states it
TARGET_CPU_PCT = 1.0
MIB_PER_MB = 1e6 / 2**20
WORDS = "alpha beta gamma delta parse render cache queue token retry buffer index".split()


@dataclass
class Result:
    """Everything the table shows."""

    ready_s: float = 0.0
    counts: dict = field(default_factory=dict)
    cold: dict = field(default_factory=dict)  # /proc status when first ready
    used: dict = field(default_factory=dict)  # ... after changes and searches, idle
    after: dict = field(default_factory=dict)  # ... at the end of the window
    window_rss_mib: list[float] = field(default_factory=list)
    cpu_pct: float = 0.0
    other_cores: float = 0.0
    still_idle: bool = False
    exit_code: int | None = None

    def max_rss_mib(self) -> float:
        """The largest RSS read after the daemon was used."""
        return max(mib(self.used, "VmRSS"), mib(self.after, "VmRSS"), *self.window_rss_mib)


def read_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of raw values."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def mib(status: dict[str, str], key: str) -> float:
    """A `kB` field of /proc/PID/status in MiB."""
    return int(status[key].split()[0]) / 1024


def write_tree(watched: Path, files: int, rng: random.Random) -> None:
    """`files` small text files spread over a few nested folders."""
    for i in range(files):
        folder = watched / f"pkg_{i % 10}" / f"sub_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"{rng.choice(WORDS)}_{j} = {rng.randint(0, 999)}  # {' '.join(rng.sample(WORDS, 3))}"
                 for j in range(rng.randint(5, 40))]
        (folder / f"file_{i:04d}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")


def exercise(settings, watched: Path, changes: int, rng: random.Random) -> None:
    """Append 5-25 lines to `changes` files, wait until all are embedded, then search a few times."""
    files = sorted(watched.rglob("*.py"))[:changes]
    for path in files:
        with path.open("a", encoding="utf-8") as handle:
            handle.writelines(f"{rng.choice(WORDS)}_extra_{j} = {rng.randint(0, 999)}  "
                              f"# {' '.join(rng.sample(WORDS, 5))}\n" for j in range(rng.randint(5, 25)))
    poll(lambda: (s := try_status(settings)) and is_idle(s) and s["counts"]["memories"] >= len(files),
         300, 0.2, f"{len(files)} changes to be embedded")
    for word in WORDS[:5]:
        request(settings, "search", query=f"{word} changed", k=5)


def measure_window(pid: int, seconds: float, result: Result) -> None:
    """CPU % of `pid` over `seconds` (own threads only), sampling its RSS every 5 s."""
    meter = LoadMeter([os.getpid(), pid])
    own = Path(f"/proc/{pid}/stat")
    first, start = _own_cpu_s(own), time.monotonic()
    while (left := start + seconds - time.monotonic()) > 0:
        time.sleep(min(5.0, left))
        result.window_rss_mib.append(mib(read_status(pid), "VmRSS"))
    result.cpu_pct = 100 * (_own_cpu_s(own) - first) / (time.monotonic() - start)
    result.other_cores = meter.other_cores()


def _own_cpu_s(stat: Path) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat) in seconds."""
    raw = stat.read_text()
    fields = raw[raw.rindex(")") + 2:].split()  # fields from #3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace, settings, watched: Path, rng: random.Random) -> Result:
    """Start the daemon, use it, measure it idle, stop it."""
    result = Result()
    with running_daemon(settings.home, parse_env(args.env)) as proc:
        started = time.monotonic()
        wait_ready(settings, proc)
        result.ready_s = time.monotonic() - started
        if running_pid(settings) != proc.pid:
            raise BenchError(f"the home's lock names pid {running_pid(settings)}, not {proc.pid}")
        result.cold = read_status(proc.pid)
        exercise(settings, watched, args.changes, rng)
        time.sleep(args.settle)
        result.counts = wait_ready(settings, proc)["counts"]
        result.used = read_status(proc.pid)
        logger.info("measuring CPU of pid %s for %.0f s", proc.pid, args.seconds)
        measure_window(proc.pid, args.seconds, result)
        result.after = read_status(proc.pid)
        result.still_idle = bool((s := try_status(settings)) and is_idle(s))
    result.exit_code = proc.returncode
    return result


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="CPU measuring window (default 60)")
    parser.add_argument("--files", type=int, default=300, help="files in the watched folder (default 300)")
    parser.add_argument("--changes", type=int, default=30,
                        help="files changed (and embedded) before measuring, 0 for none (default 30)")
    parser.add_argument("--settle", type=float, default=5.0, help="pause after use before measuring (default 5 s)")
    parser.add_argument("--seed", type=int, default=5, help="random seed (default 5)")
    add_common_options(parser)
    return parser.parse_args()


def main() -> int:
    """Run the benchmark and print its table."""
    args = parse_args()
    configure_logging(args.verbose)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="gremlin-bench-resources-") as tmp:
        base = Path(tmp).resolve()
        write_tree(base / "project", args.files, rng)
        settings = load_settings(make_home(base, base / "project", parse_sets(args.set)))
        result = run(args, settings, base / "project", rng)
    return report(args, result)


def report(args: argparse.Namespace, r: Result) -> int:
    """Print the results table and the verdict."""
    rss_target = f"< {TARGET_RSS_MB} MB = {TARGET_RSS_MB * MIB_PER_MB:.0f} MiB"
    rows = [("VmRSS when first ready (nothing encoded yet)", f"{mib(r.cold, 'VmRSS'):.0f} MiB", "(info)"),
            (f"VmRSS after {args.changes} changes + 5 searches, idle", f"{mib(r.used, 'VmRSS'):.0f} MiB",
             rss_target),
            (f"VmRSS max during the {args.seconds:g} s window", f"{max(r.window_rss_mib):.0f} MiB", rss_target),
            ("VmHWM (peak RSS since start)", f"{mib(r.after, 'VmHWM'):.0f} MiB", "(info)"),
            ("threads", r.after["Threads"], "(info)"),
            (f"CPU over {args.seconds:g} s (utime+stime)", f"{r.cpu_pct:.3f} %", f"< {TARGET_CPU_PCT} %"),
            ("start -> first ready and idle", f"{r.ready_s:.1f} s", "(info)"),
            ("watched files / events / memories", f"{args.files} / {r.counts['events']} / "
             f"{r.counts['memories']}", "(info)"),
            ("still idle after the window", r.still_idle, "(info)"),
            ("daemon exit code after SIGTERM", r.exit_code, "0"),
            ("machine", f"{machine()}; others used {r.other_cores:.2f} CPUs", "(info)")]
    print_table(f"resources: daemon watching {args.files} files", rows, ("what", "measured", "target"))
    rss = r.max_rss_mib()
    ok = rss < TARGET_RSS_MB * MIB_PER_MB and r.cpu_pct < TARGET_CPU_PCT and r.exit_code == 0
    return verdict(ok, f"RSS {rss:.0f} MiB = {rss / MIB_PER_MB:.0f} MB (target < {TARGET_RSS_MB} MB), "
                       f"idle CPU {r.cpu_pct:.3f} % (target < {TARGET_CPU_PCT} %), daemon exit code {r.exit_code}")


if __name__ == "__main__":
    raise SystemExit(main())
