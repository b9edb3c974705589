"""Training pairs from history: every source over a real Store, cleaning, the split, the files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from memory.store import FileState, NewEvent, Store, utc_now
from self_training.generate_dataset import (HELDOUT_FILE, MANIFEST_FILE, TRAIN_FILE, Pair, build_dataset,
                                            clean_pairs, collect_pairs, count_new_pairs, jsonl,
                                            split_chronologically, with_file_pairs)
from self_training.replay import replay_repository

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
FIX = "--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,3 @@\n def load(path):\n+    if not path:\n+        return None\n"
TRACEBACK = ('Traceback (most recent call last):\n  File "{file}", line 2, in load\n'
             "    return open(path).read()\nFileNotFoundError: [Errno 2] No such file or directory: ''")


def at(seconds: float) -> str:
    return utc_now(T0 + timedelta(seconds=seconds))


def change(path: str, root: str, seconds: float, diff: str = FIX, **meta) -> NewEvent:
    return NewEvent(kind="modified", path=path, root=root, time=at(seconds), state=FileState(path, root, "s", 1, 1),
                    diff=diff, meta=meta, memory_kind="code_diff", memory_text=f"modified {path}\n{diff}",
                    memory_meta={"path": path})


def failure(seconds: float, file: str | None, root: str = "/logs", text: str | None = None) -> NewEvent:
    text = text or TRACEBACK.format(file=file)
    return NewEvent(kind="log", path=f"{root}/app.log", root=root, time=at(seconds), state=None, diff=text,
                    meta={"file": file, "line": 2 if file else None, "title": text.splitlines()[-1]},
                    memory_kind="failure", memory_text=text, memory_meta={"path": f"{root}/app.log"})


def record(store: Store, *events: NewEvent) -> list[int]:
    return [s.event_id for s in store.record_events(events)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def with_training(settings, **values):
    return dataclasses.replace(settings, training=dataclasses.replace(settings.training, **values))


def pairs_of(store: Store, settings) -> list[dict]:
    """Every cleaned pair the store yields (before the split), as rows."""
    return [p.to_row() for p in collect_pairs(store, settings, 0, settings.memory.memory_chars)[0]]


def test_failure_pairs_with_the_next_change_to_the_file_it_names(store: Store, settings):
    ids = record(store, failure(0, "/p/app.py"), change("/p/other.py", "/p", 10, FIX.replace("app", "other")),
                 change("/p/app.py", "/p", 20), failure(5000, "/p/app.py", text="late " + TRACEBACK),
                 change("/p/app.py", "/p", 5000 + 3601, FIX + "+# too late\n"))
    found = pairs_of(store, settings)
    assert [(r["source"], r["event_ids"]) for r in found] == [("failure_fix", [ids[0], ids[2]])]
    assert found[0]["input"].startswith("Traceback") and found[0]["output"] == FIX.strip()
    assert found[0]["time"] == at(20)


def test_failure_without_a_change_to_its_file_pairs_within_the_same_root(store: Store, settings):
    ids = record(store, change("/q/x.py", "/q", 5), failure(10, "/p/app.py"),
                 change("/q/late.py", "/q", 20), change("/p/util.py", "/p", 30))
    assert [r["event_ids"] for r in pairs_of(store, settings)] == [[ids[1], ids[3]]]


def test_log_error_naming_no_file_pairs_with_the_next_change(store: Store, settings):
    error = "2024-05-01 12:00:00 ERROR worker: queue backend unreachable after 3 retries"
    ids = record(store, failure(0, None, text=error), change("/p/by_us.py", "/p", 5, by_gremlin=True),
                 change("/p/queue.py", "/p", 9))
    found = pairs_of(store, settings)
    assert [(r["source"], r["event_ids"], r["input"]) for r in found] == [("log", [ids[0], ids[2]], error)]


def test_task_rewrites_named_or_of_the_same_type_within_the_window(store: Store, settings):
    now = lambda s: T0 + timedelta(seconds=s)  # noqa: E731
    bad = store.insert_task("shell", {"cmd": ["pytest", "-x", "tests/"]}, "failed", error="exit code 4", now=now(0))
    good = store.insert_task("shell", {"cmd": ["pytest", "-x", "tests/unit"], "rewrites": bad}, "done",
                             {"exit_code": 0}, now=now(60))
    low = store.insert_task("mutate", {"goal": "speed up the parser loop"}, "done", {"reward": 0.1}, now=now(100))
    # the same payload again is a retry, not a rewrite
    store.insert_task("mutate", {"goal": "speed up the parser loop"}, "done", {"reward": 0.9}, now=now(110))
    fixed = store.insert_task("mutate", {"goal": "cache parsed config files"}, "done", {"reward": 0.9}, now=now(120))
    # a rewrite created beyond pair_window_s (3600 s) after the failure pairs with nothing
    store.insert_task("snapshot", {"name": "nightly backup of data"}, "failed", error="disk full", now=now(0))
    store.insert_task("snapshot", {"name": "nightly backup of the data"}, "done", now=now(7200))
    found = [(r["task_ids"], r["source"]) for r in pairs_of(store, settings)]
    assert found == [([bad, good], "task_rewrite"), ([low, fixed], "task_rewrite")]
    first = pairs_of(store, settings)[0]
    assert first["input"] == 'shell task: {"cmd": ["pytest", "-x", "tests/"]}\nfailed: exit code 4'
    assert first["output"] == 'shell task: {"cmd": ["pytest", "-x", "tests/unit"]}' and first["event_ids"] == []


def git_repo(path: Path) -> Path:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Ada",
           "GIT_AUTHOR_EMAIL": "ada@example.com", "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com"}
    path.mkdir()
    subprocess.run(["git", "-C", str(path), "init", "-q"], env=env, check=True, timeout=30)
    commits = [("Add a loader for settings files (#3)", "load.py", "def load():\n    return {}\n"),
               ("Fix", "load.py", "def load():\n    return {'a': 1}\n"),
               ("Put the settings loader back as it was (#5)", "load.py", "def load():\n    return {}\n")]
    for day, (message, name, text) in enumerate(commits, start=1):
        (path / name).write_text(text)
        date = f"2024-05-0{day}T12:00:00Z"
        subprocess.run(["git", "-C", str(path), "add", "-A"], env=env, check=True, timeout=30)
        subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", message],
                       env={**env, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}, check=True, timeout=30)
    return path


def test_commit_pairs_from_a_replayed_repository(store: Store, settings, tmp_path: Path):
    replay_repository(store, settings, git_repo(tmp_path / "repo"))
    found = pairs_of(store, settings)
    # "Fix" is too short a query; issue numbers are stripped
    assert [(r["source"], r["input"]) for r in found] == [("commit", "Add a loader for settings files"),
                                                          ("commit", "Put the settings loader back as it was")]
    assert found[0]["output"].startswith("diff --git a/load.py b/load.py") and "+def load():" in found[0]["output"]
    assert found[0]["time"] == "2024-05-01T12:00:00.000+00:00"


def pair(text: str, output: str = FIX, seconds: float = 0, source: str = "failure_fix", ids=(1, 2)) -> Pair:
    return Pair(text, output, source, tuple(ids), at(seconds))


def test_clean_pairs_dedupes_drops_trivial_and_strips_issue_numbers():
    kept = clean_pairs([
        pair("Handle a missing settings file (#41)", seconds=2),
        pair("Handle a missing settings file", seconds=1),  # the same pair once #41 is gone: oldest kept
        pair("too short"), pair("   "), pair("a b c d e f g", output="   "),
        pair("rename without changes to content", output="--- a/x\n+++ b/y\n@@ -1 +1 @@\n same"),
        pair(FIX, output=FIX),
        pair("shell task: pytest failed", output="shell task: pytest -x", source="task_rewrite"),
    ])
    assert [(p.input, p.time) for p in kept] == [("shell task: pytest failed", at(0)),
                                                 ("Handle a missing settings file", at(1))]


def test_a_query_several_different_diffs_share_is_dropped_everywhere():
    """"bump version, merge from devel" names none of its diffs: not a training pair, not a
    held-out question (one relevant answer among look-alikes)."""
    bumps = [pair("bump version, merge from tqdm/devel", FIX + f"+__version__ = '4.{i}'\n", seconds=i, ids=(i,))
             for i in range(3)]
    same = [pair("pin the parser version again", FIX, seconds=10 + i, ids=(10 + i,)) for i in range(2)]
    kept = clean_pairs([*bumps, *same, pair("handle a missing settings file", seconds=20, ids=(20,))])
    assert [p.input for p in kept] == ["pin the parser version again", "handle a missing settings file"]
    assert kept[0].event_ids == (10,)                  # the same pair twice is one pair, not an ambiguous query


def test_split_holds_out_the_newest_and_never_leaks():
    pairs = [pair(f"query number {i} about parsing", FIX + f"+# {i}\n", seconds=i, ids=(i,)) for i in range(10)]
    leak = pair("another query with the same answer", FIX + "+# 9\n", seconds=3, ids=(99,))
    train, held = split_chronologically([*pairs, leak], 0.2, 2)
    assert [p.event_ids for p in held] == [(7,), (8,), (9,)]  # ceil(11 * 0.2)
    assert [p.event_ids for p in train] == [(i,) for i in range(7)]  # the pair sharing held-out text is gone
    assert max(p.time for p in train) < min(p.time for p in held)
    assert len(split_chronologically(pairs, 0.2, 4)[1]) == 4  # at least min_heldout ...
    assert len(split_chronologically(pairs, 0.2, 1)[1]) == 2
    assert len(split_chronologically(pairs[:4], 0.2, 4)[1]) == 2  # ... but never more than half
    assert split_chronologically([], 0.2, 2) == ([], [])


def git_file(name: str, body: str) -> str:
    return f"diff --git a/{name} b/{name}\nindex 1..2 100644\n--- a/{name}\n+++ b/{name}\n@@ -1 +1 @@\n{body}\n"


def test_file_pairs_add_each_changed_file_of_a_diff_as_a_pair_of_its_own():
    many = "".join(git_file(f"f{i}.py", f"-old {i}\n+new {i}") for i in range(10))
    mode_only = "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n"
    two = git_file("a.py", "+x = 1") + mode_only + git_file("b.py", "-y = 2")
    pairs = [pair("Touch two files and a mode", two, source="commit"),
             pair("One file only for this fix", git_file("c.py", "+z"), source="commit"),
             pair("shell task: pytest failed", "shell task: pytest -x", source="task_rewrite"),
             pair("Rename ten modules at once", many, source="commit")]
    out = with_file_pairs(pairs)
    assert out[:3] == [pairs[0], dataclasses.replace(pairs[0], output=git_file("a.py", "+x = 1").strip()),
                       dataclasses.replace(pairs[0], output=git_file("b.py", "-y = 2").strip())]  # no mode-only part
    assert out[3:5] == pairs[1:3]                     # one file, or not a diff: as it was
    assert out[5] == pairs[3] and [p.output.split()[2] for p in out[6:]] == [f"a/f{i}.py" for i in range(8)]
    assert with_file_pairs([]) == []


def test_build_dataset_writes_contract_rows_and_records_sha256(store: Store, settings):
    for i in range(12):
        record(store, failure(i * 10_000, f"/p/mod{i}.py"), change(f"/p/mod{i}.py", "/p", i * 10_000 + 30,
                                                                   FIX + f"+# fix {i}\n"))
    settings = with_training(settings, max_pairs=10, heldout_fraction=0.2, min_heldout_pairs=2)
    dataset = build_dataset(store, settings, now=T0)
    assert dataset.train_path == settings.data_dir / "nlp_training_sets" / TRAIN_FILE
    assert (len(dataset.train), len(dataset.heldout), dataset.counts) == (8, 2, {"failure_fix": 10})
    assert dataset.sha256 == hashlib.sha256(dataset.train_path.read_bytes()).hexdigest()
    assert dataset.heldout_sha256 == hashlib.sha256((dataset.train_path.parent / HELDOUT_FILE).read_bytes()).hexdigest()
    train_rows, held_rows = rows(dataset.train_path), rows(dataset.heldout_path)
    for row in train_rows + held_rows:
        assert set(row) == {"input", "output", "source", "event_ids", "time"}
        assert isinstance(row["input"], str) and row["source"] in ("code_diff", "failure_fix", "task_rewrite",
                                                                   "log", "commit")
        assert all(isinstance(i, int) for i in row["event_ids"])
    assert "+# fix 2\n" in train_rows[0]["output"] + "\n"  # capped to the newest 10: pairs 0 and 1 are gone
    assert [r["output"][-1] for r in held_rows] == ["0", "1"]  # fixes 10 and 11 are held out
    assert not {r["output"] for r in held_rows} & {r["output"] for r in train_rows}
    manifest = json.loads((dataset.train_path.parent / MANIFEST_FILE).read_text())
    assert manifest["sha256"] == dataset.sha256 and manifest["built"] == utc_now(T0)
    assert manifest["last_event_id"] == dataset.last_event_id == 24
    assert not list(dataset.train_path.parent.glob(".*.tmp"))


def test_count_new_pairs_counts_only_after_the_given_event(store: Store, settings):
    first = record(store, failure(0, "/p/a.py"), change("/p/a.py", "/p", 10))
    assert count_new_pairs(store, settings, 0) == 1
    assert count_new_pairs(store, settings, first[-1]) == 0
    record(store, failure(100, "/p/b.py"), change("/p/b.py", "/p", 110, FIX + "+# b\n"))
    assert count_new_pairs(store, settings, first[-1]) == 1


@pytest.mark.parametrize("chars", [64, 200])
def test_texts_stay_within_memory_chars(store: Store, settings, chars: int):
    record(store, failure(0, "/p/a.py", text=TRACEBACK.format(file="/p/a.py") + "\n" + "x" * 5000),
           change("/p/a.py", "/p", 10, FIX + "+" + "y" * 5000 + "\n"))
    settings = dataclasses.replace(settings, memory=dataclasses.replace(settings.memory, memory_chars=chars))
    found = pairs_of(store, settings)
    assert len(found) == 1 and len(found[0]["input"]) <= chars and len(found[0]["output"]) <= chars


def test_a_lone_surrogate_in_a_pair_does_not_fail_the_dataset():
    rows = jsonl([Pair("shell task: {\"cwd\": \"caf\udce9\"}", "fixed", "task", (), "2024-01-01T00:00:00.000+00:00")])
    assert json.loads(rows)["input"] == "shell task: {\"cwd\": \"caf\udce9\"}"
