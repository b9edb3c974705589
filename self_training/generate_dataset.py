"""Training pairs from Gremlin's history, and the dataset files the trainer reads.

Each pair is a query (`input`) and the text it should find (`output`). Sources, named as
in DESIGN.md's row contract:

- **commit**: a commit's cleaned message → its diff (commits from `gremlin replay` or from
  watched repositories).
- **failure_fix**: a failure whose traceback names a file → the first code change to that
  file within `[training] pair_window_s` after it; if there is none, the first change in
  the same root (the root holding the named file, or the log's own root).
- **log**: an error record that names no file → the first code change after it within the
  window.
- **task_rewrite**: a failed or low-reward task → the task that rewrote it and succeeded.
  The rule: a succeeded task whose payload says `"rewrites": <failed task id>` pairs with
  that task; a succeeded task without that key pairs with the latest failed task of the
  same type that finished at most `pair_window_s` before it was created and whose payload
  differs. Each failed task is paired at most once.

A code change is a created/modified/moved/deleted event with a diff (not Gremlin's own
write) or a commit. The builders are pure: records in, pairs out. `clean_pairs` strips
issue numbers, drops trivial pairs, duplicates and queries several outputs share; `split_chronologically` holds out the
newest pairs. `build_dataset` reads the store, writes `auto_generated.jsonl` (train) and
`heldout.jsonl` atomically, and records their sha256 in a manifest beside them.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from config.settings import Settings, TrainingSettings
from memory.atomic import write_bytes_atomically, write_json_atomically
from memory.store import Store, utc_now
from self_mutation_watcher.redact import Redactor
from self_training.feedback_loop import classify_task
from self_training.git_history import clean_message, strip_issue_refs

logger = logging.getLogger(__name__)

SOURCES = ("code_diff", "failure_fix", "task_rewrite", "log", "commit")
DIFF_SOURCES = frozenset({"code_diff", "failure_fix", "log", "commit"})  # their output is a diff
CHANGE_KINDS = frozenset({"created", "modified", "moved", "deleted"})
COMMIT_KIND = "commit"
FAILURE_KIND = "log"  # the event kind of a failure found in a log (its memory kind is "failure")
DATASET_DIR = "nlp_training_sets"
TRAIN_FILE = "auto_generated.jsonl"
HELDOUT_FILE = "heldout.jsonl"
MANIFEST_FILE = "auto_generated.manifest.json"
MIN_INPUT_CHARS = 12
MIN_INPUT_WORDS = 3
EVENTS_PER_PAIR = 4  # the newest max_pairs * this events are read: bounds memory on a long history
ESTIMATE_CHARS = 600  # count_new_pairs reads only the start of each diff (enough to see a changed line)
PAGE = 2000
MAX_FILE_PAIRS = 8  # file_pairs: at most this many files of one diff become pairs of their own


@dataclass(frozen=True)
class Pair:
    """One training pair: a query and the text it should retrieve."""

    input: str
    output: str
    source: str
    event_ids: tuple[int, ...]
    time: str  # when the pair became known (its output's time), ISO-8601 UTC
    task_ids: tuple[int, ...] = ()

    def to_row(self) -> dict:
        """The dataset row (DESIGN.md contract, plus `time`, and `task_ids` for task pairs)."""
        row = {"input": self.input, "output": self.output, "source": self.source,
               "event_ids": list(self.event_ids), "time": self.time}
        if self.task_ids:
            row["task_ids"] = list(self.task_ids)
        return row


@dataclass(frozen=True)
class EventRecord:
    """What the builders need of one event."""

    id: int
    time: str
    kind: str
    path: str
    root: str
    diff: str | None
    meta: dict

    @classmethod
    def from_row(cls, row: dict) -> EventRecord:
        """From a `Store.dataset_events` row."""
        return cls(row["id"], row["time"], row["kind"], row["path"], row["root"], row["diff"], row["meta"] or {})


@dataclass(frozen=True)
class TaskRecord:
    """What the builders need of one finished task."""

    id: int
    type: str
    payload: dict
    state: str
    created: str
    finished: str | None
    result: dict | None
    error: str | None

    @classmethod
    def from_row(cls, row: dict) -> TaskRecord:
        """From a `Store.dataset_tasks` row."""
        payload = row["payload"] if isinstance(row["payload"], dict) else {}
        result = row["result"] if isinstance(row["result"], dict) else None
        return cls(row["id"], row["type"], payload, row["state"], row["created"], row["finished"], result,
                   row["error"])


@dataclass(frozen=True)
class Dataset:
    """The pairs of one build and the files they were written to."""

    train: list[Pair]
    heldout: list[Pair]
    train_path: Path
    heldout_path: Path
    sha256: str  # of the train file
    heldout_sha256: str
    counts: dict[str, int]  # source -> pairs kept (train and held-out)
    last_event_id: int  # the newest event this build saw


# -- pure builders -------------------------------------------------------------------------


def timestamp(text: str) -> float:
    """Seconds since the epoch of an ISO-8601 time (naive = UTC)."""
    value = datetime.fromisoformat(text)
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def commit_pairs(events: Sequence[EventRecord], max_chars: int) -> list[Pair]:
    """Cleaned commit message → the commit's diff."""
    return [Pair(clean_message(e.meta.get("message") or "")[:max_chars], (e.diff or "")[:max_chars], "commit",
                 (e.id,), e.time)
            for e in events if e.kind == COMMIT_KIND and e.diff]


def file_sections(diff: str) -> list[str]:
    """The parts of a unified diff, one per file (each starts at its `diff --git` line)."""
    lines = diff.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("diff --git ")]
    if len(starts) < 2:
        return [diff] if diff else []
    return ["".join(lines[a:b]).strip() for a, b in zip(starts, [*starts[1:], len(lines)])]


def with_file_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """`pairs`, and after each diff pair that touches several files, its input → each file's
    part of the diff (the first MAX_FILE_PAIRS files that change a line): a small history
    gives more to learn from. Only for training pairs; held-out pairs stay whole."""
    out: list[Pair] = []
    for pair in pairs:
        out.append(pair)
        if pair.source not in DIFF_SOURCES:
            continue
        parts = [s for s in file_sections(pair.output) if has_changed_lines(s)]
        if len(parts) > 1:
            out += [dataclasses.replace(pair, output=part) for part in parts[:MAX_FILE_PAIRS]]
    return out


def is_code_change(event: EventRecord) -> bool:
    """A change with a diff that someone other than Gremlin made (a file change or a commit)."""
    if not event.diff or event.meta.get("by_gremlin"):
        return False
    return event.kind == COMMIT_KIND or event.kind in CHANGE_KINDS


def failure_pairs(events: Sequence[EventRecord], window_s: float, max_chars: int) -> list[Pair]:
    """Failure → the change that fixed it (failure_fix); an error naming no file → the next change (log)."""
    changes = sorted((e for e in events if is_code_change(e)), key=lambda e: (timestamp(e.time), e.id))
    times = [timestamp(c.time) for c in changes]
    pairs = []
    for failure in events:
        if failure.kind != FAILURE_KIND or not failure.diff:
            continue
        start = timestamp(failure.time)
        window = changes[bisect.bisect_right(times, start):bisect.bisect_right(times, start + window_s)]
        fix, source = fix_for(failure, window)
        if fix is not None:
            pairs.append(Pair(failure.diff[:max_chars], (fix.diff or "")[:max_chars], source,
                              (failure.id, fix.id), fix.time))
    return pairs


def fix_for(failure: EventRecord, window: Sequence[EventRecord]) -> tuple[EventRecord | None, str]:
    """The change a failure pairs with among the changes that followed it, and the pair's source."""
    file = failure.meta.get("file")
    if not file:
        return (window[0] if window else None), "log"
    touching = next((c for c in window if touches(c, file)), None)
    if touching is not None:
        return touching, "failure_fix"
    same_root = next((c for c in window if _under(file, c.root) or c.root == failure.root), None)
    return same_root, "failure_fix"


def touches(change: EventRecord, file: str) -> bool:
    """Whether a change (file event or commit) changed `file` (absolute, or relative to a root)."""
    if change.kind == COMMIT_KIND:
        paths = change.meta.get("paths") or []
        if os.path.isabs(file):
            return _under(file, change.root) and os.path.relpath(file, change.root) in paths
        return any(p == file or p.endswith("/" + file) for p in paths)
    if os.path.isabs(file):
        return os.path.normpath(file) == os.path.normpath(change.path)
    return change.path.endswith("/" + file.removeprefix("./"))


def _under(file: str, root: str) -> bool:
    return os.path.isabs(file) and os.path.normpath(file).startswith(os.path.normpath(root) + os.sep)


def is_bad_task(task: TaskRecord, reward_threshold: float) -> bool:
    """A task that failed, exited non-zero (shell) or scored below the reward threshold."""
    feedback = classify_task({"type": task.type, "state": task.state, "result": task.result}, reward_threshold)
    return bool(feedback) or (task.type == "self_train" and task.state == "failed")


def task_text(task: TaskRecord, failed: bool) -> str:
    """A task as text: its type and payload, and why it failed."""
    payload = {k: v for k, v in task.payload.items() if k != "rewrites"}
    text = f"{task.type} task: {json.dumps(payload, sort_keys=True, ensure_ascii=False)}"
    if not failed:
        return text
    result = task.result or {}
    why = task.error or "; ".join(f"{k} {result[k]}" for k in ("exit_code", "reward", "stderr") if k in result)
    return f"{text}\nfailed: {why or task.state}"


def task_rewrite_pairs(tasks: Sequence[TaskRecord], window_s: float, reward_threshold: float,
                       max_chars: int) -> list[Pair]:
    """Failed or low-reward task → the succeeded task that rewrote it (see the module docstring)."""
    by_id = {t.id: t for t in tasks if t.type != "self_train"}
    bad = {i for i, t in by_id.items() if is_bad_task(t, reward_threshold)}
    used: set[int] = set()
    pairs = []
    for task in sorted(by_id.values(), key=lambda t: t.id):
        if task.state != "done" or task.id in bad:
            continue
        target = _rewritten(task, by_id, bad - used, window_s)
        if target is not None:
            used.add(target.id)
            pairs.append(Pair(task_text(target, True)[:max_chars], task_text(task, False)[:max_chars],
                              "task_rewrite", (), task.finished or task.created, (target.id, task.id)))
    return pairs


def _rewritten(task: TaskRecord, by_id: dict[int, TaskRecord], open_bad: set[int],
               window_s: float) -> TaskRecord | None:
    """The failed task that `task` rewrote: named by `"rewrites"`, else the latest of its type."""
    named = task.payload.get("rewrites")
    if isinstance(named, int) and not isinstance(named, bool):
        return by_id[named] if named in open_bad and named < task.id else None
    created = timestamp(task.created)
    candidates = [by_id[i] for i in open_bad if i < task.id and by_id[i].type == task.type]
    for old in sorted(candidates, key=lambda t: t.id, reverse=True):
        gap = created - timestamp(old.finished or old.created)
        if 0 <= gap <= window_s and _payload(old) != _payload(task):
            return old
    return None


def _payload(task: TaskRecord) -> dict:
    return {k: v for k, v in task.payload.items() if k != "rewrites"}


def build_pairs(events: Sequence[EventRecord], tasks: Sequence[TaskRecord], training: TrainingSettings,
                max_chars: int) -> list[Pair]:
    """Every pair the records yield, from all sources, before cleaning."""
    return (commit_pairs(events, max_chars) + failure_pairs(events, training.pair_window_s, max_chars)
            + task_rewrite_pairs(tasks, training.pair_window_s, training.reward_threshold, max_chars))


def has_changed_lines(diff: str) -> bool:
    """Whether a unified diff adds or removes at least one line."""
    return any(line.startswith(("+", "-")) and not line.startswith(("+++ ", "--- "))
               for line in diff.splitlines())


def is_trivial(pair: Pair) -> bool:
    """Empty, too short a query, query equal to the answer, or a diff that changes no line."""
    text, output = pair.input.strip(), pair.output.strip()
    if not text or not output or text == output:
        return True
    if len(text) < MIN_INPUT_CHARS or len(text.split()) < MIN_INPUT_WORDS:
        return True
    return pair.source in DIFF_SOURCES and not has_changed_lines(output)


def _order(pair: Pair) -> tuple:
    return timestamp(pair.time), pair.event_ids, pair.task_ids


def clean_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """Oldest first: issue numbers stripped from queries; trivial pairs, duplicates and
    ambiguous queries dropped. A query several different outputs share ("bump version, merge
    from tqdm/devel" 42 times, "[pre-commit.ci] pre-commit autoupdate" 19) names none of them:
    as a training pair it pulls one text toward unrelated diffs, and held out it is a question
    with one right answer among look-alikes that no model can pick."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for pair in sorted(pairs, key=_order):
        pair = dataclasses.replace(pair, input=strip_issue_refs(pair.input).strip(), output=pair.output.strip())
        key = (pair.input, pair.output)
        if is_trivial(pair) or key in seen:
            continue
        seen.add(key)
        kept.append(pair)
    answers = collections.Counter(pair.input for pair in kept)  # duplicates are gone: one per output
    return [pair for pair in kept if answers[pair.input] == 1]


def split_chronologically(pairs: Sequence[Pair], heldout_fraction: float,
                          min_heldout: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): the newest pairs are held out, at least `min_heldout` but never more
    than half; a train pair sharing a text with a held-out pair is dropped (no leak)."""
    ordered = sorted(pairs, key=_order)
    n = len(ordered)
    held_n = min(max(math.ceil(n * heldout_fraction), min_heldout), n // 2)
    train, held = ordered[:n - held_n], ordered[n - held_n:]
    held_texts = {p.input for p in held} | {p.output for p in held}
    return [p for p in train if p.input not in held_texts and p.output not in held_texts], held


def redact_pair(pair: Pair, redactor: Redactor) -> Pair:
    """The pair with secrets redacted from both texts (task payloads were never redacted)."""
    return dataclasses.replace(pair, input=redactor.redact(pair.input)[0] or "",
                               output=redactor.redact(pair.output)[0] or "")


def jsonl(pairs: Sequence[Pair]) -> bytes:
    """The dataset file's bytes: one JSON row a line (a lone surrogate, say from a task payload,
    becomes its JSON escape instead of failing the whole dataset)."""
    return "".join(json.dumps(p.to_row(), ensure_ascii=False) + "\n" for p in pairs).encode("utf-8", "backslashreplace")


def source_counts(pairs: Sequence[Pair]) -> dict[str, int]:
    """How many pairs each source gave."""
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.source] = counts.get(pair.source, 0) + 1
    return counts


# -- effects: the store and the files ------------------------------------------------------


def read_events(store: Store, after_id: int, max_chars: int, limit: int) -> list[EventRecord]:
    """Up to `limit` events after `after_id`, oldest first, diffs cut to `max_chars`."""
    events: list[EventRecord] = []
    while len(events) < limit:
        rows = store.dataset_events(after_id, min(PAGE, limit - len(events)), max_chars)
        events += [EventRecord.from_row(r) for r in rows]
        if len(rows) < PAGE:
            break
        after_id = rows[-1]["id"]
    return events


def collect_pairs(store: Store, settings: Settings, after_event_id: int, max_chars: int,
                  tasks_after: str | None = None) -> tuple[list[Pair], int]:
    """(cleaned pairs, newest event id read) from the events after `after_event_id` and the tasks."""
    cfg = settings.training
    limit = cfg.max_pairs * EVENTS_PER_PAIR
    events = read_events(store, after_event_id, max_chars, limit)
    tasks = [TaskRecord.from_row(t) for t in store.dataset_tasks(limit)]
    if tasks_after:
        tasks = [t for t in tasks if timestamp(t.finished or t.created) > timestamp(tasks_after)]
    redactor = Redactor.build(settings.watch.redact, settings.watch.redact_patterns)
    pairs = [redact_pair(p, redactor) if p.source == "task_rewrite" else p
             for p in build_pairs(events, tasks, cfg, max_chars)]
    return clean_pairs(pairs), (events[-1].id if events else after_event_id)


def build_dataset(store: Store, settings: Settings, now: datetime | None = None) -> Dataset:
    """Build the pairs of the newest history, split them by time, write both files atomically."""
    cfg = settings.training
    floor = store.event_id_floor(cfg.max_pairs * EVENTS_PER_PAIR)
    pairs, last_event_id = collect_pairs(store, settings, floor, settings.memory.memory_chars)
    pairs = pairs[-cfg.max_pairs:]
    train, heldout = split_chronologically(pairs, cfg.heldout_fraction, cfg.min_heldout_pairs)
    folder = settings.data_dir / DATASET_DIR
    train_bytes, heldout_bytes = jsonl(train), jsonl(heldout)
    write_bytes_atomically(folder / TRAIN_FILE, train_bytes)
    write_bytes_atomically(folder / HELDOUT_FILE, heldout_bytes)
    dataset = Dataset(train, heldout, folder / TRAIN_FILE, folder / HELDOUT_FILE,
                      hashlib.sha256(train_bytes).hexdigest(), hashlib.sha256(heldout_bytes).hexdigest(),
                      source_counts([*train, *heldout]), last_event_id)
    write_json_atomically(folder / MANIFEST_FILE, manifest(dataset, now))
    logger.info("dataset built", extra={"train": len(train), "heldout": len(heldout), "counts": dataset.counts,
                                        "sha256": dataset.sha256})
    return dataset


def manifest(dataset: Dataset, now: datetime | None = None) -> dict:
    """What a build wrote, recorded beside the files (the trainer copies the sha256 into lineage)."""
    return {"built": utc_now(now), "train_file": dataset.train_path.name, "sha256": dataset.sha256,
            "heldout_file": dataset.heldout_path.name, "heldout_sha256": dataset.heldout_sha256,
            "train": len(dataset.train), "heldout": len(dataset.heldout), "counts": dataset.counts,
            "last_event_id": dataset.last_event_id}


def count_new_pairs(store: Store, settings: Settings, after_event_id: int) -> int:
    """About how many pairs the events after `after_event_id` (and tasks finished since) yield."""
    since = store.event_time(after_event_id) if after_event_id else None
    pairs, _ = collect_pairs(store, settings, after_event_id, ESTIMATE_CHARS, since)
    return len(pairs)


class NewPairCounter:
    """`count_new_pairs` for the trigger rules, recomputed only when new history arrived.

    The rules ask every check while a rule has fired but too few pairs are new; without
    this each check would re-read every event since the last trigger.
    """

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self._key: tuple | None = None
        self._count = 0

    def __call__(self, after_event_id: int) -> int:
        key = (after_event_id, self.store.history_version())
        if key != self._key:
            self._count = count_new_pairs(self.store, self.settings, after_event_id)
            self._key = key
        return self._count
