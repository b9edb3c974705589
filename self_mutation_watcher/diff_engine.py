"""Turn the state of one file into an event: shadow copies, GNU diff, unidiff hunks.

The last seen content of every watched text file is kept, with likely secrets redacted, in
a shadow store keyed by content hash (`data/shadow/ab/cdef…`). A change is the unified diff,
made by GNU diff, between the shadow copy and the new (redacted) content, parsed with
unidiff into hunks; the files of one batch share one `diff -r` run. Binary files and
files over the size limit become events with metadata only. Log files are followed
from their last offset instead, and appended text that looks like a failure becomes a
failure memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import unidiff

from config.errors import GremlinError
from memory.atomic import write_bytes_atomically
from memory.paths import c_quote, display_path
from memory.store import FileState, NewEvent, Store, utc_now
from self_mutation_watcher import log_tail
from self_mutation_watcher.redact import Redactor, count_markers

logger = logging.getLogger(__name__)

DIFF_TIMEOUT_S = 30
DIFF_FARM_PREFIX = ".diff-"  # folders of links for one batched diff, inside the shadow store
BINARY_SNIFF_BYTES = 8192
REDACTED_MARK = b"[REDACTED:"  # in every redacted shadow copy (redact.py's marker)


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
    """The last seen content of each text file, under the sha256 of the file's content:
    `<root>/<sha[:2]>/<sha[2:]>`. Secrets in it are redacted (`ChangeDetector.shadow_copy`).

    A copy that is its file's content verbatim (nearly all) is its own checksum, so it is
    written without fsync and checked when read; a power cut can then leave it damaged, and
    `has` drops it (the next diff of that file says `previous_unknown`), never diffs against
    it. A redacted copy cannot be checked so: it is fsynced before it gets its name."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._fans: set[str] = set()  # fan folders known to exist: a failing mkdir costs a syscall

    def path(self, sha: str) -> Path:
        """Where the blob of `sha` lives (it may not exist)."""
        return self.root / sha[:2] / sha[2:]

    def has(self, sha: str | None) -> bool:
        """Whether an intact copy of `sha` is stored (a damaged one is removed, with a warning)."""
        if not sha:
            return False
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except OSError:
            return False
        if sha256_bytes(data) == sha or REDACTED_MARK in data:
            return True
        logger.warning("shadow copy damaged (cut off by a power failure?), dropped; the next diff "
                       "of its file says previous_unknown", extra={"path": str(path)})
        path.unlink(missing_ok=True)
        return False

    def put(self, data: bytes, sha: str | None = None) -> str:
        """Store `data` once (atomically) as the copy of `sha` (default: its own sha256) and
        return that sha; fsynced only when `data` is not its own checksum (redacted). No
        folder fsync: a power cut can lose the copy, which `has` then reports missing; that
        is a third less file system time per change."""
        own = sha256_bytes(data)
        sha = sha or own
        if not self.has(sha):
            if sha[:2] not in self._fans:
                self._make_fan(sha[:2])
            try:
                self._write(sha, data, sync=own != sha)
            except FileNotFoundError:  # its folder was removed under us
                self._make_fan(sha[:2])
                self._write(sha, data, sync=own != sha)
        return sha

    def _write(self, sha: str, data: bytes, sync: bool) -> None:
        """Write the copy of `sha` under its name, fsynced if `sync`."""
        write_bytes_atomically(self.path(sha), data, parents=False, sync_dir=False, sync=sync)

    def _make_fan(self, fan: str) -> None:
        if not self.root.exists():  # copies of watched files: only Gremlin's user may read them
            self.root.mkdir(parents=True, mode=0o700)
        (self.root / fan).mkdir(exist_ok=True)
        self._fans.add(fan)

    def blobs(self) -> Iterator[Path]:
        """Every stored copy."""
        for fan in self.root.glob("??"):
            yield from (blob for blob in fan.iterdir() if not blob.name.startswith("."))

    def rewrite(self, transform: Callable[[bytes], bytes]) -> int:
        """Replace each copy by `transform` of it (when that differs); return how many changed."""
        changed = 0
        for blob in self.blobs():
            try:
                data = blob.read_bytes()
                new = transform(data)
                if new != data:
                    write_bytes_atomically(blob, new)
                    changed += 1
            except OSError as exc:  # one unreadable copy: the others still get done
                logger.warning("cannot rewrite a shadow copy", extra={"path": str(blob), "error": str(exc)})
        return changed

    def prune(self, keep: set[str]) -> int:
        """Delete copies whose sha is not in `keep` (no file's last content); return how many.
        Link folders a batched diff left behind (it was killed) go too."""
        for farm in self.root.glob(DIFF_FARM_PREFIX + "*"):
            shutil.rmtree(farm, ignore_errors=True)
        removed = 0
        for blob in list(self.blobs()):
            if blob.parent.name + blob.name not in keep:
                blob.unlink(missing_ok=True)
                removed += 1
        return removed


@dataclass(frozen=True)
class DiffJob:
    """Two files to compare (None for an absent side), and the path their diff names."""

    old: Path | None
    new: Path | None
    label: str

    def labels(self) -> tuple[str, str]:
        """The `---` and `+++` names of the diff, as git writes them."""
        return (c_quote(f"a/{self.label}") if self.old else "/dev/null",
                c_quote(f"b/{self.label}") if self.new else "/dev/null")


def unified_diff(old: Path | None, new: Path | None, label: str, max_bytes: int) -> Diff:
    """The unified diff of two files (None for an absent side), made by GNU diff."""
    old_label, new_label = DiffJob(old, new, label).labels()
    cmd = ["diff", "-u", "-a", "--label", old_label, "--label", new_label, str(old or os.devnull),
           str(new or os.devnull)]
    out = _run_diff(cmd, display_path(label))
    return parse_diff(out.decode("utf-8", errors="replace"), max_bytes)


def unified_diffs(jobs: Sequence[DiffJob], max_bytes: int, workdir: Path | None = None) -> list[Diff | DiffError]:
    """The diff of each job, equal to `unified_diff`'s, from one GNU diff run for them all.

    Starting a process costs more than diffing a small file, so a batch is one `diff -r`
    over two folders of links to its files, made in `workdir` (hard links where it shares
    the files' file system, else in the temp folder). Should that run fail, each job is
    diffed on its own, so that an error (returned in its place) belongs to its file.
    """
    if len(jobs) < 2:
        return [_diff_or_error(job, max_bytes) for job in jobs]
    try:
        texts = _diff_tree(jobs, workdir)
    except DiffError as exc:
        logger.warning("batched diff failed; diffing each file on its own",
                       extra={"files": len(jobs), "error": str(exc)})
        return [_diff_or_error(job, max_bytes) for job in jobs]
    return [parse_diff(texts.get(i, ""), max_bytes) for i in range(len(jobs))]


def _diff_or_error(job: DiffJob, max_bytes: int) -> Diff | DiffError:
    try:
        return unified_diff(job.old, job.new, job.label, max_bytes)
    except DiffError as exc:
        return exc


# The line `diff -r` writes before each pair that differs; the links are named by job number.
_TREE_PAIR = re.compile(rb"^diff -u -a -r -N a/(\d+) b/\d+\n", re.MULTILINE)


def _diff_tree(jobs: Sequence[DiffJob], workdir: Path | None) -> dict[int, str]:
    """Diff text per job number (none where equal) from `diff -u -a -r -N` over links a/N, b/N."""
    try:
        with tempfile.TemporaryDirectory(prefix=DIFF_FARM_PREFIX, dir=workdir) as tmp:
            for side in ("a", "b"):
                os.mkdir(os.path.join(tmp, side))
            for i, job in enumerate(jobs):
                for side, target in (("a", job.old), ("b", job.new)):
                    if target is not None:  # -N: a missing side is an empty file, as /dev/null is
                        _link(target, os.path.join(tmp, side, f"{i:06d}"))
            out = _run_diff(["diff", "-u", "-a", "-r", "-N", "a", "b"], f"{len(jobs)} files", cwd=tmp)
    except OSError as exc:
        raise DiffError(f"cannot link {len(jobs)} files to diff them together: {exc}") from exc
    pairs = list(_TREE_PAIR.finditer(out))
    texts = {}
    for pair, after in zip(pairs, [*pairs[1:], None]):
        i = int(pair.group(1))
        # diff -r names the links (and their times) where --label would name the file
        body = out[pair.end():after.start() if after else len(out)].split(b"\n", 2)[2:] or [b""]
        old_label, new_label = jobs[i].labels()
        texts[i] = f"--- {old_label}\n+++ {new_label}\n" + body[0].decode("utf-8", errors="replace")
    return texts


def _link(target: Path, link: str) -> None:
    """A hard link (a symlink with a long target costs a disk block), else a symlink."""
    try:
        os.link(target, link)
    except OSError:  # another file system, or links not allowed there
        os.symlink(os.path.abspath(target), link)


def _run_diff(cmd: list[str], what: str, cwd: str | None = None) -> bytes:
    """GNU diff's output (exit 0: same, 1: different); DiffError when it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=DIFF_TIMEOUT_S, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiffError(f"diff of {what} failed: {exc}; is GNU diffutils installed?") from exc
    if proc.returncode > 1:
        raise DiffError(f"diff of {what} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


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


@dataclass(frozen=True)
class PendingDiff:
    """A change whose event is made once its diff is (the diffs of a batch share one run)."""

    job: DiffJob
    event: Callable[[Diff], NewEvent]


@dataclass(frozen=True)
class Outcome:
    """What a check found: events to record, a state to save silently, or ask again later;
    `pending` (from `ChangeDetector.inspect` only) is an event still waiting for its diff."""

    events: tuple[NewEvent, ...] = ()
    state: FileState | None = None
    retry: bool = False
    pending: PendingDiff | None = None


NOTHING = Outcome()
RETRY = Outcome(retry=True)


class ChangeDetector:
    """Compares a file on disk with its recorded state and says what changed."""

    def __init__(self, store: Store, shadow: ShadowStore, watch, memory_chars: int,
                 is_log=lambda path: False, redactor: Redactor | None = None):
        self.store = store
        self.shadow = shadow
        self.watch = watch
        self.memory_chars = memory_chars
        self.is_log = is_log
        self.redactor = redactor or Redactor.build(watch.redact, watch.redact_patterns)

    def check(self, path: Path, root: Path, **options) -> Outcome:
        """What happened to `path` since it was last recorded (see `inspect` for the options)."""
        outcome = self.check_many([(path, root, options)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def check_many(self, checks: Sequence[tuple[Path, Path, dict]]) -> list[Outcome | Exception]:
        """`check` of each (path, root, options), their diffs made by one GNU diff run; a check
        that failed is its exception, so one bad file does not cost the others theirs."""
        results: list[Outcome | Exception] = []
        for path, root, options in checks:
            try:
                results.append(self.inspect(path, root, **options))
            except Exception as exc:  # noqa: BLE001 - handed back in its place, logged by the caller
                results.append(exc)
        waiting = [i for i, r in enumerate(results) if isinstance(r, Outcome) and r.pending]
        diffs = unified_diffs([results[i].pending.job for i in waiting], self.watch.max_diff_bytes,
                              self.shadow.root)
        for i, diff in zip(waiting, diffs, strict=True):
            try:
                results[i] = diff if isinstance(diff, Exception) else self.finish(results[i], diff)
            except Exception as exc:  # noqa: BLE001 - as above
                results[i] = exc
        return results

    def finish(self, outcome: Outcome, diff: Diff) -> Outcome:
        """`outcome` with its pending event made from `diff`."""
        return Outcome((outcome.pending.event(diff),), outcome.state, outcome.retry)

    def inspect(self, path: Path, root: Path, *, trust_stat: bool = False,
                baseline_before_ns: int | None = None, prev: FileState | None = None,
                known: bool = False, accept_changing: bool = False) -> Outcome:
        """What happened to `path` since it was last recorded (`prev`, looked up unless known);
        an event that needs a diff is left `pending`.

        With `baseline_before_ns`, a file last modified before that time is recorded silently
        (a root's first scan); one modified after it changed while being watched: an event.
        A file that changes while it is read is not recorded half-written: `retry` is set
        (unless `accept_changing`: it kept changing, so it is taken as read).
        """
        if not known:
            prev = self.store.file_state(str(path))
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):  # symlinks are not followed; a dir is not a file
                return self._deleted(path, root, prev)
            if trust_stat and prev and (prev.size, prev.mtime_ns) == (st.st_size, st.st_mtime_ns):
                return NOTHING
            baseline = baseline_before_ns is not None and st.st_mtime_ns < baseline_before_ns
            if self.is_log(path):
                return self._log(path, root, prev, st, baseline)
            return self._file(path, root, prev, st, baseline, accept_changing)
        except FileNotFoundError:  # gone, perhaps between stat and read
            if prev and self.is_log(path):
                # a log renamed away by rotation: keep its offset, so the rest of the old file
                # is read (found by its inode) once the new file appears
                return NOTHING
            return self._deleted(path, root, prev)
        except (PermissionError, IsADirectoryError) as exc:
            logger.warning("cannot read file, skipping it", extra={"path": str(path), "error": str(exc)})
            return NOTHING

    def merge_move(self, gone: NewEvent, came: NewEvent) -> NewEvent:
        """One `moved` event from the delete of the old path and the create of the new one."""
        old, new = Path(gone.path), Path(came.path)
        old_blob = self.shadow.path(gone.old_sha) if self.shadow.has(gone.old_sha) else None
        new_blob = self.shadow.path(came.new_sha) if self.shadow.has(came.new_sha) else None
        meta = {"old_path": gone.path}
        diff = None
        if gone.old_sha != came.new_sha and old_blob and new_blob:
            result = unified_diff(old_blob, new_blob, _label(new, Path(came.root)), self.watch.max_diff_bytes)
            diff, meta = result.text, {**meta, **result.meta()}
        elif gone.old_sha == came.new_sha:
            meta["same_content"] = True
        else:
            meta["metadata_only"] = True
        header = f"moved {_shown(old, Path(gone.root))} -> {_shown(new, Path(came.root))}"
        return self._event("moved", new, Path(came.root), came.state, _state_of(gone), diff, meta,
                           old_path=gone.path, header=header)

    def _file(self, path, root, prev, st, baseline: bool, accept_changing: bool = False) -> Outcome:
        if st.st_size > self.watch.max_file_bytes:
            return self._metadata_only(path, root, prev, st, None, baseline, "too_large")
        data, changed = _read_checked(path, st, self.watch.max_file_bytes)
        if changed and not accept_changing:  # still being written: check again once it is quiet
            return RETRY
        if data is None:
            return self._metadata_only(path, root, prev, st, None, baseline, "too_large")
        sha = sha256_bytes(data)
        state = FileState(str(path), str(root), sha, len(data), st.st_mtime_ns, st.st_ino)
        if prev and prev.sha == sha:
            return Outcome(state=state) if _stat_of(prev) != _stat_of(state) else NOTHING
        if is_binary(data):
            return self._metadata_only(path, root, prev, st, sha, baseline, "binary")
        self.shadow.put(self.shadow_copy(data), sha)
        if baseline:
            return Outcome(state=state)
        old = self.shadow.path(prev.sha) if prev and self.shadow.has(prev.sha) else None
        flags = {"invalid_utf8": True} if decode_text(data)[1] else {}
        if prev and old is None:
            flags["previous_unknown"] = True
        change = "modified" if prev else "created"
        return Outcome(pending=PendingDiff(
            DiffJob(old, self.shadow.path(sha), _label(path, root)),
            lambda diff: self._event(change, path, root, state, prev, diff.text, {**diff.meta(), **flags})))

    def shadow_copy(self, data: bytes) -> bytes:
        """What the shadow keeps of a text file: its content with secrets redacted, so that no
        copy under the home holds one (diffs are made between redacted versions)."""
        if is_binary(data):
            return data
        text, found = self.redactor.redact(decode_text(data)[0])
        return text.encode("utf-8") if found else data

    def _deleted(self, path, root, prev: FileState | None) -> Outcome:
        if prev is None:
            return NOTHING
        old = self.shadow.path(prev.sha) if self.shadow.has(prev.sha) else None
        if old is None:
            return Outcome((self._event("deleted", path, root, None, prev, None, {"metadata_only": True}),))
        return Outcome(pending=PendingDiff(
            DiffJob(old, None, _label(path, root)),
            lambda diff: self._event("deleted", path, root, None, prev, diff.text, diff.meta())))

    def _metadata_only(self, path, root, prev, st, sha, baseline: bool, reason: str) -> Outcome:
        state = FileState(str(path), str(root), sha, st.st_size, st.st_mtime_ns, st.st_ino)
        if prev and (prev.sha, prev.size, prev.mtime_ns) == (sha, st.st_size, st.st_mtime_ns):
            return NOTHING
        if baseline:
            return Outcome(state=state)
        change = "modified" if prev else "created"
        return Outcome((self._event(change, path, root, state, prev, None, {reason: True, "metadata_only": True}),))

    def _log(self, path, root, prev, st, baseline: bool) -> Outcome:
        """Appended text since the saved offset (across rotation); failures become events."""
        rest, rotated = b"", False
        if prev and prev.inode and (prev.inode != st.st_ino or st.st_size < prev.size):
            rotated = True  # renamed away (new inode) or truncated in place (copytruncate)
            rest = self._rotated_rest(path, prev, renamed=prev.inode != st.st_ino)
        start = 0 if rotated or not prev else prev.size
        if not prev and baseline:
            start = st.st_size  # an old log seen for the first time: follow it from its end
        chunk = log_tail.read_range(path, start, min(st.st_size - start, self.watch.max_file_bytes))
        consumed = chunk[:chunk.rfind(b"\n") + 1]  # a partial last line waits for its end
        head = log_tail.head_signature(log_tail.read_head(path)) if st.st_size else None
        state = FileState(str(path), str(root), None, start + len(consumed), st.st_mtime_ns, st.st_ino, head)
        text, _ = self.redactor.redact(decode_text(rest + consumed)[0])  # titles and signatures too
        failures = log_tail.group_failures(text)
        if not failures:
            return Outcome(state=state) if state != prev else NOTHING
        base = {"offset": start, "bytes": len(consumed), "rotated": rotated}
        return Outcome(tuple(self._failure_event(path, root, state, prev, f, base) for f in failures))

    def _rotated_rest(self, path: Path, prev: FileState, renamed: bool) -> bytes:
        """What the rotated-away file got after our offset (lines written just before rotation)."""
        sibling = log_tail.rotated_sibling(path, prev.inode if renamed else 0, prev.head, prev.size)
        if sibling is None:
            logger.warning("log rotated and its old file was not found; lines written just before "
                           "the rotation may be missed", extra={"path": str(path)})
            return b""
        size = sibling.stat().st_size
        logger.info("log rotated, reading the rest of the old file",
                    extra={"path": str(path), "rotated_to": str(sibling), "bytes": size - prev.size})
        return log_tail.read_range(sibling, prev.size, min(size - prev.size, self.watch.max_file_bytes))

    def _failure_event(self, path, root, state, prev, failure: log_tail.Failure, base: dict) -> NewEvent:
        meta = {**base, "title": failure.title, "file": failure.file, "line": failure.line,
                "signature": failure.signature}
        event = self._event("log", path, root, state, prev, failure.text, meta, memory_kind="failure",
                            header=f"failure in {_shown(path, root)}: {failure.title}")
        return dataclasses.replace(event, signature=failure.signature, title=failure.title)

    def _event(self, change: str, path: Path, root: Path, state: FileState | None,
               prev: FileState | None, diff_text: str | None, meta: dict,
               memory_kind: str = "code_diff", old_path: str | None = None,
               header: str | None = None) -> NewEvent:
        label = _shown(path, root)
        size = state.size if state else (prev.size if prev else None)
        diff_text, _ = self.redactor.redact(diff_text)  # what the shadow or log reading left
        found = count_markers(diff_text)
        if found:
            meta = {**meta, "redacted": found}
            logger.info("secrets redacted from a change", extra={"path": str(path), "kinds": found})
        new_sha = state.sha if state else None
        if self.store.is_own_write(str(path), new_sha):
            meta = {**meta, "by_gremlin": True}
        header = header or f"{change} {label}"
        text = f"{header}\n{diff_text}"[:self.memory_chars] if diff_text else f"{header} ({_describe(meta, size)})"
        return NewEvent(
            kind=change, path=str(path), root=str(root), time=utc_now(), state=state,
            old_sha=prev.sha if prev else None, new_sha=new_sha, size=size, diff=diff_text, meta=meta,
            memory_kind=memory_kind, memory_text=text, old_path=old_path,
            memory_meta={"path": str(path), "label": label, "change": change,
                         **{k: v for k, v in meta.items() if k != "hunks"}})


def _stat_of(state: FileState) -> tuple:
    return state.size, state.mtime_ns, state.inode


def _state_of(event: NewEvent) -> FileState | None:
    """The state a deleted file had (for the old side of a move)."""
    if event.old_sha is None and event.size is None:
        return None
    return FileState(event.path, event.root, event.old_sha, event.size or 0, 0)


def _label(path: Path, root: Path) -> str:
    """The path named in diffs and memories: relative to the root's parent (keeps its name)."""
    try:
        return str(path.relative_to(root.parent))
    except ValueError:
        return str(path)


def _shown(path: Path, root: Path) -> str:
    """The label as people see it: one line, undecodable bytes escaped."""
    return display_path(_label(path, root))


def _describe(meta: dict, size: int | None) -> str:
    if meta.get("same_content"):
        return "content unchanged"
    kind = "binary" if meta.get("binary") else "over the size limit" if meta.get("too_large") else "no diff"
    return f"{kind}, {size} bytes" if size is not None else kind


def _read_checked(path: Path, before: os.stat_result, limit: int) -> tuple[bytes | None, bool]:
    """The file's bytes (None when over `limit`), and whether it changed while being read."""
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
        after = os.fstat(handle.fileno())
    changed = (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino)
    return (None if len(data) > limit else data), changed
