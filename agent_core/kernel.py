"""Safe mutation: check a unified diff, snapshot, apply, verify, keep it or roll back.

`Kernel.check` plans a patch without touching anything and refuses (PatchRefused, naming
the file and the reason) an empty, oversized, unparsable or binary patch, renames, absolute
paths, `..` components, symbolic links (a patched path may not be a link, and no folder on
its way may lead outside the root), files the watcher does not watch (`.git/`, excluded
patterns, Gremlin's own state) and hunks that do not apply exactly. A hunk may sit some
lines away from where its header says, as `patch` allows, but every context and removed
line must match the file byte for byte (no fuzz); a new file must not exist and a deleted
file must hold exactly the removed lines.

Paths in the patch are relative; `a/` and `b/` prefixes are stripped when the patch has
them (git style). They are resolved against a watched root: each ordinary root is tried
in the configured order and the first under which every file of the patch applies is
taken (or the one given as `root=`).

`Kernel.apply` then snapshots the touched files (a partial snapshot), writes the changes
atomically (file modes kept, new and deleted files, "\\ No newline at end of file"),
announced as Gremlin's own writes, and runs the verify command (`[mutation] verify`, or
the per-call one; an empty one skips verification) in the root through the shell
executor. A failing verify, or anything that goes wrong while writing or verifying, rolls
the files back from the snapshot and checks that each is byte-identical to before.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import unidiff
from unidiff.constants import DEV_NULL, LINE_TYPE_ADDED, LINE_TYPE_CONTEXT, LINE_TYPE_NO_NEWLINE, LINE_TYPE_REMOVED

from agent_core.snapshot import GIT_EXEC, GIT_FILE, SnapshotInfo, Snapshots, permission_for, remove_empty_parents
from config.errors import GremlinError
from memory.atomic import fsync_dir, write_bytes_atomically
from memory.paths import display_path
from memory.store import DELETED_SHA
from self_mutation_watcher.diff_engine import is_binary, sha256_bytes
from tools.shell_executor import ShellResult, run_command

logger = logging.getLogger(__name__)
audit = logging.getLogger("gremlin.audit")

BINARY_MARKER = re.compile(r"^(GIT binary patch|Binary files? .* (differ|has changed))$", re.MULTILINE)
SUPPORTED_MODES = (f"{GIT_FILE:o}", f"{GIT_EXEC:o}")
_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}


class PatchRefused(GremlinError):
    """A patch was not applied, and nothing was touched: the message names the file and why."""


class MutationFailed(GremlinError):
    """Writing a patch broke off (disk full, permissions); the files were rolled back."""


@dataclass(frozen=True)
class FileChange:
    """One file a patch changes: its real path, root, action and contents before and after."""

    path: Path
    root: Path
    rel: str
    action: str  # create | modify | delete
    old: bytes | None = field(default=None, repr=False)
    new: bytes | None = field(default=None, repr=False)
    mode: int | None = None  # permission bits after the change (None for a delete)

    def to_dict(self) -> dict:
        """A JSON-ready description (content as sha256s)."""
        return {"path": display_path(self.path), "action": self.action,
                "old_sha": sha256_bytes(self.old) if self.old is not None else None,
                "new_sha": sha256_bytes(self.new) if self.new is not None else None,
                "mode": f"{self.mode:o}" if self.mode is not None else None}


@dataclass(frozen=True)
class MutationResult:
    """What `Kernel.apply` did: kept or rolled back, why, and the evidence."""

    kept: bool
    reason: str
    files: tuple[str, ...]
    root: str
    snapshot: str
    verify: dict | None
    restored_identical: bool | None
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"kept": self.kept, "reason": self.reason, "files": [display_path(f) for f in self.files],
                "root": self.root, "snapshot": self.snapshot, "verify": self.verify,
                "restored_identical": self.restored_identical, "seconds": self.seconds}


@dataclass(frozen=True)
class _Hunk:
    """A hunk as bytes: where it starts in the old file and its old and new lines."""

    start: int
    length: int
    old: tuple[bytes, ...]
    new: tuple[bytes, ...]
    header: str


@dataclass(frozen=True)
class _FilePatch:
    """One file of a parsed patch, before it is placed under a root."""

    rel: str
    action: str
    hunks: tuple[_Hunk, ...]
    exec_bit: bool | None  # set or cleared by the patch (git mode lines), None when it says nothing


class Kernel:
    """Applies patches to the watched roots: snapshot, apply, verify, keep or roll back."""

    def __init__(self, settings, store, snapshots: Snapshots | None = None):
        self.settings = settings
        self.store = store
        self.snapshots = snapshots or Snapshots(settings, store)
        self.filter = self.snapshots.filter
        self.roots = self.snapshots.roots
        self._lock = threading.Lock()  # one mutation at a time: two would snapshot each other's writes

    def check(self, patch_text: str, root: Path | None = None) -> list[FileChange]:
        """The file changes the patch would make; raises PatchRefused, touching nothing."""
        files = parse_patch(patch_text, self.settings.mutation.max_patch_bytes)
        candidates = [Path(root)] if root is not None else list(self.roots)
        if root is not None and Path(root) not in self.roots:
            raise PatchRefused(f"{display_path(root)} is not a watched root; choose one of "
                               f"{', '.join(map(str, self.roots)) or '(none configured)'}")
        if not candidates:
            raise PatchRefused(f"no watched roots to patch; add one to [watch] roots in {self.settings.config_file}")
        errors = []
        for candidate in candidates:
            try:
                return [self._plan_file(fp, candidate) for fp in files]
            except PatchRefused as exc:
                errors.append((candidate, exc))
        if len(errors) == 1:
            raise errors[0][1]
        raise PatchRefused("the patch applies under no watched root: "
                           + "; ".join(f"under {display_path(r)}: {e}" for r, e in errors))

    def apply(self, patch_text: str, verify: Sequence[str] | None = None,
              stop: threading.Event | None = None, root: Path | None = None) -> MutationResult:
        """Snapshot, apply, verify; keep the change if verify passes (or there is none), else
        restore the files byte for byte. Refusals raise PatchRefused before anything is touched."""
        started = time.monotonic()
        if isinstance(verify, (str, bytes)):
            raise PatchRefused(f"verify must be a list of arguments, e.g. [\"pytest\", \"-q\"] (got {verify!r})")
        with self._lock:
            changes = self.check(patch_text, root)
            where = changes[0].root
            snap = self.snapshots.create(f"before patch of {_names(changes)}", paths=[c.path for c in changes])
            self._recheck(changes)
            self._write_or_roll_back(changes, snap)
            command = tuple(self.settings.mutation.verify if verify is None else verify)
            if not command:
                return self._kept(changes, snap, None, started)
            try:
                ran = self._verify(command, where, stop)
            except GremlinError as exc:  # the verify command was refused (allowlist, folder)
                return self._rolled_back(changes, snap, f"verify could not run: {exc}", None, started)
            except BaseException:
                self._roll_back(changes, snap)
                raise
            if ran.ok:
                return self._kept(changes, snap, ran, started)
            return self._rolled_back(changes, snap, _failure(ran), ran, started)

    # -- planning ----------------------------------------------------------------------

    def _plan_file(self, fp: _FilePatch, root: Path) -> FileChange:
        """Place one file of the patch under `root` and compute its new content."""
        path = self._confine(fp.rel, root)
        if fp.action == "create":
            return self._plan_create(fp, path, root)
        data, current = _read_target(path, fp.rel)
        if fp.action == "delete":
            expected = b"".join(line for h in fp.hunks for line in h.old)
            if data != expected:
                raise PatchRefused(f"{fp.rel}: the patch deletes it, but its content differs from the "
                                   "patch's removed lines")
            return FileChange(path, root, fp.rel, "delete", data, None, None)
        new = apply_hunks(data, fp.hunks, fp.rel)
        mode = current if fp.exec_bit is None else permission_for(GIT_EXEC if fp.exec_bit else GIT_FILE, current)
        return FileChange(path, root, fp.rel, "modify", data, new, mode)

    def _plan_create(self, fp: _FilePatch, path: Path, root: Path) -> FileChange:
        if os.path.lexists(path):
            raise PatchRefused(f"{fp.rel}: the patch creates it, but it already exists under {display_path(root)}")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise PatchRefused(f"{fp.rel}: {display_path(folder)} is a file, so the new file cannot go there")
        content = b"".join(line for h in fp.hunks for line in h.new)
        mode = permission_for(GIT_EXEC if fp.exec_bit else GIT_FILE, None)
        return FileChange(path, root, fp.rel, "create", None, content, mode)

    def _confine(self, rel: str, root: Path) -> Path:
        """The real path of `rel` under `root`; refused when it leaves the root or is not watched."""
        target = root / rel
        if target.is_symlink():
            raise PatchRefused(f"{rel}: is a symbolic link under {display_path(root)}; patches change "
                               "regular files only (patch the file it points to)")
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(target.parent)) / target.name
        if real_root not in real.parents:
            raise PatchRefused(f"{rel}: resolves to {display_path(real)}, outside the watched root "
                               f"{display_path(root)} (a symbolic link on the way)")
        path = root / real.relative_to(real_root)
        if not self.filter.accepts(path, root):
            raise PatchRefused(f"{rel}: not a watched file under {display_path(root)} (excluded by [watch] "
                               "include/exclude, or Gremlin's own state); the kernel patches watched files only")
        return path

    def _recheck(self, changes: list[FileChange]) -> None:
        """Refuse when a file changed between planning and the snapshot (nothing written yet)."""
        for change in changes:
            now = _current_bytes(change.path)
            if now != change.old:
                raise PatchRefused(f"{change.rel}: changed while the patch was being prepared; try again")

    # -- writing, verifying, rolling back ------------------------------------------------

    def _write_or_roll_back(self, changes: list[FileChange], snap: SnapshotInfo) -> None:
        """Write every change; if one fails, restore them all and raise (never half-patched)."""
        try:
            self._write_all(changes)
        except (OSError, GremlinError) as exc:
            identical = self._roll_back(changes, snap)
            raise MutationFailed(f"writing the patch failed ({exc}); the files were restored from snapshot "
                                 f"{snap.id[:12]} (byte-identical: {identical})") from exc
        except BaseException:
            self._roll_back(changes, snap)
            raise

    def _write_all(self, changes: list[FileChange]) -> None:
        for change in changes:
            if change.action == "delete":
                self._announce(change.path, DELETED_SHA)
                change.path.unlink()
                fsync_dir(change.path.parent)
                remove_empty_parents(change.path.parent, change.root)
            else:
                self._announce(change.path, sha256_bytes(change.new))
                change.path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomically(change.path, change.new, change.mode)

    def _announce(self, path: Path, sha: str) -> None:
        """Tell the watcher this write is Gremlin's own (tagged by_gremlin, never learnt from)."""
        if self.store is not None:
            self.store.expect_own_write(str(path), sha)

    def _verify(self, command: tuple[str, ...], root: Path, stop: threading.Event | None) -> ShellResult:
        logger.info("verifying a patch", extra={"argv": list(command), "cwd": str(root)})
        return run_command(list(command), self.settings, cwd=str(root),
                           timeout_s=self.settings.mutation.verify_timeout_s, stop=stop)

    def _roll_back(self, changes: list[FileChange], snap: SnapshotInfo) -> bool:
        """Restore the snapshot; True when every touched file is byte-identical to before."""
        try:
            self.snapshots.restore(snap.id)
        except GremlinError as exc:
            logger.error("rollback of a patch failed; restore the snapshot by hand",
                         extra={"snapshot": snap.id, "error": str(exc)})
            raise MutationFailed(f"rolling back the patch failed ({exc}); restore snapshot {snap.id[:12]} "
                                 f"with: gremlin snapshot restore {snap.id[:12]}") from exc
        identical = all(_sha_now(c.path) == (sha256_bytes(c.old) if c.old is not None else None) for c in changes)
        if not identical:
            logger.error("files differ from before the patch after rollback", extra={"snapshot": snap.id})
        return identical

    def _kept(self, changes: list[FileChange], snap: SnapshotInfo, ran: ShellResult | None,
              started: float) -> MutationResult:
        reason = "verify passed" if ran else "kept without verification: no verify command is configured"
        result = MutationResult(True, reason, tuple(str(c.path) for c in changes), str(changes[0].root),
                                snap.id, ran.to_dict() if ran else None, None, _since(started))
        audit.info("patch kept", extra={"snapshot": snap.id, "files": len(changes), "reason": reason})
        return result

    def _rolled_back(self, changes: list[FileChange], snap: SnapshotInfo, reason: str,
                     ran: ShellResult | None, started: float) -> MutationResult:
        identical = self._roll_back(changes, snap)
        result = MutationResult(False, reason, tuple(str(c.path) for c in changes), str(changes[0].root),
                                snap.id, ran.to_dict() if ran else None, identical, _since(started))
        audit.info("patch rolled back", extra={"snapshot": snap.id, "files": len(changes), "reason": reason,
                                               "restored_identical": identical})
        return result


# -- parsing (pure) ----------------------------------------------------------------------

def parse_patch(patch_text: str, max_bytes: int) -> list[_FilePatch]:
    """The files of a unified diff, checked for everything that does not depend on a root."""
    if not isinstance(patch_text, str) or not patch_text.strip():
        raise PatchRefused("the patch is empty; give a unified diff")
    size = len(patch_text.encode("utf-8", "surrogateescape"))
    if size > max_bytes:
        raise PatchRefused(f"the patch is {size} bytes, over [mutation] max_patch_bytes ({max_bytes})")
    try:
        patch = unidiff.PatchSet(patch_text)
    except unidiff.UnidiffParseError as exc:
        if BINARY_MARKER.search(patch_text):
            raise PatchRefused(f"binary patches are not supported ({exc})") from exc
        raise PatchRefused(f"the patch is not a valid unified diff: {exc}") from exc
    if not len(patch):
        raise PatchRefused("the patch names no file (is it a unified diff?)")
    files = [_file_patch(pf) for pf in patch]
    seen = set()
    for fp in files:
        if fp.rel in seen:
            raise PatchRefused(f"{fp.rel}: appears twice in the patch; give one diff per file")
        seen.add(fp.rel)
    if BINARY_MARKER.search(patch_text):
        raise PatchRefused("binary patches are not supported (the patch has a binary part)")
    return files


def _file_patch(pf: unidiff.PatchedFile) -> _FilePatch:
    source, target = _unquote(pf.source_file or ""), _unquote(pf.target_file or "")
    created, deleted = source == DEV_NULL, target == DEV_NULL
    if pf.is_binary_file:
        raise PatchRefused(f"{_strip(_strip(target if created else source, 'a/'), 'b/')}: binary patches "
                           "are not supported")
    if created and deleted:
        raise PatchRefused("the patch has a file that is both created and deleted")
    git_style = (created or source.startswith("a/")) and (deleted or target.startswith("b/"))
    old_rel = _strip(source, "a/") if git_style else source
    new_rel = _strip(target, "b/") if git_style else target
    rel = check_relative(new_rel if created else old_rel)
    if not (created or deleted) and old_rel != new_rel:
        raise PatchRefused(f"{rel}: renames and copies are not supported (it would become {new_rel})")
    for mode in (pf.source_mode, pf.target_mode):
        if mode is not None and mode not in SUPPORTED_MODES:
            raise PatchRefused(f"{rel}: git mode {mode} (symbolic link or submodule) is not supported")
    hunks = tuple(_hunk(h, rel) for h in pf)
    if created and any(h.old for h in hunks):
        raise PatchRefused(f"{rel}: the patch creates it but has old lines")
    exec_bit = _exec_bit(pf, created)
    if not hunks and not created and not deleted and exec_bit is None:
        raise PatchRefused(f"{rel}: the patch has no hunks for it")
    return _FilePatch(rel, "create" if created else "delete" if deleted else "modify", hunks, exec_bit)


def _exec_bit(pf: unidiff.PatchedFile, created: bool) -> bool | None:
    """The executable bit the patch asks for: a new file's mode, or an `old mode/new mode` pair."""
    if created:
        return pf.target_mode == f"{GIT_EXEC:o}"
    if pf.source_mode and pf.target_mode and pf.source_mode != pf.target_mode:
        return pf.target_mode == f"{GIT_EXEC:o}"
    return None


def check_relative(rel: str) -> str:
    """`rel` as a clean relative path; absolute paths and `..` are refused."""
    if not rel or "\0" in rel:
        raise PatchRefused(f"{rel!r}: not a usable file name")
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise PatchRefused(f"{rel}: absolute paths are refused; a patch names files relative to a watched root")
    if ".." in pure.parts:
        raise PatchRefused(f"{rel}: '..' components are refused; a patch may not leave its root")
    parts = [p for p in pure.parts if p != "."]
    if not parts:
        raise PatchRefused(f"{rel!r}: names no file")
    return "/".join(parts)


def _strip(name: str, prefix: str = "") -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _unquote(name: str) -> str:
    """A file name from a diff header: C-quoted names (as git writes them) decoded to the
    exact bytes, handed over as surrogate escapes."""
    if len(name) < 2 or not (name.startswith('"') and name.endswith('"')):
        return name
    out, body, i = bytearray(), name[1:-1], 0
    while i < len(body):
        char = body[i]
        if char != "\\" or i + 1 == len(body):
            out += char.encode("utf-8", "surrogateescape")
            i += 1
        elif body[i + 1] in "01234567":
            out.append(int(body[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(_ESCAPES.get(body[i + 1], ord(body[i + 1])))
            i += 2
    return os.fsdecode(bytes(out))


def _hunk(hunk: unidiff.Hunk, rel: str) -> _Hunk:
    """A hunk's old and new lines as exact bytes ("\\ No newline" strips the line ending)."""
    old, new, last = [], [], None
    for line in hunk:
        kind = line.line_type
        if kind == LINE_TYPE_NO_NEWLINE:
            for side in _sides(last, old, new):
                side[-1] = side[-1][:-1] if side[-1].endswith(b"\n") else side[-1]
            continue
        if kind not in (LINE_TYPE_CONTEXT, LINE_TYPE_REMOVED, LINE_TYPE_ADDED):
            continue  # blank lines unidiff keeps after a hunk
        data = line.value.encode("utf-8", "surrogateescape")
        data = data if data.endswith(b"\n") else data + b"\n"
        for side in _sides(kind, old, new):
            side.append(data)
        last = kind
    header = f"@@ -{hunk.source_start},{hunk.source_length} +{hunk.target_start},{hunk.target_length} @@"
    return _Hunk(hunk.source_start, hunk.source_length, tuple(old), tuple(new), header)


def _sides(kind: str | None, old: list, new: list) -> list[list]:
    return {LINE_TYPE_CONTEXT: [old, new], LINE_TYPE_REMOVED: [old], LINE_TYPE_ADDED: [new]}.get(kind, [])


# -- applying (pure) ---------------------------------------------------------------------

def split_lines(data: bytes) -> list[bytes]:
    """Lines with their "\\n" kept (the last may lack it); only "\\n" ends a line, as in diff."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def apply_hunks(data: bytes, hunks: Sequence[_Hunk], rel: str) -> bytes:
    """`data` with the hunks applied in order; each may be offset, none fuzzed."""
    lines, out, pos, offset = split_lines(data), [], 0, 0
    for number, hunk in enumerate(hunks, 1):
        expected = (hunk.start - 1 if hunk.old else hunk.start) + offset
        at = locate(lines, hunk.old, expected, pos)
        if at is None:
            raise PatchRefused(f"{rel}: hunk {number} ({hunk.header}) does not apply: its context and removed "
                               "lines are not in the file as they are (no fuzz is allowed)")
        out += lines[pos:at]
        out += hunk.new
        offset, pos = at - (expected - offset), at + len(hunk.old)
    return b"".join(out + lines[pos:])


def locate(lines: list[bytes], old: Sequence[bytes], expected: int, low: int) -> int | None:
    """Where `old` occurs in `lines` at or after `low`, nearest to `expected` first (as `patch`
    searches); a hunk without old lines applies only exactly where it says."""
    if not old:
        return expected if low <= expected <= len(lines) else None
    count, high = len(old), len(lines) - len(old)
    for distance in range(max(expected - low, high - expected, 0) + 1):
        for at in dict.fromkeys((expected - distance, expected + distance)):
            if low <= at <= high and lines[at] == old[0] and lines[at:at + count] == list(old):
                return at
    return None


# -- small helpers -----------------------------------------------------------------------

def _read_target(path: Path, rel: str) -> tuple[bytes, int]:
    """A patched file's bytes and permission bits; refused when missing, special or binary."""
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise PatchRefused(f"{rel}: is not a regular file")
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PatchRefused(f"{rel}: does not exist (the patch changes it)") from exc
    except OSError as exc:
        raise PatchRefused(f"{rel}: cannot be read ({exc.strerror or exc})") from exc
    if is_binary(data):
        raise PatchRefused(f"{rel}: is a binary file; binary files are not patched")
    return data, st.st_mode & 0o7777


def _current_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if stat.S_ISREG(path.lstat().st_mode) else b""
    except FileNotFoundError:
        return None


def _sha_now(path: Path) -> str | None:
    data = _current_bytes(path)
    return sha256_bytes(data) if data is not None else None


def _failure(ran: ShellResult) -> str:
    why = "timed out" if ran.timed_out else "was cancelled" if ran.cancelled else f"exited with code {ran.exit_code}"
    return f"verify failed: {' '.join(ran.argv)} {why}; the patch was rolled back"


def _names(changes: list[FileChange]) -> str:
    names = ", ".join(display_path(c.rel) for c in changes[:3])
    return names + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
