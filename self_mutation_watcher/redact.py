"""Redact likely secrets from diff and log text before it is stored or embedded.

Pure functions: text in, text and counts out. A redacted value becomes
`[REDACTED:<kind>]`; for `key = value` assignments the key is kept so the diff still
says what changed. The event records how many of each kind were removed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

# (kind, pattern, group to replace: 0 = the whole match). Every repetition is bounded or
# anchored: diff lines can be hundreds of kilobytes long, and an unbounded `[a-z]*` that
# must backtrack at every position makes a search quadratic.
BUILTIN_PATTERNS: tuple[tuple[str, str, int], ...] = (
    ("private_key", r"-----BEGIN [A-Z0-9 ]{0,20}PRIVATE KEY-----[\s\S]{0,16384}?(?:-----END [A-Z0-9 ]{0,20}PRIVATE KEY-----|\Z)", 0),
    ("aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 0),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b", 0),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", 0),
    ("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}\b", 0),
    ("openai_key", r"\bsk-(?:proj-)?[A-Za-z0-9_\-]{20,}", 0),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 0),
    ("bearer_token", r"(?i)\b(?:bearer|token)\s+([A-Za-z0-9._~+/=-]{16,})", 1),
    ("url_password", r"\b[a-z][a-z0-9+.-]{0,15}://[^/\s:@]{1,64}:([^/\s@]{3,128})@", 1),
    ("assignment", r"(?i)(?<![\w.-])[\w.-]{0,40}(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key"
                   r"|auth[_-]?token|access[_-]?token|client[_-]?secret|private[_-]?key)[\w.-]{0,40}[\"']?"
                   r"[ \t]{0,8}[:=][ \t]{0,8}[\"']?(?!\[REDACTED)([^\s\"',;]{4,200})", 1),
)

# Text a built-in pattern cannot match without: it is skipped when none of these is in the
# text (casefolded for the (?i) ones: every letter `re` matches to one of these under
# IGNORECASE, such as "S", "ſ" or the Kelvin sign, casefolds to it). Most text holds no
# secret, and a substring test costs a fraction of a regex scan.
NEEDLES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "aws_access_key": (False, ("AKIA", "ASIA")),
    "github_token": (False, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    "slack_token": (False, ("xox",)),
    "google_api_key": (False, ("AIza",)),
    "openai_key": (False, ("sk-",)),
    "jwt": (False, ("eyJ",)),
    "bearer_token": (True, ("bearer", "token")),
    "url_password": (False, ("://",)),
    "assignment": (True, ("passw", "pwd", "secret", "key", "token")),
}


@dataclass(frozen=True)
class Redactor:
    """Compiled patterns; `redact` returns the cleaned text and counts per kind."""

    patterns: tuple[tuple[str, re.Pattern, int], ...]

    @classmethod
    def build(cls, enabled: bool = True, extra: Iterable[str] = ()) -> Redactor:
        """Built-in patterns (when enabled) plus extra regexes (redacted whole, kind 'custom')."""
        chosen = [(k, re.compile(p), g) for k, p, g in BUILTIN_PATTERNS] if enabled else []
        chosen += [("custom", re.compile(p), 0) for p in extra]
        return cls(tuple(chosen))

    def redact(self, text: str | None) -> tuple[str | None, dict[str, int]]:
        """`text` with every match replaced, and how many of each kind were replaced."""
        counts: dict[str, int] = {}
        if not text:
            return text, counts
        folded = None
        for kind, pattern, group in self.patterns:
            needles = NEEDLES.get(kind)  # custom patterns have none: they always run
            if needles:
                if needles[0] and folded is None:
                    folded = text.casefold()
                if not any(n in (folded if needles[0] else text) for n in needles[1]):
                    continue
            text, n = pattern.subn(lambda m, k=kind, g=group: _replace(m, k, g), text)
            if n:
                counts[kind] = counts.get(kind, 0) + n
                folded = None
        return text, counts

    @property
    def fingerprint(self) -> str:
        """Identifies the patterns (copies redacted with other patterns are redacted again)."""
        return hashlib.sha256("\0".join(p.pattern for _, p, _ in self.patterns).encode()).hexdigest()[:16]


MARKER = re.compile(r"\[REDACTED:(\w+)\]")


def count_markers(text: str | None) -> dict[str, int]:
    """How many redactions of each kind `text` holds."""
    counts: dict[str, int] = {}
    for kind in MARKER.findall(text or ""):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _replace(match: re.Match, kind: str, group: int) -> str:
    marker = f"[REDACTED:{kind}]"
    if group == 0:
        return marker
    start, end = match.span(group)
    whole = match.group(0)
    offset = match.start(0)
    return whole[:start - offset] + marker + whole[end - offset:]
