"""Log handlers, configured only here (by the CLI and the daemon).

`data/logs/system/gremlin.log` gets one JSON object per line (rotating);
`data/logs/system/bootstrap.log` gets the audit trail, one line per stored mutation;
the terminal gets short `component message key=value` lines (journald lines with `<N>`
priority prefixes when stderr is the systemd journal). Every record names its component.

The reading side (`gremlin logs`, the dashboard's log page) is here too: `read_records`
over gremlin.log and its rotations, `follow_records` for a live tail. A line that is not a
record (half-written, binary junk, JSON that is not an object) is kept as a corrupt
record showing its escaped text; reading never fails on file contents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from config.errors import ConfigError
from config.settings import PRIVATE_DIR, PRIVATE_FILE, journal_stream
from memory.paths import display_path

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
AUDIT_LOGGER = "gremlin.audit"
MAIN_LOG = "gremlin.log"

# The component of each part of Gremlin, by logger-name prefix (the longest prefix wins);
# any other logger (a library) is named by its top-level package.
_COMPONENT_OF_PREFIX = {
    "self_mutation_watcher": "watcher",
    "self_training": "trainer", "self_training.feedback_loop": "feedback",
    "self_training.replay": "git", "self_training.git_history": "git",
    "memory": "memory",
    "agent_core": "daemon", "agent_core.service": "service", "agent_core.training": "trainer",
    "agent_core.tasks": "tasks", "agent_core.tool_executor": "tasks", "agent_core.kernel": "tasks",
    "agent_core.snapshot": "tasks", "tools": "tasks",
    "agent_core.cli": "cli", "agent_core.status": "cli", "agent_core.logs": "cli", "__main__": "cli",
    "agents": "planner", "dashboard": "dashboard", "config": "config",
    AUDIT_LOGGER: "audit", "py.warnings": "warnings",
}
COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(_COMPONENT_OF_PREFIX.values()))


@functools.lru_cache(maxsize=1024)
def component_of(logger_name: str) -> str:
    """The component a logger belongs to: `self_training.trainer` → `trainer`, `watchdog.x` → `watchdog`."""
    parts = logger_name.split(".")
    for n in range(len(parts), 0, -1):
        found = _COMPONENT_OF_PREFIX.get(".".join(parts[:n]))
        if found:
            return found
    return parts[0] or "root"


def _component(record: logging.LogRecord) -> str:
    given = getattr(record, "component", None)  # set with extra={"component": ...}
    return str(given) if given else component_of(record.name)


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k != "component"}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(line: str, in_json: bool = False) -> str:
    """`line` with the surrogate escapes of undecodable file-name bytes written as \\xNN
    (a file name is any bytes; a UTF-8 log file cannot hold those as they are)."""
    def escape(match: re.Match) -> str:
        shown = display_path(match.group())
        return shown.replace("\\", "\\\\") if in_json else shown
    return _SURROGATE.sub(escape, line)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, component, logger, msg, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "component": _component(record), "logger": record.name,
               "msg": record.getMessage(), **_extras(record)}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _escape_surrogates(json.dumps(out, default=str, ensure_ascii=False), in_json=True)


def _pairs(record: logging.LogRecord) -> str:
    return " ".join(f"{k}={display_path(str(v))}" for k, v in _extras(record).items())


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL component message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {_component(record):<9} {record.getMessage()} {_pairs(record)}"
        line = line.rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return _escape_surrogates(line)


def _syslog_priority(levelno: int) -> int:
    """The syslog priority journald files a record under (sd-daemon(3) prefixes)."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)):
        if levelno >= floor:
            return priority
    return 7


class JournaldFormatter(logging.Formatter):
    """`<N>component: message key=value` for the systemd journal: no time (journald adds its
    own), and the priority prefix on every line, because journald reads each line on its own."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_component(record)}: {record.getMessage()} {_pairs(record)}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return _escape_surrogates("\n".join(prefix + line for line in text.splitlines() or [""]))


def stderr_is_journal(stream: str | None) -> bool:
    """Whether stderr is the journal stream named by `$JOURNAL_STREAM` ("device:inode"). The
    variable is inherited by children whose stderr goes elsewhere, so the pair is compared
    with stderr's own, as systemd.exec(5) asks."""
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):  # malformed, or stderr is not a file (closed, captured)
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


# Libraries whose INFO lines say nothing an operator needs (APScheduler logs every job run).
QUIET_LOGGERS = ("watchdog", "sentence_transformers", "transformers", "urllib3", "filelock", "faiss", "apscheduler")


def system_log_dir(settings) -> Path:
    """The folder of gremlin.log and bootstrap.log."""
    return Path(settings.logging.dir) / "system"


def configure_logging(settings, console: bool = True, files: bool = True) -> Path:
    """Install the handlers for this process; returns the system log folder."""
    system = system_log_dir(settings)
    main_file, audit_file = _file_handlers(system, settings) if files else (None, None)
    root = logging.getLogger()
    _replace_handlers(root, main_file)
    root.setLevel(settings.logging.level)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if audit_file:
        audit = logging.getLogger(AUDIT_LOGGER)
        audit.propagate = False
        audit.setLevel(logging.INFO)
        _replace_handlers(audit, audit_file)
    if console:
        handler = logging.StreamHandler(sys.stderr)
        journal = stderr_is_journal(journal_stream())
        handler.setFormatter(JournaldFormatter() if journal else ConsoleFormatter())
        root.addHandler(handler)
    logging.captureWarnings(True)
    return system


def _file_handlers(system: Path, settings) -> tuple[logging.Handler, logging.Handler]:
    """The handlers of gremlin.log and bootstrap.log; ConfigError when the folder is not writable."""
    try:
        system.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        return (_rotating(system / MAIN_LOG, settings, JsonFormatter()),
                _rotating(system / "bootstrap.log", settings, JsonFormatter()))
    except OSError as exc:
        raise ConfigError(f"cannot write log files in {system}: {exc.strerror or exc}; give this user write "
                          f"permission there, or set [logging] dir in {settings.config_file}") from exc


def _replace_handlers(logger: logging.Logger, handler: logging.Handler | None) -> None:
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    if handler is not None:
        logger.addHandler(handler)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that only its owner may read (mode 0600, rotated files too)."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def _rotating(path: Path, settings, formatter: logging.Formatter) -> logging.Handler:
    handler = _PrivateRotatingFileHandler(
        path, maxBytes=settings.logging.max_bytes, backupCount=settings.logging.backup_count,
        encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(formatter)
    return handler


# ---- reading the logs back ---------------------------------------------------------------

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_LEVEL_ALIASES = {**LEVELS, "WARN": 30, "FATAL": 50}
_RECORD_KEYS = ("time", "level", "component", "logger", "msg")
MAX_LINE = 1 << 20  # a longer line (binary junk without newlines) is cut here, not held whole in memory
_SHOWN_MAX = 2000  # characters of a corrupt line shown


@dataclass(frozen=True)
class LogRecord:
    """One line of gremlin.log: a record, or a corrupt line kept as its (escaped) text.

    A corrupt line has no time, level, component or logger; its `message` is the escaped
    text, `fields["reason"]` says what is wrong with it and `raw` holds the text itself.
    """

    time: str | None
    level: str | None
    component: str | None
    logger: str | None
    message: str
    fields: dict
    raw: str
    corrupt: bool
    file: str

    def to_dict(self) -> dict:
        """All attributes as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def shown_fields(self) -> list[tuple[str, str]]:
        """(key, value) of the fields, escaped onto one line each, the traceback (`exc`) left out."""
        if self.corrupt:
            return []
        return [(display_path(str(k)), display_path(_field_text(v))) for k, v in self.fields.items() if k != "exc"]

    def plain(self) -> str:
        """One greppable tab-separated line: time, level, component, message and key=value fields."""
        if self.corrupt:
            where = f"{self.file}: " if self.file else ""
            return f"-\tCORRUPT\t-\t{self.message}  [{where}{self.fields['reason']}]"
        pairs = [f"{k}={v}" for k, v in self.shown_fields()]
        if "exc" in self.fields:
            pairs.append(f"exc={display_path(_field_text(self.fields['exc']))}")
        return "\t".join((self.time or "-", self.level or "-", self.component or "-",
                          " ".join([display_path(self.message), *pairs])))


def _field_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _to_datetime(text: object) -> datetime | None:
    """An ISO-8601 time as an aware datetime (UTC when it names no offset); None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _corrupt(text: str, file: str, reason: str) -> LogRecord:
    shown = display_path(text)
    if len(shown) > _SHOWN_MAX:
        shown = shown[:_SHOWN_MAX] + f"… ({len(text)} characters)"
    return LogRecord(None, None, None, None, shown, {"reason": reason}, text, True, file)


_JSON_TYPES = {list: "a JSON array", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "a JSON boolean", type(None): "JSON null"}


def parse_line(line: bytes | str, file: str = "") -> LogRecord:
    """One line of gremlin.log as a record; a line that is not one (not UTF-8, not JSON, not a
    JSON object with time, level and msg) as a corrupt record. Never raises on content."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            return _corrupt(line.decode("utf-8", "backslashreplace").rstrip("\r\n"), file, "not UTF-8 text")
    text = line.rstrip("\r\n")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: thousands of nested brackets
        return _corrupt(text, file, f"not JSON ({exc})" if isinstance(exc, ValueError) else "not JSON (too deep)")
    if not isinstance(obj, dict):
        return _corrupt(text, file, f"{_JSON_TYPES.get(type(obj), 'a JSON value')}, not a log record")
    if not all(isinstance(obj.get(k), str) for k in ("level", "msg")) or _to_datetime(obj.get("time")) is None:
        return _corrupt(text, file, "JSON object without a valid time, level and msg")
    logger = obj["logger"] if isinstance(obj.get("logger"), str) else None
    component = obj["component"] if isinstance(obj.get("component"), str) else component_of(logger or "")
    fields = {k: v for k, v in obj.items() if k not in _RECORD_KEYS}
    return LogRecord(obj["time"], obj["level"], component, logger, obj["msg"], fields, text, False, file)


_DURATION = re.compile(r"(\d{1,12}(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A moment: a duration before `now` (`90s`, `15m`, `1h`, `2d`, `1w`) or an ISO-8601 time
    (UTC unless it names an offset); ValueError saying what is accepted."""
    now = _aware(now or datetime.now(timezone.utc))
    match = _DURATION.fullmatch(text.strip())
    if match:
        try:
            return now - timedelta(seconds=float(match[1]) * _UNIT_S[match[2].lower()])
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before the year 1; give a shorter duration") from None
    when = _to_datetime(text)
    if when is None:
        raise ValueError(f"{text!r} is neither a duration (90s, 15m, 1h, 2d) nor an ISO-8601 time "
                         "(2024-05-01, 2024-05-01T12:00:00Z, 2024-05-01T14:00+02:00)")
    return when


def _aware(when: datetime | None) -> datetime | None:
    """`when` with a time zone; a naive datetime is taken as UTC, as the log's times are."""
    return when.replace(tzinfo=timezone.utc) if when is not None and when.tzinfo is None else when


@dataclass(frozen=True)
class _Filter:
    """What `read_records` and `follow_records` keep. A filter drops only what it can judge: a
    corrupt line has no level or component, so only the text filters (grep, run id in its text)
    and its place in time (between the records around it) decide it."""

    since: datetime | None = None
    until: datetime | None = None
    level: int | None = None
    component: str | None = None
    grep: str | None = None
    run_id: str | None = None

    @classmethod
    def make(cls, since=None, until=None, level=None, component=None, grep=None, run_id=None) -> _Filter:
        rank = None
        if level:
            rank = LEVELS.get(level.upper())
            if rank is None:
                raise ValueError(f"unknown level {level!r}; use one of {', '.join(n.lower() for n in LEVELS)}")
        return cls(_aware(since), _aware(until), rank, component.lower() if component else None,
                   grep.lower() if grep else None, run_id or None)

    def keeps(self, rec: LogRecord) -> bool:
        """Whether the level, component, text and run filters keep `rec`."""
        if self.grep and self.grep not in (rec.message if rec.corrupt else rec.plain()).lower():
            return False
        if rec.corrupt:
            return not self.run_id or self.run_id in rec.raw
        if self.run_id and str(rec.fields.get("run_id")) != self.run_id:
            return False
        if self.component and (rec.component or "").lower() != self.component:
            return False
        # A level this reader does not know (a library's custom one) cannot be ranked: kept.
        return not self.level or _LEVEL_ALIASES.get((rec.level or "").upper(), self.level) >= self.level

    def in_window(self, earliest: datetime | None, latest: datetime | None) -> bool:
        """Whether [earliest, latest] (None: unbounded) meets [since, until]."""
        return ((self.since is None or latest is None or latest >= self.since)
                and (self.until is None or earliest is None or earliest <= self.until))


def log_files(settings) -> list[Path]:
    """gremlin.log and its rotated files (gremlin.log.1 … .N), oldest first."""
    system = system_log_dir(settings)
    rotated = []
    for path in system.glob(MAIN_LOG + ".*"):
        suffix = path.name[len(MAIN_LOG) + 1:]
        if suffix.isascii() and suffix.isdigit() and path.is_file():
            rotated.append((int(suffix), path))
    main = system / MAIN_LOG
    return [path for _, path in sorted(rotated, reverse=True)] + ([main] if main.is_file() else [])


def _file_lines(path: Path) -> Iterator[bytes]:
    """The lines of one file, each cut at MAX_LINE; none when it is gone (rotated away meanwhile)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        while line := f.readline(MAX_LINE):
            if len(line) == MAX_LINE and not line.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass  # the rest of an overlong line is dropped
            yield line


def read_records(settings, since: datetime | None = None, until: datetime | None = None, level: str | None = None,
                 component: str | None = None, grep: str | None = None,
                 run_id: str | None = None) -> Iterator[LogRecord]:
    """The records of gremlin.log and its rotations, oldest first, that pass the filters: `level`
    and above, one `component`, `grep` text (case-insensitive, in the line as `plain()` shows it),
    `run_id` (the run's records), between `since` and `until` (naive times are UTC)."""
    keep = _Filter.make(since, until, level, component, grep, run_id)  # bad level: ValueError now, not later
    lines = (parse_line(line, path.name) for path in log_files(settings) for line in _file_lines(path))
    return filter(keep.keeps, _windowed(lines, keep))


def _windowed(records: Iterable[LogRecord], keep: _Filter) -> Iterator[LogRecord]:
    """The records in the time window; a corrupt line was written between the records around
    it, so it is held until the next record and kept when that stretch meets the window."""
    pending: list[LogRecord] = []
    before = None
    for rec in records:
        if rec.corrupt:
            pending.append(rec)
            continue
        when = _to_datetime(rec.time)
        yield from (p for p in pending if keep.in_window(before, when))
        pending.clear()
        before = when
        if keep.in_window(when, when):
            yield rec
    yield from (p for p in pending if keep.in_window(before, None))


def follow_records(settings, stop: threading.Event, poll_s: float = 0.5, **filters) -> Iterator[LogRecord]:
    """Records appended to gremlin.log after this call, as they come, until `stop` is set. Follows
    the file across rotation (renamed to .1, a new one created) and truncation. `filters` are
    those of `read_records`."""
    keep = _Filter.make(**filters)
    return _follow(_Tail(system_log_dir(settings) / MAIN_LOG), keep, stop, poll_s)


def _follow(tail: _Tail, keep: _Filter, stop: threading.Event, poll_s: float) -> Iterator[LogRecord]:
    before = None  # the time of the last record, which places a corrupt line in time
    try:
        while not stop.is_set():
            for line in tail.read():
                rec = parse_line(line, tail.name)
                if not rec.corrupt:
                    before = _to_datetime(rec.time)
                window = (before, None) if rec.corrupt else (before, before)
                if keep.in_window(*window) and keep.keeps(rec):
                    yield rec
            stop.wait(poll_s)
    finally:
        tail.close()


class _Tail:
    """The complete lines appended to a file after this object was made, across rotation (the
    file renamed and a new one created) and truncation. Opens nothing until the first read, so
    an unused tail holds no file."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        self._file = None
        self._partial = b""
        self._start = self._end_of(path)  # (device, inode, offset) now; None: read from the start

    @staticmethod
    def _end_of(path: Path) -> tuple[int, int, int] | None:
        """Where new lines will start: the end, or the start of an unfinished last line, which is
        shown whole once finished (a record being written now, or junk a new record is glued to:
        either way not to be lost)."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                f.seek(max(0, st.st_size - MAX_LINE))
                tail = f.read()
                return st.st_dev, st.st_ino, st.st_size - len(tail) + tail.rfind(b"\n") + 1
        except FileNotFoundError:
            return None

    def read(self) -> list[bytes]:
        """The complete lines appended since the last read (a rotated file's unfinished last line too)."""
        if self._file is None and not self._open():
            return []
        lines = self._drain()
        if self._replaced():
            lines += self._drain()  # written just before the rename
            if self._partial:
                lines.append(self._partial)
            self.close()
            if self._open():
                lines += self._drain()
        return lines

    def _open(self) -> bool:
        """Open the file this tail started in (maybe rotated to .1 since), else the current one from its start."""
        start, self._start = self._start, None
        for path in (self.path, self.path.with_name(self.name + ".1")) if start else (self.path,):
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue
            st = os.fstat(f.fileno())
            if not start or (st.st_dev, st.st_ino) == start[:2]:
                f.seek(start[2] if start else 0)
                self._file, self._partial = f, b""
                return True
            f.close()
        return self._open() if start else False

    def _drain(self) -> list[bytes]:
        if os.fstat(self._file.fileno()).st_size < self._file.tell():  # truncated in place: start over
            self._file.seek(0)
            self._partial = b""
        chunks = (self._partial + self._file.read()).split(b"\n")
        self._partial = chunks.pop()
        if len(self._partial) >= MAX_LINE:  # no newline in sight: show what there is rather than hoard it
            chunks.append(self._partial)
            self._partial = b""
        return chunks

    def _replaced(self) -> bool:
        """Whether the path now names another file than the open one (or none)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._file.fileno())
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        """Close the open file, if any."""
        if self._file is not None:
            self._file.close()
            self._file = None
