"""Snapshots: a real dulwich object store, real files, byte-exact restores that can be undone."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent_core.snapshot import DELETED_SHA, SnapshotError, Snapshots
from config.settings import load_settings
from self_mutation_watcher.diff_engine import sha256_bytes
from tests.conftest import make_home

ODD_NAME = os.fsdecode(b"caf\xe9-latin1.txt")  # not UTF-8: the name is kept as raw bytes


def tree_state(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under `root`: (bytes, permission bits), by its path relative to the root."""
    out = {}
    for top, dirs, names in os.walk(root):
        for name in names:
            path = Path(top, name)
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return out


def populate(root: Path) -> None:
    """A small project: text, a non-UTF-8 file name, an executable script, a private file, a binary
    file, a subfolder."""
    (root / "app.py").write_text("def main():\n    return 1\n")
    (root / ODD_NAME).write_bytes(b"latin-1 name, bytes \xff\xfe inside\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "logo.bin").write_bytes(bytes(range(256)) * 4)
    (root / "local.cfg").write_text("token = placeholder\n")
    os.chmod(root / "local.cfg", 0o600)
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text("X = 1\n")


def blob_count(settings) -> int:
    """Loose blob objects in the snapshot store."""
    from dulwich.repo import Repo
    repo = Repo(str(settings.snapshot_dir))
    try:
        return sum(1 for sha in repo.object_store if repo.object_store[sha].type_name == b"blob")
    finally:
        repo.close()


@pytest.fixture
def snaps(settings, store) -> Snapshots:
    s = Snapshots(settings, store)
    yield s
    s.close()


def test_create_list_and_get_by_prefix(snaps, settings, watched):
    populate(watched)
    first = snaps.create("first")
    (watched / "app.py").write_text("def main():\n    return 2\n")
    second = snaps.create("second")
    assert [s.id for s in snaps.list()] == [second.id, first.id]  # newest first
    assert [s.id for s in snaps.list(limit=1)] == [second.id]
    assert snaps.get(first.id[:6]) == first and snaps.get(first.id.upper()) == first
    assert (first.message, first.files, first.partial, first.model) == ("first", 6, False, None)
    assert first.bytes == sum(len(b) for b, _ in tree_state(watched).values())  # "return 2": same size
    assert first.roots == (str(watched),) and len(first.id) == 40
    assert json.loads(json.dumps(first.to_dict()))["files"] == 6
    assert stat.S_IMODE(settings.snapshot_dir.stat().st_mode) == 0o700


def test_bad_ids_get_clear_errors(snaps, watched):
    populate(watched)
    info = snaps.create()
    for ref, words in (("abc", "at least 4 hex"), ("zzzz", "not a snapshot id"), ("", "not a snapshot id")):
        with pytest.raises(SnapshotError, match=words):
            snaps.get(ref)
    other = "0000" if not info.id.startswith("0000") else "ffff"
    with pytest.raises(SnapshotError, match="no snapshot"):
        snaps.get(other)


def test_an_empty_store_lists_nothing_and_makes_no_folder(snaps, settings):
    assert snaps.list() == []
    assert not settings.snapshot_dir.exists()
    with pytest.raises(SnapshotError, match="no snapshot"):
        snaps.get("abcd")


def test_snapshot_records_the_current_model_pointer(snaps, settings, watched):
    pointer = {"id": "run-7", "path": "/models/run-7", "time": "2025-01-01T00:00:00+00:00"}
    (settings.run_dir / "checkpoints" / "current_model.json").write_text(json.dumps(pointer))
    populate(watched)
    assert snaps.create().model == pointer
    assert snaps.list()[0].model == pointer


def test_diff_names_added_deleted_and_modified_files_with_gnu_diff_text(snaps, watched):
    populate(watched)
    a = snaps.create("a")
    (watched / "pkg" / "mod.py").write_text("X = 2\n")
    (watched / "logo.bin").write_bytes(b"\0new binary")
    (watched / "app.py").unlink()
    (watched / "new.txt").write_text("hello\n")
    os.chmod(watched / "run.sh", 0o644)
    b = snaps.create("b")
    changes = {Path(c["path"]).name: c for c in snaps.diff(a.id, b.id)}
    assert {n: c["change"] for n, c in changes.items()} == {
        "mod.py": "modified", "logo.bin": "modified", "app.py": "deleted", "new.txt": "added", "run.sh": "modified"}
    assert changes["mod.py"]["diff"] == (f"--- a/{watched.name}/pkg/mod.py\n+++ b/{watched.name}/pkg/mod.py\n"
                                         "@@ -1 +1 @@\n-X = 1\n+X = 2\n")
    assert changes["logo.bin"]["diff"] is None  # binary
    assert "-    return 1" in changes["app.py"]["diff"] and "+hello" in changes["new.txt"]["diff"]
    assert changes["run.sh"]["mode"] == "755 -> 644"
    assert snaps.diff(a.id, a.id) == []


def test_restore_round_trips_bytes_names_and_executable_bit_and_can_be_undone(snaps, watched):
    populate(watched)
    before = tree_state(watched)
    snap = snaps.create("good state")
    (watched / "app.py").write_text("broken(\n")
    (watched / ODD_NAME).unlink()
    os.chmod(watched / "run.sh", 0o644)
    (watched / "local.cfg").unlink()
    (watched / "logo.bin").write_bytes(b"\0\1")
    (watched / "extra" / "deep").mkdir(parents=True)
    (watched / "extra" / "deep" / "new.py").write_text("new\n")
    later = tree_state(watched)

    result = snaps.restore(snap.id[:8])
    assert tree_state(watched) == before
    assert not (watched / "extra").exists()  # folders emptied by the restore go too
    assert stat.S_IMODE((watched / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((watched / "local.cfg").stat().st_mode) == 0o600  # deleted, back with its exact mode
    assert sorted(Path(p).name for p in result.written) == sorted(["app.py", ODD_NAME, "run.sh", "logo.bin",
                                                                   "local.cfg"])
    assert [Path(p).name for p in result.deleted] == ["new.py"]
    assert result.unchanged == 1 and result.snapshot == snap.id

    undone = snaps.restore(result.undo)
    assert tree_state(watched) == later
    assert snaps.get(undone.undo).message.startswith("before restore of")


def test_unchanged_files_add_no_new_blobs(snaps, settings, watched):
    populate(watched)
    snaps.create("one")
    blobs = blob_count(settings)
    assert blobs == 6
    snaps.create("two")
    assert blob_count(settings) == blobs
    (watched / "pkg" / "mod.py").write_text("X = 3\n")
    snaps.create("three")
    assert blob_count(settings) == blobs + 1


def test_restored_writes_and_deletes_are_announced_as_own_writes(snaps, store, watched):
    populate(watched)
    original = (watched / "app.py").read_bytes()
    snap = snaps.create()
    (watched / "app.py").write_text("changed\n")
    (watched / "gone.py").write_text("to be deleted by the restore\n")
    assert not store.is_own_write(str(watched / "app.py"), sha256_bytes(original))
    snaps.restore(snap.id)
    assert store.is_own_write(str(watched / "app.py"), sha256_bytes(original))
    assert store.is_own_write(str(watched / "gone.py"), DELETED_SHA)
    assert not store.is_own_write(str(watched / "pkg" / "mod.py"), sha256_bytes(b"X = 1\n"))  # untouched


def test_partial_snapshot_records_absent_paths_and_restore_touches_only_them(snaps, watched):
    populate(watched)
    target, missing = watched / "app.py", watched / "new" / "made.py"
    snap = snaps.create("partial", paths=[target, missing])
    assert (snap.partial, snap.files, snap.absent) == (True, 1, (str(missing),))
    target.write_text("patched\n")
    missing.parent.mkdir()
    missing.write_text("created\n")
    (watched / "pkg" / "mod.py").write_text("X = 99\n")  # not in the snapshot: left alone
    result = snaps.restore(snap.id)
    assert target.read_text() == "def main():\n    return 1\n"
    assert not missing.exists() and not missing.parent.exists()
    assert (watched / "pkg" / "mod.py").read_text() == "X = 99\n"
    assert [Path(p).name for p in result.deleted] == ["made.py"]
    assert snaps.get(result.undo).partial


def test_paths_outside_the_roots_cannot_be_snapshotted(snaps, tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("x")
    with pytest.raises(SnapshotError, match="not under a watched root"):
        snaps.create(paths=[outside])


def test_excluded_log_and_oversized_files_are_neither_stored_nor_deleted(tmp_path, watched):
    home = make_home(tmp_path, watched, max_file_bytes=1024)  # snapshot cap: 16 KiB
    settings = load_settings(home)
    snaps = Snapshots(settings)
    populate(watched)
    (watched / ".git").mkdir()
    (watched / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (watched / "app.log").write_text("line 1\n")
    (watched / "huge.dat").write_bytes(b"h" * 20_000)
    snap = snaps.create()
    assert snap.files == 6 and snap.skipped == (str(watched / "huge.dat"),)
    (watched / "app.log").write_text("line 1\nline 2\n")
    (watched / "huge.dat").write_bytes(b"H" * 20_000)
    result = snaps.restore(snap.id)
    assert result.deleted == () and result.written == ()
    assert (watched / ".git" / "HEAD").exists() and (watched / "app.log").read_text() == "line 1\nline 2\n"
    assert (watched / "huge.dat").read_bytes() == b"H" * 20_000
    snaps.close()


def test_restore_refuses_a_snapshot_whose_root_is_gone(tmp_path, watched):
    settings = load_settings(make_home(tmp_path, watched))
    populate(watched)
    snap = Snapshots(settings).create()
    other = tmp_path / "other"
    other.mkdir()
    moved = load_settings(make_home(tmp_path, other))  # same home, now watching another folder
    with pytest.raises(SnapshotError, match="not watched now"):
        Snapshots(moved).restore(snap.id)
    watched.rename(tmp_path / "renamed")
    with pytest.raises(SnapshotError, match="not a folder now"):
        Snapshots(settings).restore(snap.id)
    assert not list(other.iterdir())  # nothing written anywhere


def test_restore_never_writes_through_a_symlinked_folder(snaps, tmp_path, watched):
    populate(watched)
    snap = snaps.create()
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in (watched / "pkg").iterdir():
        f.unlink()
    (watched / "pkg").rmdir()
    (watched / "pkg").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SnapshotError, match="outside the watched root"):
        snaps.restore(snap.id)
    assert list(outside.iterdir()) == []


def test_a_tampered_store_name_is_refused(snaps, settings, watched):
    from dulwich.objects import Blob, Commit, Tree
    from dulwich.repo import Repo
    populate(watched)
    good = snaps.create()
    before = tree_state(watched)
    repo = Repo(str(settings.snapshot_dir))
    blob = Blob.from_string(b"evil\n")
    inner, top = Tree(), Tree()
    inner.add(b"..", 0o100644, blob.id)
    top.add(b"0", stat.S_IFDIR, inner.id)
    commit = Commit()
    commit.tree, commit.parents = top.id, [good.id.encode()]
    commit.author = commit.committer = b"x <x@x>"
    commit.author_time = commit.commit_time = 0
    commit.author_timezone = commit.commit_timezone = 0
    commit.message = repo[good.id.encode()].message
    for obj in (blob, inner, top, commit):
        repo.object_store.add_object(obj)
    repo.refs[b"refs/gremlin/snapshots"] = commit.id
    repo.close()
    with pytest.raises(SnapshotError, match="unsafe file name"):
        snaps.restore(commit.id.decode())
    assert tree_state(watched) == before


def test_store_announcements_need_no_store(settings, watched):
    populate(watched)
    snaps = Snapshots(settings)  # no store: restores still work, nothing is announced
    snap = snaps.create()
    (watched / "app.py").write_text("x\n")
    snaps.restore(snap.id)
    assert (watched / "app.py").read_text() == "def main():\n    return 1\n"
    snaps.close()


def test_the_snapshot_commands_create_list_diff_and_restore(home, watched):
    from tests.conftest import gremlin

    (watched / "conf.py").write_text("debug = False\n")
    first = json.loads(gremlin("snapshot", "create", "-m", "before", "--json", home=home).stdout)
    (watched / "conf.py").write_text("debug = True\n")
    second = json.loads(gremlin("snapshot", "create", "-m", "after", "--json", home=home).stdout)
    listed = gremlin("snapshot", "list", home=home).stdout.splitlines()
    assert [line.split("\t")[-1] for line in listed] == ["after", "before"]
    diff = gremlin("snapshot", "diff", first["id"][:8], second["id"][:8], home=home).stdout
    assert "modified\t" in diff and "-debug = False" in diff and "+debug = True" in diff
    restored = gremlin("snapshot", "restore", first["id"][:8], home=home).stdout
    assert (watched / "conf.py").read_text() == "debug = False\n" and "undo with: gremlin snapshot restore" in restored
    undo = restored.rsplit(" ", 1)[-1].strip()
    gremlin("snapshot", "restore", undo, home=home)
    assert (watched / "conf.py").read_text() == "debug = True\n"
    bad = gremlin("snapshot", "restore", "zzzz", home=home, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")
