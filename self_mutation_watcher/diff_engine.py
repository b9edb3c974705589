"""Turn the state of one file into an event: shadow copies, GNU diff, unidiff hunks.

The last seen content of every watched text file is kept in a content-addressed shadow
store (`data/shadow/ab/cdef…`). A change is the unified diff, made by GNU diff, between
the shadow copy and the new content, parsed with unidiff into hunks. Binary files and
files over the size limit become events with metadata only. Log files are followed
from their last offset instead, and appended text that looks like a failure becomes a
failure memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import unidiff

from config.errors import GremlinError
from memory.atomic import write_bytes_atomically
from memory.store import FileState, NewEvent, Store, utc_now

logger = logging.getLogger(__name__)

DIFF_TIMEOUT_S = 30
BINARY_SNIFF_BYTES = 8192
# Lines that mark appended log text as a failure; issue-level grouping builds on this.
FAILURE_LINE = re.compile(
    r"Traceback \(most recent call last\)|\b(ERROR|CRITICAL|FATAL)\b|^\s*\w+(Error|Exception)\b")
FAILURE_CONTEXT_LINES = 2


class DiffError(GremlinError):
    """GNU diff could not compare two files."""


@dataclass(frozen=True)
class Hunk:
    """One hunk of a unified diff."""

    source_start: int
    source_length: int
    target_start: int
    target_length: int
    added: int
    removed: int
    section: str


@dataclass(frozen=True)
class Diff:
    """A unified diff, its hunks and totals; `text` may be cut to the configured size."""

    text: str
    hunks: tuple[Hunk, ...]
    added: int
    removed: int
    truncated: bool
    parsed: bool = True

    def meta(self) -> dict:
        """The diff's numbers for event and memory metadata."""
        return {"added": self.added, "removed": self.removed, "truncated": self.truncated,
                "hunks": [h.__dict__ for h in self.hunks], "parsed": self.parsed}


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def is_binary(data: bytes) -> bool:
    """True when the content looks binary (a NUL byte near the start, as git decides)."""
    return b"\0" in data[:BINARY_SNIFF_BYTES]


def decode_text(data: bytes) -> tuple[str, bool]:
    """Text of `data` as UTF-8; invalid bytes are replaced and the second value is True."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


class ShadowStore:
    """Content-addressed copies of file contents: `<root>/<sha[:2]>/<sha[2:]>`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        """Where the blob of `sha` lives (it may not exist)."""
        return self.root / sha[:2] / sha[2:]

    def has(self, sha: str | None) -> bool:
        """Whether the blob of `sha` is stored."""
        return bool(sha) and self.path(sha).is_file()

    def put(self, data: bytes, sha: str | None = None) -> str:
        """Store `data` once (atomically) and return its sha256."""
        sha = sha or sha256_bytes(data)
        if not self.has(sha):
            write_bytes_atomically(self.path(sha), data)
        return sha


def unified_diff(old: Path | None, new: Path | None, label: str, max_bytes: int) -> Diff:
    """The unified diff of two files (None for an absent side), made by GNU diff."""
    cmd = ["diff", "-u", "-a", "--label", f"a/{label}" if old else "/dev/null",
           "--label", f"b/{label}" if new else "/dev/null",
           str(old or os.devnull), str(new or os.devnull)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=DIFF_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiffError(f"diff of {label} failed: {exc}; is GNU diffutils installed?") from exc
    if proc.returncode > 1:
        raise DiffError(f"diff of {label} failed: {proc.stderr.decode(errors='replace').strip()}")
    return parse_diff(proc.stdout.decode("utf-8", errors="replace"), max_bytes)


def parse_diff(text: str, max_bytes: int) -> Diff:
    """Hunks and totals of a unified diff (parsed in full), its text cut to `max_bytes`."""
    try:
        patch = unidiff.PatchSet(text)
        hunks = tuple(Hunk(h.source_start, h.source_length, h.target_start, h.target_length,
                           h.added, h.removed, h.section_header) for f in patch for h in f)
        parsed = True
    except unidiff.UnidiffParseError as exc:
        logger.warning("diff could not be parsed into hunks", extra={"error": str(exc)})
        hunks, parsed = (), False
    added, removed = sum(h.added for h in hunks), sum(h.removed for h in hunks)
    cut = text.encode()[:max_bytes].decode("utf-8", errors="ignore")
    truncated = len(cut) < len(text)
    if truncated and cut.rfind("\n") >= len(cut) // 2:  # end at a whole line unless lines are huge
        cut = cut[:cut.rfind("\n") + 1]
    return Diff(cut, hunks, added, removed, truncated, parsed)


def failure_excerpt(text: str) -> str | None:
    """The part of appended log text from just before its first failure line, or None."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if FAILURE_LINE.search(line):
            return "\n".join(lines[max(0, number - FAILURE_CONTEXT_LINES):])
    return None


class ChangeDetector:
    """Compares a file on disk with its recorded state and says what changed.

    `check` returns a NewEvent to record, a FileState to save silently (a baseline, a
    touched but unchanged file, a log that advanced without failures), or None.
    """

    def __init__(self, store: Store, shadow: ShadowStore, watch, memory_chars: int,
                 is_log=lambda path: False):
        self.store = store
        self.shadow = shadow
        self.watch = watch
        self.memory_chars = memory_chars
        self.is_log = is_log

    def check(self, path: Path, root: Path, *, trust_stat: bool = False,
              baseline_before_ns: int | None = None, prev: FileState | None = None,
              known: bool = False) -> NewEvent | FileState | None:
        """What happened to `path` since it was last recorded (`prev`, looked up unless known).

        With `baseline_before_ns`, a file last modified before that time is recorded silently
        (a root's first scan); one modified after it changed while being watched: an event.
        """
        if not known:
            prev = self.store.file_state(str(path))
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):  # symlinks are not followed; a dir is not a file
                return self._deleted(path, root, prev)
            if trust_stat and prev and (prev.size, prev.mtime_ns) == (st.st_size, st.st_mtime_ns):
                return None
            baseline = baseline_before_ns is not None and st.st_mtime_ns < baseline_before_ns
            return self._inspect(path, root, prev, st, baseline)
        except FileNotFoundError:  # gone, perhaps between stat and read
            return self._deleted(path, root, prev)
        except (PermissionError, IsADirectoryError) as exc:
            logger.warning("cannot read file, skipping it", extra={"path": str(path), "error": str(exc)})
            return None

    def _inspect(self, path, root, prev, st, baseline: bool):
        if self.is_log(path):
            return self._log(path, root, prev, st, baseline)
        if st.st_size > self.watch.max_file_bytes:
            return self._metadata_only(path, root, prev, st, None, baseline, "too_large")
        data = _read_capped(path, self.watch.max_file_bytes)
        if data is None:  # grew past the limit while being read
            return self._metadata_only(path, root, prev, st, None, baseline, "too_large")
        return self._content(path, root, prev, st, data, baseline)

    def _content(self, path, root, prev, st, data: bytes, baseline: bool):
        sha = sha256_bytes(data)
        state = FileState(str(path), str(root), sha, len(data), st.st_mtime_ns)
        if prev and prev.sha == sha:
            return state if (prev.size, prev.mtime_ns) != (state.size, state.mtime_ns) else None
        if is_binary(data):
            return self._metadata_only(path, root, prev, st, sha, baseline, "binary")
        self.shadow.put(data, sha)
        if baseline:
            return state
        old = self.shadow.path(prev.sha) if prev and self.shadow.has(prev.sha) else None
        diff = unified_diff(old, self.shadow.path(sha), _label(path, root), self.watch.max_diff_bytes)
        _, invalid = decode_text(data)
        flags = {"invalid_utf8": True} if invalid else {}
        if prev and old is None:
            flags["previous_unknown"] = True
        change = "modified" if prev else "created"
        return self._event(change, path, root, state, prev, diff.text, {**diff.meta(), **flags})

    def _deleted(self, path, root, prev: FileState | None):
        if prev is None:
            return None
        old = self.shadow.path(prev.sha) if self.shadow.has(prev.sha) else None
        diff = unified_diff(old, None, _label(path, root), self.watch.max_diff_bytes) if old else None
        meta = diff.meta() if diff else {"metadata_only": True}
        return self._event("deleted", path, root, None, prev, diff.text if diff else None, meta)

    def _metadata_only(self, path, root, prev, st, sha, baseline: bool, reason: str):
        state = FileState(str(path), str(root), sha, st.st_size, st.st_mtime_ns)
        unchanged = prev and (prev.sha, prev.size, prev.mtime_ns) == (sha, st.st_size, st.st_mtime_ns)
        if baseline or unchanged:
            return None if unchanged else state
        change = "modified" if prev else "created"
        return self._event(change, path, root, state, prev, None, {reason: True, "metadata_only": True})

    def _log(self, path, root, prev, st, baseline: bool):
        start = prev.size if prev and prev.size <= st.st_size else 0
        if baseline and prev is None:  # first sight of an old log: follow it from its end
            start = st.st_size
        chunk = _read_range(path, start, min(st.st_size - start, self.watch.max_file_bytes))
        consumed = chunk[:chunk.rfind(b"\n") + 1]  # a partial last line waits for its end
        state = FileState(str(path), str(root), None, start + len(consumed), st.st_mtime_ns)
        excerpt = failure_excerpt(decode_text(consumed)[0])
        if excerpt is None:
            return state if state != prev else None
        meta = {"offset": start, "bytes": len(consumed), "log": True}
        return self._event("log", path, root, state, prev, excerpt, meta, memory_kind="failure")

    def _event(self, change: str, path: Path, root: Path, state: FileState | None,
               prev: FileState | None, diff_text: str | None, meta: dict,
               memory_kind: str = "code_diff") -> NewEvent:
        label = _label(path, root)
        size = state.size if state else (prev.size if prev else None)
        if diff_text:
            text = f"{change} {label}\n{diff_text}"[:self.memory_chars]
        else:
            text = f"{change} {label} ({_describe(meta, size)})"
        return NewEvent(
            kind=change, path=str(path), root=str(root), time=utc_now(), state=state,
            old_sha=prev.sha if prev else None, new_sha=state.sha if state else None,
            size=size, diff=diff_text, meta=meta, memory_kind=memory_kind, memory_text=text,
            memory_meta={"path": str(path), "label": label, "change": change,
                         **{k: v for k, v in meta.items() if k != "hunks"}})


def _label(path: Path, root: Path) -> str:
    """The path shown in diffs and memories: relative to the root's parent (keeps its name)."""
    try:
        return str(path.relative_to(root.parent))
    except ValueError:
        return str(path)


def _describe(meta: dict, size: int | None) -> str:
    kind = "binary" if meta.get("binary") else "over the size limit" if meta.get("too_large") else "no diff"
    return f"{kind}, {size} bytes" if size is not None else kind


def _read_capped(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it holds more than `limit`."""
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    return None if len(data) > limit else data


def _read_range(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(max(0, length))
