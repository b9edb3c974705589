"""What each page (and its JSON twin) shows, assembled from the store, the backend and the logs.

Views stay thin: they parse nothing but the URL, call one function here, and render or
jsonify its result. No SQL here either: every read is a `memory.store` method.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta, timezone

from flask import abort
from werkzeug.datastructures import MultiDict

from agent_core.logs import COMPONENTS, LogRecord, parse_when, read_records
from config.errors import GremlinError
from dashboard.backend import NO_DAEMON_NOTE, Backend
from dashboard.render import seconds_between
from memory.store import Store, utc_now

EVENT_KINDS = ("created", "modified", "deleted", "moved", "log", "commit")
MEMORY_KINDS = ("code_diff", "failure", "feedback", "task", "log", "retrain")
SEARCH_MODES = ("hybrid", "dense", "lexical")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TASK_STATES = ("queued", "running", "done", "failed", "cancelled")
HOURS = 24
SIMILAR = 5
MAX_PAGE = 500
CHANGES_PAGE = 100
SIMILAR_QUERY_CHARS = 2000  # a long diff's first part says what it is about


def int_arg(args: MultiDict, name: str, default: int, lo: int = 1, hi: int = MAX_PAGE) -> int:
    """An integer query argument, clamped to [lo, hi]; the default when absent or not a number."""
    value = args.get(name, default, type=int)
    return max(lo, min(hi, value if value is not None else default))


def since_arg(args: MultiDict) -> str | None:
    """`since` (a duration such as 2h, or an ISO-8601 time) as a stored-time string; 400 when malformed."""
    text = (args.get("since") or "").strip()
    if not text:
        return None
    try:
        return utc_now(parse_when(text))
    except ValueError as exc:
        abort(400, description=f"since: {exc}")


# -- changes -------------------------------------------------------------------------------


def change_filters(args: MultiDict) -> dict:
    """The event filters of a query string: path (substring), kind, since, by_gremlin (1/0), before."""
    kind = args.get("kind") or None
    if kind and kind not in EVENT_KINDS:
        abort(400, description=f"kind must be one of {', '.join(EVENT_KINDS)} (got {kind[:40]!r})")
    flag = args.get("by_gremlin", "")
    return {"path_contains": args.get("path") or None, "kind": kind, "since": since_arg(args),
            "by_gremlin": {"1": True, "true": True, "0": False, "false": False}.get(flag.lower()),
            "before_id": args.get("before", type=int)}


def list_changes(store: Store, args: MultiDict) -> list[dict]:
    """The newest events passing the query string's filters."""
    return store.list_events(**change_filters(args), limit=int_arg(args, "limit", CHANGES_PAGE))


def change_detail(store: Store, backend: Backend, event_id: int) -> dict:
    """One event with its diff, memory, hunks, vector shift and the most similar past changes."""
    event = store.get_event(event_id)
    if event is None:
        abort(404, description=f"no event {event_id}; see /changes")
    memory = event["memory"] or {}
    similar, note = [], None
    if memory.get("text", "").strip():
        try:
            hits, mode = backend.search(memory["text"][:SIMILAR_QUERY_CHARS], SIMILAR + 1)
        except GremlinError as exc:  # the daemon cannot search now: the change itself still shows
            hits, mode, note = [], "hybrid", str(exc)
        similar = [h for h in hits if h["id"] != memory["id"]][:SIMILAR]
        note = note or (NO_DAEMON_NOTE if mode != "hybrid" else None)
    return {"event": event, "memory": memory or None, "hunks": event["meta"].get("hunks") or [],
            "vector_shift": (memory.get("meta") or {}).get("vector_shift"), "similar": similar,
            "similar_note": note}


# -- search --------------------------------------------------------------------------------


def search(backend: Backend, args: MultiDict) -> dict:
    """Search results for `q` (mode, kind), then filtered by path substring and since."""
    query, mode = (args.get("q") or "").strip(), args.get("mode") or "hybrid"
    kind, path, since = args.get("kind") or None, args.get("path") or None, since_arg(args)
    k = int_arg(args, "k", 20, hi=100)
    out = {"query": query, "mode": mode, "asked_mode": mode, "kind": kind, "path": path, "results": [], "note": None}
    if not query:
        return out
    filtered = bool(path or since)
    hits, used = backend.search(query, min(500, k * 5) if filtered else k, kind, mode)
    hits = [h for h in hits if (not path or path in (h.get("path") or "")) and (not since or h["time"] >= since)]
    out.update(results=hits[:k], mode=used, note=NO_DAEMON_NOTE if used != mode else None)
    return out


# -- overview ------------------------------------------------------------------------------


def hourly(store: Store, now: datetime | None = None) -> dict:
    """Events, memories and tasks per hour over the last day: series for charts, totals and rates."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    hours = [now - timedelta(hours=HOURS - 1 - i) for i in range(HOURS)]
    counts = store.activity_by_hour(utc_now(hours[0]))
    out = {}
    for table, by_hour in counts.items():
        series = [(h.strftime("%H:00"), by_hour.get(h.isoformat()[:13], 0)) for h in hours]
        total = sum(n for _, n in series)
        out[table] = {"series": series, "total": total, "per_hour": round(total / HOURS, 2)}
    return out


def overview(backend: Backend, store: Store, now: datetime | None = None) -> dict:
    """Everything the overview shows: status, the current model, activity, watcher health, drift, failures."""
    status = backend.status()
    models = store.list_models()
    current = next((m for m in models if m["id"] == status.get("model_id")), None) or \
        next((m for m in models if m["status"] == "current"), None)
    watcher = status.get("watcher") or {}
    return {"status": status, "model": current, "activity": hourly(store, now),
            "degraded": watcher.get("degraded") or {}, "missing": watcher.get("missing") or {},
            "watcher_known": bool(watcher), "drift": status.get("drift") or {},
            "failures": status.get("failures") or store.failure_counts(10),
            "training": status.get("training") or {}, "tasks": status.get("tasks") or {"counts": store.task_counts()}}


# -- training ------------------------------------------------------------------------------


def _run_row(run: dict, model: dict | None) -> dict:
    """One run as the training table shows it."""
    metrics, lineage = run.get("metrics") or {}, (model or {}).get("lineage") or {}
    dataset, decision = metrics.get("dataset") or {}, metrics.get("decision") or {}
    return {"id": run["id"], "state": run["state"], "trigger": (run.get("trigger") or {}).get("trigger"),
            "note": (run.get("trigger") or {}).get("note"), "train_pairs": dataset.get("train"),
            "heldout_pairs": dataset.get("heldout"), "before": metrics.get("before") or {},
            "after": metrics.get("after") or {}, "gain": decision.get("gain"), "reason": run.get("reason"),
            "device": lineage.get("device"), "model_id": run.get("model_id"), "started": run["started"],
            "seconds": seconds_between(run["started"], run.get("finished")) or lineage.get("seconds"),
            "progress": run.get("progress") or {}, "finished": run.get("finished"),
            "train_loss": lineage.get("train_loss", (run.get("progress") or {}).get("loss"))}


def training(store: Store) -> dict:
    """Runs, models, the MRR@10 and loss series, and the dataset's sources."""
    runs, models = store.recent_runs(100), store.list_models()
    by_id = {m["id"]: m for m in models}
    rows = [_run_row(r, by_id.get(r.get("model_id"))) for r in runs]
    trained = [m for m in reversed(models) if (m["lineage"].get("metrics_after") or {}).get("mrr@10") is not None]
    mrr = [(f"{m['id'][:8]} {m['status']}", m["lineage"]["metrics_after"]["mrr@10"]) for m in trained]
    if trained and (trained[0]["lineage"].get("metrics_before") or {}).get("mrr@10") is not None:
        mrr.insert(0, ("base", trained[0]["lineage"]["metrics_before"]["mrr@10"]))
    loss = [(r["id"], r["train_loss"]) for r in reversed(rows) if r["train_loss"] is not None]
    with_data = next((r for r in runs if (r.get("metrics") or {}).get("dataset")), None)
    current = next((m for m in models if m["status"] == "current"), None)
    return {"runs": rows, "models": models, "mrr": mrr, "loss": loss, "current": current,
            "dataset": (with_data or {}).get("metrics", {}).get("dataset") or {},
            "dataset_run": (with_data or {}).get("id"),
            "lineage_sources": ((current or {}).get("lineage") or {}).get("sources") or {}}


# -- tasks ---------------------------------------------------------------------------------


def tasks(store: Store, args: MultiDict) -> dict:
    """Tasks (filtered by state and type), counts by state, and the mean reward of each type."""
    states = [s for s in args.getlist("state") if s]
    unknown = [s for s in states if s not in TASK_STATES]
    if unknown:
        abort(400, description=f"state must be one of {', '.join(TASK_STATES)} (got {unknown[0][:40]!r})")
    rows = store.list_tasks(states, args.get("type") or None, int_arg(args, "limit", 100))
    rewards = {t: {"mean": round(mean, 4), "count": n} for t, (mean, n) in store.reward_by_type().items()}
    return {"tasks": rows, "counts": store.task_counts(), "rewards": rewards}


# -- logs ----------------------------------------------------------------------------------


def log_filters(args: MultiDict) -> dict:
    """The live filters of the log page: level, component, text."""
    level = (args.get("level") or "").lower() or None
    if level and level not in LOG_LEVELS:
        abort(400, description=f"level must be one of {', '.join(LOG_LEVELS)} (got {level[:40]!r})")
    component = (args.get("component") or "").lower() or None
    if component and component not in COMPONENTS:
        abort(400, description=f"component must be one of {', '.join(COMPONENTS)} (got {component[:40]!r})")
    return {"level": level, "component": component, "grep": args.get("grep") or None}


def log_records(settings, args: MultiDict) -> list[LogRecord]:
    """The newest records passing the filters (and since), newest first."""
    since = (args.get("since") or "").strip()
    try:
        start = parse_when(since) if since else None
    except ValueError as exc:
        abort(400, description=f"since: {exc}")
    kept = deque(read_records(settings, since=start, **log_filters(args)), maxlen=int_arg(args, "limit", 200))
    return list(reversed(kept))


def record_dict(rec: LogRecord) -> dict:
    """A log record for JSON and the live tail: its fields, plus the escaped fields as shown."""
    return {**rec.to_dict(), "shown_fields": rec.shown_fields()}
