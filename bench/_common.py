"""Shared pieces of the benchmarks: temporary homes, the real daemon, Rich result tables."""

from __future__ import annotations

import logging
import math
import os
import signal
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` imports the checkout this file lives in
    sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent_core.control import DaemonUnavailable, request  # noqa: E402
from config.errors import GremlinError  # noqa: E402
from config.settings import init_home, load_settings, toml_value  # noqa: E402

logger = logging.getLogger(__name__)
# Wide enough for the result tables when stdout is a pipe or a file (Rich would use 80).
console = Console(width=None if sys.stdout.isatty() else max(140, shutil.get_terminal_size((140, 24)).columns))

DAEMON_LOG = "daemon.out"


class BenchError(Exception):
    """A benchmark could not run (the daemon died, a change never showed up...)."""


def configure_logging(verbose: bool) -> None:
    """Log to stderr: INFO with --verbose, otherwise warnings only."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gremlin.audit").setLevel(logging.WARNING)  # one line per stored change


def make_home(base: Path, watched: Path, sections: dict[str, dict] | None = None) -> Path:
    """A home under `base` that watches only `watched` (not Gremlin's own source), plus `sections`."""
    home = base / "home"
    init_home(home)
    sections = dict(sections or {})
    watch = {"roots": [str(watched)], "own_source": False, **sections.pop("watch", {})}
    dashboard = {"enabled": False, **sections.pop("dashboard", {})}  # on only where a benchmark measures it
    all_sections = {"watch": watch, "dashboard": dashboard, **sections}
    lines = []
    for section, values in all_sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    (home / "config" / "gremlin.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return home


def parse_sets(items: Sequence[str]) -> dict[str, dict]:
    """`section.key=value` options (value in TOML syntax) as {section: {key: value}}."""
    sections: dict[str, dict] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not (sep and dot and key):
            raise BenchError(f"--set {item!r}: expected section.key=value, e.g. model.batch_size=16")
        sections.setdefault(section, {})[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
    return sections


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """`NAME=value` options as a dict (extra environment for the daemon)."""
    pairs = [item.partition("=") for item in items]
    if any(not sep or not name for name, sep, _ in pairs):
        raise BenchError("--env expects NAME=value, e.g. MALLOC_ARENA_MAX=2")
    return {name: value for name, _, value in pairs}


def start_daemon(home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The real `gremlin daemon` of this checkout, logging only to its files and daemon.out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(home / DAEMON_LOG, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "agent_core.cli", "--home", str(home), "daemon",
                                 "--quiet"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def daemon_output(home: Path, lines: int = 20) -> str:
    """The last lines the daemon wrote to its terminal."""
    path = home / DAEMON_LOG
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def is_idle(status: dict) -> bool:
    """Nothing pending in the watcher, nothing waiting to be embedded, every memory indexed."""
    counts = status.get("counts", {})
    return (status.get("state") == "ready" and status.get("pending", 0) == 0
            and status.get("embedding", 0) == 0 and status.get("index_size") == counts.get("memories"))


def try_status(settings) -> dict | None:
    """The daemon's live status, or None while it does not answer."""
    try:
        return request(settings, "status", timeout=5)
    except (DaemonUnavailable, GremlinError):
        return None


def wait_ready(settings, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """Poll the control socket until the daemon is ready and idle; fail if it exits (settings or a home)."""
    settings = load_settings(settings) if isinstance(settings, (str, Path)) else settings
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"daemon exited with {proc.returncode}:\n{daemon_output(settings.home)}")
        status = try_status(settings)
        if status and is_idle(status):
            return status
        time.sleep(0.2)
    raise BenchError(f"daemon not ready and idle after {timeout:.0f} s:\n{daemon_output(settings.home)}")


def stop_daemon(proc: subprocess.Popen, timeout: float = 120) -> int:
    """SIGTERM and wait for the exit code; SIGKILL (and -9) if it does not stop in time."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.error("daemon %s ignored SIGTERM for %.0f s, killing it", proc.pid, timeout)
        proc.kill()
        proc.wait()
        return -9


@contextmanager
def running_daemon(home: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start the daemon, yield its process, always stop it (its exit code is proc.returncode)."""
    proc = start_daemon(home, env)
    logger.info("daemon started, pid %s", proc.pid)
    try:
        yield proc
    finally:
        code = stop_daemon(proc)
        logger.info("daemon stopped, exit code %s", code)


def add_common_options(parser, daemon: bool = True) -> None:
    """--set (config values), --env (daemon environment, when it runs one) and --verbose."""
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config value for the temporary home, TOML syntax (repeatable), "
                             "e.g. --set model.batch_size=16")
    if daemon:
        parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                            help="extra environment variable for the daemon (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its waited-for children (utime+stime+cutime+cstime)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = raw[raw.rindex(")") + 2:].split()  # fields from #3 (state) on
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat, all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """CPU used by other processes while a benchmark runs (to spot a disturbed measurement)."""

    def __init__(self, pids: Sequence[int]):
        self.pids = tuple(pids)
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        return time.monotonic(), machine_busy_s(), sum(process_cpu_s(p) for p in self.pids)

    def other_cores(self) -> float:
        """Average CPUs kept busy by processes other than ours since the meter started."""
        t1, busy1, ours1 = self._sample()
        t0, busy0, ours0 = self._start
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-9)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def poll(predicate: Callable[[], object], timeout: float, interval: float, what: str) -> object:
    """Call `predicate` every `interval` s until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def print_table(title: str, rows: Sequence[Sequence[object]], columns: Sequence[str]) -> None:
    """A Rich table of results."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


def warn_if_disturbed(other_cores: float, limit: float = 0.2) -> None:
    """Say so when other processes used the CPUs during a measurement (its timings are off)."""
    if other_cores > limit:
        console.print(f"[bold yellow]WARNING[/] other processes kept {other_cores:.2f} of {os.cpu_count()} CPUs "
                      "busy during the measurement; timings are disturbed, run it again on an idle machine",
                      highlight=False)


def verdict(ok: bool, text: str) -> int:
    """Print the final PASS/FAIL line; return the exit code for it."""
    console.print(f"[bold {'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {text}", highlight=False,
                  soft_wrap=True)  # one line, whatever its length: scripts grep for it
    return 0 if ok else 1


def machine() -> str:
    """CPU count and the revision of the code being measured."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip() or "?"
    except OSError:
        rev = "?"
    return f"{os.cpu_count()} CPUs, code {rev}"


def raw_library_model(embedder):
    """The raw library doing the embedder's work: a SentenceTransformer of the same folder, device
    and max_seq_length (Gremlin serves through its lean encoder; baselines use this)."""
    from memory.vector_store.embedder import MERGE_ADAPTER, load_sentence_model

    model = load_sentence_model(embedder.path, embedder.device, merge=MERGE_ADAPTER)
    model.max_seq_length = embedder.max_seq_length
    return model.eval()
