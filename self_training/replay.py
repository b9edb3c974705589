"""Git history as memories: backfill a repository (`gremlin replay`) or follow watched ones.

Each commit becomes one `commit` event (path and root = the repository, diff = the
redacted diff, cut to `[watch] max_diff_bytes`, its sha in the event's meta) and one
`code_diff` memory whose text is the cleaned message and the diff. A commit is stored once
per repository: replaying again stores nothing new. Nothing here loads the model; the
daemon embeds memories without vectors when it catches up.

With `branches` (`[training] replay_branches`, `gremlin replay --branches`), the commits a
merge brought to the main line are stored too, each dated when its merge landed
(`git_history.with_branches`): a history of merged pull requests gives several times the
pairs.

`GitSync` follows watched roots that are the top of a git work tree: the
first sync only remembers HEAD (backfilling is `gremlin replay`'s job); later syncs store
the commits that arrived since.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from memory.store import NewEvent, Store
from self_mutation_watcher.redact import Redactor
from self_training.git_history import (Commit, GitHistoryError, GitLog, clean_message, commit_time, head_sha,
                                       is_ancestor, is_git_repo, load_commit, range_shas, read_log,
                                       repository_root, summary_line, with_branches)

logger = logging.getLogger(__name__)

COMMIT_KIND = "commit"  # the event kind of a commit (its memory is a code_diff)
BATCH = 50  # commits per transaction: a running daemon waits for the write lock at most this long
MAX_PATHS = 200  # changed paths kept in the metadata of one commit
SYNC_MARKER = "git_sync."  # + repository path: {"sha", "time"} of the HEAD synced last

Progress = Callable[[int, int], None]  # (commits done, commits in total)


@dataclass(frozen=True)
class ReplayResult:
    """What one replay or sync of a repository did."""

    repo: str
    commits_seen: int
    commits_stored: int
    skipped: int  # already stored (by this or another process), or a commit without any diff
    unreadable: int = 0  # malformed or missing commits, shallow boundaries: skipped with a warning


def commit_event(commit: Commit, repo: Path, redactor: Redactor, memory_chars: int) -> NewEvent | None:
    """The event and memory of one commit (secrets redacted); None for a commit with no diff."""
    if not commit.diff.strip():
        return None
    diff, found_diff = redactor.redact(commit.diff)
    message, found_message = redactor.redact(commit.message)
    cleaned = clean_message(message)
    paths = list(commit.paths[:MAX_PATHS])
    meta = {"commit": commit.sha, "author": commit.author, "message": message, "paths": paths,
            "paths_total": len(commit.paths), "truncated": commit.truncated, "merge": commit.merge}
    if commit.landed_by:
        meta.update(landed_by=commit.landed_by, committed=commit.committed)
    redacted = _merge_counts(found_diff, found_message)
    if redacted:
        meta["redacted"] = redacted
    text = f"{cleaned}\n\n{diff}"[:memory_chars]
    memory_meta = {"path": str(repo), "label": summary_line(cleaned) or commit.sha[:12], "change": COMMIT_KIND,
                   "commit": commit.sha, "message": cleaned, "author": commit.author, "paths": paths}
    return NewEvent(kind=COMMIT_KIND, path=str(repo), root=str(repo), time=commit.time, state=None,
                    diff=diff, size=len(diff.encode("utf-8")), meta=meta, memory_kind="code_diff",
                    memory_text=text, memory_meta=memory_meta)


def _merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for found in counts:
        for kind, n in found.items():
            merged[kind] = merged.get(kind, 0) + n
    return merged


def replay_repository(store: Store, settings: Settings, repo: Path, since: str | None = None,
                      progress: Progress | None = None, merges: bool = True,
                      branches: bool | None = None) -> ReplayResult:
    """Store every commit of `repo`'s first-parent history (from `since`) not stored yet, and
    with `branches` (default: `[training] replay_branches`) what its merges brought."""
    root = repository_root(repo)
    history = read_history(root, range_shas, dict(since=since), merges,
                           settings.training.replay_branches if branches is None else branches)
    logger.info("replaying git history", extra={"repo": str(root), "commits": len(history.entries),
                                                "unreadable": len(history.skipped), "since": since})
    return store_entries(store, settings, root, history, progress)


def read_history(root: Path, shas_of: Callable[..., list[str]], where: dict, merges: bool,
                 branches: bool) -> GitLog:
    """The commits `shas_of(root, **where, merges=...)` names, with their branches' when asked."""
    history = read_log(root, shas_of(root, **where, merges=merges or branches))
    return with_branches(root, history, merges) if branches else history


def store_entries(store: Store, settings: Settings, root: Path, history: GitLog,
                  progress: Progress | None = None) -> ReplayResult:
    """Read the diff of each commit not stored yet and record them in batches.

    Safe to run in several processes at once: the database stores a commit once per
    repository, so a commit another replay stored first is counted as skipped.
    """
    known = store.commit_shas(str(root))
    redactor = Redactor.build(settings.watch.redact, settings.watch.redact_patterns)
    entries, batch = history.entries, []
    stored = skipped = 0
    unreadable = len(history.skipped)
    for done, entry in enumerate(entries, start=1):
        if entry.sha in known:
            skipped += 1
        else:
            try:
                event = commit_event(load_commit(root, entry, settings.watch.max_diff_bytes), root, redactor,
                                     settings.memory.memory_chars)
            except GitHistoryError as exc:  # one unreadable commit never stops the rest
                logger.warning("skipping a commit whose diff cannot be read",
                               extra={"repo": str(root), "commit": entry.sha, "error": str(exc)})
                unreadable += 1
                event = None
            else:
                skipped += event is None
            if event is not None:
                batch.append(event)
                known.add(entry.sha)
        if len(batch) >= BATCH or (done == len(entries) and batch):
            written = len(store.record_events(batch))  # a commit another process stored first is left out
            stored, skipped, batch = stored + written, skipped + len(batch) - written, []
        if progress is not None:
            progress(done, len(entries))
    return ReplayResult(str(root), len(entries) + len(history.skipped), stored, skipped, unreadable)


class GitSync:
    """Follows the watched roots that are git repositories (the daemon's `git.sync` job).

    Each repository is synced on its own: one that fails (a corrupt object, a timeout,
    anything) is logged once, with the repository and the error, and retried at the next
    run, while the others go on syncing.
    """

    def __init__(self, store: Store, settings: Settings, merges: bool = True):
        self.store = store
        self.settings = settings
        self.merges = merges
        self.failing: dict[str, str] = {}  # repository -> the error it fails with

    def run(self) -> int:
        """Store new commits of every watched git repository; return how many."""
        stored = 0
        for root in self.settings.watch_roots:
            stored += self._sync_one(Path(root))
        return stored

    def _sync_one(self, root: Path) -> int:
        try:
            if not root.is_dir() or not is_git_repo(root):
                return 0
            result = sync_repository(self.store, self.settings, root.resolve(), self.merges)
        except Exception as exc:  # noqa: BLE001 - one broken repository must not stop the others
            error = f"{type(exc).__name__}: {exc}"
            if self.failing.get(str(root)) != error:  # once per distinct error, not every 30 s
                logger.error("cannot sync git history; trying again at each run",
                             exc_info=not isinstance(exc, GitHistoryError),
                             extra={"repo": str(root), "error": error})
            self.failing[str(root)] = error
            return 0
        if self.failing.pop(str(root), None):
            logger.info("git history syncs again", extra={"repo": str(root)})
        return result.commits_stored


def sync_repository(store: Store, settings: Settings, repo: Path, merges: bool = True) -> ReplayResult:
    """The commits of `repo` since the HEAD seen last time (the first time: remember HEAD only)."""
    key = SYNC_MARKER + str(repo)
    head = head_sha(repo)
    cursor = _read_cursor(store.get_marker(key))
    if head is None or (cursor and cursor["sha"] == head):
        return ReplayResult(str(repo), 0, 0, 0)
    result = ReplayResult(str(repo), 0, 0, 0)
    if cursor is not None:
        if is_ancestor(repo, cursor["sha"], head):
            where = dict(after_sha=cursor["sha"], until_sha=head)
        else:  # history rewritten or another branch checked out: what is newer than the cursor
            where = dict(since=cursor["time"], until_sha=head)
        history = read_history(repo, range_shas, where, merges, settings.training.replay_branches)
        result = store_entries(store, settings, repo, history)
        if result.commits_stored:
            logger.info("stored new commits", extra={"repo": str(repo), "commits": result.commits_stored})
    store.set_marker(key, json.dumps({"sha": head, "time": commit_time(repo, head)}))
    return result


def _read_cursor(value: str | None) -> dict | None:
    """The stored {"sha", "time"} of a repository, None if absent or unreadable."""
    try:
        cursor = json.loads(value) if value else None
    except ValueError:
        cursor = None
    if isinstance(cursor, dict) and cursor.get("sha") and cursor.get("time"):
        return cursor
    if value:
        logger.warning("unreadable git sync marker; starting again from HEAD", extra={"value": value[:200]})
    return None
