"""The web dashboard: pages, JSON API, authentication, CSRF, Host checks, escaping, live logs, the server."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from agent_core import tasks as task_queue
from agent_core.logs import system_log_dir
from agent_core.snapshot import Snapshots
from agent_core.tasks import MAX_TASK_BYTES
from config.errors import GremlinError
from config.settings import load_settings
from dashboard import create_app
from dashboard.auth import load_or_create_secret, load_or_create_token, login_url
from dashboard.charts import line_chart
from dashboard.security import CSP
from dashboard.server import DashboardServer
from memory.store import FileState, NewEvent, utc_now
from self_mutation_watcher.diff_engine import unified_diff
from self_training.feedback_loop import trigger_path
from tests.conftest import make_home, start_daemon, wait_for, write_config

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(1)>'
HOSTILE_NAME = '"><img src=x onerror=alert(2)>.py'
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


# -- fixtures -------------------------------------------------------------------------------


class Client(FlaskClient):
    """A test client that talks to the dashboard as the browser does: Host 127.0.0.1:<port>."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.base = f"http://127.0.0.1:{self.application.config['GREMLIN_SETTINGS'].dashboard.port}"

    def open(self, *args, **kwargs):
        if args and isinstance(args[0], str):
            kwargs.setdefault("base_url", self.base)
        return super().open(*args, **kwargs)

    def csrf(self) -> str:
        """This session's CSRF token, as the pages embed it."""
        page = self.get("/tasks").get_data(as_text=True)
        return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def make_app(settings, **config):
    app = create_app(settings, test_config=config or None)
    app.test_client_class = Client
    return app


def _event(path: Path, root: Path, kind: str = "modified", diff: str | None = None, meta: dict | None = None,
           memory_kind: str = "code_diff", text: str | None = None, **kw) -> NewEvent:
    label = f"{root.name}/{path.name}"
    return NewEvent(kind=kind, path=str(path), root=str(root), time=utc_now(), state=FileState(str(path), str(root),
                    "sha-" + path.name, 10, 1), new_sha="sha-" + path.name, size=10, diff=diff, meta=meta or {},
                    memory_kind=memory_kind, memory_text=text or f"{kind} {label}\n{diff or ''}",
                    memory_meta={"path": str(path), "label": label, "change": kind, **(meta or {})}, **kw)


def _hostile_diff(tmp_path: Path) -> tuple[str, dict]:
    """A real GNU diff whose text holds script and attribute injections."""
    old, new = tmp_path / "old.py", tmp_path / "new.py"
    old.write_text("x = 1\n")
    new.write_text(f"x = 1\nbanner = '{XSS_SCRIPT}'\nlink = '{XSS_ATTR}'\n")
    diff = unified_diff(old, new, "project/evil.py", 1 << 20)
    return diff.text, {**diff.meta(), "vector_shift": 0.4242}


def _runs_and_models(store) -> dict:
    """A promoted run with its current model, and a rejected run whose model kept no weights."""
    ids = {}
    for n, (state, status, before, after) in enumerate((("promoted", "current", 0.41, 0.57),
                                                         ("rejected", "rejected", 0.57, 0.55))):
        run_id, model_id = f"20240501-12000{n}-run{n}", f"model{n}" + "0" * 20
        store.create_run(run_id, {"trigger": "manual", "note": "from a test"}, {"epochs": 1})
        lineage = {"source": "manual", "run_id": run_id, "device": "cpu", "train_loss": 0.9 - n / 10,
                   "metrics_before": {"mrr@10": before}, "metrics_after": {"mrr@10": after},
                   "confidence_gain": round(after - before, 4), "sources": {"commit": 30, "failure_fix": 4},
                   "n_pairs": 34, "n_heldout": 8, "seconds": 12.5}
        store.register_model(model_id, f"/nowhere/{run_id}", status, lineage)
        store.update_run(run_id, state=state, model_id=model_id, reason=f"{state} by the gate", finished=utc_now(),
                         metrics={"dataset": {"train": 34, "heldout": 8, "counts": {"commit": 30}},
                                  "before": {"mrr@10": before}, "after": {"mrr@10": after},
                                  "decision": {"gain": round(after - before, 4), "accepted": n == 0}})
        ids[state] = model_id
    store.make_current(ids["promoted"])
    return ids


def _tasks(store, settings) -> dict:
    """A shell task that ran (done, rewarded) and one still queued."""
    done = task_queue.submit(store, settings, task_queue.parse_task({"type": "shell", "cmd": ["true"]})).id
    row = store.claim_task(os.getpid(), 60)
    store.finish_task(row["id"], row["attempts"], "done", {"exit_code": 0, "reward": 0.9})
    queued = task_queue.submit(store, settings, task_queue.parse_task({"type": "shell", "cmd": ["echo", "hi"]})).id
    return {"done": done, "queued": queued}


@pytest.fixture
def rows(tmp_path, settings, store, watched) -> dict:
    """Real rows in a real database: changes (one hostile), a failure, one by Gremlin, tasks, runs, models."""
    diff, meta = _hostile_diff(tmp_path)
    stored = store.record_events([
        _event(watched / "evil.py", watched, diff=diff, meta=meta),
        _event(watched / "app.py", watched, kind="log", memory_kind="failure",
               text="failure in project/app.py: ZeroDivisionError: division by zero",
               meta={"title": "ZeroDivisionError: division by zero", "file": "app.py", "line": 3},
               signature="sig-zero", title="ZeroDivisionError: division by zero"),
        _event(watched / "restored.py", watched, diff="-a\n+b\n", meta={"by_gremlin": True}),
        _event(watched / HOSTILE_NAME, watched, kind="created", diff="+x\n"),
    ])
    return {"evil": stored[0].event_id, "failure": stored[1].event_id, "by_gremlin": stored[2].event_id,
            "hostile_name": stored[3].event_id, "models": _runs_and_models(store), "tasks": _tasks(store, settings)}


@pytest.fixture
def app(settings, store):
    return make_app(settings, SSE_KEEPALIVE_S=0.2)


@pytest.fixture
def anon(app) -> Client:
    """A client that has not logged in."""
    return app.test_client()


@pytest.fixture
def client(app) -> Client:
    """A client logged in through /login?token=…."""
    c = app.test_client()
    assert c.get(f"/login?token={app.config['GREMLIN_TOKEN']}").status_code == 302
    return c


def bearer(app) -> dict:
    return {"Authorization": f"Bearer {app.config['GREMLIN_TOKEN']}"}


@pytest.fixture
def snapshots(settings, store, watched) -> tuple[str, str]:
    """Two real snapshots of the watched folder; the second holds the hostile content."""
    (watched / "notes.txt").write_text("first\n")
    snaps = Snapshots(settings, store)
    a = snaps.create("before").id
    (watched / "notes.txt").write_text(f"second {XSS_SCRIPT}\n{XSS_ATTR}\n")
    b = snaps.create("after").id
    snaps.close()
    return a, b


def write_log(settings, *records: dict) -> Path:
    path = system_log_dir(settings) / "gremlin.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps({"time": utc_now(), "level": "INFO", "component": "daemon",
                                     "logger": "agent_core.daemon", **rec}) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- every route ----------------------------------------------------------------------------


def test_every_page_renders_when_logged_in(client, rows, snapshots, settings):
    write_log(settings, {"msg": "daemon ready", "pid": 1}, {"level": "WARNING", "msg": "slow disk"})
    a, b = snapshots
    pages = ["/", "/changes", "/changes?path=evil&kind=modified&since=1d&by_gremlin=0", "/changes?by_gremlin=1",
             f"/changes/{rows['evil']}", f"/changes/{rows['failure']}", "/search",
             "/search?q=division&mode=lexical&kind=failure&path=app&since=1d", "/search?q=division",
             "/training", "/tasks", "/tasks?state=done&type=shell", f"/tasks/{rows['tasks']['done']}",
             "/snapshots", f"/snapshots/diff?a={a}&b={b}", "/logs", "/logs?level=warning&component=daemon&grep=slow"]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, (page, response.get_data(as_text=True)[:500])
        assert response.mimetype == "text/html" and 'id="nav"' in response.get_data(as_text=True)
    assert client.get("/login").status_code == 302  # logged in already: on to the overview


def test_pages_show_the_rows_they_are_about(client, rows, snapshots, settings):
    write_log(settings, {"level": "WARNING", "msg": "slow disk", "seconds": 3})
    overview = client.get("/").get_data(as_text=True)
    assert "ZeroDivisionError: division by zero" in overview and "0.41 → 0.57" in overview
    events_row = re.search(r'<tr id="count-events">.*?</tr>', overview, re.S).group(0)
    assert re.findall(r'<td class="num">([\d.]+)</td>', events_row) == ["4", "4", "0.17"]  # total, 24 h, per hour
    assert 'id="next-page"' in client.get("/changes?limit=2").get_data(as_text=True)
    assert 'id="next-page"' not in client.get("/changes").get_data(as_text=True)
    changes = client.get("/changes?by_gremlin=1").get_data(as_text=True)
    assert f'data-event-id="{rows["by_gremlin"]}"' in changes and f'data-event-id="{rows["evil"]}"' not in changes
    change = client.get(f"/changes/{rows['evil']}").get_data(as_text=True)
    assert 'class="diff"' in change and "0.4242" in change and 'id="hunks"' in change
    training = client.get("/training").get_data(as_text=True)
    assert training.count('class="run-row"') == 2 and '<svg' in training and "Promote" not in training
    tasks = client.get("/tasks").get_data(as_text=True)
    assert f'data-task-id="{rows["tasks"]["queued"]}"' in tasks and 'id="rewards"' in tasks and "0.9" in tasks
    assert "slow disk" in client.get("/logs?level=warning").get_data(as_text=True)
    assert "slow disk" not in client.get("/logs?level=error").get_data(as_text=True)
    assert "notes.txt" in client.get(f"/snapshots/diff?a={snapshots[0]}&b={snapshots[1]}").get_data(as_text=True)


def test_every_api_read_returns_json(app, anon, rows, snapshots, settings):
    write_log(settings, {"msg": "daemon ready"})
    a, b = snapshots
    reads = {"/api/status": "counts", "/api/search?q=division&mode=lexical": "results", "/api/events": "events",
             f"/api/events/{rows['evil']}": "event", "/api/runs": "runs", "/api/models": "models",
             "/api/tasks": "tasks", f"/api/tasks/{rows['tasks']['done']}": "payload", "/api/snapshots": "snapshots",
             f"/api/snapshots/diff?a={a}&b={b}": "changes", "/api/logs?level=info": "records"}
    for path, key in reads.items():
        response = anon.get(path, headers=bearer(app))
        assert response.status_code == 200, (path, response.get_json())
        assert response.mimetype == "application/json" and key in response.get_json(), path
    assert anon.get("/api/models", headers=bearer(app)).get_json()["current"] == rows["models"]["promoted"]
    def event_ids(query: str) -> list[int]:
        return [e["id"] for e in anon.get(f"/api/events?{query}", headers=bearer(app)).get_json()["events"]]
    assert event_ids("kind=log") == [rows["failure"]]
    assert event_ids("path=evil") == [rows["evil"]] and event_ids("by_gremlin=1") == [rows["by_gremlin"]]
    assert event_ids("since=2999-01-01") == [] and event_ids("since=1h&limit=2") == [rows["hostile_name"],
                                                                                     rows["by_gremlin"]]
    assert event_ids(f"before={rows['by_gremlin']}") == [rows["failure"], rows["evil"]]


def test_errors_are_json_for_the_api_and_pages_otherwise(app, anon, client, rows):
    for path, status in (("/api/nowhere", 404), ("/api/events/999999", 404), ("/api/tasks/999999", 404),
                         ("/api/search", 400), ("/api/search?q=x&mode=psychic", 400), ("/api/events?since=soon", 400),
                         ("/api/logs?level=loud", 400)):
        response = anon.get(path, headers=bearer(app))
        assert response.status_code == status, path
        assert set(response.get_json()) == {"error"} and response.get_json()["error"], path
    assert anon.get("/api/train", headers=bearer(app)).status_code == 405
    page = client.get("/changes/999999")
    assert page.status_code == 404 and "no event 999999" in page.get_data(as_text=True)
    assert "Traceback" not in page.get_data(as_text=True)
    assert client.get("/search?q=x&mode=psychic").status_code == 400


# -- authentication --------------------------------------------------------------------------


def test_without_a_login_pages_redirect_and_the_api_answers_401(anon, rows):
    for page in ("/", "/changes", f"/changes/{rows['evil']}", "/tasks", "/logs"):
        response = anon.get(page)
        assert response.status_code == 302 and response.headers["Location"] == "/login", page
    for path in ("/api/status", "/api/events", "/logs/stream"):
        response = anon.get(path)
        assert response.status_code == 401 and "error" in response.get_json(), path
    assert anon.post("/api/tasks", data='{"type": "self_train"}').status_code == 401
    login = anon.get("/login")
    assert login.status_code == 200 and 'id="login-form"' in login.get_data(as_text=True)


def test_login_sets_a_strict_httponly_session_and_drops_the_token_from_the_url(app, anon):
    response = anon.get(f"/login?token={app.config['GREMLIN_TOKEN']}")
    assert response.status_code == 302 and response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and app.config["GREMLIN_TOKEN"] not in cookie
    assert anon.get("/").status_code == 200


def test_a_wrong_token_is_refused_everywhere(app, anon):
    assert anon.get("/login?token=not-the-token").status_code == 403
    assert anon.get("/").status_code == 302  # still not logged in
    assert anon.get("/api/status", headers={"Authorization": "Bearer not-the-token"}).status_code == 401
    assert anon.get("/api/status", headers={"Authorization": "Basic " + app.config["GREMLIN_TOKEN"]}).status_code == 401
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', anon.get("/login").get_data(as_text=True)).group(1)
    assert anon.post("/login", data={"token": "nope", "csrf_token": csrf}).status_code == 403
    done = anon.post("/login", data={"token": app.config["GREMLIN_TOKEN"], "csrf_token": csrf})
    assert done.status_code == 303 and done.headers["Location"] == "/" and anon.get("/").status_code == 200


def test_bearer_token_works_without_a_session_or_csrf(app, anon, store):
    assert anon.get("/api/status", headers=bearer(app)).status_code == 200
    response = anon.post("/api/tasks", data='{"type": "self_train"}', headers=bearer(app))
    assert response.status_code == 201 and store.get_task(response.get_json()["id"])["type"] == "self_train"
    assert "Set-Cookie" not in response.headers


def test_logout_ends_the_session_and_a_new_token_ends_old_sessions(app, client, settings, store):
    csrf = client.csrf()
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert client.get("/").status_code == 302
    client.get(f"/login?token={app.config['GREMLIN_TOKEN']}")
    (settings.run_dir / "dashboard.token").unlink()
    renewed = make_app(settings)
    again = renewed.test_client()
    name = app.config["SESSION_COOKIE_NAME"]
    again.set_cookie(name, client.get_cookie(name, domain="127.0.0.1").value, domain="127.0.0.1")
    assert again.get("/api/status").status_code == 401
    assert again.get("/").status_code == 302  # signed with the same secret, but for the old token


# -- CSRF, Host, size ------------------------------------------------------------------------


def test_cookie_posts_need_the_csrf_token(client, store):
    task = {"kind": "json", "task": '{"type": "self_train"}'}
    assert client.post("/tasks", data=task).status_code == 403
    assert client.post("/tasks", data={**task, "csrf_token": "forged"}).status_code == 403
    body = '{"type": "self_train"}'
    assert client.post("/api/tasks", data=body).status_code == 403
    assert client.post("/api/tasks", data=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert store.list_tasks() == []
    csrf = client.csrf()
    assert client.post("/tasks", data={**task, "csrf_token": csrf}).status_code == 303
    assert client.post("/api/tasks", data='{"type": "self_train"}', headers={"X-CSRF-Token": csrf}).status_code == 201
    foreign = client.post("/tasks", data={**task, "csrf_token": csrf}, headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    assert len(store.list_tasks()) == 2


def test_a_foreign_host_header_is_refused(app, anon, client):
    port = app.config["GREMLIN_SETTINGS"].dashboard.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        page = client.get("/", headers={"Host": host})
        assert page.status_code == 421 and "Host header" in page.get_data(as_text=True), host
        api = anon.get("/api/status", headers={**bearer(app), "Host": host})
        assert api.status_code == 421 and "Host" in api.get_json()["error"]
    for host in (f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert anon.get("/api/status", headers={**bearer(app), "Host": host}).status_code == 200, host


def test_an_oversized_body_is_refused_with_413(app, anon, client):
    big = b'{"type": "mutate", "patch": "' + b"x" * MAX_TASK_BYTES + b'"}'
    response = anon.post("/api/tasks", data=big, headers=bearer(app))
    assert response.status_code == 413 and "bytes" in response.get_json()["error"]
    form = client.post("/tasks", data={"kind": "json", "task": "x" * (MAX_TASK_BYTES + 1), "csrf_token": "x"})
    assert form.status_code == 413
    patch = "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n" * 20_000  # a 600 kB patch fits
    fits = anon.post("/api/tasks", data=json.dumps({"type": "mutate", "patch": patch}), headers=bearer(app))
    assert fits.status_code == 201


def test_security_headers_are_on_every_response(app, anon, client, rows):
    responses = [client.get("/"), client.get(f"/changes/{rows['evil']}"), client.get("/api/status"),
                 anon.get("/"), anon.get("/api/status"), anon.get("/login"), client.get("/nowhere"),
                 client.get("/", headers={"Host": "evil.example"}), client.post("/tasks", data={}),
                 anon.post("/api/tasks", data=b"x" * (MAX_TASK_BYTES + 1), headers=bearer(app)),
                 client.get("/static/style.css"), client.get("/static/app.js")]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (response.status_code, response.request.path, name)
        if not response.request.path.startswith("/static/"):
            assert response.headers["Cache-Control"] == "no-store", response.request.path
        response.close()
    with client.get("/static/logs.js") as script:
        assert script.mimetype in ("text/javascript", "application/javascript")


def test_pages_load_no_inline_script_or_style(client, rows):
    for page in ("/", "/training", "/logs", f"/changes/{rows['evil']}", "/tasks", "/snapshots", "/search?q=x"):
        html = client.get(page).get_data(as_text=True)
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), page
        assert " style=" not in html and "<style" not in html and " on" + "click=" not in html, page


# -- escaping ---------------------------------------------------------------------------------


def test_hostile_diff_text_and_file_names_are_escaped(client, rows, snapshots):
    pages = [f"/changes/{rows['evil']}", "/changes", f"/changes/{rows['hostile_name']}", "/search?q=alert&mode=lexical",
             f"/snapshots/diff?a={snapshots[0]}&b={snapshots[1]}", f"/search?q={XSS_SCRIPT}&mode=lexical"]
    for page in pages:
        html = client.get(page).get_data(as_text=True)
        assert XSS_SCRIPT not in html and "<img src=x" not in html, page
    change = client.get(f"/changes/{rows['evil']}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in change and "&lt;img src=x onerror=alert(1)&gt;" in change
    listing = client.get("/changes").get_data(as_text=True)
    assert "&lt;img src=x onerror=alert(2)&gt;.py" in listing


def test_charts_are_escaped_svg():
    svg = str(line_chart([("<script>x</script>", 0.5), ("b\"'&", 0.75), ("nan", float("nan")), ("none", None)],
                         300, 120, '<img src=x onerror=alert(1)>'))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<script>" not in svg and "<img" not in svg and "&lt;script&gt;" in svg and "&#34;" in svg
    assert svg.count("<circle") == 2 and " style=" not in svg
    assert "no data yet" in str(line_chart([], 300, 120, "loss"))
    assert str(line_chart([("only", 1.0)], 300, 120, "mrr")).count("<circle") == 1


# -- changes the dashboard makes ----------------------------------------------------------------


def test_api_task_submit_validates_and_stores(app, anon, store):
    for body, field in (('{"type": "shell"}', "'cmd'"), ('{"type": "shell", "cmd": "ls -l"}', "'cmd'"),
                        ('{"type": "nuke"}', "'type'"), ('{"type": "self_train", "wait": "yes"}', "'wait'"),
                        ('{"type": "shell", "cmd": ["rm", "-rf", "/"]}', "'cmd'"), ("not json", "not valid JSON"),
                        ("[1, 2]", "JSON object")):
        response = anon.post("/api/tasks", data=body, headers=bearer(app))
        assert response.status_code == 400, body
        error = response.get_json()["error"]
        assert field in error and "\n" not in error, (body, error)
    assert store.list_tasks() == []
    response = anon.post("/api/tasks", data='{"type": "shell", "cmd": ["echo", "hi"], "priority": 5}',
                         headers=bearer(app))
    assert response.status_code == 201
    row = store.get_task(response.get_json()["id"])
    assert row["payload"] == {"cmd": ["echo", "hi"]} and row["priority"] == 5 and row["source"] == "dashboard"


def test_task_forms_queue_cancel_and_retry(client, store):
    csrf = client.csrf()
    shell = client.post("/tasks", data={"kind": "shell", "cmd": "echo 'two words'", "timeout_s": "5",
                                        "csrf_token": csrf})
    assert shell.status_code == 303
    task = store.list_tasks()[0]
    assert task["payload"] == {"cmd": ["echo", "two words"], "timeout_s": 5.0}
    bad = client.post("/tasks", data={"kind": "json", "task": '{"type": "shell"}', "csrf_token": csrf})
    assert bad.status_code == 400 and "field &#39;cmd&#39; is missing" in bad.get_data(as_text=True)
    assert client.post(f"/tasks/{task['id']}/cancel", data={"csrf_token": csrf}).status_code == 303
    assert store.get_task(task["id"])["state"] == "cancelled"
    assert client.post(f"/tasks/{task['id']}/retry", data={"csrf_token": csrf, "back": "//evil.example/"}
                       ).headers["Location"] == "/tasks"
    retried = store.list_tasks()[0]
    assert retried["retry_of"] == task["id"] and retried["state"] == "queued"
    assert "queued (retry of" in client.get("/tasks").get_data(as_text=True)


def test_api_cancel_and_retry(app, anon, rows, store):
    queued, done = rows["tasks"]["queued"], rows["tasks"]["done"]
    assert anon.post(f"/api/tasks/{queued}/retry", headers=bearer(app)).status_code == 409
    assert anon.post(f"/api/tasks/{queued}/cancel", headers=bearer(app)).get_json() == {"id": queued,
                                                                                           "state": "cancelled"}
    retried = anon.post(f"/api/tasks/{done}/retry", headers=bearer(app))
    assert retried.status_code == 201 and store.get_task(retried.get_json()["id"])["retry_of"] == done
    assert anon.post("/api/tasks/999999/cancel", headers=bearer(app)).status_code == 404


def test_train_writes_the_trigger_without_a_daemon(app, anon, client, settings):
    response = anon.post("/api/train", data='{"note": "from the API", "force": true}', headers=bearer(app))
    assert response.status_code == 202 and response.get_json()["daemon"] is False
    trigger = json.loads(trigger_path(settings).read_text())
    assert trigger["trigger"] == "manual" and trigger["note"] == "from the API" and trigger["force"] is True
    assert anon.post("/api/train", data='{"force": "yes"}', headers=bearer(app)).status_code == 400
    form = client.post("/training/train", data={"note": "from the form", "csrf_token": client.csrf()})
    assert form.status_code == 303 and "retrain queued" in client.get("/training").get_data(as_text=True)


def test_model_switch_errors_are_clear(app, anon, client, rows):
    unknown = anon.post("/api/models/nosuchmodel/rollback", headers=bearer(app))
    assert unknown.status_code == 404 and "nosuchmodel" in unknown.get_json()["error"]
    weightless = anon.post(f"/api/models/{rows['models']['rejected']}/rollback", headers=bearer(app))
    assert weightless.status_code == 409 and "has no weights" in weightless.get_json()["error"]
    form = client.post(f"/training/models/{rows['models']['rejected']}/switch", data={"csrf_token": client.csrf()})
    assert form.status_code == 303 and "has no weights" in client.get("/training").get_data(as_text=True)


def test_snapshot_create_and_restore_through_the_api(app, anon, watched):
    (watched / "keep.txt").write_text("original\n")
    created = anon.post("/api/snapshots", data='{"message": "api test"}', headers=bearer(app))
    assert created.status_code == 201 and created.get_json()["message"] == "api test"
    (watched / "keep.txt").write_text("broken\n")
    restored = anon.post(f"/api/snapshots/{created.get_json()['id']}/restore", headers=bearer(app))
    assert restored.status_code == 200 and (watched / "keep.txt").read_text() == "original\n"
    listed = anon.get("/api/snapshots", headers=bearer(app)).get_json()["snapshots"]
    assert restored.get_json()["undo"] in [s["id"] for s in listed]
    assert anon.post("/api/snapshots/abcdef12/restore", headers=bearer(app)).status_code == 400


def test_search_without_a_daemon_is_lexical(app, anon, rows):
    found = anon.get("/api/search?q=division&mode=lexical", headers=bearer(app)).get_json()
    assert found["mode"] == "lexical" and found["note"] is None
    assert [h["event_id"] for h in found["results"]] == [rows["failure"]]
    hybrid = anon.get("/api/search?q=division", headers=bearer(app)).get_json()
    assert hybrid["mode"] == "lexical" and "no daemon" in hybrid["note"] and hybrid["results"]
    filtered = anon.get("/api/search?q=division&mode=lexical&path=nowhere", headers=bearer(app)).get_json()
    assert filtered["results"] == []


# -- the live log tail ---------------------------------------------------------------------------


def next_chunk(chunks, timeout: float = 10.0) -> str | None:
    """The next chunk of a streamed response (None at its end), failing after `timeout`."""
    got: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: got.put(next(chunks, None)), daemon=True).start()
    chunk = got.get(timeout=timeout)
    return chunk.decode() if isinstance(chunk, bytes) else chunk


def tails_running() -> int:
    return sum(t.name == "gremlin-log-tail" and t.is_alive() for t in threading.enumerate())


def test_live_tail_streams_records_written_after_it_started(client, settings):
    write_log(settings, {"msg": "written before the tail"})
    response = client.get("/logs/stream?component=daemon", buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    chunks = iter(response.response)
    assert "live tail started" in next_chunk(chunks)
    write_log(settings, {"msg": "from the trainer", "component": "trainer"}, {"msg": "tail me", "n": 1})
    seen = ""
    deadline = time.monotonic() + 10
    while "tail me" not in seen and time.monotonic() < deadline:
        seen += next_chunk(chunks)
    assert "event: record" in seen and "tail me" in seen
    assert "written before the tail" not in seen and "from the trainer" not in seen
    record = json.loads(next(line for line in seen.splitlines() if "tail me" in line)[len("data: "):])
    assert record["component"] == "daemon" and record["fields"]["n"] == 1
    response.close()  # the client goes away
    wait_for(lambda: tails_running() == 0, 10, what="the tail thread to stop")


def test_live_tail_ends_when_the_server_stops_and_is_bounded(settings, store):
    app = make_app(settings, SSE_KEEPALIVE_S=0.2, SSE_MAX_STREAMS=1)
    client = app.test_client()
    client.get(f"/login?token={app.config['GREMLIN_TOKEN']}")
    first = client.get("/logs/stream", buffered=False)
    chunks = iter(first.response)
    assert "live tail started" in next_chunk(chunks)
    second = client.get("/logs/stream")
    assert second.status_code == 503 and "too many" in second.get_json()["error"]
    app.extensions["gremlin"].stopping.set()
    rest = []
    while (chunk := next_chunk(chunks)) is not None:
        rest.append(chunk)
    assert "event: end" in "".join(rest)
    first.close()
    wait_for(lambda: tails_running() == 0, 10, what="the tail thread to stop")
    app.extensions["gremlin"].stopping.clear()
    again = client.get("/logs/stream", buffered=False)  # its slot was given back
    assert again.status_code == 200
    again.close()


# -- token files -----------------------------------------------------------------------------------


def test_token_and_secret_files_are_private_and_stable(settings):
    token = load_or_create_token(settings)
    path = settings.run_dir / "dashboard.token"
    assert len(token) >= 40 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(settings) != token
    assert stat.S_IMODE((settings.run_dir / "dashboard.secret").stat().st_mode) == 0o600
    first, second = create_app(settings), create_app(settings)
    assert first.config["GREMLIN_TOKEN"] == second.config["GREMLIN_TOKEN"] == token
    assert first.config["SECRET_KEY"] == second.config["SECRET_KEY"] != token
    os.chmod(path, 0o644)
    assert load_or_create_token(settings) == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")  # not one of ours: replaced
    renewed = load_or_create_token(settings)
    assert renewed != token and path.read_text().strip() == renewed
    assert login_url(settings, renewed) == f"http://127.0.0.1:{settings.dashboard.port}/login?token={renewed}"


# -- the real server --------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture
def served(home, watched, store):
    port = free_port()
    write_config(home, watch={"roots": [str(watched)], "own_source": False}, dashboard={"port": port})
    server = DashboardServer(load_settings(home))
    server.start()
    yield server, port
    server.stop()


def test_server_serves_logins_and_the_api_over_http(served):
    server, port = served
    assert server.url.startswith(f"http://127.0.0.1:{port}/login?token=")
    with pytest.raises(urllib.error.HTTPError) as redirect:
        urllib.request.build_opener(_NoRedirect).open(server.url, timeout=10)
    assert redirect.value.code == 302 and redirect.value.headers["Location"] == "/"
    redirect.value.close()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    with browser.open(server.url, timeout=10) as page:
        assert page.status == 200 and page.url == f"http://127.0.0.1:{port}/" and b'id="nav"' in page.read()
    token = server.app.config["GREMLIN_TOKEN"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Content-Security-Policy"] == CSP and "counts" in json.loads(answer.read())


def test_server_stop_ends_live_tails_and_frees_the_port(served):
    server, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/logs/stream", headers={"Authorization": f"Bearer {server.app.config['GREMLIN_TOKEN']}"})
    response = conn.getresponse()
    assert response.status == 200 and b"live tail started" in response.read1(4096)
    write_log(server.settings, {"msg": "over real http"})
    seen = b""
    while b"over real http" not in seen:
        seen += response.read1(4096)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5 and not server._thread.is_alive()
    conn.close()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: closed connections wait
        sock.bind(("127.0.0.1", port))  # nothing listens there any more
        sock.listen()


def test_a_live_tail_ends_soon_after_its_client_goes_away(served):
    server, port = served
    server.app.config["SSE_KEEPALIVE_S"] = 0.2  # a gone client is noticed at the next write
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/logs/stream", headers={"Authorization": f"Bearer {server.app.config['GREMLIN_TOKEN']}"})
    response = conn.getresponse()
    assert b"live tail started" in response.read1(4096) and tails_running() == 1
    response.close()
    conn.close()
    wait_for(lambda: tails_running() == 0, 10, what="the tail of a gone client to stop")
    assert server.app.extensions["gremlin"].streams.acquire(blocking=False)  # its slot is free again


def test_a_busy_port_is_a_clear_error(home, watched, store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(home, watch={"roots": [str(watched)], "own_source": False}, dashboard={"port": port})
        with pytest.raises(GremlinError, match=rf"{port}.*\[dashboard\] port"):
            DashboardServer(load_settings(home)).start()


# -- inside the daemon ------------------------------------------------------------------------------


def test_the_daemon_serves_the_dashboard_with_its_live_ops_and_survives_a_busy_port(tmp_path):
    homes = {}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for name, port in (("free", free_port()), ("busy", taken.getsockname()[1])):
            project = tmp_path / name / "project"
            project.mkdir(parents=True)
            home = make_home(tmp_path / name, project)
            write_config(home, watch={"roots": [str(project)], "own_source": False, "debounce_ms": 100},
                         dashboard={"port": port})
            homes[name] = (home, port, start_daemon(home))
        try:
            free_home, port, _ = homes["free"]
            line = wait_for(lambda: re.search(r"dashboard ready: (\S+)", (free_home / "daemon.out").read_text()), 60,
                            what="the dashboard to be ready")
            token = (free_home / "run" / "dashboard.token").read_text().strip()
            assert line.group(1) == f"http://127.0.0.1:{port}/login?token={token}"
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                status = json.loads(answer.read())
            assert status["running"] is True and status["pid"] == homes["free"][2].pid and "watcher" in status
            busy_home = homes["busy"][0]
            wait_for(lambda: "daemon ready" in (busy_home / "daemon.out").read_text(), 60,
                     what="the daemon with a busy dashboard port to be ready")
            out = (busy_home / "daemon.out").read_text()
            assert "dashboard not started" in out and "[dashboard] port" in out and "ERROR" in out
        finally:
            for _, _, proc in homes.values():
                proc.terminate()
            assert [proc.wait(30) for _, _, proc in homes.values()] == [0, 0]
