"""Git history: real repositories made with git in tmp_path, replayed into a real Store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_core.cli import main
from config.settings import load_settings
from memory.store import MIGRATIONS, NewEvent, Store, _split_sql
from conftest import GREMLIN, REPO, make_home, write_config
from self_training.git_history import (BadDateError, NotAGitRepository, clean_message, head_sha, is_git_repo,
                                       iter_commits, log_entries, range_shas, read_log, repository_root,
                                       truncate_diff, with_branches)
from self_training.replay import SYNC_MARKER, GitSync, replay_repository

# No user or system git config: identity and dates come from here.
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Ada Lovelace",
           "GIT_AUTHOR_EMAIL": "ada@example.com", "GIT_COMMITTER_NAME": "Ada Lovelace",
           "GIT_COMMITTER_EMAIL": "ada@example.com"}


class Repo:
    """A real git repository in a temporary folder."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.day = 0

    def git(self, *args: str, date: str | None = None) -> str:
        env = {**os.environ, **GIT_ENV}
        if date:
            env.update(GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
        return subprocess.run(["git", "-C", str(self.path), *args], env=env, check=True, capture_output=True,
                              text=True, timeout=30).stdout.strip()

    def commit(self, message: str, files: dict[str, str | None], date: str | None = None) -> str:
        """Write (or delete, for None) files and commit them; return the sha."""
        for name, text in files.items():
            target = self.path / name
            if text is None:
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
        self.day += 1
        date = date or f"2024-03-{self.day:02d}T12:00:00+02:00"
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message, date=date)
        return self.git("rev-parse", "HEAD")

    def raw_commit(self, message: bytes, files: dict[str, str], stamp: bytes = b"1700000000 +0000",
                   author_stamp: bytes | None = None) -> str:
        """Commit `files` as a hand-written commit object (dates and bytes git itself would refuse)."""
        for name, text in files.items():
            (self.path / name).write_text(text)
        self.git("add", "-A")
        tree, parent = self.git("write-tree"), self.git("rev-parse", "HEAD")
        raw = (f"tree {tree}\nparent {parent}\n".encode() + b"author Eve <eve@example.com> "
               + (author_stamp or stamp) + b"\ncommitter Eve <eve@example.com> " + stamp + b"\n\n" + message)
        sha = subprocess.run(["git", "-C", str(self.path), "hash-object", "-t", "commit", "-w", "--literally",
                              "--stdin"], input=raw, capture_output=True, check=True, timeout=30).stdout.decode().strip()
        self.git("update-ref", "HEAD", sha)
        self.git("reset", "-q", "--hard")
        return sha


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path / "repo")
    r.commit("Add the parser module\n\nIt reads config files.", {"parser.py": "def parse(text):\n    return text\n"})
    r.commit("Handle empty input in parse (#12)\n\nSigned-off-by: Ada <ada@example.com>",
             {"parser.py": "def parse(text):\n    if not text:\n        return None\n    return text\n"})
    r.commit("Rename the helpers module", {"util.py": "X = 1\n"})
    return r


def test_iter_commits_walks_the_history_oldest_first_with_git_diffs(repo: Repo):
    commits = list(iter_commits(repo.path))
    assert [c.message.splitlines()[0] for c in commits] == [
        "Add the parser module", "Handle empty input in parse (#12)", "Rename the helpers module"]
    first, second = commits[0], commits[1]
    assert first.time == "2024-03-01T10:00:00.000+00:00"  # committer time, in UTC
    assert first.author == "Ada Lovelace" and first.paths == ("parser.py",)
    assert first.diff.startswith("diff --git a/parser.py b/parser.py") and "+def parse(text):" in first.diff
    assert "+    if not text:" in second.diff and "Signed-off-by" not in second.diff
    assert commits[-1].sha == head_sha(repo.path) and not any(c.truncated or c.merge for c in commits)


def test_first_parent_line_skips_merges_unless_asked(repo: Repo):
    repo.git("checkout", "-q", "-b", "feature")
    repo.commit("Teach parse to strip whitespace", {"parser.py": "def parse(text):\n    return text.strip()\n"})
    repo.git("checkout", "-q", "main")
    repo.git("merge", "-q", "--no-ff", "-m", "Merge pull request #7 from ada/strip\n\nStrip whitespace in parse",
             "feature", date="2024-03-20T12:00:00Z")
    messages = [c.message for c in iter_commits(repo.path)]
    assert len(messages) == 3 and not any("strip" in m.lower() for m in messages)
    with_merges = list(iter_commits(repo.path, merges=True))
    merge = with_merges[-1]
    assert len(with_merges) == 4 and merge.merge and "+    return text.strip()" in merge.diff
    assert clean_message(merge.message) == "Strip whitespace in parse"


def test_since_until_and_after_select_a_range(repo: Repo):
    shas = [e.sha for e in log_entries(repo.path)]
    assert [c.sha for c in iter_commits(repo.path, since="2024-03-02")] == shas[1:]
    assert [c.sha for c in iter_commits(repo.path, since="2024-03-02T10:00:01Z")] == shas[2:]
    assert [c.sha for c in iter_commits(repo.path, until_sha=shas[1])] == shas[:2]
    assert [c.sha for c in iter_commits(repo.path, after_sha=shas[0])] == shas[1:]
    with pytest.raises(BadDateError, match="ISO-8601"):
        list(iter_commits(repo.path, since="last tuesday"))


def test_renames_deletions_and_a_cut_diff(repo: Repo):
    repo.git("mv", "util.py", "helpers.py")
    repo.commit("Move util to helpers and drop the parser", {"parser.py": None})
    last = list(iter_commits(repo.path))[-1]
    assert set(last.paths) == {"helpers.py", "parser.py"} and "rename to helpers.py" in last.diff
    cut = list(iter_commits(repo.path, max_diff_bytes=60))[0]
    assert cut.truncated and len(cut.diff.encode()) <= 60
    assert truncate_diff("x" * 100, 10) == ("x" * 10, True)  # one long line is cut, not emptied


def test_not_a_repository_and_an_empty_one(tmp_path: Path, repo: Repo):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(NotAGitRepository, match=r"plain is not inside a git repository.*git init"):
        list(iter_commits(plain))
    with pytest.raises(NotAGitRepository, match="is not a folder"):
        repository_root(tmp_path / "missing")
    assert not is_git_repo(plain) and is_git_repo(repo.path)
    (repo.path / "sub").mkdir()
    assert repository_root(repo.path / "sub") == repo.path.resolve() and not is_git_repo(repo.path / "sub")
    empty = Repo(tmp_path / "empty")
    assert head_sha(empty.path) is None and list(iter_commits(empty.path)) == []


@pytest.mark.parametrize(("message", "cleaned"), [
    ("Fixes #12: crash on empty input", "crash on empty input"),
    ("Add FAQ entry about Windows (#3778)", "Add FAQ entry about Windows"),
    ("Handle tabs (GH-44, #45)\n\nCloses #44 and #45.\n\nCo-authored-by: Bo <bo@example.com>", "Handle tabs"),
    ("Merge pull request #5 from ada/fix-the-parser", "fix the parser"),
    ("Merge pull request #5 from ada/branch\n\nRead empty config files", "Read empty config files"),
    ("Follow up on psf/requests#123, see https://github.com/a/b/pull/9", "Follow up"),
    ("Speed up parse\n\nThe body stays.\nSigned-off-by: Ada <ada@example.com>", "Speed up parse\n\nThe body stays."),
])
def test_clean_message_strips_numbers_boilerplate_and_trailers(message: str, cleaned: str):
    assert clean_message(message) == cleaned


def _merged_branches(repo: Repo) -> None:
    """Two pull requests merged with --no-ff: one of two commits, one of one commit, plus a
    main-line commit made while they were open."""
    repo.git("checkout", "-q", "-b", "strip")
    repo.commit("Teach parse to strip whitespace", {"parser.py": "def parse(text):\n    return text.strip()\n"})
    repo.commit("Test that parse strips tabs", {"test_parser.py": "assert parse('\\tx') == 'x'\n"})
    repo.git("checkout", "-q", "main")
    repo.commit("Document the parser", {"README.md": "parse(text)\n"})
    repo.git("merge", "-q", "--no-ff", "-m", "Merge pull request #7 from ada/strip\n\nStrip whitespace in parse",
             "strip", date="2024-03-20T12:00:00Z")
    repo.git("checkout", "-q", "-b", "lower")
    repo.commit("Lower-case the parsed text", {"parser.py": "def parse(text):\n    return text.strip().lower()\n"})
    repo.git("checkout", "-q", "main")
    repo.git("merge", "-q", "--no-ff", "-m", "Merge pull request #8 from ada/lower", "lower",
             date="2024-03-21T12:00:00Z")


def test_with_branches_adds_merged_commits_dated_when_they_landed(repo: Repo):
    _merged_branches(repo)
    main_line = read_log(repo.path, range_shas(repo.path, merges=True))
    history = with_branches(repo.path, main_line)
    summary = [(e.message.splitlines()[0], e.time[:10], bool(e.landed_by)) for e in history.entries]
    assert summary[3:] == [
        ("Document the parser", "2024-03-06", False),
        ("Teach parse to strip whitespace", "2024-03-20", True),  # made on the 4th, landed on the 20th
        ("Test that parse strips tabs", "2024-03-20", True),
        ("Merge pull request #7 from ada/strip", "2024-03-20", False),  # two commits: the merge stays as a summary
        ("Lower-case the parsed text", "2024-03-21", True)]  # one commit: its merge says the same, left out
    branch = history.entries[4]
    assert branch.landed_by == main_line.entries[-2].sha and branch.committed.startswith("2024-03-04")
    times = [e.time for e in history.entries]
    assert times == sorted(times)  # a chronological split stays honest
    no_merges = with_branches(repo.path, main_line, merges=False)
    assert not any(e.is_merge for e in no_merges.entries) and len(no_merges.entries) == 7


def test_replay_with_branches_stores_branch_commits_once_and_marks_them(store: Store, settings, repo: Repo):
    _merged_branches(repo)
    first_parent = replay_repository(store, settings, repo.path, branches=False)
    assert first_parent.commits_stored == 6  # 4 main-line commits and 2 merges
    more = replay_repository(store, settings, repo.path, branches=True)
    assert more.commits_stored == 3 and replay_repository(store, settings, repo.path, branches=True).commits_stored == 0
    events = {e["meta"]["message"].splitlines()[0]: e for e in store.events_for_path(str(repo.path.resolve()))}
    landed = events["Test that parse strips tabs"]
    assert landed["time"].startswith("2024-03-20") and landed["meta"]["committed"].startswith("2024-03-05")
    assert landed["meta"]["landed_by"] == events["Merge pull request #7 from ada/strip"]["meta"]["commit"]


def test_sync_follows_branches_by_default(tmp_path: Path, watched: Path):
    home = make_home(tmp_path / "home", watched)
    write_config(home, watch={"roots": [str(watched)], "own_source": False})  # replay_branches: on by default
    settings = load_settings(home)
    repo = Repo(watched)
    repo.commit("Start the project with a readme", {"README.md": "hello\n"})
    store = Store(settings.memory.db)
    try:
        sync = GitSync(store, settings)
        assert sync.run() == 0
        _merged_branches(repo)
        assert sync.run() == 5  # 1 main-line commit, 3 branch commits, 1 merge summary (#8 brought one commit)
        messages = [e["meta"]["message"].splitlines()[0] for e in store.events_for_path(str(watched))]
        assert "Lower-case the parsed text" in messages and "Merge pull request #8 from ada/lower" not in messages
    finally:
        store.close()


def test_replay_stores_each_commit_once(store: Store, settings, repo: Repo):
    repo.commit("Read the token from config", {"auth.py": "password = 'hunter2hunter2'\n"})
    seen = []
    first = replay_repository(store, settings, repo.path, progress=lambda done, total: seen.append((done, total)))
    assert (first.commits_seen, first.commits_stored, first.skipped) == (4, 4, 0)
    assert seen[-1] == (4, 4) and first.repo == str(repo.path.resolve())
    again = replay_repository(store, settings, repo.path)
    assert (again.commits_seen, again.commits_stored, again.skipped) == (4, 0, 4)
    events = store.events_for_path(str(repo.path.resolve()))
    assert [e["kind"] for e in events] == ["commit"] * 4
    assert [e["meta"]["commit"] for e in events] == [e.sha for e in log_entries(repo.path)]
    assert events[1]["time"] == "2024-03-02T10:00:00.000+00:00"
    memories = store.get_memories(store.memory_ids("code_diff").tolist())
    texts = [m["text"] for m in sorted(memories.values(), key=lambda m: m["id"])]
    assert texts[1].startswith("Handle empty input in parse\n\ndiff --git a/parser.py")
    assert "hunter2" not in texts[3] and "hunter2" not in events[3]["diff"] and "[REDACTED" in events[3]["diff"]
    meta = sorted(memories.values(), key=lambda m: m["id"])[1]["meta"]
    assert meta["label"] == "Handle empty input in parse" and meta["path"] == str(repo.path.resolve())
    assert meta["paths"] == ["parser.py"] and meta["change"] == "commit"


def test_replay_since_stores_only_newer_commits(store: Store, settings, repo: Repo):
    result = replay_repository(store, settings, repo.path, since="2024-03-02")
    assert (result.commits_seen, result.commits_stored) == (2, 2)
    assert replay_repository(store, settings, repo.path).commits_stored == 1


def test_sync_remembers_head_first_then_stores_new_commits(tmp_path: Path, store: Store, settings, watched: Path):
    repo = Repo(watched)  # the watched root is a git work tree
    repo.commit("Start the project with a readme", {"README.md": "hello\n"})
    sync = GitSync(store, settings)
    assert sync.run() == 0  # first sync: HEAD only, no backfill
    assert json.loads(store.get_marker(SYNC_MARKER + str(watched)))["sha"] == head_sha(watched)
    assert sync.run() == 0
    repo.commit("Document how to install it", {"README.md": "hello\npip install it\n"})
    repo.commit("Add a changelog for releases", {"CHANGES.md": "1.0\n"})
    assert sync.run() == 2
    assert sync.run() == 0
    repo.git("commit", "-q", "--amend", "-m", "Add a changelog for the 1.0 release", date="2024-03-10T12:00:00Z")
    assert sync.run() == 1  # rewritten history: newer than the cursor
    messages = [e["meta"]["message"] for e in store.events_for_path(str(watched))]
    assert messages == ["Document how to install it", "Add a changelog for releases",
                        "Add a changelog for the 1.0 release"]


def test_cli_replay(home: Path, repo: Repo, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(home), "replay", str(repo.path)])
    assert result.exit_code == 0, result.output
    assert "3 commits seen, 3 stored, 0 skipped" in result.output
    again = runner.invoke(main, ["--home", str(home), "replay", str(repo.path), "--since", "2024-03-03"])
    assert again.exit_code == 0 and "1 commits seen, 0 stored, 1 skipped" in again.output
    (tmp_path / "plain").mkdir()
    bad = runner.invoke(main, ["--home", str(home), "replay", str(tmp_path / "plain")])
    assert bad.exit_code == 1 and "not inside a git repository" in bad.output
    bad_date = runner.invoke(main, ["--home", str(home), "replay", str(repo.path), "--since", "soon"])
    assert bad_date.exit_code == 1 and "--since 'soon' is not a date" in bad_date.output
    assert "first-parent history" in runner.invoke(main, ["replay", "--help"]).output
    assert "--branches / --first-parent" in runner.invoke(main, ["replay", "--help"]).output


def test_malformed_dates_and_separator_bytes_do_not_stop_a_replay(store: Store, settings, repo: Repo):
    bad_zone = repo.raw_commit(b"Parse the tz table\n", {"tz.py": "ZONES = 1\n"}, b"1700000000 +51800")
    separators = repo.raw_commit(b"Fields \x1e and \x1f in a message\n", {"sep.py": "SEP = 1\n"})
    impossible = repo.raw_commit(b"From the far future\n", {"far.py": "X = 1\n"}, b"99999999999999999999 +0000")
    repo.commit("An ordinary commit after them", {"after.py": "Y = 2\n"})
    result = replay_repository(store, settings, repo.path)
    assert (result.commits_seen, result.commits_stored, result.unreadable) == (7, 6, 1)
    events = {e["meta"]["commit"]: e for e in store.events_for_path(str(repo.path.resolve()))}
    assert impossible not in events and len(events) == 6
    assert events[bad_zone]["time"] == "2023-11-14T22:13:20.000+00:00"  # from the timestamp, zone ignored
    assert events[separators]["meta"]["message"] == "Fields   and   in a message"
    assert events[separators]["meta"]["paths"] == ["sep.py"]


def test_a_commit_whose_author_date_is_impossible_keeps_its_committer_date(repo: Repo):
    sha = repo.raw_commit(b"Odd author\n", {"odd.py": "Z = 3\n"}, b"1700000000 +0000",
                          author_stamp=b"not-a-date")
    assert log_entries(repo.path)[-1].sha == sha and log_entries(repo.path)[-1].time.startswith("2023-11-14")


def test_one_broken_repository_does_not_stop_the_sync_of_the_others(tmp_path: Path):
    first, second = Repo(tmp_path / "a"), Repo(tmp_path / "b")
    for r in (first, second):
        r.commit("Start with a readme", {"README.md": "hi\n"})
    home = make_home(tmp_path, roots=[str(first.path), str(second.path)])
    settings = load_settings(home)
    store = Store(settings.memory.db)
    try:
        sync = GitSync(store, settings)
        assert sync.run() == 0  # the first sync remembers each HEAD
        first.raw_commit(b"Bad zone at HEAD\n", {"x.py": "X = 1\n"}, b"1700000000 +51800")
        second.commit("Keep syncing me", {"y.py": "Y = 1\n"})
        blob = first.git("rev-parse", "HEAD:x.py")
        first.commit("Another one", {"z.py": "Z = 1\n"})
        (first.path / ".git" / "objects" / blob[:2] / blob[2:]).unlink()  # a corrupt object store:
        (first.path / "x.py").unlink()  # (and no copy in the work tree that git could use instead)
        assert sync.run() == 2  # second's commit and first's readable one
        assert [e["meta"]["message"] for e in store.events_for_path(str(second.path))] == ["Keep syncing me"]
        assert [e["meta"]["message"] for e in store.events_for_path(str(first.path))] == ["Another one"]
    finally:
        store.close()


def test_concurrent_replays_store_each_commit_once(tmp_path: Path, home: Path, repo: Repo):
    for i in range(40):
        repo.commit(f"Change number {i} of the module", {"module.py": f"VALUE = {i}\n"},
                    date=f"2024-04-01T12:{i:02d}:00Z")
    replays = [subprocess.Popen([*GREMLIN, "--home", str(home), "replay", str(repo.path)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in replays]
    assert all(p.returncode == 0 for p in replays), outputs
    store = Store(load_settings(home).memory.db, readonly=True)
    try:
        shas = [e["meta"]["commit"] for e in store.events_for_path(str(repo.path.resolve()))]
        assert len(shas) == 43 and len(set(shas)) == 43
        assert store.counts()["memories"] == 43
    finally:
        store.close()


def test_migration_drops_commits_that_concurrent_replays_stored_twice(tmp_path: Path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for number in range(2):  # the schema as version 2 left it
        for statement in _split_sql(MIGRATIONS[number]):
            conn.execute(statement)
    conn.execute("PRAGMA user_version=2")
    for sha in ("aaa", "bbb", "aaa", "aaa", "bbb"):
        event = conn.execute("INSERT INTO events (time, kind, path, root, meta) VALUES ('t', 'commit', '/r', '/r', ?)",
                             (json.dumps({"commit": sha}),)).lastrowid
        memory = conn.execute("INSERT INTO memories (kind, text, created, event_id) VALUES ('code_diff', ?, 't', ?)",
                              (f"commit {sha}", event)).lastrowid
        conn.execute("INSERT INTO vectors (model_id, memory_id, vec) VALUES ('m', ?, x'00')", (memory,))
    conn.close()
    store = Store(path)
    try:
        assert [(e["id"], e["meta"]["commit"]) for e in store.events_for_path("/r")] == [(1, "aaa"), (2, "bbb")]
        assert store.counts()["memories"] == 2 and store.counts()["vectors"] == 2
        assert store.lexical_search("aaa", 10) and len(store.lexical_search("aaa", 10)) == 1
        twice = NewEvent(kind="commit", path="/r", root="/r", time="t", state=None, meta={"commit": "aaa"},
                         memory_kind="code_diff", memory_text="again")
        assert store.record_events([twice]) == [] and store.counts()["events"] == 2
    finally:
        store.close()


def test_a_shallow_clones_boundary_commit_is_skipped(tmp_path: Path, store: Store, settings, repo: Repo):
    repo.commit("Add the lexer", {"lexer.py": "def lex(text):\n    return text.split()\n"})
    clone = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "2", f"file://{repo.path}", str(clone)], check=True,
                   capture_output=True, timeout=60, env={**os.environ, **GIT_ENV})
    result = replay_repository(store, settings, clone)
    assert (result.commits_seen, result.commits_stored, result.unreadable) == (2, 1, 1)
    [event] = store.events_for_path(str(clone.resolve()))
    assert event["meta"]["message"] == "Add the lexer" and event["meta"]["paths"] == ["lexer.py"]


def test_a_failing_repository_is_logged_once_not_at_every_sync(tmp_path: Path, store: Store, settings,
                                                                 watched: Path, caplog):
    repo = Repo(watched)
    repo.commit("Start", {"a.py": "A = 1\n"})
    store.set_marker(SYNC_MARKER + str(watched), json.dumps({"sha": "0" * 40, "time": "not a time"}))
    sync = GitSync(store, settings)
    with caplog.at_level("INFO", logger="self_training.replay"):
        for _ in range(3):
            assert sync.run() == 0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].repo == str(watched) and "not a time" in errors[0].error
    store.set_marker(SYNC_MARKER + str(watched), json.dumps({"sha": head_sha(watched), "time": "2024-01-01"}))
    repo.commit("Fixed", {"b.py": "B = 1\n"})
    with caplog.at_level("INFO", logger="self_training.replay"):
        assert sync.run() == 1
    assert "git history syncs again" in caplog.text and not sync.failing
