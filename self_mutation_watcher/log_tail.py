"""Follow log files across rotation and group failures into one record each.

`group_failures` is pure: appended log text in, one `Failure` per Python traceback or
ERROR/CRITICAL record (with its continuation lines and a little context) out, each with a
signature that ignores numbers, addresses and quoted values so repeats can be counted.
`read_appended` finds what was appended since the saved offset, also when the file was
rotated by rename (the old inode is found beside it) or by copy-and-truncate (the copy
is found by its first bytes), so no line is lost across a rotation.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

TRACEBACK_START = "Traceback (most recent call last):"
CHAIN_LINES = ("During handling of the above exception", "The above exception was the direct cause")
LEVEL = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b")
FRAME = re.compile(r'File "([^"]+)", line (\d+)')
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure|Fault)\b")
CONTEXT_LINES = 2
HEAD_BYTES = 256
_VOLATILE = re.compile(r"0x[0-9a-fA-F]+|\d+|'[^']*'|\"[^\"]*\"")


@dataclass(frozen=True)
class Failure:
    """One failure found in log text."""

    text: str
    title: str
    signature: str
    file: str | None
    line: int | None


def group_failures(text: str, context: int = CONTEXT_LINES) -> list[Failure]:
    """Each traceback or ERROR/CRITICAL record in `text`, with `context` lines before it."""
    lines = text.splitlines()
    failures, i, done = [], 0, 0
    while i < len(lines):
        if TRACEBACK_START in lines[i] or LEVEL.search(lines[i]):
            end = _record_end(lines, i)
            failures.append(_failure(lines[max(done, i - context):end], lines[i:end]))
            i = done = end
        else:
            i += 1
    return failures


def _record_end(lines: list[str], start: int) -> int:
    """Index just after the record starting at `start` (continuation lines included)."""
    in_traceback = TRACEBACK_START in lines[start]
    after_chain = False  # "During handling of the above exception..." joins the next traceback
    j = start + 1
    while j < len(lines):
        line = lines[j]
        nxt = lines[j + 1] if j + 1 < len(lines) else ""
        if TRACEBACK_START in line:
            in_traceback, after_chain = True, False
        elif line.startswith(CHAIN_LINES):
            after_chain = True
        elif not line.strip() and (nxt.startswith(CHAIN_LINES) or (after_chain and TRACEBACK_START in nxt)):
            pass
        elif line[:1] in (" ", "\t") and line.strip():
            pass
        elif in_traceback and EXCEPTION_LINE.match(line):
            in_traceback = False
        else:
            break
        j += 1
    return j


def _failure(with_context: list[str], record: list[str]) -> Failure:
    exceptions = [line for line in record if EXCEPTION_LINE.match(line)]
    title = (exceptions[-1] if exceptions else record[0]).strip()[:300]
    frames = [m for line in record for m in FRAME.finditer(line)]
    file, line = (frames[-1].group(1), int(frames[-1].group(2))) if frames else (None, None)
    key = f"{_VOLATILE.sub('#', _strip_prefix(title))}|{file or ''}:{line or ''}"
    return Failure("\n".join(with_context), title, hashlib.sha1(key.encode()).hexdigest()[:16], file, line)


def _strip_prefix(title: str) -> str:
    """The part of a log line from its level on (drops timestamps, pids, logger names)."""
    found = LEVEL.search(title)
    return title[found.start():] if found else title


def head_signature(data: bytes) -> str:
    """Identifies a log by its first bytes: '<length>:<sha256 prefix>'."""
    head = data[:HEAD_BYTES]
    return f"{len(head)}:{hashlib.sha256(head).hexdigest()[:16]}"


def read_head(path: Path) -> bytes:
    """The first HEAD_BYTES of a file."""
    with open(path, "rb") as handle:
        return handle.read(HEAD_BYTES)


def read_range(path: Path, start: int, length: int) -> bytes:
    """`length` bytes of `path` from `start`."""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(max(0, length))


def rotated_sibling(path: Path, inode: int, head: str | None, min_size: int) -> Path | None:
    """The rotated copy of a log: the same inode renamed, or a copy starting with the same bytes."""
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path
                    and not p.name.endswith((".gz", ".bz2", ".xz", ".zst"))]
    except OSError:
        return None
    for sibling in sorted(siblings):
        try:
            st = os.stat(sibling)
            if inode and st.st_ino == inode:
                return sibling
            if head and st.st_size >= min_size and _head_matches(sibling, head):
                return sibling
        except OSError:
            continue
    return None


def _head_matches(path: Path, head: str) -> bool:
    length = int(head.split(":", 1)[0])
    return head_signature(read_head(path)[:length]) == head
