"""Log handlers, configured only here (by the CLI and the daemon).

`data/logs/system/gremlin.log` gets one JSON object per line (rotating);
`data/logs/system/bootstrap.log` gets the audit trail, one line per stored mutation;
the terminal gets short `message key=value` lines.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from config.errors import ConfigError
from config.settings import PRIVATE_DIR, PRIVATE_FILE
from memory.paths import display_path

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
AUDIT_LOGGER = "gremlin.audit"


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(line: str, in_json: bool = False) -> str:
    """`line` with the surrogate escapes of undecodable file-name bytes written as \\xNN
    (a file name is any bytes; a UTF-8 log file cannot hold those as they are)."""
    def escape(match: re.Match) -> str:
        shown = display_path(match.group())
        return shown.replace("\\", "\\\\") if in_json else shown
    return _SURROGATE.sub(escape, line)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
               **_extras(record)}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _escape_surrogates(json.dumps(out, default=str, ensure_ascii=False), in_json=True)


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        pairs = " ".join(f"{k}={display_path(str(v))}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.getMessage()} {pairs}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return _escape_surrogates(line)


# Libraries whose INFO lines say nothing an operator needs (APScheduler logs every job run).
QUIET_LOGGERS = ("watchdog", "sentence_transformers", "transformers", "urllib3", "filelock", "faiss", "apscheduler")


def configure_logging(settings, console: bool = True, files: bool = True) -> Path:
    """Install the handlers for this process; returns the system log folder."""
    system = Path(settings.logging.dir) / "system"
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
        handler.setFormatter(ConsoleFormatter())
        root.addHandler(handler)
    logging.captureWarnings(True)
    return system


def _file_handlers(system: Path, settings) -> tuple[logging.Handler, logging.Handler]:
    """The handlers of gremlin.log and bootstrap.log; ConfigError when the folder is not writable."""
    try:
        system.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        return (_rotating(system / "gremlin.log", settings, JsonFormatter()),
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
