"""Git history: real repositories made with git in tmp_path, replayed into a real Store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_core.cli import main
from memory.store import Store
from self_training.git_history import (BadDateError, NotAGitRepository, clean_message, head_sha, is_git_repo,
                                       iter_commits, log_entries, repository_root, truncate_diff)
from self_training.replay import SYNC_MARKER, replay_repository, sync_watched_repositories

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
    assert sync_watched_repositories(store, settings) == 0  # first sync: HEAD only, no backfill
    assert json.loads(store.get_marker(SYNC_MARKER + str(watched)))["sha"] == head_sha(watched)
    assert sync_watched_repositories(store, settings) == 0
    repo.commit("Document how to install it", {"README.md": "hello\npip install it\n"})
    repo.commit("Add a changelog for releases", {"CHANGES.md": "1.0\n"})
    assert sync_watched_repositories(store, settings) == 2
    assert sync_watched_repositories(store, settings) == 0
    repo.git("commit", "-q", "--amend", "-m", "Add a changelog for the 1.0 release", date="2024-03-10T12:00:00Z")
    assert sync_watched_repositories(store, settings) == 1  # rewritten history: newer than the cursor
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
