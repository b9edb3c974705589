"""What templates need beyond Jinja: diff highlighting, and filters for paths, times and numbers.

Every value a template prints is escaped by Jinja's autoescape; the only markup that is
trusted is Pygments' output (it escapes the text it is given) and the charts of
`dashboard.charts` (which escape their own text).
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer

from memory.paths import display_path

MAX_HIGHLIGHT_CHARS = 1_000_000  # a longer diff is shown cut (the watcher already caps what it stores)
_SURROGATE = re.compile("[\ud800-\udfff]")
_FORMATTER = HtmlFormatter(cssclass="highlight", wrapcode=True)


def escape_surrogates(text: str) -> str:
    """`text` with the surrogate escapes of undecodable bytes written as \\xNN (a page is UTF-8)."""
    return _SURROGATE.sub(lambda m: display_path(m.group()), text)


def finalize(value: object) -> object:
    """Jinja's finalize: every printed string is valid UTF-8 (undecodable file-name bytes shown as \\xNN)."""
    if isinstance(value, str) and not isinstance(value, Markup) and _SURROGATE.search(value):
        return escape_surrogates(value)
    return "" if value is None else value


def highlight_diff(text: str | None) -> Markup:
    """A unified diff as highlighted HTML; Pygments escapes every character of the text."""
    text = escape_surrogates(text or "")
    if len(text) > MAX_HIGHLIGHT_CHARS:
        text = text[:MAX_HIGHLIGHT_CHARS] + "\n… (cut here: the diff is longer)\n"
    return Markup(highlight(text, DiffLexer(), _FORMATTER))  # noqa: S704 - Pygments escapes its input


def shown_path(path: str | None) -> str:
    """A path on one printable line (escaped bytes and control characters)."""
    return display_path(path) if path else ""


def when(stamp: str | None) -> str:
    """An ISO-8601 UTC time as `2024-05-01 12:00:00`."""
    return (stamp or "")[:19].replace("T", " ")


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one ISO-8601 time to another, or None when either is missing."""
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


def duration(seconds: float | None) -> str:
    """`42 s`, `3 min 5 s`, `2 h 10 min`."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def number(value: object, digits: int = 4) -> str:
    """A metric with a few significant digits; '' for none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def pretty_json(value: object) -> str:
    """Indented JSON for a <pre> block."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def short_id(value: str | None, chars: int = 12) -> str:
    """The first characters of a long id (a model fingerprint, a snapshot commit)."""
    return (value or "")[:chars]


FILTERS = {"path": shown_path, "when": when, "duration": duration, "number": number, "pretty_json": pretty_json,
           "short": short_id, "diff": highlight_diff}
