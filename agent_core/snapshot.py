"""Snapshots of the watched files and the current-model pointer, kept in a private git store.

The store is a bare git repository at `settings.snapshot_dir` (mode 0700), written with
dulwich: file contents are blobs, folders are trees, a snapshot is a commit, so content
that did not change between snapshots is stored once. One ref, `refs/gremlin/snapshots`,
points at the newest snapshot; its first-parent chain is the snapshot list, newest first.
A commit's tree has one subtree per watched root, named by the root's index in the header's
`roots` list ("0", "1", ...), holding the files' exact bytes and git modes (100644, or
100755 for an executable file); names are raw bytes, so any Linux file name survives.
The commit message is a JSON header: message, time, roots, files, bytes, model (the
content of `run/checkpoints/current_model.json` or null), partial, absent, skipped.

A full snapshot holds every regular file under the ordinary roots that the watcher's
PathFilter accepts, except log files (append-only history: rolling them back would drop
lines their writers still append) and files larger than 16 x `[watch] max_file_bytes`
(logged and listed in `skipped`; a restore leaves them alone). Symbolic links are not
followed and not stored. A partial snapshot (`paths=`) holds just the named files and lists
those that did not exist as `absent`; the kernel takes one before it patches.

Permission bits beyond git's executable bit (0640, 0775, ...) are kept in the header's
`perms`, so a restore gives every file its exact bytes and mode back.

Restoring writes back only what differs, atomically and announced as Gremlin's own writes
(so the watcher tags them `by_gremlin` and training ignores them), after taking a snapshot
of the present state: restoring that one undoes the restore. The model pointer is recorded
for reference and never switched by a restore (`gremlin models` rolls models back).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from dulwich.errors import NotGitRepository
from dulwich.objects import Blob, Commit, Tree
from dulwich.repo import Repo

from config.errors import GremlinError
from memory.atomic import fsync_dir, write_bytes_atomically
from memory.paths import display_path
from memory.store import DELETED_SHA, utc_now
from memory.vector_store.embedder import current_model_file
from self_mutation_watcher.diff_engine import is_binary, sha256_bytes, unified_diff
from self_mutation_watcher.watcher import PathFilter

logger = logging.getLogger(__name__)
audit = logging.getLogger("gremlin.audit")

REF = b"refs/gremlin/snapshots"
HEADER_VERSION = 1
SIZE_FACTOR = 16  # a snapshot keeps files up to this many times [watch] max_file_bytes
MIN_PREFIX = 4
GIT_FILE, GIT_EXEC = 0o100644, 0o100755
NEW_FILE_MODE, NEW_EXEC_MODE = 0o644, 0o755
IDENTITY = b"Gremlin <gremlin@localhost>"
CAS_ATTEMPTS = 20  # another process moving the ref at the same moment: rebuild the commit and retry
_HEX = re.compile(r"[0-9a-f]+")


class SnapshotError(GremlinError):
    """A snapshot cannot be taken, found or restored."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as listed: its commit id and header."""

    id: str
    time: str
    message: str
    files: int
    bytes: int
    model: dict | None
    partial: bool
    roots: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-ready dict (paths with undecodable bytes escaped)."""
        return {"id": self.id, "time": self.time, "message": self.message, "files": self.files,
                "bytes": self.bytes, "model": self.model, "partial": self.partial,
                "roots": list(self.roots), "absent": [display_path(p) for p in self.absent],
                "skipped": [display_path(p) for p in self.skipped]}


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did; `undo` is the snapshot of the state just before it."""

    snapshot: str
    undo: str
    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    unchanged: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict (paths with undecodable bytes escaped)."""
        return {"snapshot": self.snapshot, "undo": self.undo, "unchanged": self.unchanged,
                "written": [display_path(p) for p in self.written],
                "deleted": [display_path(p) for p in self.deleted]}


class SnapFile(NamedTuple):
    """One file of a snapshot: where it goes, its git mode, blob id and exact permission bits."""

    path: Path
    root: Path
    rel: bytes
    mode: int
    blob: bytes
    perm: int


@dataclass
class _Scan:
    """What a scan found: tree entries (b"<root index>/<rel>" -> (mode, blob id)) and totals."""

    entries: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    size: int = 0
    absent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    perms: dict[str, str] = field(default_factory=dict)  # path -> octal bits, where git's mode says too little


def remove_empty_parents(folder: Path, root: Path) -> None:
    """Remove `folder` and its parents while they are empty, stopping below `root`
    (a deleted file's folder goes with it, as with git)."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or not ours to remove): stop here
            return
        fsync_dir(folder.parent)
        folder = folder.parent


def git_mode(st_mode: int) -> int:
    """The git mode of a regular file: executable when its owner may execute it."""
    return GIT_EXEC if st_mode & stat.S_IXUSR else GIT_FILE


def default_permission(git: int) -> int:
    """The permission bits git's mode stands for (644 or 755)."""
    return NEW_EXEC_MODE if git == GIT_EXEC else NEW_FILE_MODE


def permission_for(git: int, current: int | None) -> int:
    """Permission bits that give a file the git mode's executable bit and keep the rest of
    `current` (the file's bits now, None for a new file)."""
    if current is None:
        return default_permission(git)
    if git == GIT_EXEC:
        return current | ((current & 0o444) >> 2)  # x wherever r is, as chmod +x does
    return current & ~0o111


def inside(path: Path, root: Path) -> bool:
    """Whether `path` lies strictly below `root` (lexically)."""
    return root in path.parents


def resolves_inside(path: Path, root: Path) -> bool:
    """Whether the entry `path` lies below the real `root` once every symbolic link in its
    folders is resolved (the entry itself is not followed: a write replaces it)."""
    real = Path(os.path.realpath(path.parent)) / path.name
    return inside(real, Path(os.path.realpath(root)))


class Snapshots:
    """Take, list, compare and restore snapshots of the watched roots."""

    def __init__(self, settings, store=None):
        self.settings = settings
        self.store = store
        self.filter = PathFilter(settings, settings.watch_roots)
        self.roots = tuple(r for r in self.filter.roots if r not in self.filter.file_roots)
        self.max_bytes = settings.watch.max_file_bytes * SIZE_FACTOR
        self.path = Path(settings.snapshot_dir)
        self._lock = threading.RLock()
        self._repo: Repo | None = None

    # -- public ------------------------------------------------------------------------

    def create(self, message: str = "", paths: Sequence[Path] | None = None,
               now: datetime | None = None) -> SnapshotInfo:
        """Snapshot every watched file (paths=None) or just `paths` (absent ones recorded)."""
        with self._lock:
            repo = self._open(create=True)
            scan = self._scan_roots(repo) if paths is None else self._scan_paths(repo, paths)
            tree = _write_tree(repo, scan.entries)
            header = self._header(message, scan, paths is not None, now)
            commit_id = self._commit(repo, tree, header, now)
        info = _info(commit_id, header)
        audit.info("snapshot taken", extra={"snapshot": info.id, "files": info.files, "partial": info.partial,
                                            "skipped": len(info.skipped)})
        return info

    def list(self, limit: int = 50) -> list[SnapshotInfo]:
        """The newest `limit` snapshots, newest first."""
        repo = self._open(create=False)
        if repo is None:
            return []
        out = []
        for commit in self._chain(repo):
            if len(out) >= limit:
                break
            out.append(_info(commit.id, _header_of(commit)))
        return out

    def get(self, ref: str) -> SnapshotInfo:
        """The snapshot with this full id or unique prefix (at least 4 hex digits)."""
        commit = self._find(ref)
        return _info(commit.id, _header_of(commit))

    def files(self, ref: str) -> dict[Path, SnapFile]:
        """The files a snapshot holds, by the path they are restored to."""
        commit = self._find(ref)
        return self._files_of(commit, _header_of(commit))

    def diff(self, a: str, b: str) -> list[dict]:
        """What changed from snapshot `a` to `b`: path, change, unified diff (None for binary)."""
        old, new = self.files(a), self.files(b)
        out = []
        for path in sorted(set(old) | set(new), key=os.fsencode):
            was, now = old.get(path), new.get(path)
            if was and now and (was.blob, was.perm) == (now.blob, now.perm):
                continue
            out.append(self._change(path, was, now))
        return out

    def restore(self, ref: str) -> RestoreResult:
        """Snapshot the present state, then make the files what snapshot `ref` holds."""
        with self._lock:
            commit = self._find(ref)
            header = _header_of(commit)
            snap_id = commit.id.decode()
            self._check_roots(snap_id, header)
            files = self._files_of(commit, header)
            deletes = self._deletions(header, files)
            undo = self._undo_snapshot(snap_id, header, files)
            try:
                result = self._apply_restore(snap_id, undo.id, files, deletes)
            except OSError as exc:
                raise SnapshotError(f"restore of snapshot {snap_id[:12]} broke off: {exc}; the files as "
                                    f"they were before it are snapshot {undo.id[:12]}: restore that to "
                                    "go back") from exc
        audit.info("snapshot restored", extra={"snapshot": snap_id, "undo": undo.id,
                                               "written": len(result.written), "deleted": len(result.deleted)})
        return result

    def close(self) -> None:
        """Close the git store (it is opened again on the next call)."""
        with self._lock:
            if self._repo is not None:
                self._repo.close()
                self._repo = None

    # -- the git store -----------------------------------------------------------------

    def _open(self, create: bool) -> Repo | None:
        """The repository; made on first use when `create` (else None while there is none)."""
        if self._repo is not None:
            return self._repo
        if not self.path.exists():
            if not create:
                return None
            self._init_store()
        try:
            self._repo = Repo(str(self.path))
        except NotGitRepository as exc:
            raise SnapshotError(f"{self.path} is not a snapshot store (no git repository there); move it "
                                "away and a new store is made on the next snapshot") from exc
        return self._repo

    def _init_store(self) -> None:
        """Make the bare repository in a private temp folder and rename it into place, so a
        half-made store is never seen and two processes making it at once both end well."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".snapshots-", dir=self.path.parent))  # mode 0700
        try:
            repo = Repo.init_bare(str(tmp))
            config = repo.get_config()
            config.set((b"core",), b"fsyncObjectFiles", True)  # snapshots must survive power loss
            config.write_to_path()
            repo.close()
            os.rename(tmp, self.path)
        except OSError as exc:
            _remove_tree(tmp)
            if not self.path.is_dir():
                raise SnapshotError(f"cannot make the snapshot store at {self.path}: {exc}") from exc
        fsync_dir(self.path.parent)
        logger.info("snapshot store made", extra={"path": str(self.path)})

    def _commit(self, repo: Repo, tree: bytes, header: dict, now: datetime | None) -> bytes:
        """Add a commit for `tree` on top of the ref and move the ref to it (compare-and-swap)."""
        when = int((now or datetime.now(timezone.utc)).timestamp())
        for _ in range(CAS_ATTEMPTS):
            head = _head(repo)
            commit = Commit()
            commit.tree, commit.parents = tree, [head] if head else []
            commit.author = commit.committer = IDENTITY
            commit.author_time = commit.commit_time = when
            commit.author_timezone = commit.commit_timezone = 0
            commit.message = json.dumps(header, sort_keys=True).encode("ascii") + b"\n"
            repo.object_store.add_object(commit)
            moved = (repo.refs.set_if_equals(REF, head, commit.id) if head
                     else repo.refs.add_if_new(REF, commit.id))
            if moved:
                return commit.id
        raise SnapshotError(f"the snapshot list in {self.path} kept changing under this process; try again")

    def _chain(self, repo: Repo) -> Iterator[Commit]:
        """Every snapshot, newest first."""
        sha = _head(repo)
        while sha:
            commit = repo[sha]
            yield commit
            sha = commit.parents[0] if commit.parents else None

    def _find(self, ref: str) -> Commit:
        """The snapshot commit named by a full id or a unique prefix."""
        want = (ref or "").strip().lower()
        if len(want) < MIN_PREFIX or not _HEX.fullmatch(want):
            raise SnapshotError(f"{ref!r} is not a snapshot id; give at least {MIN_PREFIX} hex digits of "
                                "one (see `gremlin snapshot list`)")
        repo = self._open(create=False)
        found = [c for c in self._chain(repo) if c.id.decode().startswith(want)] if repo else []
        if not found:
            raise SnapshotError(f"no snapshot {ref!r}; see `gremlin snapshot list`")
        if len(found) > 1:
            ids = ", ".join(c.id.decode()[:12] for c in found[:5])
            raise SnapshotError(f"snapshot id {ref!r} is ambiguous ({ids}); give more digits")
        return found[0]

    # -- scanning ----------------------------------------------------------------------

    def _header(self, message: str, scan: _Scan, partial: bool, now: datetime | None) -> dict:
        return {"format": HEADER_VERSION, "message": message, "time": utc_now(now),
                "roots": [str(r) for r in self.roots], "files": len(scan.entries), "bytes": scan.size,
                "model": self._model_pointer(), "partial": partial, "absent": sorted(scan.absent),
                "skipped": sorted(scan.skipped), "perms": scan.perms}

    def _model_pointer(self) -> dict | None:
        """The current-model pointer's content, or None when there is none (or it is unreadable)."""
        pointer = current_model_file(self.settings.home)
        try:
            value = json.loads(pointer.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("current model pointer unreadable; snapshot records none",
                           extra={"file": str(pointer), "error": str(exc)})
            return None
        return value if isinstance(value, dict) else None

    def _scan_roots(self, repo: Repo) -> _Scan:
        scan = _Scan()
        for index, root in enumerate(self.roots):
            if not root.is_dir():
                raise SnapshotError(f"watched root {display_path(root)} is not a folder now; a snapshot "
                                    "without it could not be restored safely: create it or remove it from "
                                    f"[watch] roots in {self.settings.config_file}")
            for path in self._walk(root, scan.skipped):
                self._add(repo, scan, index, root, path, partial=False)
        return scan

    def _scan_paths(self, repo: Repo, paths: Sequence[Path]) -> _Scan:
        scan = _Scan()
        for path in dict.fromkeys(Path(os.path.abspath(p)) for p in paths):
            index = self._root_index(path)
            self._add(repo, scan, index, self.roots[index], path, partial=True)
        return scan

    def _root_index(self, path: Path) -> int:
        """The index of the root that holds `path`; SnapshotError when none does (safely)."""
        for index, root in enumerate(self.roots):
            if inside(path, root):
                if not resolves_inside(path, root):
                    raise SnapshotError(f"{display_path(path)} resolves outside the watched root "
                                        f"{display_path(root)} (a symbolic link on the way)")
                return index
        raise SnapshotError(f"{display_path(path)} is not under a watched root; only watched files "
                            "can be snapshotted")

    def _walk(self, root: Path, skipped: list[str]) -> Iterator[Path]:
        """Every watched, non-log file path under `root`, in a stable order."""
        def unreadable(exc: OSError) -> None:
            logger.warning("cannot list a folder; its files are left out of the snapshot",
                           extra={"path": str(exc.filename), "error": str(exc)})
            skipped.append(str(exc.filename))

        for top, dirs, names in os.walk(root, onerror=unreadable):
            here = Path(top)
            dirs[:] = sorted(d for d in dirs if self.filter.accepts_dir(here / d, root))
            for name in sorted(names):
                path = here / name
                if self.filter.accepts(path, root) and not self.filter.is_log(path):
                    yield path

    def _add(self, repo: Repo, scan: _Scan, index: int, root: Path, path: Path, partial: bool) -> None:
        """Store one file's blob and tree entry (or record it as absent or skipped)."""
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                if partial:
                    raise SnapshotError(f"{display_path(path)} is not a regular file; it cannot be snapshotted")
                return  # symlinks and special files are not snapshotted
            if st.st_size > self.max_bytes:
                raise _TooLarge(st.st_size)
            data = path.read_bytes()
        except FileNotFoundError:
            if partial:
                scan.absent.append(str(path))
            return
        except (_TooLarge, OSError) as exc:
            if partial:  # the kernel must not go on without a copy of every file it touches
                raise SnapshotError(f"cannot snapshot {display_path(path)}: {exc}") from exc
            logger.warning("file left out of the snapshot", extra={"path": str(path), "error": str(exc)})
            scan.skipped.append(str(path))
            return
        blob = Blob.from_string(data)
        repo.object_store.add_object(blob)  # already there: not written again
        rel = os.fsencode(path.relative_to(root))
        mode, perm = git_mode(st.st_mode), stat.S_IMODE(st.st_mode)
        scan.entries[str(index).encode() + b"/" + rel] = (mode, blob.id)
        if perm != default_permission(mode):  # git keeps only the executable bit; the header keeps the rest
            scan.perms[str(path)] = f"{perm:o}"
        scan.size += len(data)

    # -- reading a snapshot ------------------------------------------------------------

    def _files_of(self, commit: Commit, header: dict) -> dict[Path, SnapFile]:
        """The snapshot's files by target path; names are checked so none can leave its root."""
        repo = self._open(create=False)
        roots = [Path(r) for r in header["roots"]]
        perms = header.get("perms") or {}
        out: dict[Path, SnapFile] = {}
        for name, mode, sha in repo[commit.tree].iteritems():
            root = roots[_root_number(name, len(roots))]
            for rel, file_mode, blob in _walk_tree(repo, sha, b""):
                path = root / os.fsdecode(rel)
                perm = int(perms[str(path)], 8) & 0o7777 if str(path) in perms else default_permission(file_mode)
                out[path] = SnapFile(path, root, rel, file_mode, blob, perm)
        return out

    def _blob(self, sha: bytes) -> bytes:
        return self._open(create=False)[sha].as_raw_string()

    def _change(self, path: Path, was: SnapFile | None, now: SnapFile | None) -> dict:
        """One entry of `diff`: the change and its unified diff (made by GNU diff)."""
        change = "added" if was is None else "deleted" if now is None else "modified"
        entry = {"path": str(path), "change": change, "diff": None}
        if was and now and was.perm != now.perm:
            entry["mode"] = f"{was.perm:o} -> {now.perm:o}"
        old = self._blob(was.blob) if was else None
        new = self._blob(now.blob) if now else None
        if any(d is not None and is_binary(d) for d in (old, new)):
            return entry
        label = str(path.relative_to((was or now).root.parent))
        with tempfile.TemporaryDirectory(prefix="gremlin-diff-") as tmp:
            sides = [_temp_file(Path(tmp) / side, data) for side, data in (("old", old), ("new", new))]
            entry["diff"] = unified_diff(sides[0], sides[1], label, self.settings.watch.max_diff_bytes).text
        return entry

    # -- restoring ---------------------------------------------------------------------

    def _check_roots(self, snap_id: str, header: dict) -> None:
        """Every root of the snapshot must exist and be watched now (nothing is written elsewhere)."""
        for text in header["roots"]:
            root = Path(text)
            if not root.is_dir():
                raise SnapshotError(f"snapshot {snap_id[:12]} holds files of {display_path(root)}, which is "
                                    "not a folder now; recreate it (or restore another snapshot)")
            if root not in self.roots:
                raise SnapshotError(f"snapshot {snap_id[:12]} holds files of {display_path(root)}, which is "
                                    f"not watched now; add it to [watch] roots in {self.settings.config_file}")

    def _deletions(self, header: dict, files: dict[Path, SnapFile]) -> list[Path]:
        """Files to delete: a partial snapshot's absent ones; for a full one, watched files now
        present that it did not have (except those it had to skip)."""
        if header["partial"]:
            paths = [Path(p) for p in header["absent"]]
            return [p for p in paths if self._root_index(p) >= 0 and p.is_file() and not p.is_symlink()]
        skipped = [Path(p) for p in header["skipped"]]
        roots = [Path(r) for r in header["roots"]]  # never files of a root the snapshot did not cover
        present = [p for r in roots for p in self._walk(r, []) if p.is_file() and not p.is_symlink()]
        return [p for p in present if p not in files and not any(s == p or s in p.parents for s in skipped)]

    def _undo_snapshot(self, snap_id: str, header: dict, files: dict[Path, SnapFile]) -> SnapshotInfo:
        """A snapshot of what the restore is about to change: all files, or the same paths."""
        message = f"before restore of {snap_id[:12]}"
        if not header["partial"]:
            return self.create(message)
        return self.create(message, paths=[*files, *(Path(p) for p in header["absent"])])

    def _apply_restore(self, snap_id: str, undo: str, files: dict[Path, SnapFile],
                       deletes: list[Path]) -> RestoreResult:
        deleted = []
        for path in deletes:
            self._announce(path, DELETED_SHA)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
            remove_empty_parents(path.parent, self._root_of(path))
            deleted.append(str(path))
        written, unchanged = [], 0
        for path, snap in sorted(files.items(), key=lambda item: os.fsencode(item[0])):
            if self._restore_file(snap):
                written.append(str(path))
            else:
                unchanged += 1
        return RestoreResult(snap_id, undo, tuple(written), tuple(deleted), unchanged)

    def _restore_file(self, snap: SnapFile) -> bool:
        """Make one file hold the snapshot's bytes and permission bits; False when it already did."""
        if not resolves_inside(snap.path, snap.root):
            raise SnapshotError(f"{display_path(snap.path)} would be written outside the watched root "
                                f"{display_path(snap.root)} (a symbolic link on the way); nothing more written")
        try:
            st = snap.path.lstat()
        except FileNotFoundError:
            st = None
        regular = st is not None and stat.S_ISREG(st.st_mode)
        same_bytes = regular and _blob_id_of(snap.path) == snap.blob
        if same_bytes and stat.S_IMODE(st.st_mode) == snap.perm:
            return False
        data = self._blob(snap.blob)
        self._announce(snap.path, sha256_bytes(data))
        if same_bytes:
            os.chmod(snap.path, snap.perm)
        else:
            snap.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(snap.path, data, snap.perm)
        return True

    def _root_of(self, path: Path) -> Path:
        return self.roots[self._root_index(path)]

    def _announce(self, path: Path, sha: str) -> None:
        """Tell the watcher that Gremlin itself makes this change (so it is not learnt from)."""
        if self.store is not None:
            self.store.expect_own_write(str(path), sha)


class _TooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(f"{size} bytes, over the snapshot limit (16 x [watch] max_file_bytes)")


def _head(repo: Repo) -> bytes | None:
    try:
        return repo.refs[REF]
    except KeyError:
        return None


def _write_tree(repo: Repo, entries: dict[bytes, tuple[int, bytes]]) -> bytes:
    """Write the trees for `entries` (path -> (mode, blob id)) bottom-up; the top tree's id."""
    tree, folders = Tree(), {}
    for path, (mode, sha) in entries.items():
        head, slash, rest = path.partition(b"/")
        if slash:
            folders.setdefault(head, {})[rest] = (mode, sha)
        else:
            tree.add(head, mode, sha)
    for name, inner in folders.items():
        tree.add(name, stat.S_IFDIR, _write_tree(repo, inner))
    repo.object_store.add_object(tree)
    return tree.id


def _walk_tree(repo: Repo, sha: bytes, prefix: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(relative path, mode, blob id) of every file below a tree; bad names raise SnapshotError."""
    for name, mode, child in repo[sha].iteritems():
        if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
            raise SnapshotError(f"snapshot store holds an unsafe file name {name!r}; it was tampered with")
        rel = prefix + name
        if stat.S_ISDIR(mode):
            yield from _walk_tree(repo, child, rel + b"/")
        elif mode in (GIT_FILE, GIT_EXEC):
            yield rel, mode, child


def _root_number(name: bytes, count: int) -> int:
    if not name.isdigit() or int(name) >= count:
        raise SnapshotError(f"snapshot store holds an unknown root entry {name!r}; it was tampered with")
    return int(name)


def _header_of(commit: Commit) -> dict:
    try:
        header = json.loads(commit.message)
        if not isinstance(header, dict) or not isinstance(header.get("roots"), list):
            raise ValueError("not a snapshot header")
    except ValueError as exc:
        raise SnapshotError(f"commit {commit.id.decode()[:12]} in the snapshot store has no valid "
                            f"header ({exc})") from exc
    return header


def _info(commit_id: bytes, header: dict) -> SnapshotInfo:
    return SnapshotInfo(id=commit_id.decode(), time=header.get("time", ""), message=header.get("message", ""),
                        files=int(header.get("files", 0)), bytes=int(header.get("bytes", 0)),
                        model=header.get("model"), partial=bool(header.get("partial")),
                        roots=tuple(header["roots"]), absent=tuple(header.get("absent", ())),
                        skipped=tuple(header.get("skipped", ())))


def _blob_id_of(path: Path) -> bytes | None:
    """The git blob id of a file's bytes now (None when it cannot be read)."""
    try:
        return Blob.from_string(path.read_bytes()).id
    except OSError:
        return None


def _temp_file(path: Path, data: bytes | None) -> Path | None:
    if data is None:
        return None
    path.write_bytes(data)
    return path


def _remove_tree(folder: Path) -> None:
    for top, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            Path(top, name).unlink(missing_ok=True)
        for name in dirs:
            Path(top, name).rmdir()
    folder.rmdir()
