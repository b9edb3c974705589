"""Read a git repository's history: one `Commit` per change on the first-parent line, and
optionally the commits that merges brought to it (`with_branches`).

git produces every diff (`git diff-tree -p`); this module runs git with argument lists and
timeouts, parses what it prints, and never uses difflib. `clean_message` strips what a
model must not learn from a commit message: issue and PR numbers, merge boilerplate and
trailers, leaving the summary and the body.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from config.errors import GremlinError

logger = logging.getLogger(__name__)

GIT_TIMEOUT_S = 60  # one diff of one commit
LOG_TIMEOUT_S = 300  # the whole log of a large repository
DEFAULT_MAX_DIFF_BYTES = 262_144
CAT_FILE_CHUNK = 2000  # commit objects read per `git cat-file --batch` run
# Settings a user's git config could change in the output we parse.
GIT_CONFIG = ("-c", "core.quotePath=false", "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false",
              "-c", "color.ui=never", "-c", "log.showSignature=false", "-c", "i18n.logOutputEncoding=UTF-8")
DIFF_OPTIONS = ("-r", "-M", "--no-commit-id", "--no-color", "--no-ext-diff", "--no-textconv", "-z",
                "--patch-with-raw")


class GitHistoryError(GremlinError):
    """git could not read a repository's history."""


class NotAGitRepository(GitHistoryError):
    """The path is not (inside) a git repository."""


class BadDateError(GitHistoryError):
    """A --since date is not an ISO-8601 date."""


class BadCommit(GitHistoryError):
    """One commit cannot be turned into a change (the rest of the history can)."""


@dataclass(frozen=True)
class LogEntry:
    """One commit as its raw object says, before its diff is read."""

    sha: str
    parents: tuple[str, ...]
    time: str  # committer time, ISO-8601 UTC; a branch commit's: when its merge reached the main line
    author: str
    message: str
    landed_by: str | None = None  # a branch commit: the merge on the main line that brought it
    committed: str | None = None  # a branch commit: its own committer time

    @property
    def is_merge(self) -> bool:
        """Whether the commit has more than one parent."""
        return len(self.parents) > 1


@dataclass(frozen=True)
class Commit:
    """One change of the history: its message and the diff against its first parent."""

    sha: str
    time: str  # committer time, ISO-8601 UTC
    author: str
    message: str
    diff: str
    paths: tuple[str, ...]
    truncated: bool = False  # the diff was cut to max_diff_bytes
    merge: bool = False
    landed_by: str | None = None  # a branch commit: the merge that brought it to the main line
    committed: str | None = None  # a branch commit: its own committer time


def git(repo: Path, *args: str, timeout: float = GIT_TIMEOUT_S, stdin: bytes | None = None) -> bytes:
    """stdout of `git -C repo args...`; GitHistoryError naming the repo and git's message."""
    cmd = ["git", *GIT_CONFIG, "-C", str(repo), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False,
                              **({"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}))
    except FileNotFoundError as exc:
        raise GitHistoryError("git is not installed; install it (e.g. `apt-get install git`)") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitHistoryError(f"git {args[0]} in {repo} took more than {timeout:.0f} s; "
                              "try a smaller range with --since") from exc
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitHistoryError(f"git {args[0]} failed in {repo}: {message[-1] if message else proc.returncode}")
    return proc.stdout


def repository_root(path: Path) -> Path:
    """The top folder of the work tree holding `path` (or the folder of a bare repository)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise NotAGitRepository(f"{path} is not a folder; give the path of a git repository")
    try:
        bare = git(path, "rev-parse", "--is-bare-repository").strip() == b"true"
        where = git(path, "rev-parse", "--absolute-git-dir" if bare else "--show-toplevel")
    except GitHistoryError as exc:
        raise NotAGitRepository(f"{path} is not inside a git repository; give the folder of a git clone, "
                                f"or run `git init` there first ({exc})") from exc
    return Path(where.decode("utf-8", "replace").strip()).resolve()


def is_git_repo(path: Path) -> bool:
    """Whether `path` is the top folder of a git work tree (or a bare repository)."""
    try:
        return repository_root(path) == Path(path).expanduser().resolve()
    except NotAGitRepository:
        return False


def head_sha(repo: Path) -> str | None:
    """The commit HEAD points at; None in a repository without commits yet."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").decode().strip() or None
    except GitHistoryError:
        repository_root(repo)  # not a repository at all: NotAGitRepository says so
        return None


def commit_time(repo: Path, sha: str) -> str:
    """The committer time of one commit, ISO-8601 UTC (the author time if that one is impossible)."""
    entry = next(iter(read_log(repo, [sha]).entries), None)
    return entry.time if entry else utc_iso(datetime.now(timezone.utc))


def is_ancestor(repo: Path, older: str, newer: str) -> bool:
    """Whether commit `older` is reachable from `newer` (False when `older` is unknown)."""
    cmd = ["git", *GIT_CONFIG, "-C", str(repo), "merge-base", "--is-ancestor", older, newer]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=GIT_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def parse_since(text: str) -> str:
    """An ISO-8601 date or time (naive = UTC) as the UTC timestamp git's --since gets."""
    try:
        value = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError) as exc:
        raise BadDateError(f"--since {text!r} is not a date; use ISO-8601 such as 2024-01-31 "
                           "or 2024-01-31T12:00:00Z") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="seconds")


def utc_iso(moment: datetime) -> str:
    """A time as UTC with milliseconds, like every Gremlin time."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class SkippedCommit:
    """A commit that cannot become a change, and why."""

    sha: str
    reason: str


@dataclass(frozen=True)
class GitLog:
    """The commits of a range, oldest first, and those skipped (already logged as warnings)."""

    entries: list[LogEntry]
    skipped: list[SkippedCommit]


def log_entries(repo: Path, since: str | None = None, until_sha: str | None = None,
                after_sha: str | None = None, merges: bool = False) -> list[LogEntry]:
    """Commits of the first-parent line, oldest first: up to `until_sha` (default HEAD),
    after `after_sha`, committed on or after `since`; merges only when `merges`.
    Commits that cannot be read are left out with a warning (see `read_log`)."""
    return read_log(repo, range_shas(repo, since, until_sha, after_sha, merges)).entries


def range_shas(repo: Path, since: str | None = None, until_sha: str | None = None,
               after_sha: str | None = None, merges: bool = False) -> list[str]:
    """The shas of the first-parent line, oldest first (see `log_entries`)."""
    tip = until_sha or head_sha(repo)
    if tip is None:
        return []  # no commits yet
    args = ["rev-list", "--first-parent", "--reverse"]
    if not merges:
        args.append("--no-merges")
    if since:
        args.append(f"--since={parse_since(since)}")
    args += [f"{after_sha}..{tip}" if after_sha else tip, "--"]
    return git(repo, *args, timeout=LOG_TIMEOUT_S).decode("ascii", "replace").split()


def read_log(repo: Path, shas: Sequence[str]) -> GitLog:
    """Each commit of `shas` parsed from its raw object (`git cat-file --batch`).

    Raw objects are length-prefixed, so no byte of a message (the \\x1e or \\x1f that
    `git log` formats use as separators, NUL) can break the parsing. Times come from the
    Unix timestamps, so a malformed timezone (`+51800`, which `git fsck` calls
    badTimezone) cannot break them. A shallow clone's boundary commits, whose parents
    are missing, and commits whose object or dates cannot be read are skipped, each with
    a warning.
    """
    shallow = shallow_boundaries(repo)
    entries: list[LogEntry] = []
    skipped: list[SkippedCommit] = []
    for start in range(0, len(shas), CAT_FILE_CHUNK):
        for sha, raw in _cat_commits(repo, shas[start:start + CAT_FILE_CHUNK]):
            try:
                if sha in shallow:
                    raise BadCommit("the boundary of a shallow clone (its parent is not in this clone, "
                                    "so its diff would add every file); run `git fetch --unshallow` to include it")
                entries.append(parse_commit(sha, raw))
            except BadCommit as exc:
                logger.warning("skipping a commit", extra={"repo": str(repo), "commit": sha, "reason": str(exc)})
                skipped.append(SkippedCommit(sha, str(exc)))
    return GitLog(entries, skipped)


def with_branches(repo: Path, history: GitLog, merges: bool = True) -> GitLog:
    """`history` (a main line read with its merges) with, before each merge, the commits it
    brought: those reachable from the merge but not from its first parent, merges left out,
    oldest first, each dated when the merge reached the main line (so a chronological split
    never trains on a branch commit that landed after the held-out ones). A merge that
    brought one commit is left out (that commit is the same change, in its author's words);
    the others stay as summaries unless `merges` is false."""
    entries: list[LogEntry] = []
    skipped = list(history.skipped)
    for entry in history.entries:
        if not entry.is_merge:
            entries.append(entry)
            continue
        branch = read_log(repo, branch_shas(repo, entry))
        skipped += branch.skipped
        entries += [dataclasses.replace(b, time=entry.time, landed_by=entry.sha, committed=b.time)
                    for b in branch.entries]
        if merges and len(branch.entries) + len(branch.skipped) != 1:
            entries.append(entry)
    return GitLog(entries, skipped)


def branch_shas(repo: Path, merge: LogEntry) -> list[str]:
    """The non-merge commits `merge` brought to its first parent's line, oldest first."""
    out = git(repo, "rev-list", "--reverse", "--topo-order", "--no-merges", f"{merge.parents[0]}..{merge.sha}",
              "--", timeout=LOG_TIMEOUT_S)
    return out.decode("ascii", "replace").split()


def shallow_boundaries(repo: Path) -> frozenset[str]:
    """The commits a shallow clone was cut at (their parents are not in the clone)."""
    path = Path(git(repo, "rev-parse", "--git-path", "shallow").decode("utf-8", "surrogateescape").strip())
    path = path if path.is_absolute() else Path(repo) / path
    try:
        return frozenset(path.read_text(encoding="ascii", errors="replace").split())
    except FileNotFoundError:
        return frozenset()


def _cat_commits(repo: Path, shas: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
    """(sha, raw commit object or None when missing) for each sha, in order."""
    out = git(repo, "cat-file", "--batch", stdin="".join(f"{s}\n" for s in shas).encode(), timeout=LOG_TIMEOUT_S)
    pos = 0
    for sha in shas:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        if len(header) != 3 or header[1] != b"commit":
            pos = end + 1
            yield sha, None
            continue
        size = int(header[2])
        yield sha, out[end + 1:end + 1 + size]
        pos = end + 1 + size + 1  # the object is followed by a newline


_IDENT = re.compile(rb"^(?P<name>.*?) *<[^>]*> *(?P<ts>-?\d+)?")


def parse_commit(sha: str, raw: bytes | None) -> LogEntry:
    """A LogEntry from a raw commit object; BadCommit when it is missing or has no usable date."""
    if raw is None:
        raise BadCommit("the commit object is missing from the repository")
    head, _, body = raw.partition(b"\n\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\n"):
        if line[:1] != b" ":  # continuation lines belong to a multi-line header (gpgsig)
            key, _, value = line.partition(b" ")
            fields.setdefault(key, []).append(value)
    author, author_time = _ident(fields.get(b"author", [b""])[0])
    _, committer_time = _ident(fields.get(b"committer", [b""])[0])
    moment = committer_time or author_time
    if moment is None:
        raise BadCommit("neither its committer nor its author date is a possible date")
    encoding = fields.get(b"encoding", [b"utf-8"])[0].decode("ascii", "replace")
    parents = tuple(p.decode("ascii", "replace") for p in fields.get(b"parent", []))
    return LogEntry(sha, parents, utc_iso(moment), _decode(author, encoding), _printable(_decode(body, encoding)))


def _ident(value: bytes) -> tuple[bytes, datetime | None]:
    """(name, time) of an author or committer header; time None when absent or impossible."""
    match = _IDENT.match(value)
    if not match:
        return value, None
    try:
        return match["name"], datetime.fromtimestamp(int(match["ts"]), timezone.utc) if match["ts"] else None
    except (ValueError, OverflowError, OSError):  # beyond what a datetime holds
        return match["name"], None


def _decode(data: bytes, encoding: str) -> str:
    """Text in the commit's declared encoding (UTF-8 when unknown), bad bytes replaced."""
    try:
        return data.decode(encoding, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _printable(message: str) -> str:
    """A message without control characters other than tab and newlines, stripped."""
    return _CONTROL.sub(" ", message).strip()


def commit_diff(repo: Path, entry: LogEntry, max_diff_bytes: int = DEFAULT_MAX_DIFF_BYTES
                ) -> tuple[str, tuple[str, ...], bool]:
    """(diff against the first parent, changed paths, whether the diff was cut) of one commit."""
    trees = [entry.parents[0], entry.sha] if entry.parents else ["--root", entry.sha]
    raw, _, patch = git(repo, "diff-tree", *DIFF_OPTIONS, *trees).partition(b"\0\0")
    diff, truncated = truncate_diff(patch.decode("utf-8", "replace"), max_diff_bytes)
    return diff, raw_paths(raw.decode("utf-8", "replace")), truncated


def raw_paths(raw: str) -> tuple[str, ...]:
    """The paths named by `git diff-tree -z --raw` output (a rename names its new path)."""
    tokens, paths, i = raw.split("\0"), [], 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith(":"):
            status = token.split()[-1][:1]
            width = 2 if status in ("R", "C") else 1
            names = tokens[i + 1:i + 1 + width]
            if names:
                paths.append(names[-1])
            i += 1 + width
        else:
            i += 1
    return tuple(dict.fromkeys(paths))


def truncate_diff(diff: str, max_bytes: int) -> tuple[str, bool]:
    """`diff` cut to at most `max_bytes` UTF-8 bytes at a line end (mid-line if it is one line)."""
    data = diff.encode("utf-8")
    if len(data) <= max_bytes:
        return diff, False
    cut = data[:max_bytes]
    end = cut.rfind(b"\n")
    return (cut[:end + 1] if end > 0 else cut).decode("utf-8", "ignore"), True


def iter_commits(repo: Path, since: str | None = None, until_sha: str | None = None,
                 max_diff_bytes: int = DEFAULT_MAX_DIFF_BYTES, *, after_sha: str | None = None,
                 merges: bool = False) -> Iterator[Commit]:
    """Each commit of the first-parent line, oldest first, with its diff (see `log_entries`).

    Merges are skipped unless `merges`; then a merge is one change, diffed against its first
    parent (a merged pull request as a whole).
    """
    root = repository_root(repo)
    for entry in log_entries(root, since, until_sha, after_sha, merges):
        yield load_commit(root, entry, max_diff_bytes)


def load_commit(repo: Path, entry: LogEntry, max_diff_bytes: int = DEFAULT_MAX_DIFF_BYTES) -> Commit:
    """The Commit of one log entry (runs git for its diff)."""
    diff, paths, truncated = commit_diff(repo, entry, max_diff_bytes)
    return Commit(entry.sha, entry.time, entry.author, entry.message, diff, paths, truncated, entry.is_merge,
                  entry.landed_by, entry.committed)


# -- commit messages -----------------------------------------------------------------------

TRAILER = re.compile(r"^\s*(?:signed-off-by|co-authored-by|reviewed-by|acked-by|tested-by|reported-by|"
                     r"suggested-by|helped-by|reviewed-on|change-id|cc|pr-url|closes-issue)\s*:.*$",
                     re.IGNORECASE | re.MULTILINE)
MERGE_PR = re.compile(r"^\s*Merge (?:pull request|PR|branch|remote-tracking branch|tag)\b.*$",
                      re.IGNORECASE | re.MULTILINE)
PR_BRANCH = re.compile(r"^\s*Merge pull request #\d+ from [^/\s]+/(\S+)", re.IGNORECASE)
_REF = r"(?:[\w.-]+/[\w.-]+)?#\d+|\bGH-\d+\b|https?://github\.com/[\w.-]+/[\w.-]+/(?:issues|pull)/\d+\S*"
# "Fixes #12", "closes #3, #4 and #5", "see GH-7": the verb goes with its references.
VERB_REFS = re.compile(rf"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?|refs?|references|see|related to|"
                       rf"addresse[sd]|part of|for|by|in|from|via|per|on)\s*:?\s*(?:{_REF})"
                       rf"(?:\s*(?:,|and|&)\s*(?:{_REF}))*", re.IGNORECASE)
BARE_REFS = re.compile(rf"\(\s*(?:{_REF})(?:\s*,\s*(?:{_REF}))*\s*\)|\[\s*(?:{_REF})\s*\]|"
                       rf"\b(?:PR|pull request|issue)\s*(?=#)|{_REF}", re.IGNORECASE)


def clean_message(message: str) -> str:
    """The commit message without issue/PR numbers, merge boilerplate and trailers."""
    text = message.replace("\r\n", "\n")
    branch = PR_BRANCH.match(text)
    text = TRAILER.sub("", MERGE_PR.sub("", text))
    text = strip_issue_refs(text)
    if not text.strip() and branch:  # a bare "Merge pull request #1 from a/fix-the-parser"
        text = re.sub(r"[-_/]+", " ", branch.group(1))
    return _tidy(text)


def strip_issue_refs(text: str) -> str:
    """`text` without issue and pull-request references (#123, GH-123, owner/repo#1, their URLs)."""
    return BARE_REFS.sub("", VERB_REFS.sub("", text))


def _tidy(text: str) -> str:
    """Collapse the spaces and empty lines that removals leave behind."""
    lines = []
    for line in text.split("\n"):
        indent = line[:len(line) - len(line.lstrip())]
        line = indent + re.sub(r"[ \t]{2,}", " ", line.strip())
        line = re.sub(r"\s+([,.;:)])", r"\1", line)
        line = re.sub(r"\(\s*\)|\[\s*\]", "", line).rstrip(" ,;")
        line = re.sub(r"^(\s*)[,;:]+\s*", r"\1", line)
        lines.append(line if line.strip(" .,;:-") else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def summary_line(message: str, limit: int = 100) -> str:
    """The first non-empty line of a message, cut to `limit` characters."""
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return first if len(first) <= limit else first[:limit - 1] + "…"
