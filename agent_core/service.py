"""Gremlin under systemd: the unit (render, install, uninstall, status) and what the daemon
tells the service manager while it runs (READY/RELOADING, STATUS=, WATCHDOG=1), plus which
config changes a reload (SIGHUP) applies live.

One unit per mode: `gremlin.service` in the user's unit folder (`--user`) or in
/etc/systemd/system (`--system`). A unit file records the home it serves (a `# home:`
line); installing over one that serves another home is refused, so one machine (or one
user) runs one service. For a second home, print its unit (`--print`) and save it under
another name by hand.

Where no service manager answers (no systemctl, PID 1 is not systemd, no user manager)
`install` writes nothing and returns the rendered unit with the reason; the CLI prints
both and exits 0, as `--print` does. systemctl runs as an argument list with a timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config.errors import GremlinError
from config.settings import DEFAULT_CONFIG, REPO_ROOT, SECTIONS, Settings, config_home
from memory.atomic import write_bytes_atomically

logger = logging.getLogger(__name__)

UNIT_NAME = "gremlin.service"
TEMPLATE = DEFAULT_CONFIG.with_name(UNIT_NAME)
MODES = ("user", "system")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEMCTL = "systemctl"
SYSTEMD_BOOTED = Path("/run/systemd/system")  # exists only when systemd is PID 1 (sd_booted(3))
LINGER_DIR = Path("/var/lib/systemd/linger")
SYSTEMCTL_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 180.0  # `disable --now` waits for the daemon's stop (TimeoutStopSec=120 in the unit)
UNIT_MODE = 0o644  # units are configuration, not secrets; `systemctl cat` reads them as any user
HOME_MARK = "# home: "
# Folders ProtectHome= covers; a system unit whose paths lie there gets read-only, not hidden.
HOME_TREES = (Path("/home"), Path("/root"), Path("/run/user"))
_PLAIN_WORD = re.compile(r"[\w/.+,:@=-]+")
SHOWN = ("LoadState", "ActiveState", "SubState", "UnitFileState", "MainPID", "StatusText", "NRestarts", "Result")

# What a reload (SIGHUP) cannot change in a running daemon: whole sections, and keys read once
# at start (scheduler intervals, worker threads, the log handlers, the mutation job).
RESTART_SECTIONS = ("watch", "model", "memory", "dashboard", "reward")
RESTART_KEYS = frozenset({("logging", "dir"), ("logging", "max_bytes"), ("logging", "backup_count"),
                          ("tasks", "workers"), ("tasks", "inbox_poll_s"), ("training", "poll_interval_s"),
                          ("training", "check_interval_s"), ("mutation", "enabled"), ("retention", "interval_s")})
STATUS_EVERY_S = 5.0  # how often the STATUS= line is recomputed (sent only when it changed)


class ServiceError(GremlinError):
    """The unit cannot be rendered, written, or handed to systemd."""


# -- the unit ------------------------------------------------------------------------------

def default_mode() -> str:
    """`system` for root, else `user`."""
    return "system" if os.geteuid() == 0 else "user"


def unit_path(mode: str) -> Path:
    """Where the unit file goes: ~/.config/systemd/user/ or /etc/systemd/system/."""
    _check_mode(mode)
    return SYSTEM_UNIT_DIR / UNIT_NAME if mode == "system" else config_home() / "systemd" / "user" / UNIT_NAME


def gremlin_executable() -> Path:
    """The `gremlin` script of this installation: beside the running Python, in its environment's bin/."""
    script = Path(sys.executable).absolute().parent / "gremlin"  # not resolved: the venv's python is a link
    if not os.access(script, os.X_OK):
        raise ServiceError(f"no gremlin script at {script}; install Gremlin into this Python environment "
                           "(pip install -e . or make install) and run that environment's gremlin")
    return script


def service_user(settings: Settings, mode: str) -> str | None:
    """Who a system unit runs as: the owner of the home (it must write there); None for user units."""
    if mode != "system":
        return None
    uid = settings.home.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no name: User= takes the number
        return str(uid)


def render_unit(settings: Settings, mode: str, gremlin_bin: Path, user: str | None = None) -> str:
    """The unit for this home: the template (config/gremlin.service) with paths and mode filled in."""
    _check_mode(mode)
    home, writable = settings.home, _outermost([settings.home, *settings.watch_roots])
    read = [*writable, Path(gremlin_bin), REPO_ROOT, *settings.watch.log_files]
    argv = [str(gremlin_bin), "--home", str(home), "daemon"]  # its stderr lines reach the journal with priorities
    fields = {
        "home": _printable(str(home)),  # a comment: nothing to escape
        "exec_start": " ".join(_unit_word(a, exec_line=True) for a in argv),
        "account": f"User={_unit_word(user)}" if user and mode == "system" else "",
        # "-": a root that is missing must not stop the namespace set-up; the daemon names it instead
        "rw_paths": " ".join(_unit_word(f"-{p}") for p in writable),
        "protect_home": "read-only" if any(_under_home_trees(p) for p in read) else "yes",
        "sys": "" if mode == "system" else "#",
        "wanted_by": "multi-user.target" if mode == "system" else "default.target",
    }
    try:
        return TEMPLATE.read_text(encoding="utf-8").format(**fields)
    except OSError as exc:
        raise ServiceError(f"cannot read the unit template {TEMPLATE}: {exc.strerror or exc}; "
                           "reinstall Gremlin") from exc


def _unit_word(text: str, exec_line: bool = False) -> str:
    """`text` as one word of a unit line: specifiers (and `$` on Exec lines) escaped, quoted when needed."""
    text = _printable(text).replace("%", "%%")
    if exec_line:
        text = text.replace("$", "$$")
    if _PLAIN_WORD.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _outermost(paths: list[Path]) -> list[Path]:
    """`paths` without those inside another of them (ReadWritePaths= covers a folder's subtree)."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    return [p for p in unique if not any(q in p.parents for q in unique)]


def _printable(text: str) -> str:
    """`text`, unless a unit file cannot hold it: control characters, undecodable bytes."""
    if not text.isprintable():
        raise ServiceError(f"{text!r} cannot be written into a unit file (control characters or undecodable "
                           "bytes); use a path without them")
    return text


def _under_home_trees(path: Path) -> bool:
    path = Path(path)
    return any(path == tree or tree in path.parents for tree in HOME_TREES)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ServiceError(f"unknown service mode {mode!r}; use user or system")


def served_home(path: Path) -> str | None:
    """The home a unit file written by Gremlin serves ('' for a unit Gremlin did not write; None: no file)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    return next((line[len(HOME_MARK):] for line in lines if line.startswith(HOME_MARK)), "")


def write_unit(path: Path, text: str) -> None:
    """Write the unit file atomically (mode 0644), refusing to replace a unit that serves another home."""
    current = served_home(path)
    if current == "":
        raise ServiceError(f"{path} exists and was not written by `gremlin service install`; "
                           "move it away first, or install this unit by hand (--print)")
    wanted = served_home_of(text)
    if current is not None and current != wanted:
        raise ServiceError(f"{path} already runs the daemon of home {current}; uninstall that one first "
                           f"(gremlin --home {current} service uninstall), or save this unit under another "
                           "name by hand (--print)")
    try:
        write_bytes_atomically(path, text.encode("utf-8"), mode=UNIT_MODE)
    except PermissionError as exc:
        raise ServiceError(f"cannot write {path}: permission denied; a system unit needs root "
                           "(sudo), or install a user unit (--user)") from exc


def served_home_of(text: str) -> str:
    """The home recorded in a rendered unit's `# home:` line."""
    return next((line[len(HOME_MARK):] for line in text.splitlines() if line.startswith(HOME_MARK)), "")


# -- systemctl -------------------------------------------------------------------------------

def systemctl(mode: str, *args: str, timeout_s: float = SYSTEMCTL_TIMEOUT_S,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run `systemctl [--user] ARGS`; ServiceError naming its message when it fails (check=True)."""
    argv = [SYSTEMCTL, *(["--user"] if mode == "user" else []), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"`{' '.join(argv)}` did not finish within {timeout_s:.0f} s; "
                           "see `journalctl -xe` for what systemd is waiting on") from exc
    except OSError as exc:
        raise ServiceError(f"cannot run {SYSTEMCTL}: {exc.strerror or exc}") from exc
    if check and proc.returncode != 0:
        raise ServiceError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {_first_line(proc.stderr)}")
    return proc


def manager_problem(mode: str) -> str | None:
    """Why no service manager of this mode can be used here, in one line; None when one answers."""
    if shutil.which(SYSTEMCTL) is None:
        return "systemctl is not installed here"
    if not SYSTEMD_BOOTED.is_dir():
        return "systemd is not running here (PID 1 is another init, e.g. in a container)"
    try:
        proc = systemctl(mode, "show", "--property=Version", check=False)
    except ServiceError as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    if mode == "user":
        return (f"no user service manager answers ({_first_line(proc.stderr)}); log in to a session, "
                "or ask root for `loginctl enable-linger`")
    return f"the system service manager does not answer ({_first_line(proc.stderr)})"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")


def enable_commands(mode: str) -> str:
    """The commands that load and start an installed unit by hand."""
    ctl = "systemctl --user" if mode == "user" else "systemctl"
    return f"{ctl} daemon-reload && {ctl} enable --now {UNIT_NAME}"


# -- install, uninstall, status ---------------------------------------------------------------

@dataclass(frozen=True)
class InstallResult:
    """What `install` did: the unit written and started, or only rendered (`problem` says why)."""

    mode: str
    path: Path
    unit: str
    installed: bool
    problem: str | None = None
    was_running: bool = False  # it ran before: a restart makes it use the new unit
    lingering: bool = True  # a user unit keeps running after its user logs out


def install(settings: Settings, mode: str) -> InstallResult:
    """Write the unit, reload systemd, enable and start it; without a usable service manager only render it."""
    path = unit_path(mode)
    unit = render_unit(settings, mode, gremlin_executable(), service_user(settings, mode))
    problem = manager_problem(mode)
    if problem:
        return InstallResult(mode, path, unit, installed=False, problem=problem)
    was_running = systemctl(mode, "is-active", "--quiet", UNIT_NAME, check=False).returncode == 0
    write_unit(path, unit)
    systemctl(mode, "daemon-reload")
    systemctl(mode, "enable", "--now", "--no-block", UNIT_NAME)  # the start (model load) goes on in systemd
    logger.info("service installed", extra={"unit": str(path), "mode": mode, "home": str(settings.home)})
    return InstallResult(mode, path, unit, installed=True, was_running=was_running, lingering=_lingering(mode))


def _lingering(mode: str) -> bool:
    if mode != "user":
        return True
    try:
        return (LINGER_DIR / pwd.getpwuid(os.getuid()).pw_name).exists()
    except KeyError:
        return False


@dataclass(frozen=True)
class UninstallResult:
    """What `uninstall` did."""

    mode: str
    path: Path
    removed: bool
    home: str | None = None  # the home the removed unit served
    problem: str | None = None  # no service manager: the file was removed, nothing was stopped


def uninstall(mode: str) -> UninstallResult:
    """Stop and disable the unit, remove its file, reload systemd; a missing unit is not an error."""
    path = unit_path(mode)
    home = served_home(path)
    if home is None:
        return UninstallResult(mode, path, removed=False)
    if home == "":
        raise ServiceError(f"{path} was not written by `gremlin service install`; remove it by hand")
    problem = manager_problem(mode)
    if problem is None:
        systemctl(mode, "disable", "--now", UNIT_NAME, timeout_s=STOP_TIMEOUT_S)
    try:
        path.unlink(missing_ok=True)
    except PermissionError as exc:
        raise ServiceError(f"cannot remove {path}: permission denied; a system unit needs root (sudo)") from exc
    if problem is None:
        systemctl(mode, "daemon-reload")
    logger.info("service uninstalled", extra={"unit": str(path), "mode": mode, "home": home})
    return UninstallResult(mode, path, removed=True, home=home, problem=problem)


@dataclass(frozen=True)
class ServiceStatus:
    """The unit file and what systemd says about it (`properties`: `systemctl show` fields)."""

    mode: str
    path: Path
    home: str | None  # the home the unit file serves; None when there is no file
    problem: str | None = None
    properties: dict = dataclasses.field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether systemd runs it now."""
        return self.properties.get("ActiveState") == "active"


def status(mode: str) -> ServiceStatus:
    """The unit file of this mode and systemd's state of it."""
    path = unit_path(mode)
    home, problem = served_home(path), manager_problem(mode)
    if problem:
        return ServiceStatus(mode, path, home, problem)
    shown = systemctl(mode, "show", *(f"--property={p}" for p in SHOWN), UNIT_NAME).stdout
    properties = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    return ServiceStatus(mode, path, home, None, properties)


# -- reload ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reload:
    """A reloaded config: what to run with now, which keys changed live, which wait for a restart."""

    settings: Settings  # the new values, except those that need a restart (they keep the running ones)
    applied: tuple[str, ...]  # "section.key"
    pending: tuple[str, ...]


def plan_reload(old: Settings, new: Settings) -> Reload:
    """Split the changes from `old` to `new` into those a running daemon applies and those that wait."""
    applied: list[str] = []
    pending: list[str] = []
    sections = {name: _merge_section(name, getattr(old, name), getattr(new, name), applied, pending)
                for name in SECTIONS}
    return Reload(dataclasses.replace(new, **sections), tuple(applied), tuple(pending))


def _merge_section(name: str, old, new, applied: list[str], pending: list[str]):
    """`new`, with the changed keys that need a restart set back to their running values."""
    keep = {}
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if name in RESTART_SECTIONS or (name, f.name) in RESTART_KEYS:
            pending.append(f"{name}.{f.name}")
            keep[f.name] = before
        else:
            applied.append(f"{name}.{f.name}")
    return dataclasses.replace(new, **keep)


# -- talking to systemd while running ---------------------------------------------------------

class Notifier:
    """What the daemon tells systemd as it runs: READY=1 and RELOADING=1, WATCHDOG=1 while healthy
    (at half the watchdog interval), STATUS= when it changed. `send` is the daemon's sd_notify;
    `active` is whether there is a notification socket at all."""

    def __init__(self, send: Callable[[str], object], watchdog_s: float | None, active: bool = True):
        self.send = send
        self.active = active
        self.ping_every_s = watchdog_s / 2 if watchdog_s else None  # one late ping is not yet a restart
        self.status = ""
        self.unhealthy = False
        self._last_ping = self._last_status = float("-inf")

    def ready(self, status: str, now: float | None = None) -> None:
        """Started, or done reloading: READY=1 with the status line."""
        if self.active:
            self.send(f"READY=1\nSTATUS={status}")
        self.status, self._last_status = status, time.monotonic() if now is None else now

    def reloading(self) -> None:
        """About to read the config again (the notify-reload protocol wants the monotonic time too)."""
        if self.active:
            self.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def tick(self, healthy: bool, status: Callable[[], str], now: float | None = None) -> None:
        """One pass of the main loop: ping the watchdog while healthy, send the status when it changed."""
        now = time.monotonic() if now is None else now
        if not healthy and not self.unhealthy:
            self.unhealthy = True  # for good: a dead thread does not come back, systemd restarts the daemon
            logger.error("daemon unhealthy: the watcher or the scheduler stopped; no more watchdog pings, "
                         "so systemd restarts it", extra={"watchdog": self.ping_every_s is not None})
            if self.active:
                self.send("STATUS=unhealthy: the watcher or the scheduler stopped")
        if not self.active or self.unhealthy:
            return
        if self.ping_every_s is not None and now - self._last_ping >= self.ping_every_s:
            self.send("WATCHDOG=1")
            self._last_ping = now
        if now - self._last_status >= STATUS_EVERY_S:
            self._last_status = now
            text = status()
            if text != self.status:
                self.send(f"STATUS={text}")
                self.status = text
