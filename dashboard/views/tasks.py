"""Tasks: states, the submit forms (JSON or a shell command), cancel and retry, rewards per type."""

from __future__ import annotations

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, url_for

from agent_core import tasks as task_queue
from config.errors import GremlinError
from dashboard import actions, queries
from dashboard.backend import backend, read_store
from dashboard.views import back_to, form_action

bp = Blueprint("tasks", __name__)
EXAMPLE = '{"type": "shell", "cmd": ["pytest", "-q"]}'


def _page(error: str | None = None, form: dict | None = None) -> str:
    return render_template("tasks.html", error=error, form=form or {}, example=EXAMPLE,
                           types=tuple(task_queue.TYPE_FIELDS), states=queries.TASK_STATES, args=request.args,
                           **queries.tasks(read_store(), request.args))


@bp.get("/tasks")
def index() -> str:
    """The task list, counts, rewards and the submit forms."""
    return _page()


@bp.post("/tasks")
def submit() -> Response | tuple[str, int]:
    """Queue the task of the JSON form or the shell-command form; a malformed one is shown on the form (400)."""
    form = request.form
    try:
        if form.get("kind") == "shell":
            spec = actions.shell_task(form.get("cmd", ""), form.get("cwd", ""), form.get("timeout_s", ""),
                                      form.get("priority", ""))
        else:
            spec = task_queue.parse_task_text(form.get("task", ""))
        done = actions.submit_task(backend(), spec)
    except GremlinError as exc:
        return _page(str(exc), form.to_dict()), 400
    what = "queued" if done["created"] else "was already queued under its key"
    flash(f"task {done['id']} {what}" + ("" if done["daemon"] else "; no daemon is running: it runs when one starts"),
          "ok")
    return redirect(url_for("tasks.show", task_id=done["id"]), code=303)


@bp.get("/tasks/<int:task_id>")
def show(task_id: int) -> str:
    """One task: payload, state, attempts, result, reward, error."""
    task = read_store().get_task(task_id)
    if task is None:
        abort(404, description=f"no task {task_id}; see /tasks")
    return render_template("task.html", task=task)


@bp.post("/tasks/<int:task_id>/cancel")
def cancel(task_id: int) -> Response:
    """Cancel a queued task, or ask a running one to stop."""
    def run() -> str:
        state = actions.cancel_task(task_id)["state"]
        return f"task {task_id}: asked it to stop" if state == "running" else f"task {task_id} is {state}"
    return form_action(run, back_to(url_for("tasks.show", task_id=task_id)))


@bp.post("/tasks/<int:task_id>/retry")
def retry(task_id: int) -> Response:
    """Queue a finished task again."""
    def run() -> str:
        return f"task {actions.retry_task(backend(), task_id)['id']} queued (retry of {task_id})"
    return form_action(run, back_to(url_for("tasks.index")))
