"""Retention: drop the memories past the [retention] limits of their kind, never those still needed.

A memory is past a limit when it was created more than `max_age_days` ago, or when it is not
among the newest `max_count` memories of its kind (by creation time, then id). It is evicted
unless something still needs it. Kept whatever the limits:

- a memory whose `replaceable` is false (retrain memories: training results);
- a memory a training pair refers to: its event id is in the `event_ids` of a line of the
  current dataset files (data/nlp_training_sets/auto_generated.jsonl and heldout.jsonl), or the
  task id in its meta (`task_id`) is in the `task_ids` of one;
- a memory a queued or running task refers to: the task it records (meta `task_id`) is that
  task, or the task that one retries (`retry_of`) or rewrites (payload `rewrites`); or it is the
  failure a mutate task was proposed for (payload `failure_id`);
- the memory with the highest id (SQLite would hand its id out again).

Kept memories still take their place among the newest `max_count`, so a kind can hold more than
its limit while old memories of it are needed. The store checks the task references in the
same transaction as each delete; the dataset's are read here (the store reads no files).

Eviction deletes the rows (their full-text rows and vectors go with them, in the same
transaction), then drops their ids from the live index.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from config.settings import RetentionSettings
from memory.errors import MemoryLayerError
from memory.store import Store, utc_now

if TYPE_CHECKING:
    from memory.service import Memory

logger = logging.getLogger(__name__)

LAST_SUMMARY = "retention.last"  # marker: the summary of the last policy applied (dry runs are not kept)


class RetentionError(MemoryLayerError):
    """What retention needs to know before it deletes anything cannot be read."""


@dataclass
class DatasetRefs:
    """The event and task ids the training pairs of the dataset files refer to."""

    event_ids: set[int] = field(default_factory=set)
    task_ids: set[int] = field(default_factory=set)
    skipped_lines: int = 0


def dataset_references(paths: Sequence[Path]) -> DatasetRefs:
    """The ids the pairs in `paths` name (a missing file names none; a malformed line is skipped and counted)."""
    refs = DatasetRefs()
    for path in paths:
        _read_references(Path(path), refs)
    return refs


def _read_references(path: Path, refs: DatasetRefs) -> None:
    skipped = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                ids = _line_ids(line) if line.strip() else ([], [])
                if ids is None:
                    skipped += 1
                    continue
                refs.event_ids.update(ids[0])
                refs.task_ids.update(ids[1])
    except FileNotFoundError:
        return  # no dataset built yet: no pair needs anything
    except OSError as exc:  # unknown references: evicting now could delete what a pair needs
        raise RetentionError(f"cannot read the dataset file {path} ({exc.strerror or exc}); retention reads it "
                             "to keep the memories training pairs use: give this user read access to it") from exc
    if skipped:
        logger.warning("malformed dataset lines skipped; they protect no memory from retention",
                       extra={"file": str(path), "lines": skipped})
    refs.skipped_lines += skipped


def _line_ids(line: str) -> tuple[list[int], list[int]] | None:
    """(event ids, task ids) of one dataset line, or None when it is not a pair with id lists."""
    try:
        pair = json.loads(line)
    except ValueError:
        return None
    if not isinstance(pair, dict):
        return None
    ids = (pair.get("event_ids", []), pair.get("task_ids", []))
    if not all(isinstance(v, list) and all(_is_id(i) for i in v) for v in ids):
        return None
    return ids


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def apply_policy(settings, store: Store, memory: Memory | None = None, dataset_files: Sequence[Path] = (),
                 dry_run: bool = False, now: datetime | None = None) -> dict:
    """Evict what [retention] says (with dry_run: only count it); returns a JSON-ready summary.

    `memory` is the live Memory whose current index drops the evicted ids (None: no index is
    loaded here; each index drops them when it is next opened).
    """
    cfg, started = settings.retention, time.monotonic()
    refs = dataset_references(dataset_files)
    evicted = {kind: _apply_kind(store, cfg, kind, refs, dry_run, now) for kind in cfg.limited_kinds}
    if not dry_run:
        _drop_from_index(memory, [i for ids in evicted.values() for i in ids])
    summary = _summary(cfg, evicted, refs, dry_run, now, time.monotonic() - started)
    logger.info("retention dry run" if dry_run else "retention applied",
                extra={"evicted": summary["evicted"], "total": summary["total"], "seconds": summary["seconds"]})
    if summary["configured"] and not dry_run:
        store.set_marker(LAST_SUMMARY, json.dumps(summary))
    return summary


def _apply_kind(store: Store, cfg: RetentionSettings, kind: str, refs: DatasetRefs, dry_run: bool,
                now: datetime | None) -> list[int]:
    """The ids of `kind` evicted (or, in a dry run, that would be)."""
    days = cfg.max_age_days.get(kind)
    older_than = utc_now((now or datetime.now(timezone.utc)) - timedelta(days=days)) if days else None
    args = (kind, cfg.max_count.get(kind), older_than, refs.event_ids, refs.task_ids)
    return store.evictable_memories(*args) if dry_run else store.evict_memories(*args, batch=cfg.batch)


def _drop_from_index(memory: Memory | None, ids: list[int]) -> None:
    # After the commit: a crash before this line is harmless. The index is a cache of the
    # database: VectorIndex.sync drops ids the database no longer has when the index is next
    # opened, and search leaves out any hit whose memory row is gone.
    if memory is not None and ids:
        memory.current()[1].remove(np.array(ids, dtype=np.int64))


def _summary(cfg: RetentionSettings, evicted: dict[str, list[int]], refs: DatasetRefs, dry_run: bool,
             now: datetime | None, seconds: float) -> dict:
    limits = {kind: {"max_count": cfg.max_count.get(kind), "max_age_days": cfg.max_age_days.get(kind)}
              for kind in cfg.limited_kinds}
    return {"time": utc_now(now), "dry_run": dry_run, "configured": bool(limits), "limits": limits,
            "evicted": {kind: len(ids) for kind, ids in evicted.items()},
            "total": sum(len(ids) for ids in evicted.values()),
            "kept_for_training": {"events": len(refs.event_ids), "tasks": len(refs.task_ids)},
            "skipped_lines": refs.skipped_lines, "seconds": round(seconds, 3)}


def last_summary(store: Store) -> dict | None:
    """The summary of the last policy applied to this home, or None (never applied, or unreadable)."""
    try:
        summary = json.loads(store.get_marker(LAST_SUMMARY) or "null")
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None
