"""`gremlin`: parse, call the library, render. Errors become a message and exit code 1."""

from __future__ import annotations

import json
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from config.errors import GremlinError
from config.settings import init_home, load_settings
from memory.paths import display_path

console = Console()

MEMORY_KINDS = ("code_diff", "failure", "feedback", "task", "log", "retrain")
# The search modes (memory.service.SEARCH_MODES) and the score each reports; spelled out
# here so that `--help` need not import the model stack.
SCORE_NAMES = {"hybrid": "fused", "dense": "cosine", "lexical": "bm25"}


class GremlinGroup(click.Group):
    """Turns GremlinError from any command into `error: ...` and exit code 1 (usage errors keep
    click's exit code 2). A file system or database failure no code path foresaw is one line too."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GremlinError as exc:
            _fail(str(exc))
        except OSError as exc:
            where = f" ({display_path(exc.filename)})" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}; check that the path exists and this user may use it")
        except sqlite3.Error as exc:
            _fail(f"database: {exc}; see `gremlin status`, and the log in data/logs/system/gremlin.log")


def _fail(message: str) -> None:
    click.echo(f"error: {display_path(message)}", err=True)
    sys.exit(1)


def _settings(ctx: click.Context):
    return load_settings(ctx.obj["home"])


@click.group(cls=GremlinGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Home directory (config/, run/, data/). Default: $GREMLIN_HOME, else this "
                   "repository when run from a checkout.")
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """Gremlin: watches your files, remembers every change and failure, searches them by meaning.

    Start the daemon with `gremlin daemon`, then ask `gremlin search "what changed around X"`.
    """
    ctx.obj = {"home": home}


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init(directory: Path) -> None:
    """Create a home in DIRECTORY with a copy of the default config (existing files are kept)."""
    config = init_home(directory)
    console.print(f"home ready: {config.parent.parent}\nedit {config} to choose what to watch, "
                  f"then run: gremlin --home {config.parent.parent} daemon", highlight=False)


@main.command()
@click.option("--watch", "watch", multiple=True, type=click.Path(path_type=Path),
              help="Also watch this folder for this run (repeatable), on top of [watch] roots.")
@click.option("--quiet", is_flag=True, help="Do not log to the terminal (the log files still get everything).")
@click.pass_context
def daemon(ctx: click.Context, watch: tuple[Path, ...], quiet: bool) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM (SIGHUP reloads the config).

    It watches the configured roots, records every change in data/gremlin.db, embeds it,
    and answers searches on run/gremlin.sock. Logs: data/logs/system/gremlin.log.
    """
    from agent_core.daemon import Daemon
    from agent_core.logs import configure_logging

    settings = _settings(ctx).with_extra_roots(watch)
    init_home(settings.home)  # the home's folders (data/logs/...) exist before anything watches them
    configure_logging(settings, console=not quiet)
    sys.exit(Daemon(settings, extra_roots=watch).run())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show whether the daemon runs, what it watches, memory counts, model and index."""
    from agent_core.status import collect_status

    info = collect_status(_settings(ctx))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    _render_status(info)


@main.command()
@click.argument("query")
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(1, 1000), help="Number of results.")
@click.option("--kind", type=click.Choice(MEMORY_KINDS), default=None, help="Only memories of this kind.")
@click.option("--mode", type=click.Choice(tuple(SCORE_NAMES)), default="hybrid", show_default=True,
              help="dense: by meaning (MiniLM, cosine score); lexical: by exact words and identifiers "
                   "(SQLite full-text, BM25 score); hybrid: both, each list's scores scaled to 0..1 and "
                   "mixed by the model's fusion weight, which finds code by its identifiers and by "
                   "what it does (fused score, 1.0 = best in both).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def search(ctx: click.Context, query: str, k: int, kind: str | None, mode: str, as_json: bool) -> None:
    """Find the memories (diffs, failures) that best match QUERY, by meaning and by words.

    Uses the running daemon when there is one; otherwise searches here (dense and hybrid
    load the model first, a few seconds; lexical needs no model). On a terminal each hit is
    a heading and its first changed lines; piped, each hit is one tab-separated line:
    score, kind, path, time, preview.
    """
    from agent_core.status import search_memory, why_nothing_found

    if not query.strip():
        raise click.BadParameter("the query is empty; search for some words, an identifier or an error message",
                                 param_hint="QUERY")
    settings = _settings(ctx)
    hits = search_memory(settings, query, k, kind, mode)
    if as_json:
        click.echo(json.dumps(hits, indent=2))
    elif not hits:
        console.print(why_nothing_found(settings, mode, kind), highlight=False, soft_wrap=True)
    elif console.is_terminal:
        _print_hits(hits, SCORE_NAMES[mode])
    else:
        for hit in hits:
            click.echo("\t".join((f"{SCORE_NAMES[mode]}={hit['score']:.3f}", _kind_text(hit), _hit_place(hit),
                                  hit["time"][:19], " ⏎ ".join(hit["preview"].splitlines()))))


def _kind_text(hit: dict) -> str:
    return hit["kind"] + (f" ({hit['change']})" if hit.get("change") else "")


def _hit_place(hit: dict) -> str:
    """Where a hit is: its full path (escaped, never cut), and a commit's summary."""
    place = display_path(hit.get("path") or hit.get("label") or "")
    if hit.get("change") == "commit" and hit.get("label"):
        place += f" — {display_path(hit['label'])}"
    return place


def _print_hits(hits: list[dict], score_name: str) -> None:
    """Each hit as a heading line (the path whole: the terminal wraps it, nothing cuts it) and
    its preview lines, indented and cut to the terminal's width."""
    for hit in hits:
        console.print(f"[bold]{hit['score']:.3f}[/] {score_name}  {_kind_text(hit)}  {hit['time'][:19]}  ",
                      Text(_hit_place(hit), style="cyan"), sep="", highlight=False, soft_wrap=True)
        for line in hit["preview"].splitlines():
            console.print(Text("    " + line), no_wrap=True, overflow="ellipsis", highlight=False)


@main.command()
@click.option("--now", is_flag=True, help="Skip the cooldown; with no daemon running, train here at once.")
@click.option("--wait", is_flag=True, help="Wait for the run to end and show its progress.")
@click.option("--note", default="", help="Why (kept in the trigger and the run's lineage).")
@click.pass_context
def train(ctx: click.Context, now: bool, wait: bool, note: str) -> None:
    """Ask for a retrain: write run/checkpoints/retrain_trigger.json.

    The daemon's trainer claims it, builds a dataset from history, fine-tunes, and
    promotes the new model only if it beats the current one on held-out pairs. With no
    daemon running, --now or --wait runs the cycle here. Exit code with --wait: 0
    promoted, 3 rejected (the current model stays), 1 failed.
    """
    from agent_core import training

    settings = _settings(ctx)
    since = training.now_iso()
    trigger, via_daemon = training.queue_training(settings, note, force=now)
    if via_daemon:
        console.print(f"retrain queued with the daemon ({trigger['trigger']}: {trigger['note']})", highlight=False)
    elif not (now or wait):
        console.print(f"retrain queued in {training.trigger_path(settings)}; the daemon picks it up when it "
                      "runs (make run)", highlight=False)
        return
    if not via_daemon:
        with _TrainingProgress() as bar:
            outcome = training.run_here(settings, progress=bar.update).to_dict()
        _finish_run(outcome["outcome"], outcome["reason"], outcome.get("model_id"))
    if wait:
        with _TrainingProgress() as bar:
            run = training.wait_for_run(settings, since, progress=bar.update)
        _finish_run(run["state"], run["reason"] or "", run.get("model_id"))


@main.command()
@click.option("--seed", default=42, show_default=True, type=int, help="Seed for data order and initialisation.")
@click.option("--promote", is_flag=True, help="Promote an accepted model (no daemon may be running).")
@click.option("--json", "as_json", is_flag=True, help="Print the experiment record as JSON.")
@click.pass_context
def cycle(ctx: click.Context, seed: int, promote: bool, as_json: bool) -> None:
    """Run one deterministic self-training cycle here: dataset → train → evaluate → accept/reject.

    Appends the result to data/experiments.jsonl. The model is kept (accepted or
    rejected with its numbers) but not used unless --promote; `gremlin models rollback ID`
    switches to it later. Exit code: 0 accepted/promoted, 3 rejected, 1 failed.
    """
    from agent_core import training

    settings = _settings(ctx)
    if promote and training.running_pid(settings):
        raise GremlinError("--promote needs the daemon stopped (it serves the current model); "
                           "run without --promote, then `gremlin models rollback ID`")
    with _TrainingProgress() as bar:
        record = training.run_cycle(settings, seed, promote, progress=bar.update)
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        sys.exit(training.EXIT_CODES[record["outcome"]])
    _print_metrics(record["metrics_before"], record["metrics_after"])
    _finish_run(record["outcome"], record["reason"], record.get("model_id"))


@main.group()
def models() -> None:
    """Trained models: list them, show one's lineage, roll back."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Every model this home knows, newest first, with its status and held-out MRR@10."""
    from agent_core import training

    rows = training.list_models(_settings(ctx))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no models recorded yet: the daemon records the base model when it starts, and "
                      "`gremlin train --now --wait` trains one")
        return
    table = Table()
    for column in ("id", "status", "created", "source", "pairs", "MRR@10 before → after", "fusion weight"):
        table.add_column(column, overflow="fold")
    for m in rows:
        lin = m["lineage"]
        before, after = lin.get("metrics_before", {}), lin.get("metrics_after", {})
        mrr = f"{before['mrr@10']:.3f} → {after['mrr@10']:.3f}" if before and after else ""
        table.add_row(m["id"], m["status"], m["created"][:19], lin.get("source", ""),
                      str(lin.get("n_pairs", "")), mrr, _fusion_weight_cell(m.get("fusion_weight")))
    console.print(table)


def _fusion_weight_cell(weight: float | None) -> str:
    """A model's hybrid-search weight (the dense share) for a table; uncalibrated models fuse equally."""
    return "0.50 (equal)" if weight is None else f"{weight:.2f}"


@models.command("show")
@click.argument("model_id")
@click.pass_context
def models_show(ctx: click.Context, model_id: str) -> None:
    """Everything recorded about MODEL_ID (an id or a unique prefix): path, status, lineage, and
    `fusion_weight`, its hybrid-search weight (the dense share; null = never calibrated, 0.5),
    chosen as recorded in the lineage's `fusion` block (MRR@10 of dense, lexical and hybrid)."""
    from agent_core import training

    model = training.show_model(_settings(ctx), model_id)
    if model is None:
        raise GremlinError(f"no model '{model_id}' (or the prefix matches several); see `gremlin models list`")
    click.echo(json.dumps(model, indent=2, sort_keys=True))


@models.command("rollback")
@click.argument("model_id", required=False)
@click.pass_context
def models_rollback(ctx: click.Context, model_id: str | None) -> None:
    """Switch search to MODEL_ID, or to the model used before the current one.

    Old models keep their vectors and index until pruned ([training] keep_models), so
    this is immediate; memories added since are embedded on the way. A running daemon
    switches without stopping search.
    """
    from agent_core import training

    target = training.rollback(_settings(ctx), model_id)
    console.print(f"now using {target['id']} ({target['path']})", highlight=False)


class _TrainingProgress:
    """A Rich progress bar fed by the trainer's (state, step, total, loss) reports."""

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=console,
                                  transient=True)
        self._progress.__enter__()
        self._task = self._progress.add_task("starting", total=None, loss="")
        return self

    def update(self, report: dict) -> None:
        """Show the trainer's latest report."""
        loss = f"loss {report['loss']:.4f}" if report.get("loss") is not None else ""
        self._progress.update(self._task, description=report.get("state", ""), completed=report.get("step", 0),
                              total=report.get("total") or None, loss=loss)

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)


def _print_metrics(before: dict, after: dict) -> None:
    if not (before and after):
        return
    table = Table(title="held-out retrieval")
    for column in ("metric", "current", "candidate"):
        table.add_column(column)
    for metric in before:
        table.add_row(metric, f"{before[metric]:.4f}", f"{after[metric]:.4f}")
    console.print(table)


def _finish_run(outcome: str, reason: str, model_id: str | None) -> None:
    from agent_core.training import EXIT_CODES

    colour = {"promoted": "green", "accepted": "green", "rejected": "yellow"}.get(outcome, "red")
    model = f" model {model_id}" if model_id else ""
    console.print(f"[bold {colour}]{outcome}[/]{model}: {reason}", highlight=False)
    sys.exit(EXIT_CODES.get(outcome, 1))


def _duration(seconds: float) -> str:
    """A short human duration: 45s, 12m 5s, 3h 20m."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def _render_training(training: dict) -> None:
    state, progress = training.get("state", "unknown"), training.get("progress") or {}
    if progress.get("total"):
        loss = f", loss {progress['loss']:.4f}" if progress.get("loss") is not None else ""
        eta = f", {progress['per_s']}/s, ETA {_duration(progress['eta_s'])}" if progress.get("eta_s") is not None else ""
        state += f" ({progress.get('phase', '')} {progress['step']}/{progress['total']}{loss}{eta})"
    _line("trainer", state)
    last = training.get("last_run")
    if last:
        when = (last.get("finished") or last.get("started") or "")[:19]
        console.print(Text(f"         last run {last['id']} {last['state']} {when}: {last.get('reason') or ''}"),
                      highlight=False, soft_wrap=True)


def _render_tasks(tasks: dict) -> None:
    counts = tasks.get("counts") or {}
    if not counts:
        return
    text = ", ".join(f"{counts[s]} {s}" for s in ("queued", "running", "done", "failed", "cancelled") if counts.get(s))
    running = "; now " + ", ".join(f"{t['id']} ({t['type']})" for t in tasks.get("running", [])) \
        if tasks.get("running") else ""
    _line("tasks", text + running)


def _render_retention(summary: dict | None) -> None:
    """The last retention applied: when, and how many memories of each kind it evicted."""
    if summary:
        kinds = ", ".join(f"{kind} {n}" for kind, n in summary["evicted"].items())
        _line("retention", f"{summary['total']} evicted {summary['time'][:19]}" + (f" ({kinds})" if kinds else ""))


def _render_status(info: dict) -> None:
    """Status as lines (no table: a path is never cut or wrapped into a cell)."""
    running = f"running (pid {info['pid']}, {info['state']})" if info["running"] else "not running"
    _line("daemon", running)
    _line("home", display_path(info["home"]))
    roots = [display_path(r) for r in info["roots"]]
    _line("watching", ("\n" + " " * 9).join(roots) or "nothing")
    if info.get("note"):
        _line("note", info["note"], "yellow")
    c = info["counts"]
    index = info.get("index") or {}
    kind = f" ({index['kind']}{', rebuilding' if index.get('rebuilding') else ''})" if index.get("kind") else ""
    _line("memory", f"{c['events']} events, {c['memories']} memories, {info['index_size']} indexed{kind}")
    _line("model", info["model_id"])
    _render_training(info.get("training") or {})
    _render_tasks(info.get("tasks") or {})
    _render_retention(info.get("retention"))
    watcher = info.get("watcher", {})
    for root, why in watcher.get("degraded", {}).items():
        _line("degraded", f"{display_path(root)}: {why} (polling; see the log for the fix)", "yellow")
    for root, since in watcher.get("missing", {}).items():
        _line("missing", f"{display_path(root)} is gone since {since[:19]}; its changes are recorded when it "
                         "is back", "yellow")
    drift = info.get("drift") or {}
    if drift.get("mean_shift") is not None:
        flag = " [bold yellow]drifting[/]" if drift["drifting"] else ""
        _line("drift", f"mean vector shift {drift['mean_shift']:.3f} over {drift['samples']}/{drift['window']} "
                       f"(threshold {drift['threshold']}){flag}", markup=True)
    if watcher.get("last_error"):
        _line("last error", display_path(watcher["last_error"]), "red")
    if info.get("failures"):
        console.print("[bold]recent failures[/] (last seen, count, failure)", highlight=False)
        for f in info["failures"]:
            console.print(Text(f"  {f['last_seen'][:19]}  {f['count']:>5}  {f['title']}"), highlight=False,
                          soft_wrap=True)
    if info["recent_events"]:
        console.print("[bold]last events[/] (id, time, change, path)", highlight=False)
        for ev in info["recent_events"]:
            path = display_path(ev["path"])
            if ev.get("old_path"):
                path = f"{display_path(ev['old_path'])} -> {path}"
            console.print(Text(f"  {ev['id']:>6}  {ev['time'][:19]}  {ev['kind']:<8}  {path}"), highlight=False,
                          soft_wrap=True)


def _line(label: str, value: str, colour: str | None = None, markup: bool = False) -> None:
    """One `label   value` line of status; the value is printed as it is (soft-wrapped only)."""
    head = f"[bold {colour}]{label}[/]" if colour else f"[bold]{label}[/]"
    console.print(head + " " * max(1, 9 - len(label)), Text.from_markup(value) if markup else Text(value),
                  sep="", highlight=False, soft_wrap=True)


LEVEL_STYLES = {"DEBUG": "dim", "INFO": "green", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}


def _when_option(ctx: click.Context, param: click.Parameter, value: str | None):
    """--since/--until as an aware datetime; a clear usage error (exit 2) when it is neither form."""
    from agent_core.logs import parse_when

    try:
        return None if value is None else parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option("-f", "--follow", is_flag=True, help="Then keep printing records as they are written, across log "
              "rotation, until Ctrl-C.")
@click.option("--since", metavar="WHEN", callback=_when_option, help="Only records at or after WHEN: a duration "
              "back from now (90s, 15m, 1h, 2d) or an ISO-8601 time (UTC unless it names an offset).")
@click.option("--until", metavar="WHEN", callback=_when_option, help="Only records at or before WHEN (as --since).")
@click.option("--level", type=click.Choice(("debug", "info", "warning", "error", "critical"), case_sensitive=False),
              default=None, help="Only records at this level or above.")
@click.option("--component", metavar="NAME", default=None, help="Only records of this component: watcher, trainer, "
              "feedback, git, memory, tasks, planner, dashboard, daemon, service, cli, or a library's name.")
@click.option("--grep", "text", metavar="TEXT", default=None,
              help="Only records whose line (as piped output shows it) contains TEXT, ignoring case.")
@click.option("--run", "run_id", metavar="RUN_ID", default=None, help="Only the records of training run RUN_ID.")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=None,
              help="Only the last N matching records (with -f: 10 unless given).")
@click.option("--json", "as_json", is_flag=True, help="Print each record as stored: one JSON object a line.")
@click.pass_context
def logs(ctx: click.Context, follow: bool, since, until, level: str | None, component: str | None, text: str | None,
         run_id: str | None, lines: int | None, as_json: bool) -> None:
    """Show the daemon's log: data/logs/system/gremlin.log and its rotated files, oldest first.

    On a terminal: time (UTC), level, component, message, key=value fields. Piped: one
    tab-separated line a record (time, level, component, message and fields). A line that
    is not a record (half-written, binary junk) is shown as CORRUPT with its text escaped:
    --level and --component keep it (it has neither), --grep and --run match its text, and
    --since/--until place it between the records around it.
    """
    import threading
    from collections import deque

    from agent_core.logs import follow_records, read_records, system_log_dir

    settings = _settings(ctx)
    if not system_log_dir(settings).is_dir():
        click.echo(f"no log folder yet ({display_path(system_log_dir(settings))}); the daemon makes it when it "
                   "starts", err=True)
        return
    filters = {"since": since, "until": until, "level": level, "component": component, "grep": text, "run_id": run_id}
    stop = threading.Event()
    try:
        # The tail is placed before the history is read: a record written in between is shown
        # twice rather than lost.
        tail = follow_records(settings, stop, **filters) if follow else ()
        history = read_records(settings, **filters)
        keep = 10 if follow and lines is None else lines
        shown = _show_logs(history if keep is None else deque(history, maxlen=keep), as_json)
        if not (shown or follow or as_json):
            click.echo(f"no matching records in {display_path(system_log_dir(settings))}", err=True)
        _show_logs(tail, as_json)
    except KeyboardInterrupt:
        stop.set()  # Ctrl-C is how -f ends: not an error
    except BrokenPipeError:
        _quiet_stdout()


def _quiet_stdout() -> None:
    """The reader of our output went away (`gremlin logs | head`): stop quietly, as cat and grep do."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _show_logs(records, as_json: bool) -> int:
    """Print log records (JSON lines, Rich lines on a terminal, plain lines piped); returns how many."""
    count = 0
    for rec in records:
        if as_json:
            click.echo(json.dumps({"corrupt": True, "file": rec.file, "reason": rec.fields["reason"], "raw": rec.raw})
                       if rec.corrupt else rec.raw)
        elif console.is_terminal:
            _print_log_record(rec)
        else:
            click.echo(rec.plain())
        count += 1
    return count


def _print_log_record(rec) -> None:
    """One record on a terminal: dim time, coloured level, component, message, dim key=value fields,
    and its traceback below."""
    line = Text()
    if rec.corrupt:
        line.append("CORRUPT ", style="bold magenta")
        line.append(rec.message)
        line.append(f"  [{rec.file}: {rec.fields['reason']}]", style="dim")
        console.print(line, highlight=False, soft_wrap=True)
        return
    line.append(rec.time.replace("+00:00", "Z") + " ", style="dim")
    line.append(f"{rec.level:<8}", style=LEVEL_STYLES.get(rec.level, ""))
    line.append(f"{rec.component or '-':<10}", style="cyan")
    line.append(display_path(rec.message))
    for key, value in rec.shown_fields():
        line.append(f" {key}=", style="dim")
        line.append(value)
    console.print(line, highlight=False, soft_wrap=True)
    if isinstance(rec.fields.get("exc"), str):
        console.print(Text("\n".join("    " + display_path(x) for x in rec.fields["exc"].splitlines()), style="dim"),
                      highlight=False, soft_wrap=True)


@main.group()
def service() -> None:
    """Run the daemon as a systemd service: install its unit, remove it, ask its state.

    A user unit (--user; the default unless root) lives in ~/.config/systemd/user/ and runs
    while its user has a session (or lingers); a system unit (--system; the default for root)
    lives in /etc/systemd/system/ and runs as the home's owner from boot. One unit per mode.
    """


def _mode_options(func):
    """--user / --system, one value `mode` (None: the default for this user)."""
    func = click.option("--system", "mode", flag_value="system",
                        help="A system unit in /etc/systemd/system/ (needs root; default for root).")(func)
    return click.option("--user", "mode", flag_value="user",
                        help="A user unit in ~/.config/systemd/user/ (default unless root).")(func)


@service.command("install")
@_mode_options
@click.option("--home", "home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The home the service runs (default: gremlin's --home, $GREMLIN_HOME, ...).")
@click.option("--print", "print_only", is_flag=True, help="Print the unit on stdout; install nothing.")
@click.pass_context
def service_install(ctx: click.Context, mode: str | None, home: Path | None, print_only: bool) -> None:
    """Install, enable and start the daemon as a systemd service (Type=notify, watchdog, hardened).

    Writes the unit (config/gremlin.service filled in: this environment's gremlin, the home,
    the watched roots), then runs systemctl daemon-reload and enable --now. Where no service
    manager answers (systemd is not running, no user session) it says why in one line on
    stderr, prints the unit on stdout with where to put it, installs nothing and exits 0,
    as --print does.
    """
    from agent_core import service as svc

    mode = mode or svc.default_mode()
    settings = load_settings(home or ctx.obj["home"])
    if print_only:
        click.echo(svc.render_unit(settings, mode, svc.gremlin_executable(), svc.service_user(settings, mode)),
                   nl=False)
        return
    result = svc.install(settings, mode)
    if not result.installed:
        click.echo(f"{result.problem}: nothing installed; save the unit below as {display_path(result.path)}, "
                   f"then run: {svc.enable_commands(mode)}", err=True)
        click.echo(result.unit, nl=False)
        return
    _render_installed(result)


def _render_installed(result) -> None:
    ctl = "systemctl --user" if result.mode == "user" else "systemctl"
    console.print(Text(f"installed {display_path(result.path)} ({result.mode} unit); enabled and starting: "
                       "see `gremlin service status`"), highlight=False, soft_wrap=True)
    if result.was_running:
        console.print(f"it was running already: `{ctl} restart gremlin.service` makes it use the new unit",
                      highlight=False, soft_wrap=True)
    if not result.lingering:
        console.print("it runs while you are logged in; to keep it running after you log out: "
                      "loginctl enable-linger", highlight=False, soft_wrap=True)


@service.command("uninstall")
@_mode_options
def service_uninstall(mode: str | None) -> None:
    """Stop and disable the service, remove its unit file, reload systemd (no unit: nothing to do)."""
    from agent_core import service as svc

    result = svc.uninstall(mode or svc.default_mode())
    if not result.removed:
        console.print(Text(f"no unit at {display_path(result.path)}: nothing to remove"), highlight=False,
                      soft_wrap=True)
        return
    done = f"stopped, disabled and removed {display_path(result.path)} (home {display_path(result.home)})"
    if result.problem:
        done = f"removed {display_path(result.path)}; {result.problem}, so nothing was stopped"
    console.print(Text(done), highlight=False, soft_wrap=True)


@service.command("status")
@_mode_options
def service_status(mode: str | None) -> None:
    """The unit file, the home it runs, and what systemd says: state, pid, the daemon's status line.

    Exit code: 0 when systemd runs it, 3 when it does not (as `systemctl is-active`).
    """
    from agent_core import service as svc

    info = svc.status(mode or svc.default_mode())
    where = display_path(info.path)
    _line("unit", f"{where} (home {display_path(info.home)})" if info.home else f"not installed ({where})")
    p = info.properties
    if info.problem:
        _line("systemd", info.problem, "yellow")
    elif p.get("LoadState") == "not-found":
        _line("systemd", "does not know gremlin.service")
    else:
        pid = f", pid {p['MainPID']}" if p.get("MainPID", "0") != "0" else ""
        _line("systemd", f"{p.get('ActiveState', '?')} ({p.get('SubState', '?')}), {p.get('UnitFileState') or '?'}"
                         f"{pid}, {p.get('NRestarts', '0')} restarts, last result {p.get('Result', '?')}")
        if p.get("StatusText"):
            _line("status", p["StatusText"])
    sys.exit(0 if info.active else 3)


@main.group()
def task() -> None:
    """The task queue: add tasks for the daemon to run, follow, cancel and retry them.

    A task is a JSON object such as {"type": "self_train"} or {"type": "shell", "cmd":
    ["pytest", "-q"]}. Types: self_train, shell, snapshot, rollback, reindex, mutate,
    replay. Tasks can also be dropped as *.json files into run/queue/inbox/.
    """


@task.command("add")
@click.argument("spec", required=False)
@click.argument("args", nargs=-1)
@click.option("--type", "task_type", default=None, help="Build the task from options instead of JSON "
              "(shell: the command follows `--`).")
@click.option("--cwd", default=None, help="shell: the folder to run in (inside a watched root).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.001), default=None,
              help="shell: seconds before the command's process group is killed.")
@click.option("--priority", type=click.IntRange(-100, 100), default=None,
              help="Higher runs first (default: from the type's reward history).")
@click.option("--key", default=None, help="Idempotency key: a task with a key seen before is not queued again.")
@click.option("--wait", is_flag=True, help="Wait until the task ends; exit 0 done, 1 failed, 3 cancelled.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def task_add(ctx: click.Context, spec: str | None, args: tuple[str, ...], task_type: str | None, cwd: str | None,
             timeout_s: float | None, priority: int | None, key: str | None, wait: bool, as_json: bool) -> None:
    """Queue a task given as JSON (SPEC), or by --type: `gremlin task add --type shell -- pytest -q`."""
    from agent_core import tasks

    raw = _task_object(spec, args, task_type, cwd, timeout_s, priority, key)
    settings = _settings(ctx)
    with _store(settings) as store:
        submitted = tasks.submit(store, settings, tasks.parse_task(raw), "cli")
    woken = _wake_daemon(settings)
    if wait:
        row = _wait_task(settings, submitted.id)
        _print_task(row, as_json)
        sys.exit({"done": 0, "cancelled": 3}.get(row["state"], 1))
    if as_json:
        click.echo(json.dumps({**submitted.to_dict(), "daemon": woken}))
        return
    what = "queued" if submitted.created else "already queued under that key (not queued again)"
    where = "the daemon runs it" if woken else "no daemon is running: it runs when one starts (make run)"
    click.echo(f"task {submitted.id} {what}; {where}")


def _task_object(spec, args, task_type, cwd, timeout_s, priority, key) -> object:
    """The task as a JSON object, from SPEC or from the options."""
    from agent_core.tasks import TaskError, parse_task_text

    if task_type is None:
        if spec is None or args:
            raise click.UsageError("give the task as one JSON argument, e.g. '{\"type\": \"self_train\"}', "
                                   "or use --type (shell: gremlin task add --type shell -- pytest -q)")
        try:
            raw = json.loads(spec)
        except ValueError:
            parse_task_text(spec, "task")  # raises the one-line message naming the problem
        if not isinstance(raw, dict):
            raise TaskError('task: must be a JSON object such as {"type": "self_train"}')
    else:
        raw = {"type": task_type}
        argv = ([spec] if spec is not None else []) + list(args)
        if task_type == "shell":
            raw["cmd"] = argv
        elif argv:
            raise click.UsageError(f"a {task_type} task takes no command words; give its fields as JSON")
    extra = {"cwd": cwd, "timeout_s": timeout_s, "priority": priority, "key": key}
    return {**raw, **{k: v for k, v in extra.items() if v is not None}}


def _wake_daemon(settings) -> bool:
    """Tell a running daemon a task is waiting (it polls anyway); False when none runs."""
    from agent_core.control import DaemonUnavailable, request

    try:
        request(settings, "tasks.wake", timeout=5.0)
        return True
    except (DaemonUnavailable, GremlinError, OSError):
        return False


def _wait_task(settings, task_id: int) -> dict:
    """Poll until the task has ended; show its state meanwhile."""
    import time

    from agent_core import tasks

    with console.status(f"task {task_id}: queued") as shown:
        while True:
            with _store(settings) as store:
                row = tasks.get(store, task_id)
            if row["state"] in tasks.FINAL:
                return row
            shown.update(f"task {task_id}: {row['state']} (attempt {row['attempts']})")
            time.sleep(0.5)


@contextmanager
def _store(settings):
    """The home's database as a writer, closed on exit."""
    from memory.store import Store

    store = Store(settings.memory.db, settings.memory.synchronous)
    try:
        yield store
    finally:
        store.close()


TASK_COLUMNS = ("id", "state", "type", "priority", "attempts", "created", "finished", "reward", "summary")


@task.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice(("queued", "running", "done", "failed",
              "cancelled")), help="Only tasks in this state (repeatable).")
@click.option("--type", "task_type", default=None, help="Only tasks of this type.")
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(1, 100_000), help="How many.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def task_list(ctx: click.Context, states: tuple[str, ...], task_type: str | None, limit: int, as_json: bool) -> None:
    """The newest tasks, newest first (piped: one tab-separated line each)."""
    with _store(_settings(ctx)) as store:
        rows = store.list_tasks(states, task_type, limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tasks yet; add one with: gremlin task add '{\"type\": \"self_train\"}'", err=True)
        return
    cells = [[_task_cell(r, c) for c in TASK_COLUMNS] for r in rows]
    if not console.is_terminal:
        for line in cells:
            click.echo("\t".join(line))
        return
    table = Table()
    for column in TASK_COLUMNS:
        table.add_column(column, overflow="fold")
    for line in cells:
        table.add_row(*line)
    console.print(table)


def _task_cell(row: dict, column: str) -> str:
    if column in ("created", "finished"):
        return (row[column] or "")[:19]
    if column == "reward":
        return "" if row["reward"] is None else f"{row['reward']:.2f}"
    if column == "summary":
        payload = row["payload"]
        text = " ".join(payload["cmd"]) if "cmd" in payload else json.dumps(payload, ensure_ascii=False)
        return " ".join((text if len(text) <= 60 else text[:59] + "…").split())
    return str(row[column])


def _print_task(row: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    for key in ("id", "type", "state", "priority", "attempts", "max_attempts", "source", "created", "started",
                "finished", "exit_code", "reward", "error", "retry_of"):
        if row.get(key) is not None:
            _line(key, str(row[key]))
    _line("payload", json.dumps(row["payload"], indent=2, ensure_ascii=False))
    if row.get("result"):
        _line("result", json.dumps(row["result"], indent=2, ensure_ascii=False))


@task.command("show")
@click.argument("task_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def task_show(ctx: click.Context, task_id: int, as_json: bool) -> None:
    """Everything about TASK_ID: payload, state, attempts, result, reward, error."""
    from agent_core import tasks

    with _store(_settings(ctx)) as store:
        _print_task(tasks.get(store, task_id), as_json)


@task.command("cancel")
@click.argument("task_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def task_cancel(ctx: click.Context, task_id: int, as_json: bool) -> None:
    """Cancel TASK_ID: a queued task at once, a running one at its next heartbeat (its command is killed)."""
    from agent_core import tasks

    settings = _settings(ctx)
    with _store(settings) as store:
        state = tasks.cancel(store, task_id)
    if as_json:
        click.echo(json.dumps({"id": task_id, "state": state}))
    elif state == "running":
        click.echo(f"task {task_id} is running: asked it to stop")
    else:
        click.echo(f"task {task_id} is {state}")


@task.command("retry")
@click.argument("task_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def task_retry(ctx: click.Context, task_id: int, as_json: bool) -> None:
    """Queue a finished TASK_ID again, as a new task with the same type and payload."""
    from agent_core import tasks

    settings = _settings(ctx)
    with _store(settings) as store:
        submitted = tasks.retry(store, settings, task_id)
    _wake_daemon(settings)
    click.echo(json.dumps(submitted.to_dict()) if as_json else f"task {submitted.id} queued (retry of {task_id})")


@main.group()
def snapshot() -> None:
    """Snapshots of the watched files and the current model: create, list, diff, restore."""


@snapshot.command("create")
@click.option("-m", "--message", default="", help="What this snapshot is for.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def snapshot_create(ctx: click.Context, message: str, as_json: bool) -> None:
    """Snapshot every watched file (content-addressed: unchanged files cost nothing)."""
    from agent_core.snapshot import Snapshots

    settings = _settings(ctx)
    with _store(settings) as store:
        info = Snapshots(settings, store).create(message)
    click.echo(json.dumps(info.to_dict()) if as_json else f"snapshot {info.id[:12]}: {info.files} files")


@snapshot.command("list")
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(1, 100_000), help="How many.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def snapshot_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Snapshots, newest first: id, time, files, model, message."""
    from agent_core.snapshot import Snapshots

    rows = [s.to_dict() for s in Snapshots(_settings(ctx)).list(limit)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        model = (r.get("model") or {}).get("id", "")
        kind = " (partial)" if r.get("partial") else ""
        click.echo("\t".join((r["id"][:12], r["time"][:19], f"{r['files']} files{kind}", model, r["message"])))
    if not rows:
        click.echo("no snapshots yet; make one with: gremlin snapshot create -m 'before the refactor'", err=True)


@snapshot.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def snapshot_diff(ctx: click.Context, a: str, b: str, as_json: bool) -> None:
    """What changed from snapshot A to snapshot B (ids or unique prefixes), as unified diffs."""
    from agent_core.snapshot import Snapshots

    changes = Snapshots(_settings(ctx)).diff(a, b)
    if as_json:
        click.echo(json.dumps(changes, indent=2))
        return
    for c in changes:
        click.echo(f"{c['change']}\t{display_path(c['path'])}")
        if c.get("diff"):
            click.echo(c["diff"].rstrip("\n"))
    if not changes:
        click.echo("no differences", err=True)


@snapshot.command("restore")
@click.argument("snapshot_id")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def snapshot_restore(ctx: click.Context, snapshot_id: str, as_json: bool) -> None:
    """Put the watched files back as they were in SNAPSHOT_ID.

    The present state is snapshotted first, so `gremlin snapshot restore UNDO_ID` undoes
    it. Restored files are marked as Gremlin's own writes: they never feed training. The
    model is not switched; `gremlin models rollback ID` does that.
    """
    from agent_core.snapshot import Snapshots

    settings = _settings(ctx)
    with _store(settings) as store:
        done = Snapshots(settings, store).restore(snapshot_id)
    if as_json:
        click.echo(json.dumps(done.to_dict(), indent=2))
        return
    click.echo(f"restored {done.snapshot[:12]}: {len(done.written)} written, {len(done.deleted)} deleted, "
               f"{done.unchanged} unchanged; undo with: gremlin snapshot restore {done.undo[:12]}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Only count what would be evicted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def retention(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Apply the [retention] limits now: evict the memories of each kind past its limits.

    Through the running daemon when there is one (its live index drops them at once), else
    here. Never evicted: retrain memories, and memories that a pair of the current training
    dataset or a queued or running task refers to. On a terminal a table; piped, one
    tab-separated line a kind: kind, count.
    """
    from agent_core.retention import run_retention

    settings = _settings(ctx)
    summary, via_daemon = run_retention(settings, dry_run)
    if as_json:
        click.echo(json.dumps({**summary, "daemon": via_daemon}, indent=2))
    elif not summary["configured"]:
        console.print(Text(f"no retention limits set: nothing evicted; add [retention.max_count] or "
                           f"[retention.max_age_days] to {display_path(settings.config_file)}"), soft_wrap=True)
    elif console.is_terminal:
        _print_retention(summary, via_daemon)
    else:
        for kind, count in summary["evicted"].items():
            click.echo(f"{kind}\t{count}")


def _print_retention(summary: dict, via_daemon: bool) -> None:
    """Per kind: its limits and what was (or would be) evicted; then one line of totals."""
    table = Table()
    for column in ("kind", "max_count", "max_age_days", "would evict" if summary["dry_run"] else "evicted"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, count in summary["evicted"].items():
        limits = summary["limits"][kind]
        table.add_row(kind, *("" if limits[k] is None else str(limits[k]) for k in ("max_count", "max_age_days")),
                      str(count))
    console.print(table)
    where = "by the daemon" if via_daemon else "here (a daemon's index drops them when it next starts)"
    done = "would be evicted (dry run: nothing deleted)" if summary["dry_run"] else f"evicted {where}"
    console.print(f"{summary['total']} memories {done} in {summary['seconds']} s", highlight=False, soft_wrap=True)


@main.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--since", metavar="DATE", default=None,
              help="Only commits made on or after DATE (ISO-8601: 2024-01-31 or 2024-01-31T12:00:00Z; UTC "
                   "when no offset is given).")
@click.option("--merges/--no-merges", default=True, show_default=True,
              help="Store the main line's merge commits, each as one change against its first parent (a "
                   "merged pull request as a whole). Projects that merge pull requests keep most of their "
                   "history in merges; --no-merges keeps only commits made on the main line itself.")
@click.option("--branches/--first-parent", default=None,
              help="Also store the commits each merge brought (dated when the merge landed; a merge that "
                   "brought one commit is then left out as the same change). Default: [training] "
                   "replay_branches (on).")
@click.pass_context
def replay(ctx: click.Context, path: Path, since: str | None, merges: bool, branches: bool | None) -> None:
    """Backfill memory and training pairs from the git history of the repository at PATH.

    Walks the first-parent history oldest first and stores each commit once: its diff
    (secrets redacted) and its message, cleaned of issue numbers and trailers, become a
    searchable memory and a "commit" training pair (message → diff). Running it again
    stores only commits not stored yet. It writes to this home's database directly (a
    running daemon is fine); the daemon embeds the new memories when it next catches up.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from self_training.replay import replay_repository

    settings = _settings(ctx)
    columns = (TextColumn("replaying commits"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _store(settings) as store, Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("replay", total=None)
        result = replay_repository(store, settings, path, since, merges=merges, branches=branches,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    unreadable = (f", {result.unreadable} unreadable (malformed, missing or a shallow clone's boundary; "
                  "see the warnings)") if result.unreadable else ""
    console.print(f"replayed {result.repo}: {result.commits_seen} commits seen, {result.commits_stored} stored, "
                  f"{result.skipped} skipped (already stored or without a diff){unreadable}"
                  + ("; the daemon embeds them when it next runs" if result.commits_stored else ""),
                  highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
