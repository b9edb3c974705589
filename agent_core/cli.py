"""`gremlin`: parse, call the library, render. Errors become a message and exit code 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from config.errors import GremlinError
from config.settings import init_home, load_settings

console = Console()

MEMORY_KINDS = ("code_diff", "failure", "feedback", "task", "log", "retrain")
# The search modes (memory.service.SEARCH_MODES) and the score each reports; spelled out
# here so that `--help` need not import the model stack.
SCORE_NAMES = {"hybrid": "rrf", "dense": "cosine", "lexical": "bm25"}


class GremlinGroup(click.Group):
    """Turns GremlinError from any command into `error: ...` and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GremlinError as exc:
            click.echo(f"error: {exc}", err=True)
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
    """Run the daemon in the foreground until Ctrl-C or SIGTERM.

    It watches the configured roots, records every change in data/gremlin.db, embeds it,
    and answers searches on run/gremlin.sock. Logs: data/logs/system/gremlin.log.
    """
    from agent_core.daemon import Daemon
    from agent_core.logs import configure_logging

    settings = _settings(ctx).with_extra_roots(watch)
    init_home(settings.home)  # the home's folders (data/logs/...) exist before anything watches them
    configure_logging(settings, console=not quiet)
    sys.exit(Daemon(settings).run())


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
                   "(SQLite full-text, BM25 score); hybrid: both, fused by reciprocal rank, which "
                   "finds code by its identifiers and by what it does (rrf score, 1.0 = first in both).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def search(ctx: click.Context, query: str, k: int, kind: str | None, mode: str, as_json: bool) -> None:
    """Find the memories (diffs, failures) that best match QUERY, by meaning and by words.

    Uses the running daemon when there is one; otherwise loads the model here (slower).
    """
    from agent_core.status import search_memory

    hits = search_memory(_settings(ctx), query, k, kind, mode)
    if as_json:
        click.echo(json.dumps(hits, indent=2))
        return
    if not hits:
        console.print("no memories yet: change a watched file while the daemon runs")
        return
    table = Table(show_lines=True)
    for column in (f"score ({SCORE_NAMES[mode]})", "kind", "path", "time", "preview"):
        table.add_column(column, overflow="fold")
    for hit in hits:
        kind_text = hit["kind"] + (f" ({hit['change']})" if hit.get("change") else "")
        table.add_row(f"{hit['score']:.3f}", kind_text, hit.get("label") or hit.get("path") or "",
                      hit["time"][:19],
                      hit["preview"])
    console.print(table)


def _render_status(info: dict) -> None:
    running = f"running (pid {info['pid']}, {info['state']})" if info["running"] else "not running"
    console.print(f"[bold]daemon[/]   {running}", highlight=False)
    console.print(f"[bold]home[/]     {info['home']}", highlight=False)
    console.print("[bold]watching[/] " + ("\n         ".join(info["roots"]) or "nothing"), highlight=False)
    c = info["counts"]
    console.print(f"[bold]memory[/]   {c['events']} events, {c['memories']} memories, "
                  f"{info['index_size']} indexed", highlight=False)
    console.print(f"[bold]model[/]    {info['model_id']}", highlight=False)
    watcher = info.get("watcher", {})
    for root, why in watcher.get("degraded", {}).items():
        console.print(f"[bold yellow]degraded[/] {root}: {why} (polling; see the log for the fix)",
                      highlight=False)
    drift = info.get("drift") or {}
    if drift.get("mean_shift") is not None:
        flag = " [bold yellow]drifting[/]" if drift["drifting"] else ""
        console.print(f"[bold]drift[/]    mean vector shift {drift['mean_shift']:.3f} over "
                      f"{drift['samples']}/{drift['window']} (threshold {drift['threshold']}){flag}",
                      highlight=False)
    if watcher.get("last_error"):
        console.print(f"[bold red]last error[/] {watcher['last_error']}", highlight=False)
    if info.get("failures"):
        table = Table(title="recent failures")
        for column in ("last seen", "count", "failure"):
            table.add_column(column)
        for f in info["failures"]:
            table.add_row(f["last_seen"][:19], str(f["count"]), f["title"])
        console.print(table)
    if info["recent_events"]:
        table = Table(title="last events")
        for column in ("id", "time", "change", "path"):
            table.add_column(column)
        for ev in info["recent_events"]:
            path = f"{ev['old_path']} -> {ev['path']}" if ev.get("old_path") else ev["path"]
            table.add_row(str(ev["id"]), ev["time"][:19], ev["kind"], path)
        console.print(table)


if __name__ == "__main__":
    main()
