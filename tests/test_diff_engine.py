"""The diff engine: GNU diff + unidiff hunks, shadow copies, binary/large/invalid files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from memory.store import FileState, NewEvent, Store
from self_mutation_watcher.diff_engine import (NOTHING, ChangeDetector, DiffError, DiffJob, ShadowStore, parse_diff,
                                               unified_diff, unified_diffs)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def detector(settings, store) -> ChangeDetector:
    return ChangeDetector(store, ShadowStore(settings.memory.shadow_dir), settings.watch,
                          settings.memory.memory_chars, is_log=lambda p: p.suffix == ".log")


def record(detector: ChangeDetector, store: Store, path: Path, root: Path, **kw):
    """Check a path and commit what it finds, as the watcher does; the event, state or None."""
    outcome = detector.check(path, root, **kw)
    assert not outcome.retry
    if outcome.events:
        store.record_events(list(outcome.events))
        return outcome.events[0] if len(outcome.events) == 1 else list(outcome.events)
    if outcome.state:
        store.save_file_states([outcome.state])
    return outcome.state


def test_hunks_and_counts_come_from_the_unified_diff(tmp_path: Path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("".join(f"line {i}\n" for i in range(40)))
    new.write_text("".join(f"line {i}\n" for i in range(40)).replace("line 3\n", "LINE 3\nextra\n")
                   .replace("line 30\n", ""))
    diff = unified_diff(old, new, "pkg/f.py", 1 << 20)
    assert diff.text.startswith("--- a/pkg/f.py\n+++ b/pkg/f.py\n@@ -1,7 +1,8 @@\n")
    assert [(h.source_start, h.target_start) for h in diff.hunks] == [(1, 1), (28, 29)]
    assert [(h.added, h.removed) for h in diff.hunks] == [(2, 1), (0, 1)]
    assert (diff.added, diff.removed, diff.truncated) == (2, 2, False)


def test_long_diffs_are_cut_at_a_line_and_flagged(tmp_path: Path):
    (tmp_path / "new").write_text("".join(f"added line number {i}\n" for i in range(1000)))
    diff = unified_diff(None, tmp_path / "new", "f.txt", 500)
    assert diff.truncated and len(diff.text) <= 500 and diff.text.endswith("\n")
    assert diff.added == 1000  # counted from the whole diff


def test_unparseable_diff_text_is_flagged_not_fatal():
    diff = parse_diff("--- a/x\n+++ b/x\n@@ -1,5 +1,5 @@\n-only one line\n", 1000)
    assert diff.parsed is False and diff.hunks == ()


# Pairs a batched diff must treat exactly as one `diff` per file: (old bytes, new bytes), None = absent.
TRICKY_PAIRS = {
    "plain.py": (b"a = 1\nb = 2\n", b"a = 1\nb = 3\n"),
    "no_newline.txt": (b"x\ny", b"x\nz"),
    "header_like.txt": (b"keep\n", b"keep\ndiff -u -a -r -N a/000001 b/000001\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n"),
    "latin1.txt": ("caf\u00e9\n".encode("latin-1"), "th\u00e9\n".encode("latin-1")),
    "crlf.txt": (b"one\r\ntwo\r\n", b"one\r\nthree\r\n"),
    "nul.bin": (b"a\0b\n", b"a\0c\n"),
    "created.py": (None, b"new = True\n"),
    "deleted.py": (b"old = True\n", None),
    "emptied.py": (b"gone\n", b""),
    "same.txt": (b"same\n", b"same\n"),
    'we"ird\\na\tme.py': (b"q\n", b"r\n"),
}


def test_a_batch_is_diffed_by_one_gnu_diff_run_exactly_as_file_by_file(tmp_path: Path):
    jobs = []
    for i, (name, pair) in enumerate(TRICKY_PAIRS.items()):
        sides = [tmp_path / f"{side}{i}" for side in ("old", "new")]
        for path, data in zip(sides, pair, strict=True):
            if data is not None:
                path.write_bytes(data)
        jobs.append(DiffJob(*(p if d is not None else None for p, d in zip(sides, pair, strict=True)), f"pkg/{name}"))
    for max_bytes in (1 << 20, 40):
        batched = unified_diffs(jobs, max_bytes, workdir=tmp_path)
        assert batched == [unified_diff(j.old, j.new, j.label, max_bytes) for j in jobs]
    assert batched[0].text.startswith("--- a/pkg/plain.py\n+++ b/pkg/plain")
    assert not list(tmp_path.glob(".diff-*"))  # the folder of links is gone


def test_a_failing_batch_is_diffed_file_by_file_and_only_the_bad_file_fails(tmp_path: Path):
    (tmp_path / "a").write_text("1\n")
    (tmp_path / "b").write_text("2\n")
    good = DiffJob(tmp_path / "a", tmp_path / "b", "pkg/good.py")
    bad = DiffJob(tmp_path / "missing", tmp_path / "b", "pkg/bad.py")
    results = unified_diffs([good, bad, good], 1 << 20)
    assert isinstance(results[1], DiffError) and "pkg/bad.py" in str(results[1])
    assert results[0] == results[2] == unified_diff(good.old, good.new, good.label, 1 << 20)


def test_shadow_store_recreates_its_folders_when_they_are_removed_under_it(tmp_path: Path):
    shadow = ShadowStore(tmp_path / "shadow")
    first = shadow.put(b"one\n")
    shutil.rmtree(shadow.root)  # a user cleaning up, or a restore, while the watcher runs
    again = shadow.put(b"one\n")
    other = shadow.put(b"two\n")
    assert again == first and shadow.has(first) and shadow.has(other)
    assert shadow.root.stat().st_mode & 0o777 == 0o700


def test_prune_removes_the_link_folders_a_killed_batch_left(tmp_path: Path):
    shadow = ShadowStore(tmp_path / "shadow")
    kept = shadow.put(b"kept\n")
    left = shadow.root / ".diff-killed" / "a"
    left.mkdir(parents=True)
    os.link(shadow.path(kept), left / "000000")
    assert shadow.prune({kept}) == 0
    assert shadow.has(kept) and not (shadow.root / ".diff-killed").exists()


@pytest.mark.parametrize("damage", [b"", b"\0" * 13, b"a = 1\n"])
def test_a_shadow_copy_a_power_cut_damaged_is_dropped_not_diffed_against(detector, store, watched: Path, caplog,
                                                                         damage: bytes):
    """An unsynced copy can come back empty, as zeros or cut short: it is never a diff's old side."""
    f = watched / "app.py"
    f.write_text("a = 1\nb = 2\n")
    created = record(detector, store, f, watched)
    blob = detector.shadow.path(created.new_sha)
    blob.write_bytes(damage)
    f.write_text("a = 1\nb = 3\n")
    with caplog.at_level("WARNING", logger="self_mutation_watcher.diff_engine"):
        changed = record(detector, store, f, watched)
    assert changed.kind == "modified" and changed.meta.get("previous_unknown") is True
    assert "-b = 2" not in changed.diff and "+b = 3" in changed.diff       # not a diff against the damage
    assert [r.path for r in caplog.records if "damaged" in r.getMessage()] == [str(blob)]
    assert not blob.exists()
    f.write_text("a = 1\nb = 2\n")                                       # back to the damaged copy's content
    record(detector, store, f, watched)
    assert blob.read_bytes() == b"a = 1\nb = 2\n" and detector.shadow.has(created.new_sha)


def test_only_redacted_shadow_copies_are_fsynced(detector, store, watched: Path, monkeypatch):
    """A verbatim copy is its own checksum (checked when read); a redacted one cannot be, so it
    is made durable before it gets its name, and is trusted when read."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    plain, secret = watched / "plain.py", watched / "secret.py"
    plain.write_text("limit = 3\n")
    record(detector, store, plain, watched)
    assert synced == []
    secret.write_text('token = "ghp_' + "a" * 36 + '"\nlimit = 3\n')
    created = record(detector, store, secret, watched)
    assert len(synced) == 1 and b"[REDACTED:" in detector.shadow.path(created.new_sha).read_bytes()
    secret.write_text('token = "ghp_' + "a" * 36 + '"\nlimit = 4\n')
    changed = record(detector, store, secret, watched)
    assert "previous_unknown" not in changed.meta and "-limit = 3" in changed.diff and "+limit = 4" in changed.diff


def test_created_modified_deleted_lifecycle(detector, store, watched: Path):
    f = watched / "app.py"
    f.write_text("def main():\n    pass\n")
    created = record(detector, store, f, watched)
    assert created.kind == "created" and created.meta["added"] == 2 and created.old_sha is None
    assert created.memory_text.startswith("created project/app.py\n--- /dev/null\n+++ b/project/app.py")
    f.write_text("def main():\n    run()\n")
    modified = record(detector, store, f, watched)
    assert modified.kind == "modified" and modified.old_sha == created.new_sha
    assert "-    pass\n+    run()" in modified.diff
    assert record(detector, store, f, watched) is None  # nothing changed since
    f.unlink()
    deleted = record(detector, store, f, watched)
    assert deleted.kind == "deleted" and deleted.state is None and "-    run()" in deleted.diff
    assert store.file_state(str(f)) is None


def test_an_empty_file_is_an_event_without_hunks(detector, store, watched: Path):
    f = watched / "empty.py"
    f.write_bytes(b"")
    event = record(detector, store, f, watched)
    assert event.kind == "created" and event.meta["hunks"] == [] and event.diff == ""
    assert event.memory_text == "created project/empty.py (no diff, 0 bytes)"


def test_binary_files_get_metadata_only(detector, store, watched: Path):
    f = watched / "image.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    event = record(detector, store, f, watched)
    assert event.diff is None and event.meta == {"binary": True, "metadata_only": True}
    assert event.memory_text == f"created project/image.png (binary, {f.stat().st_size} bytes)"
    assert not any(p.is_file() for p in Path(detector.shadow.root).rglob("*"))


def test_files_over_the_size_limit_get_metadata_only(detector, store, watched: Path, settings):
    f = watched / "big.txt"
    f.write_text("x" * (settings.watch.max_file_bytes + 1))
    event = record(detector, store, f, watched)
    assert event.diff is None and event.meta["too_large"] and event.new_sha is None
    assert record(detector, store, f, watched) is None  # same size and time: no new event


def test_invalid_utf8_is_replaced_and_flagged(detector, store, watched: Path):
    f = watched / "latin1.txt"
    f.write_bytes("café au lait\n".encode("latin-1"))
    event = record(detector, store, f, watched)
    assert event.meta["invalid_utf8"] is True and "caf\ufffd au lait" in event.diff


def test_a_file_deleted_before_it_is_read_is_a_delete(detector, store, watched: Path):
    f = watched / "gone.py"
    f.write_text("x = 1\n")
    record(detector, store, f, watched)
    f.unlink()  # the watcher's check comes after the file is gone
    event = record(detector, store, f, watched)
    assert event.kind == "deleted"
    never_seen = watched / "never.py"
    assert detector.check(never_seen, watched) == NOTHING


def test_symlinks_are_not_followed(detector, store, watched: Path, tmp_path: Path):
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the root\n")
    (watched / "link.txt").symlink_to(outside)
    assert detector.check(watched / "link.txt", watched) == NOTHING


def test_baseline_records_the_shadow_copy_without_an_event(detector, store, watched: Path):
    f = watched / "old.py"
    f.write_text("a = 1\n")
    state = record(detector, store, f, watched, baseline_before_ns=time.time_ns() + 10**9)
    assert isinstance(state, FileState) and detector.shadow.has(state.sha)
    f.write_text("a = 2\n")
    assert "-a = 1\n+a = 2" in record(detector, store, f, watched).diff


def test_a_file_changed_after_the_baseline_began_is_an_event(detector, store, watched: Path):
    started = time.time_ns()
    time.sleep(0.01)
    (watched / "fresh.py").write_text("fresh = 1\n")
    event = record(detector, store, watched / "fresh.py", watched, baseline_before_ns=started)
    assert isinstance(event, NewEvent) and event.kind == "created"


def test_logs_are_followed_and_failures_become_memories(detector, store, watched: Path):
    log = watched / "app.log"
    log.write_text("INFO started\n")
    assert isinstance(record(detector, store, log, watched), FileState)  # no failure: offset only
    with log.open("a") as handle:
        handle.write("INFO request ok\nTraceback (most recent call last):\n"
                     '  File "app.py", line 3, in main\nZeroDivisionError: division by zero\npartial')
    event = record(detector, store, log, watched)
    assert event.kind == "log" and event.memory_kind == "failure"
    assert event.meta["title"] == "ZeroDivisionError: division by zero"
    assert (event.meta["file"], event.meta["line"]) == ("app.py", 3)
    assert event.diff.startswith("INFO request ok\nTraceback")  # context from the new text only
    assert "partial" not in event.diff
    assert event.state.size == log.stat().st_size - len("partial")


PERMISSION_SCRIPT = """
import json, logging, sys
from pathlib import Path
from memory.store import Store
from self_mutation_watcher.diff_engine import ChangeDetector, ShadowStore
from config.settings import WatchSettings
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append({"msg": record.getMessage(), "path": getattr(record, "path", None)})
logging.getLogger().addHandler(Keep())
base = Path(sys.argv[1])
store = Store(base / "g.db")
det = ChangeDetector(store, ShadowStore(base / "shadow"), WatchSettings(), 4000)
result = det.check(base / "root" / "locked.py", base / "root")
print(json.dumps({"result": repr(result.events or result.state), "logs": records}))
"""


def test_permission_denied_is_a_warning_naming_the_path():
    """A real unreadable file, checked in a child process without root's read-anything rights."""
    base = Path(tempfile.mkdtemp(prefix="gremlin-perm-"))
    try:
        (base / "root").mkdir()
        locked = base / "root" / "locked.py"
        locked.write_text("secret = 1\n")
        locked.chmod(0)
        # root reads anything: drop the capabilities that let it, as setpriv does for a child
        prefix = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
                  if os.geteuid() == 0 else [])
        proc = subprocess.run([*prefix, sys.executable, "-c", PERMISSION_SCRIPT, str(base)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["result"] == "None"
        assert {"msg": "cannot read file, skipping it", "path": str(locked)} in out["logs"]
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_a_single_huge_line_is_cut_not_emptied():
    diff = parse_diff("--- a/x\n+++ b/x\n@@ -0,0 +1 @@\n+" + "y" * 5000 + "\n", 300)
    assert diff.truncated and len(diff.text) == 300 and diff.text.startswith("--- a/x")


def test_changes_gremlin_announced_itself_are_tagged(detector, store, watched: Path):
    from datetime import datetime, timedelta, timezone

    from self_mutation_watcher.diff_engine import sha256_bytes

    f = watched / "restored.py"
    content = b"restored = True\n"
    store.expect_own_write(str(f), sha256_bytes(content))  # e.g. a rollback about to write it
    f.write_bytes(content)
    assert record(detector, store, f, watched).meta["by_gremlin"] is True
    f.write_text("a person edits it afterwards\n")
    assert "by_gremlin" not in record(detector, store, f, watched).meta
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    assert not store.is_own_write(str(f), sha256_bytes(content), now=later)  # announcements expire


def test_a_file_that_changes_while_read_is_retried(detector, store, watched: Path):
    f = watched / "growing.txt"
    f.write_text("start\n")
    # another process rewrites the file in place without pause: its size stays, its mtime moves
    loop = ("import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY)\nn = 0\nwhile True:\n"
            "    n += 1\n    os.pwrite(fd, (f'line {n}\\n' * 20000).encode()[:200000], 0)\n")
    writer = subprocess.Popen([sys.executable, "-c", loop, str(f)])
    try:
        while f.stat().st_size < 200_000:
            time.sleep(0.001)
        outcomes = []
        while not any(o.retry for o in outcomes) and len(outcomes) < 2000:
            outcomes.append(detector.check(f, watched))
        taken = [detector.check(f, watched, accept_changing=True) for _ in range(20)]  # the last try
    finally:
        writer.kill()
        writer.wait()
    assert any(o.retry for o in outcomes), f"no read overlapped a write in {len(outcomes)} checks"
    assert all(not o.events for o in outcomes if o.retry)
    assert not any(t.retry for t in taken) and taken[0].events[0].kind == "created"
