"""Retrain triggers: pure rules over recent events, and the trigger file they write.

The rules (`decide`) take a `Signals` value and return a `Trigger` or None:

- **mutation_watcher**: at least `min_logic_changes` changes to the "logic" files named by
  `[training] logic_globs` since the last trigger;
- **semantic_drift**: the drift detector reports drifting, or over the last
  `confidence_window` new memories the mean top-1 similarity (1 - vector shift) is below
  `confidence_threshold` or the mean vector shift is above `[watch] drift_threshold`;
- **feedback**: a failed task, a shell command that exited non-zero, or a reward below
  `reward_threshold`.

Every rule waits for `cooldown_s` after the last trigger and for at least `min_new_pairs`
new training pairs, so an edit storm cannot start a training storm. An explicit
`{"type": "self_train"}` task is not a rule: the task runner writes its (forced) trigger
when it runs the task (agent_core.tool_executor), so a cancelled one trains nothing.

The trigger file `run/checkpoints/retrain_trigger.json` follows the contract in DESIGN.md.
It is written atomically; a trigger that arrives while one is pending is coalesced into it;
the trainer claims it exactly once by renaming it; a malformed file is moved aside to
`run/checkpoints/rejected/` with a logged error, never a crash. `FeedbackLoop` is the
effectful wrapper: it reads what is new in the store, keeps its cursors and the pending
signals in the store's markers, and writes the trigger.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath

from config.errors import GremlinError
from config.settings import Settings, TrainingSettings
from memory.atomic import fsync_dir, write_json_atomically
from memory.store import Store

logger = logging.getLogger(__name__)

TRIGGER_KINDS = ("mutation_watcher", "semantic_drift", "task", "feedback", "manual")
TRIGGER_NAME = "retrain_trigger.json"
REJECTED_DIR = "rejected"
MAX_EVENT_IDS = 1000  # a coalesced trigger keeps the newest ids; the note keeps the counts
MAX_NOTE_CHARS = 4000  # coalescing an endless stream of triggers must not grow the file forever
MAX_TASK_IDS = 1000
PAGE = 1000  # rows read from the store at a time
MARKER_PREFIX = "feedback."
LAST_TRIGGER_KEY = MARKER_PREFIX + "last_trigger_time"
LAST_EVENT_KEY = MARKER_PREFIX + "last_event_id"
STATE_KEY = MARKER_PREFIX + "state"


class TriggerError(GremlinError):
    """A trigger file or trigger value is malformed."""


# -- the trigger and its file --------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """One request to retrain, as written to `retrain_trigger.json`."""

    trigger: str
    time: str
    note: str = ""
    event_ids: tuple[int, ...] = ()
    force: bool = False
    task_ids: tuple[int, ...] = ()  # the self_train tasks waiting for this run

    def to_dict(self) -> dict:
        """The contract's JSON object (`force` and `task_ids` only when set)."""
        out = {"trigger": self.trigger, "time": self.time, "note": self.note,
               "event_ids": list(self.event_ids)}
        if self.force:
            out["force"] = True
        if self.task_ids:
            out["task_ids"] = list(self.task_ids)
        return out


def iso_utc(now: datetime | None = None) -> str:
    """ISO-8601 UTC timestamp with milliseconds (naive datetimes are taken as UTC)."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(text: str) -> datetime:
    """An ISO-8601 timestamp as an aware UTC datetime; raise ValueError if it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"not a string: {text!r}")
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def parse_trigger(text: str, source: Path, now: datetime | None = None) -> Trigger:
    """Validate a trigger file's text; raise TriggerError naming the file, the key and the fix.

    A missing `time` means now (a person may write just `{"trigger": "manual"}`).
    """
    where = f"trigger file {source}"
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise TriggerError(f"{where}: not valid JSON ({exc}); write one JSON object such as "
                           '{"trigger": "manual", "time": "2024-01-01T00:00:00Z"}') from exc
    if not isinstance(raw, dict):
        raise TriggerError(f"{where}: must be a JSON object, got {type(raw).__name__}; "
                           'write an object such as {"trigger": "manual"}')
    kind = raw.get("trigger")
    if kind not in TRIGGER_KINDS:
        raise TriggerError(f"{where}: key 'trigger' must be one of {', '.join(TRIGGER_KINDS)} "
                           f"(got {kind!r}); fix it or use \"manual\"")
    return Trigger(kind, _parse_time_key(raw, where, now), _parse_note(raw, where),
                   _parse_event_ids(raw, where), _parse_force(raw, where), _parse_ids(raw, "task_ids", "task", where))


def _parse_time_key(raw: dict, where: str, now: datetime | None) -> str:
    if "time" not in raw:
        return iso_utc(now)
    try:
        return iso_utc(parse_time(raw["time"]))
    except ValueError as exc:
        raise TriggerError(f"{where}: key 'time' must be an ISO-8601 UTC time such as "
                           f"2024-01-01T00:00:00Z (got {raw['time']!r}); fix it or delete the key") from exc


def _parse_note(raw: dict, where: str) -> str:
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise TriggerError(f"{where}: key 'note' must be a string (got {note!r}); fix it or delete the key")
    return note


def _parse_event_ids(raw: dict, where: str) -> tuple[int, ...]:
    return _parse_ids(raw, "event_ids", "event", where)


def _parse_ids(raw: dict, key: str, what: str, where: str) -> tuple[int, ...]:
    ids = raw.get(key, [])
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TriggerError(f"{where}: key '{key}' must be a list of integer {what} ids "
                           f"(got {ids!r}); fix it or delete the key")
    return _cap_ids(ids, MAX_EVENT_IDS if what == "event" else MAX_TASK_IDS)


def _parse_force(raw: dict, where: str) -> bool:
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise TriggerError(f"{where}: key 'force' must be true or false (got {force!r}); fix it or delete the key")
    return force


def _cap_ids(ids: Sequence[int], cap: int) -> tuple[int, ...]:
    """Sorted unique ids, the newest `cap` of them."""
    return tuple(sorted(set(ids)))[-cap:] if cap else ()


def _join_notes(*notes: str) -> str:
    parts = list(dict.fromkeys(n for n in notes if n))
    joined = "; ".join(parts)
    return joined if len(joined) <= MAX_NOTE_CHARS else joined[:MAX_NOTE_CHARS - 1] + "…"


def coalesce(first: Trigger, second: Trigger) -> Trigger:
    """One trigger standing for both: earliest time, the first's kind, all ids and notes."""
    earliest = min(first.time, second.time, key=parse_time)
    return Trigger(first.trigger, earliest, _join_notes(first.note, second.note),
                   _cap_ids((*first.event_ids, *second.event_ids), MAX_EVENT_IDS),
                   first.force or second.force, _cap_ids((*first.task_ids, *second.task_ids), MAX_TASK_IDS))


def manual_trigger(note: str = "", force: bool = False, now: datetime | None = None) -> Trigger:
    """A trigger asked for by a person (`gremlin train`)."""
    return Trigger("manual", iso_utc(now), note or "manual retrain request", (), force)


def trigger_path(settings: Settings) -> Path:
    """Where the rules write the trigger and the trainer looks for it."""
    return settings.run_dir / "checkpoints" / TRIGGER_NAME


def rejected_path(path: Path, now: datetime | None = None) -> Path:
    """A free name under `<checkpoints>/rejected/` for a malformed trigger file."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stem = f"retrain_trigger.{now.strftime('%Y%m%dT%H%M%S.%fZ')}"
    folder = path.parent / REJECTED_DIR
    candidate, n = folder / f"{stem}.json", 1
    while candidate.exists():
        candidate, n = folder / f"{stem}-{n}.json", n + 1
    return candidate


@contextmanager
def _trigger_lock(path: Path) -> Iterator[None]:
    """Serialise writers and claimers of one trigger file (flock: also between threads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _set_aside(path: Path, error: str, checkpoints: Path) -> Path | None:
    """Move a malformed trigger file to `<checkpoints>/rejected/` and log why; None if it vanished."""
    target = rejected_path(checkpoints / TRIGGER_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    logger.error("malformed retrain trigger %s moved aside to %s: %s", path, target, error,
                 extra={"file": str(path), "moved_to": str(target), "error": error})
    return target


def _read_trigger(path: Path, checkpoints: Path) -> Trigger | None:
    """The trigger in `path`; None if absent or malformed (then moved aside and logged)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        _set_aside(path, f"trigger file {path}: cannot read as UTF-8 text ({exc})", checkpoints)
        return None
    try:
        return parse_trigger(text, path)
    except TriggerError as exc:
        _set_aside(path, str(exc), checkpoints)
        return None


def _normalised(path: Path, trigger: Trigger) -> Trigger:
    """`trigger` as it will read back (canonical time, sorted ids); TriggerError if invalid."""
    return parse_trigger(json.dumps(trigger.to_dict()), path)


def _merge_into(path: Path, trigger: Trigger, pending_first: bool) -> Trigger:
    """Coalesce `trigger` with the pending one (caller holds the lock) and write the result."""
    trigger = _normalised(path, trigger)
    pending = _read_trigger(path, path.parent)
    if pending is not None:
        trigger = coalesce(pending, trigger) if pending_first else coalesce(trigger, pending)
    write_json_atomically(path, trigger.to_dict())
    return trigger


def write_trigger_atomically(path: Path, trigger: Trigger) -> Trigger:
    """Write `trigger`, coalesced into any pending one; return what was written."""
    with _trigger_lock(path):
        return _merge_into(path, trigger, pending_first=True)


def requeue_trigger(path: Path, trigger: Trigger) -> Trigger:
    """Put a claimed trigger back (after a crash), ahead of any pending one; return what was written."""
    with _trigger_lock(path):
        return _merge_into(path, trigger, pending_first=False)


def claim_trigger(path: Path, claim_path: Path) -> Trigger | None:
    """Take the pending trigger exactly once (rename to `claim_path`); None if there is none.

    While `claim_path` exists a run is in progress: nothing more is claimed (new triggers
    wait, coalescing). Delete `claim_path` when the run is over; after a crash,
    `recover_claim` puts it back. A malformed file is moved to `rejected/` and logged;
    this never raises.
    """
    with _trigger_lock(path):
        if claim_path.exists():
            logger.debug("a claimed trigger is still in progress", extra={"file": str(claim_path)})
            return None
        claim_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, claim_path)
        except FileNotFoundError:
            return None
        fsync_dir(path.parent)
        if claim_path.parent != path.parent:
            fsync_dir(claim_path.parent)
    return _read_trigger(claim_path, path.parent)


def recover_claim(path: Path, claim_path: Path) -> Trigger | None:
    """Put back a claim left by a run that never finished (call at startup); return what was written."""
    with _trigger_lock(path):
        leftover = _read_trigger(claim_path, path.parent)
        if leftover is None:
            return None
        written = _merge_into(path, leftover, pending_first=False)
        claim_path.unlink(missing_ok=True)
        fsync_dir(claim_path.parent)
    logger.warning("an unfinished claimed trigger was put back", extra={"file": str(claim_path)})
    return written


# -- the rules (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Signals:
    """What the rules look at, gathered since the last trigger (ids in ascending order)."""

    logic_event_ids: tuple[int, ...] = ()
    shifts: tuple[float, ...] = ()  # vector shifts of new memories, newest last
    drifting: bool = False
    failed_task_ids: tuple[int, ...] = ()
    low_reward_ids: tuple[int, ...] = ()
    nonzero_shell_ids: tuple[int, ...] = ()
    new_pairs: int = 0
    last_trigger_time: str | None = None
    since_event_id: int = 0  # the newest event when the last trigger fired


def _ids_text(ids: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def mutation_rule(signals: Signals, cfg: TrainingSettings) -> str | None:
    """Note of the mutation rule when enough logic files changed, else None."""
    n = len(signals.logic_event_ids)
    if n < cfg.min_logic_changes:
        return None
    return f"{n} logic-file changes since event {signals.since_event_id} (threshold {cfg.min_logic_changes})"


def drift_rule(signals: Signals, cfg: TrainingSettings, drift_threshold: float) -> str | None:
    """Note of the semantic drift rule when new memories look unfamiliar, else None."""
    window = cfg.confidence_window
    recent = signals.shifts[-window:]
    if len(recent) >= window:
        confidence = sum(1.0 - s for s in recent) / len(recent)
        if confidence < cfg.confidence_threshold:
            return (f"mean top-1 similarity {confidence:.3f} over the last {window} new memories "
                    f"(threshold {cfg.confidence_threshold})")
        mean_shift = sum(recent) / len(recent)
        if mean_shift > drift_threshold:
            return (f"mean vector shift {mean_shift:.3f} over the last {window} new memories "
                    f"(threshold {drift_threshold})")
    if signals.drifting:
        return "the drift detector reports memory drifting"
    return None


def feedback_rule(signals: Signals, cfg: TrainingSettings) -> str | None:
    """Note of the feedback rule when a task failed or scored badly, else None."""
    parts = []
    if signals.failed_task_ids:
        parts.append(f"{len(signals.failed_task_ids)} failed task(s) ({_ids_text(signals.failed_task_ids)})")
    if signals.nonzero_shell_ids:
        parts.append(f"{len(signals.nonzero_shell_ids)} shell command(s) exited non-zero "
                     f"({_ids_text(signals.nonzero_shell_ids)})")
    if signals.low_reward_ids:
        parts.append(f"{len(signals.low_reward_ids)} reward(s) below {cfg.reward_threshold} "
                     f"({_ids_text(signals.low_reward_ids)})")
    return "feedback: " + ", ".join(parts) if parts else None


def fired_rules(signals: Signals, cfg: TrainingSettings, drift_threshold: float) -> list[tuple[str, str]]:
    """(kind, note) of every gated rule whose condition holds, in TRIGGER_KINDS order."""
    notes = (("mutation_watcher", mutation_rule(signals, cfg)),
             ("semantic_drift", drift_rule(signals, cfg, drift_threshold)),
             ("feedback", feedback_rule(signals, cfg)))
    return [(kind, note) for kind, note in notes if note]


def cooldown_passed(last_trigger_time: str | None, cooldown_s: float, now: datetime | None = None) -> bool:
    """Whether `cooldown_s` has passed since the last trigger (or there was none)."""
    if not last_trigger_time:
        return True
    try:
        elapsed = ((now or datetime.now(timezone.utc)) - parse_time(last_trigger_time)).total_seconds()
    except (ValueError, TypeError):
        return True  # an unreadable marker must not block training forever
    # A last trigger in the future means the clock moved back; waiting for it could take days.
    return elapsed >= cooldown_s or elapsed < 0


def decide(signals: Signals, cfg: TrainingSettings, drift_threshold: float,
           now: datetime | None = None) -> Trigger | None:
    """The trigger these signals call for, or None."""
    now = now or datetime.now(timezone.utc)
    fired = fired_rules(signals, cfg, drift_threshold)
    ids = _cap_ids(signals.logic_event_ids, MAX_EVENT_IDS)
    if not fired or signals.new_pairs < cfg.min_new_pairs:
        return None
    if not cooldown_passed(signals.last_trigger_time, cfg.cooldown_s, now):
        return None
    pairs = f"{signals.new_pairs} new training pairs (minimum {cfg.min_new_pairs})"
    return Trigger(fired[0][0], iso_utc(now), _join_notes(*(n for _, n in fired), pairs), ids)


def is_logic_event(path: str, kind: str, meta: dict, globs: Sequence[str]) -> bool:
    """Whether an event is a change to a logic file made by someone other than Gremlin."""
    if kind == "log" or meta.get("by_gremlin"):
        return False
    name = PurePath(path).name
    return any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(path, g) for g in globs)


def classify_task(task: dict, reward_threshold: float) -> tuple[str, ...]:
    """Which feedback a finished task gives: "failed", "nonzero_shell", "low_reward"."""
    if task.get("type") == "self_train":
        return ()  # a failed training run retrained again would loop
    result = task.get("result") if isinstance(task.get("result"), dict) else {}
    out = []
    if task.get("state") == "failed":
        out.append("failed")
    code = result.get("exit_code")
    if task.get("type") == "shell" and _is_number(code) and code != 0:
        out.append("nonzero_shell")
    reward = result.get("reward")
    if _is_number(reward) and reward < reward_threshold:
        out.append("low_reward")
    return tuple(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the effectful wrapper -----------------------------------------------------------------


@dataclass(frozen=True)
class RuleState:
    """The loop's cursors and the signals pending since the last trigger (kept in markers)."""

    last_event_id: int = 0
    last_task_id: int = 0  # unused since the task runner writes self_train triggers; kept in old markers
    finished_cursor: tuple[str, int] = ("", 0)  # (finished, id) of the last finished task read
    memory_id: int = 0  # the newest memory when the last trigger fired
    since_event_id: int = 0  # the newest event read when the last trigger fired
    last_trigger_time: str | None = None
    logic: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()
    nonzero_shell: tuple[int, ...] = ()
    low_reward: tuple[int, ...] = ()

    def to_markers(self) -> dict[str, str]:
        """The marker rows that persist this state."""
        rest = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("last_event_id", "last_trigger_time")}
        return {LAST_EVENT_KEY: str(self.last_event_id), LAST_TRIGGER_KEY: self.last_trigger_time or "",
                STATE_KEY: json.dumps(rest, sort_keys=True)}


def load_rule_state(markers: dict[str, str]) -> RuleState:
    """The state kept in markers; anything unreadable starts afresh (logged)."""
    try:
        rest = json.loads(markers.get(STATE_KEY) or "{}")
        tuples = {k: tuple(v) for k, v in rest.items() if isinstance(v, list)}
        fields = {f.name for f in dataclasses.fields(RuleState)}
        state = RuleState(**{k: v for k, v in {**rest, **tuples}.items() if k in fields})
        return dataclasses.replace(state, last_event_id=int(markers.get(LAST_EVENT_KEY) or 0),
                                   last_trigger_time=markers.get(LAST_TRIGGER_KEY) or None)
    except (ValueError, TypeError, AttributeError) as exc:
        logger.error("feedback rule markers unreadable; starting afresh", extra={"error": str(exc)})
        return RuleState()


class FeedbackLoop:
    """Reads what is new in the store, applies the rules, writes the trigger file."""

    def __init__(self, settings: Settings, store: Store, count_new_pairs: Callable[[int], int],
                 drift_state: Callable[[], object] | None = None):
        self.settings = settings
        self.store = store
        self.count_new_pairs = count_new_pairs
        self.drift_state = drift_state
        self.path = trigger_path(settings)
        self._lock = threading.Lock()

    def check(self, now: datetime | None = None) -> Trigger | None:
        """Run the rules once; return the trigger this check fired (None if it fired none)."""
        cfg = self.settings.training
        if not cfg.enabled:
            return None
        now = now or datetime.now(timezone.utc)
        with self._lock:
            state = self._read_tasks(self._read_events(load_rule_state(self.store.get_markers(MARKER_PREFIX))))
            signals = self._signals(state, now)
            trigger = decide(signals, cfg, self.settings.watch.drift_threshold, now)
            if trigger is not None:
                written = write_trigger_atomically(self.path, trigger)
                logger.info("retrain trigger written: %s", trigger.note,
                            extra={"trigger": trigger.trigger, "file": str(self.path), "pending": written.note})
                state = self._after_trigger(state, trigger)
            self.store.set_markers(state.to_markers())
            return trigger

    def _read_events(self, state: RuleState) -> RuleState:
        """Advance the event cursor, keeping the logic-file changes among the new events."""
        globs, last, logic = self.settings.training.logic_globs, state.last_event_id, list(state.logic)
        while rows := self.store.events_after(last, PAGE):
            logic += [r["id"] for r in rows if is_logic_event(r["path"], r["kind"], r["meta"], globs)]
            last = rows[-1]["id"]
        cap = max(MAX_EVENT_IDS, self.settings.training.min_logic_changes)
        return dataclasses.replace(state, last_event_id=last, logic=_cap_ids(logic, cap))

    def _read_tasks(self, state: RuleState) -> RuleState:
        """Advance the finished-task cursor, keeping failures and bad results."""
        found = {"failed": list(state.failed), "nonzero_shell": list(state.nonzero_shell),
                 "low_reward": list(state.low_reward)}
        cursor = state.finished_cursor
        while rows := self.store.tasks_finished_after(cursor[0], cursor[1], PAGE):
            for task in rows:
                for kind in classify_task(task, self.settings.training.reward_threshold):
                    found[kind].append(task["id"])
            cursor = (rows[-1]["finished"], rows[-1]["id"])
        return dataclasses.replace(state, finished_cursor=cursor,
                                   **{k: _cap_ids(v, MAX_TASK_IDS) for k, v in found.items()})

    def _signals(self, state: RuleState, now: datetime) -> Signals:
        """The rules' input; new pairs are counted only when a gated rule could fire."""
        cfg = self.settings.training
        window = max(cfg.confidence_window, 1)
        shifts = tuple(s for _, s in self.store.memory_shifts_after(state.memory_id, window))
        drift = self.drift_state() if self.drift_state else None
        signals = Signals(state.logic, shifts, bool(getattr(drift, "drifting", False)), state.failed,
                          state.low_reward, state.nonzero_shell, 0,
                          state.last_trigger_time, state.since_event_id)
        if (cooldown_passed(state.last_trigger_time, cfg.cooldown_s, now)
                and fired_rules(signals, cfg, self.settings.watch.drift_threshold)):
            signals = dataclasses.replace(signals, new_pairs=self.count_new_pairs(state.since_event_id))
        return signals

    def _after_trigger(self, state: RuleState, trigger: Trigger) -> RuleState:
        """Pending signals are spent; the cooldown and the pair count start again."""
        return RuleState(last_event_id=state.last_event_id, last_task_id=state.last_task_id,
                         finished_cursor=state.finished_cursor, memory_id=self.store.newest_memory_id(),
                         since_event_id=state.last_event_id, last_trigger_time=trigger.time)
