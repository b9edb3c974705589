"""Run one allowed command safely: an argument list, confined, scrubbed, timed and capped.

No shell ever parses a command: argv goes straight to `execve`, so quoting, globbing and
`;` mean nothing. Before anything starts:

- the executable must be in `[shell] allow` (a bare name found on the scrubbed PATH, or an
  absolute path); argv[0] also passes when it is the same file *and* has the same name as
  an allowed entry, so `/bin/echo` passes for `echo`, but a multi-call binary such as
  busybox cannot be reached as `sh` because `echo` is allowed;
- the working directory must lie inside a watch root once symlinks are resolved;
- the environment keeps only the variables named in `[shell] env_keep`.

The child starts in its own session and reads /dev/null (or `input_bytes`, fed through a
pipe). One thread watches it with a selector: stdin is fed and stdout and stderr are drained
as they become ready, so a full pipe never blocks either side, and each output keeps only
its first and last `max_output_bytes / 2` bytes. On timeout or when `stop` is set, the
whole process group gets SIGTERM, then SIGKILL after a grace period, so grandchildren die
too; so do processes a finished command left holding its pipes. A child that leaves the
group (`setsid`) escapes this; only a cgroup could hold it. The command itself is killed
when the process that started it dies (Linux `PR_SET_PDEATHSIG`, set by util-linux's
`setpriv --pdeathsig KILL`, which costs one exec; a `preexec_fn` would force a fork of the
whole daemon, 5 ms at its size, instead of a vfork), so a daemon killed with SIGKILL does not
leave it running while the task is claimed and run again.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from config.errors import GremlinError

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often the stop event and the deadline are checked
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL
DRAIN_S = 2.0  # how long output may keep coming after the command itself has exited
FINAL_DRAIN_S = 1.0  # reading what is left once the group is dead
CHUNK = 65_536
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # looked up before any fork: the child only calls it
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


class ShellRefused(GremlinError):
    """A command was not started: its executable, arguments or folder are not allowed."""


@dataclass(frozen=True)
class ShellResult:
    """What one command did; `exit_code` is None when it was killed for a timeout or cancel."""

    argv: tuple[str, ...]
    cwd: str
    exit_code: int | None
    timed_out: bool
    cancelled: bool
    seconds: float
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool

    @property
    def ok(self) -> bool:
        """True when the command exited 0 on its own."""
        return self.exit_code == 0 and not self.timed_out and not self.cancelled

    def to_dict(self) -> dict:
        """A JSON-ready dict (argv as a list, `ok` included)."""
        return {**dataclasses.asdict(self), "argv": list(self.argv), "ok": self.ok}


class PendingInput:
    """The bytes still to be written to the child's stdin."""

    def __init__(self, data: bytes):
        self.rest = memoryview(bytes(data))


class CappedBuffer:
    """Keeps the first and the last bytes of a stream and counts all of them."""

    def __init__(self, limit: int):
        self.head_max = limit // 2
        self.tail_max = limit - self.head_max
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        """Take one chunk; memory stays bounded by about twice the limit."""
        self.total += len(data)
        room = self.head_max - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > 2 * self.tail_max:  # trim in batches, not on every chunk
            del self.tail[:-self.tail_max]

    @property
    def truncated(self) -> bool:
        """True when bytes were dropped between head and tail."""
        return self.total > len(self.head) + min(len(self.tail), self.tail_max)

    def text(self) -> str:
        """The kept bytes as text, with a marker saying how many were cut."""
        tail = bytes(self.tail[-self.tail_max:]) if self.tail_max else b""
        cut = self.total - len(self.head) - len(tail)
        joined = bytes(self.head) + (f"\n[... {cut} bytes cut ...]\n".encode() if cut else b"") + tail
        return joined.decode("utf-8", errors="replace")


def scrubbed_env(settings, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `base_env` (default os.environ) named in `[shell] env_keep`."""
    base = os.environ if base_env is None else base_env
    return {key: base[key] for key in settings.shell.env_keep if key in base}


def check_command(argv: Sequence[str], settings, base_env: Mapping[str, str] | None = None) -> str:
    """The absolute executable argv[0] names, once argv and the allowlist are checked."""
    _check_argv(argv)
    search_path = _absolute_dirs(scrubbed_env(settings, base_env).get("PATH", os.defpath))
    exe = _locate(argv[0], search_path)
    if exe is None:
        raise ShellRefused(f"executable {argv[0]!r} not found (searched PATH={search_path!r}); "
                           "install it, or give its absolute path")
    if not any(_same_program(argv[0], exe, entry, search_path) for entry in settings.shell.allow):
        raise ShellRefused(f"executable {argv[0]!r} ({exe}) is not allowed; add it to [shell] allow "
                           f"in {settings.config_file} if commands may run it")
    return exe


def _absolute_dirs(search_path: str) -> str:
    """PATH without empty or relative entries, which would mean the daemon's own folder."""
    return os.pathsep.join(d for d in search_path.split(os.pathsep) if os.path.isabs(d))


def _check_argv(argv: Sequence[str]) -> None:
    """Refuse anything but a non-empty list of NUL-free strings."""
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv:
        raise ShellRefused(f"a command must be a non-empty list of arguments, e.g. [\"pytest\", \"-q\"] "
                           f"(got {argv!r}); no shell parses command strings")
    for arg in argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise ShellRefused(f"argument {arg!r} of {list(argv)!r} is not a string without NUL bytes")
    if not argv[0].strip():
        raise ShellRefused(f"the executable of {list(argv)!r} is empty")


def _locate(name: str, search_path: str) -> str | None:
    """An absolute path as it is (when executable), a bare name looked up on `search_path`."""
    if os.path.isabs(name):
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    if os.sep in name:
        # A relative path would depend on the daemon's own folder: refuse rather than guess.
        raise ShellRefused(f"executable {name!r} is a relative path; give a bare name or an absolute path")
    found = shutil.which(name, path=search_path)
    return os.path.abspath(found) if found else None


def _same_program(name: str, exe: str, entry: str, search_path: str) -> bool:
    """True when argv[0] is `entry`, or the same file under the same name."""
    if name == entry:
        return True
    allowed = _locate(entry, search_path) if os.path.isabs(entry) or os.sep not in entry else None
    if allowed is None or os.path.basename(allowed) != os.path.basename(exe):
        return False
    return os.path.realpath(allowed) == os.path.realpath(exe)


def confine_cwd(cwd: str | Path | None, settings) -> Path:
    """The resolved folder a command runs in; it must lie inside a watch root."""
    roots = settings.watch_roots
    if not roots:
        raise ShellRefused("no watch roots are configured, so a command has nowhere to run; "
                           f"add a folder to [watch] roots in {settings.config_file}")
    target = Path(roots[0]) / (cwd if cwd is not None else ".")  # an absolute cwd replaces the root
    try:
        resolved = target.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ShellRefused(f"working folder {str(target)!r} does not exist or cannot be resolved ({exc})") from exc
    if not resolved.is_dir():
        raise ShellRefused(f"working folder {str(resolved)!r} is not a folder")
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        raise ShellRefused(f"working folder {str(resolved)!r} is outside the watched roots "
                           f"({', '.join(map(str, roots))}); run commands inside a watched folder")
    return resolved


@functools.cache
def _death_signal_prefix() -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL --` when this system's setpriv has it, else () (then a preexec hook)."""
    setpriv = shutil.which("setpriv", path=SYSTEM_PATH)
    if setpriv is None:
        return ()
    try:
        usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--") if "--pdeathsig" in usage else ()


def _dying_with_us(exe: str) -> dict:
    """Popen arguments that kill the command when this process dies."""
    return {} if _death_signal_prefix() else {"preexec_fn": _die_with(os.getpid())}


def _die_with(parent: int):
    """A child-side hook: get SIGKILL when the parent dies (exit at once if it already has)."""
    def hook() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(127)
    return hook


def run_command(argv: Sequence[str], settings, cwd: str | Path | None = None, timeout_s: float | None = None,
                stop: threading.Event | None = None, base_env: Mapping[str, str] | None = None,
                input_bytes: bytes | None = None) -> ShellResult:
    """Run one allowed command to completion, timeout or `stop`; never raises for how it ends.

    stdin is /dev/null, or a pipe fed `input_bytes` and then closed."""
    exe = check_command(argv, settings, base_env)
    workdir = confine_cwd(cwd, settings)
    limit = _limit(timeout_s, settings)
    logger.info("command started", extra={"argv": list(argv), "cwd": str(workdir), "timeout_s": limit})
    started = time.monotonic()
    try:
        proc = subprocess.Popen([*_death_signal_prefix(), exe, *argv[1:]], cwd=workdir, env=scrubbed_env(settings, base_env),
                                stdin=subprocess.DEVNULL if input_bytes is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                close_fds=True, **_dying_with_us(exe))
    except OSError as exc:
        raise ShellRefused(f"cannot start {exe}: {exc.strerror or exc}") from exc
    out, err = CappedBuffer(settings.shell.max_output_bytes), CappedBuffer(settings.shell.max_output_bytes)
    pipes = {proc.stdout: out, proc.stderr: err}
    if input_bytes is not None:
        os.set_blocking(proc.stdin.fileno(), False)  # write what fits, then go back to reading
        pipes[proc.stdin] = PendingInput(input_bytes)
    timed_out, cancelled = _supervise(proc, pipes, started + limit, stop)
    result = ShellResult(
        argv=tuple(argv), cwd=str(workdir), exit_code=None if timed_out or cancelled else proc.returncode,
        timed_out=timed_out, cancelled=cancelled, seconds=round(time.monotonic() - started, 3),
        stdout=out.text(), stderr=err.text(), stdout_bytes=out.total, stderr_bytes=err.total,
        truncated=out.truncated or err.truncated)
    logger.info("command finished", extra={"argv": list(argv), "exit_code": result.exit_code,
                                           "timed_out": timed_out, "cancelled": cancelled,
                                           "seconds": result.seconds, "stdout_bytes": out.total,
                                           "stderr_bytes": err.total})
    return result


def _limit(timeout_s: float | None, settings) -> float:
    """The timeout to use: the asked one, capped at `[shell] timeout_s`."""
    cap = settings.shell.timeout_s
    if timeout_s is None:
        return cap
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        raise ShellRefused(f"timeout {timeout_s!r} must be a positive number of seconds")
    return min(float(timeout_s), cap)


def _supervise(proc: subprocess.Popen, pipes: dict, deadline: float,
               stop: threading.Event | None) -> tuple[bool, bool]:
    """Feed and drain the pipes until the command has exited and they are closed; kill the group
    on timeout, on `stop`, or when leftover processes keep the pipes open. Returns (timed_out, cancelled)."""
    timed_out = cancelled = False
    with selectors.DefaultSelector() as sel:
        for pipe, target in pipes.items():
            sel.register(pipe, selectors.EVENT_WRITE if isinstance(target, PendingInput) else selectors.EVENT_READ,
                         target)
        exited_at, exit_fd = None, _pidfd(proc)
        while sel.get_map() or exited_at is None:
            if sel.get_map():
                _pump(sel, POLL_S)
            else:
                _wait_quietly(proc, exit_fd, POLL_S)
            now, stopped = time.monotonic(), stop is not None and stop.is_set()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is None:
                cancelled, timed_out = stopped, not stopped and now >= deadline
                ending = cancelled or timed_out
            else:  # exited, but something it started still holds the pipes: do not hang on it
                ending = bool(sel.get_map()) and (stopped or now >= min(exited_at + DRAIN_S, deadline))
            if ending:
                _kill_group(proc, leftover=exited_at is not None)
                _drain(sel, time.monotonic() + FINAL_DRAIN_S)
                break
    _close_pipes(pipes)
    proc.wait()
    if exit_fd is not None:
        os.close(exit_fd)
    return timed_out, cancelled


def _pidfd(proc: subprocess.Popen) -> int | None:
    """A descriptor that becomes readable when the process exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # an older kernel, or already reaped
        return None


def _wait_quietly(proc: subprocess.Popen, exit_fd: int | None, timeout: float) -> None:
    """Wait up to `timeout` for the process to exit (its pipes are already closed): on its
    pidfd when there is one (woken at once), else by `Popen.wait`'s polling sleeps."""
    if exit_fd is not None:
        select.select([exit_fd], [], [], timeout)
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def _pump(sel: selectors.BaseSelector, timeout: float) -> None:
    """Move one chunk through every ready pipe; unregister those that are finished."""
    for key, _ in sel.select(timeout):
        if isinstance(key.data, PendingInput):
            _feed(sel, key)
            continue
        data = os.read(key.fd, CHUNK)
        if data:
            key.data.add(data)
        else:
            sel.unregister(key.fileobj)


def _feed(sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
    """Write the next chunk of input; close stdin once all is written or the child stopped reading."""
    pending = key.data
    try:
        pending.rest = pending.rest[os.write(key.fd, pending.rest[:CHUNK]):]
    except BlockingIOError:
        return
    except BrokenPipeError:  # the child exited or closed stdin: the rest is not wanted
        pending.rest = pending.rest[:0]
    if not pending.rest:
        sel.unregister(key.fileobj)
        key.fileobj.close()


def _drain(sel: selectors.BaseSelector, until: float) -> None:
    """Read what is left in the pipes, for a bounded time."""
    while sel.get_map() and time.monotonic() < until:
        _pump(sel, POLL_S)


def _close_pipes(pipes: dict) -> None:
    for pipe in pipes:
        pipe.close()


def _kill_group(proc: subprocess.Popen, leftover: bool) -> None:
    """SIGTERM the command's process group, SIGKILL what is left after the grace period."""
    pgid = proc.pid  # start_new_session made the child the leader of its own group
    if leftover:
        logger.warning("processes of a finished command kept its output open; killing them",
                       extra={"pgid": pgid})
    if not _signal_group(pgid, signal.SIGTERM):
        return
    give_up = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < give_up:
        proc.poll()  # reap the leader, else its zombie keeps the group alive
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user; nothing more we may do to it
        return True
    return True
