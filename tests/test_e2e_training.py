"""Self-training through real processes: replay a repository, train through the running
daemon, watch the model switch while search answers, roll back, and stop mid-run."""

from __future__ import annotations

import json
import signal
import threading

from config.settings import load_settings
from memory.store import Store
from tests.conftest import gremlin, start_daemon, wait_for
from tests.test_e2e import search, status, stop, wait_ready
from tests.test_trainer import TRAINING, make_repo, write_config


def home_with_history(tmp_path, **training):
    home = tmp_path / "home"
    gremlin("init", str(home), home=home)
    write_config(home, watch={"roots": [], "own_source": False}, memory={"index_save_interval_s": 0.5},
                 model={"device": "cpu", "max_seq_length": 48},
                 training={**TRAINING, "check_interval_s": 3600, **training})
    out = gremlin("replay", str(make_repo(tmp_path / "repo")), home=home)
    assert "30" in out.stdout, out.stdout
    return home


def test_train_through_the_daemon_promotes_then_rollback(tmp_path):
    home = home_with_history(tmp_path)
    proc = start_daemon(home)
    try:
        base = wait_ready(home, proc)["model_id"]
        wait_for(lambda: status(home)["index_size"] == 30, 120, 0.5, "the replayed commits to be embedded")
        answers, done = [], threading.Event()

        def keep_searching():
            while not done.is_set():
                answers.append(len(search(home, "the billing handler", 3)))

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        try:
            result = gremlin("train", "--now", "--wait", home=home, timeout=600, check=False)
        finally:
            done.set()
            searcher.join()
        assert result.returncode == 0 and "promoted" in result.stdout, result.stdout + result.stderr
        assert answers and all(n == 3 for n in answers)
        info = status(home)
        assert info["model_id"] != base and info["training"]["last_run"]["state"] == "promoted"
        assert info["index_size"] == info["counts"]["memories"]
        listed = json.loads(gremlin("models", "list", "--json", home=home).stdout)
        assert {m["status"] for m in listed} >= {"current", "retired"}
        gremlin("models", "rollback", home=home, timeout=300)
        assert status(home)["model_id"] == base
        assert search(home, "the billing handler", 3)
    finally:
        assert stop(proc) == 0


def test_stopping_the_daemon_mid_training_fails_the_run_and_keeps_the_trigger(tmp_path):
    home = home_with_history(tmp_path, max_steps=400)
    settings = load_settings(home)
    proc = start_daemon(home)
    try:
        wait_ready(home, proc)
        gremlin("train", "--now", home=home)
        wait_for(lambda: status(home)["training"]["state"] == "training", 180, 0.5, "training to start")
    finally:
        assert stop(proc, signal.SIGTERM, timeout=120) == 0
    store = Store(settings.memory.db, readonly=True)
    try:
        run = store.recent_runs(1)[0]
    finally:
        store.close()
    assert run["state"] == "failed" and "stopping" in run["reason"]
    assert (settings.run_dir / "checkpoints" / "retrain_trigger.json").exists()
