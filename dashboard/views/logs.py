"""Logs: filtered records of gremlin.log, and a live tail over server-sent events.

A live tail holds one of the server's worker threads, so at most SSE_MAX_STREAMS run at
once (all threads but two by default), and each ends after SSE_MAX_S (the browser's
EventSource reconnects by itself), when the client goes away (noticed at the next write:
a keep-alive comment at least every SSE_KEEPALIVE_S) and when the server stops.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator

from flask import Blueprint, Response, abort, current_app, render_template, request, url_for

from agent_core.logs import COMPONENTS, LogRecord, follow_records
from dashboard import queries

logger = logging.getLogger(__name__)

bp = Blueprint("logs", __name__)
QUEUED_RECORDS = 1000  # records waiting for a slow client; the reader waits beyond that
RETRY_MS = 2000


@bp.get("/logs")
def index() -> str:
    """The newest records passing the filters, and the live tail of new ones."""
    records = queries.log_records(current_app.config["GREMLIN_SETTINGS"], request.args)
    live = {k: v for k, v in queries.log_filters(request.args).items() if v}
    return render_template("logs.html", records=records, levels=queries.LOG_LEVELS, components=COMPONENTS,
                           args=request.args, stream_url=url_for("logs.stream", **live))


@bp.get("/logs/stream")
def stream() -> Response:
    """Server-sent events: each record appended to gremlin.log from now on (`event: record`)."""
    filters = queries.log_filters(request.args)
    state, config = current_app.extensions["gremlin"], current_app.config
    if not state.streams.acquire(blocking=False):
        abort(503, description="too many live log tails are open; close one (another tab?) and reload")
    tail = _Tail(state)
    try:
        records = follow_records(config["GREMLIN_SETTINGS"], tail.stop, config["SSE_POLL_S"], **filters)
    except BaseException:
        tail.close()
        raise
    response = Response(tail.events(records, config["SSE_KEEPALIVE_S"], config["SSE_MAX_S"]),
                        mimetype="text/event-stream", headers={"X-Accel-Buffering": "no"})
    response.call_on_close(tail.close)  # also when the response is never read
    return response


class _Tail:
    """One live tail: a thread reads the log into a queue, the response generator writes it out."""

    def __init__(self, state):
        self.state = state
        self.stop = threading.Event()
        self.queue: queue.Queue[LogRecord] = queue.Queue(QUEUED_RECORDS)
        self.thread: threading.Thread | None = None
        self._closed = threading.Lock()

    def events(self, records: Iterator[LogRecord], keepalive_s: float, max_s: float) -> Iterator[str]:
        """The event stream: a greeting, then records and keep-alive comments until it must end."""
        self.thread = threading.Thread(target=self._read, args=(records,), name="gremlin-log-tail", daemon=True)
        self.thread.start()
        try:
            yield f"retry: {RETRY_MS}\n: live tail started\n\n"
            yield from self._write(keepalive_s, time.monotonic() + max_s)
            if self.state.stopping.is_set():
                yield "event: end\ndata: {\"reason\": \"the dashboard is stopping\"}\n\n"
        finally:
            self.stop.set()

    def _write(self, keepalive_s: float, deadline: float) -> Iterator[str]:
        last = time.monotonic()
        while not self.state.stopping.is_set() and not self.stop.is_set() and time.monotonic() < deadline:
            try:
                rec = self.queue.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() - last >= keepalive_s:
                    last = time.monotonic()
                    yield ": keep-alive\n\n"  # a write is how a gone client is noticed
                continue
            last = time.monotonic()
            yield f"event: record\ndata: {json.dumps(queries.record_dict(rec), default=str)}\n\n"

    def _read(self, records: Iterator[LogRecord]) -> None:
        try:
            for rec in records:
                while not self.stop.is_set():
                    try:
                        self.queue.put(rec, timeout=0.25)
                        break
                    except queue.Full:
                        continue
        except Exception:  # noqa: BLE001 - a failing tail ends this stream, never the server
            logger.exception("live log tail failed")
        finally:
            self.stop.set()

    def close(self) -> None:
        """End the tail: stop the reader, wait for it, give the stream slot back (once)."""
        if not self._closed.acquire(blocking=False):
            return
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.state.streams.release()
