"""The trainer FSM on real homes: dataset from a real git history, a real tiny fine-tune,
the gate, promotion with search answering throughout, rollback, and crash recovery
after a real `kill -9`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from transitions import MachineError

from config.settings import load_settings
from memory.service import Memory
from memory.store import Store
from memory.vector_store.embedder import Embedder, current_model_file, resolve_current_model
from self_training.feedback_loop import claim_trigger, manual_trigger, trigger_path, write_trigger_atomically
from self_training.replay import replay_repository
from self_training.trainer import Trainer, recover_interrupted_runs, switch_model

from tests.conftest import GREMLIN, REPO, make_home, wait_for, write_config

TOPICS = ["parser", "cache", "upload", "retry", "logging", "config", "scheduler", "index", "socket",
          "report", "billing", "auth", "export", "import", "search", "queue", "metrics", "backup",
          "session", "template", "router", "mailer", "thumbnail", "locale", "payment", "webhook",
          "archive", "token", "profile", "invoice"]
# Tiny and fast on a 2-core CPU; the gate is told to accept anything unless a test says otherwise.
TRAINING = {"min_train_pairs": 8, "min_heldout_pairs": 4, "heldout_fraction": 0.25, "max_steps": 2,
            "batch_size": 4, "max_seq_length": 48, "learning_rate": 5e-5, "device": "cpu",
            "min_gain": -1.0, "tolerance": 1.0, "cooldown_s": 0, "tensorboard": False, "poll_interval_s": 0.5}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=T", "-c", "user.email=t@example.com", *args], cwd=repo,
                   check=True, capture_output=True)


def make_repo(path: Path, n: int = len(TOPICS)) -> Path:
    """A git repository with one descriptive commit per topic."""
    path.mkdir(parents=True)
    git(path, "init", "-q")
    for i, topic in enumerate(TOPICS[:n]):
        (path / f"{topic}.py").write_text(f"def handle_{topic}(x):\n    return x + {i}\n")
        git(path, "add", ".")
        git(path, "commit", "-q", "-m", f"Add the {topic} handler that adds {i}")
    return path


def training_home(tmp_path: Path, **training) -> Path:
    home = make_home(tmp_path)
    write_config(home, watch={"roots": [], "own_source": False}, memory={"index_save_interval_s": 0.5},
                 model={"device": "cpu", "max_seq_length": 48}, training={**TRAINING, **training})
    settings = load_settings(home)
    store = Store(settings.memory.db)
    try:
        replay_repository(store, settings, make_repo(tmp_path / "repo"))
    finally:
        store.close()
    return home


@pytest.fixture
def trained_home(tmp_path):
    return training_home(tmp_path)


def test_transitions_follow_the_table(tmp_path):
    settings = load_settings(make_home(tmp_path))
    store = Store(settings.memory.db)
    trainer = Trainer(settings, store)
    with pytest.raises(MachineError):
        trainer.promote()               # idle cannot jump to promoting
    trainer.build()
    trainer.train()
    with pytest.raises(MachineError):
        trainer.reindex()               # training must be evaluated first
    trainer.evaluate()
    trainer.reject()
    trainer.finish()
    assert trainer.state == "idle"
    store.close()


def test_rejected_run_keeps_its_numbers_but_not_its_weights(trained_home):
    settings = load_settings(trained_home)
    write_config(trained_home, model={"device": "cpu"}, training={**TRAINING, "min_gain": 1.0})
    settings = load_settings(trained_home)
    store = Store(settings.memory.db)
    base_id = Embedder.from_settings(settings).model_id
    outcome = Trainer(settings, store).run(manual_trigger("test"))
    assert outcome.outcome == "rejected" and "below min_gain" in outcome.reason
    model = store.get_model(outcome.model_id)
    assert model["status"] == "rejected" and model["lineage"]["metrics_after"] == outcome.metrics_after
    folder = Path(model["path"])
    assert (folder / "lineage.json").exists() and not (folder / "model.safetensors").exists()
    assert not current_model_file(settings.home).exists()                  # nothing was switched
    assert Embedder.from_settings(settings).model_id == base_id
    run = store.get_run(outcome.run_id)
    assert run["state"] == "rejected" and run["finished"]
    retrain = store.get_memories(store.memory_ids("retrain"))
    assert [m["replaceable"] for m in retrain.values()] == [False]
    store.close()


def test_too_little_history_is_rejected_without_training(tmp_path):
    home = training_home(tmp_path, min_train_pairs=500)
    settings = load_settings(home)
    store = Store(settings.memory.db)
    outcome = Trainer(settings, store).run(manual_trigger("test"))
    assert outcome.outcome == "rejected" and "not enough history" in outcome.reason
    assert store.list_models() == []
    store.close()


def test_promotion_reindexes_while_search_answers_and_rollback_restores(trained_home, embedder):
    settings = load_settings(trained_home)
    store = Store(settings.memory.db)
    memory = Memory(settings, store, Embedder.from_settings(settings))
    memory.catch_up()
    base_id = memory.model_id
    answers, stop = [], threading.Event()

    def search_all_the_time():
        while not stop.is_set():
            answers.append(len(memory.search("the upload handler", k=3)))

    searcher = threading.Thread(target=search_all_the_time)
    searcher.start()
    reports: list[dict] = []
    try:
        trainer = Trainer(settings, store, memory)
        trainer.on_progress = reports.append
        outcome = trainer.run(manual_trigger("test"))
    finally:
        stop.set()
        searcher.join()
    assert outcome.outcome == "promoted", outcome.reason
    reindexing = [r for r in reports if r.get("phase") == "reindexing"]
    assert reindexing and reindexing[-1]["step"] == reindexing[-1]["total"] == store.counts()["memories"]
    assert reindexing[-1]["eta_s"] == 0 and reindexing[-1]["per_s"] > 0      # rate and ETA for status
    assert answers and all(n == 3 for n in answers)                        # never an empty answer
    assert memory.model_id == outcome.model_id != base_id
    assert memory.index.ntotal == store.counts()["memories"]               # everything re-embedded
    assert json.loads(current_model_file(settings.home).read_text())["id"] == outcome.model_id
    lineage = json.loads((Path(store.get_model(outcome.model_id)["path"]) / "lineage.json").read_text())
    for key in ("source", "epoch", "confidence_gain", "base_model", "dataset_sha256", "n_pairs", "spec",
                "metrics_before", "metrics_after", "device", "seconds"):
        assert key in lineage
    assert lineage["base_model"] == base_id and lineage["source"] == "manual"
    for block in (lineage["fusion"], lineage["fusion_before"]):            # calibrated on half, reported on half
        assert 0 <= block["weight"] <= 1 and block["validation"] + block["test"] == lineage["n_heldout"]
        assert set(block["mrr@10"]) == {"dense", "lexical", "hybrid", "hybrid_equal"}
    assert store.get_model(outcome.model_id)["fusion_weight"] == lineage["fusion"]["weight"]
    assert memory.fusion_weight == lineage["fusion"]["weight"]             # search uses the new model's weight

    switch_model(settings, store, None, memory)                            # roll back to the base
    assert memory.fusion_weight == 0.5                                     # the base model was never calibrated
    assert memory.model_id == base_id and resolve_current_model("", settings.home).name != outcome.run_id
    assert store.get_model(outcome.model_id)["status"] == "retired"
    assert memory.search("the upload handler", k=3)
    store.close()


def test_busy_trainer_leaves_new_triggers_pending_and_they_coalesce(trained_home):
    settings = load_settings(trained_home)
    store = Store(settings.memory.db)
    trainer = Trainer(settings, store)
    trainer.machine.set_state("training")            # as if a run were under way
    path = trigger_path(settings)
    write_trigger_atomically(path, manual_trigger("first"))
    write_trigger_atomically(path, manual_trigger("second"))
    assert trainer.poll() is None and path.exists()
    assert json.loads(path.read_text())["note"] == "first; second"
    store.close()


def test_cooldown_holds_rule_triggers_but_not_forced_ones(trained_home):
    write_config(trained_home, model={"device": "cpu"}, training={**TRAINING, "cooldown_s": 3600, "min_gain": 1.0})
    settings = load_settings(trained_home)
    store = Store(settings.memory.db)
    trainer = Trainer(settings, store)
    first = trainer.run(manual_trigger("first"))
    assert first.outcome == "rejected"
    path = trigger_path(settings)
    write_trigger_atomically(path, manual_trigger("again"))
    assert trainer.poll() is None and path.exists()                 # within the cooldown
    write_trigger_atomically(path, manual_trigger("now", force=True))
    outcome = trainer.poll()
    assert outcome is not None and not path.exists()
    store.close()


def test_kill_9_during_training_ends_the_run_failed_and_requeues_its_trigger(tmp_path):
    home = training_home(tmp_path, max_steps=400)
    settings = load_settings(home)
    write_trigger_atomically(trigger_path(settings), manual_trigger("before the crash"))
    proc = subprocess.Popen([*GREMLIN, "--home", str(home), "train", "--now"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CI": ""})
    reader = None
    try:
        def training_started():
            nonlocal reader
            if not settings.memory.db.exists():
                return None
            reader = reader or Store(settings.memory.db, readonly=True)
            return [r for r in reader.recent_runs(5) if r["state"] == "training"]

        run = wait_for(training_started, 120, 0.2, "a run in state training")[0]
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if reader:
            reader.close()
    assert not trigger_path(settings).exists()                       # it had been claimed
    store = Store(settings.memory.db)
    assert recover_interrupted_runs(settings, store) == [run["id"]]
    ended = store.get_run(run["id"])
    assert ended["state"] == "failed" and "interrupted during training" in ended["reason"]
    requeued = claim_trigger(trigger_path(settings), tmp_path / "claim.json")
    assert requeued is not None and "before the crash" in requeued.note
    assert recover_interrupted_runs(settings, store) == []           # once only
    store.close()


def test_cycle_with_a_seed_is_deterministic_and_logged(trained_home):
    from tests.conftest import gremlin

    records = []
    for _ in range(2):
        out = gremlin("cycle", "--seed", "7", "--json", home=trained_home, timeout=300, check=False)
        assert out.returncode == 0, out.stderr                       # the test gate accepts anything
        records.append(json.loads(out.stdout))
    assert records[0]["outcome"] == "accepted" and records[0]["seed"] == 7
    assert records[0]["metrics_after"] == records[1]["metrics_after"]
    assert records[0]["dataset"]["sha256"] == records[1]["dataset"]["sha256"]
    lines = (trained_home / "data" / "experiments.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == [r["run_id"] for r in records]
    assert not current_model_file(trained_home).exists()              # a cycle never switches models


def test_a_malformed_trigger_file_is_moved_aside_and_the_trainer_goes_on(tmp_path, caplog):
    settings = load_settings(make_home(tmp_path))
    store = Store(settings.memory.db)
    path = trigger_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"trigger": "mutation_watcher", "time": ')          # cut off mid-write by hand
    trainer = Trainer(settings, store)
    assert trainer.poll() is None and trainer.state == "idle"
    assert not path.exists()
    assert list((path.parent / "rejected").glob("retrain_trigger.*.json"))
    assert any(r.levelname == "ERROR" and str(path.parent) in str(r.__dict__) for r in caplog.records)
    assert store.recent_runs() == []
    store.close()


def test_pruning_keeps_the_newest_models_and_never_the_current_one(tmp_path):
    from datetime import datetime, timedelta, timezone

    from memory.vector_store.index import index_path
    from self_training.trainer import models_dir, prune_models

    home = make_home(tmp_path)
    write_config(home, training={"keep_models": 2})
    settings = load_settings(home)
    store = Store(settings.memory.db)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    statuses = ["retired", "retired", "retired", "accepted", "current", "accepted", "accepted", "rejected"]
    for i, status in enumerate(statuses):
        folder = models_dir(settings) / f"run-{i}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "lineage.json").write_text("{}")
        store.register_model(f"m{i}", str(folder), status, now=start + timedelta(hours=i))
        index_path(settings.memory.index_dir, f"m{i}").parent.mkdir(parents=True, exist_ok=True)
        index_path(settings.memory.index_dir, f"m{i}").write_bytes(b"x")
    # the newest two retired (rollback targets) and the newest two accepted (unpromoted) stay
    assert sorted(prune_models(settings, store)) == ["m0", "m3"]
    status = {m["id"]: m["status"] for m in store.list_models()}
    assert status == {"m0": "pruned", "m1": "retired", "m2": "retired", "m3": "pruned", "m4": "current",
                      "m5": "accepted", "m6": "accepted", "m7": "rejected"}
    assert not (models_dir(settings) / "run-0" / "config.json").exists()
    assert (models_dir(settings) / "run-0" / "lineage.json").exists()    # the numbers stay
    assert not index_path(settings.memory.index_dir, "m0").exists()
    assert (models_dir(settings) / "run-4" / "config.json").exists()
    store.close()


def test_recovery_leaves_the_run_of_a_live_trainer_alone(tmp_path):
    from self_training.trainer import TrainerLock

    settings = load_settings(make_home(tmp_path))
    store = Store(settings.memory.db)
    store.create_run("live-run", manual_trigger("x").to_dict(), {})
    store.update_run("live-run", state="training")
    holder = TrainerLock(settings)
    assert holder.acquire()                                  # as `gremlin cycle` in another process
    try:
        assert recover_interrupted_runs(settings, store) == []
        assert store.get_run("live-run")["state"] == "training"
    finally:
        holder.release()
    assert recover_interrupted_runs(settings, store) == ["live-run"]   # its holder is gone now
    store.close()


def test_recovery_requeues_only_runs_meant_to_promote_and_returns_lost_claims(tmp_path):
    from self_training.trainer import claimed_path

    settings = load_settings(make_home(tmp_path))
    store = Store(settings.memory.db)
    store.create_run("cycle-run", manual_trigger("gremlin cycle --seed 1", force=True).to_dict(), {})
    store.update_run("cycle-run", state="training", metrics={"promote": False})
    lost = claimed_path(settings, "never-recorded")
    lost.parent.mkdir(parents=True, exist_ok=True)
    lost.write_text(json.dumps(manual_trigger("claimed, then the process died").to_dict()))
    assert recover_interrupted_runs(settings, store) == ["cycle-run"]
    assert "queued again" not in store.get_run("cycle-run")["reason"]
    pending = json.loads(trigger_path(settings).read_text())
    assert pending["note"] == "claimed, then the process died"          # the cycle's trigger is not there
    assert not lost.exists()
    store.close()


def test_plain_rollback_goes_to_the_model_used_before_the_current_one(tmp_path):
    from self_training.trainer import _rollback_target

    settings = load_settings(make_home(tmp_path))
    store = Store(settings.memory.db)
    store.register_model("base", "/b", "current")
    for model_id in ("A", "B"):
        store.register_model(model_id, f"/{model_id}", "accepted")
    for model_id in ("A", "B", "base", "A"):      # promote A, B; roll back to base, then to A
        store.make_current(model_id)
    assert _rollback_target(store, None)["id"] == "base"
    assert _rollback_target(store, "B")["id"] == "B"
    store.close()


def _untrainable_home(tmp_path: Path) -> Path:
    """A home with no history: a run is rejected at once, before any training."""
    home = make_home(tmp_path)
    write_config(home, watch={"roots": [], "own_source": False}, training=TRAINING,
                 planner={"max_epochs": 2, "max_training_minutes": 5.0})
    return home


def test_a_polled_run_takes_its_spec_from_the_planner_and_reports_back(tmp_path):
    from agents.planner_agent import Planner

    settings = load_settings(_untrainable_home(tmp_path))
    store = Store(settings.memory.db)
    trainer = Trainer(settings, store)
    trainer.planner = Planner(settings, store)
    write_trigger_atomically(trigger_path(settings), manual_trigger("planned"))
    outcome = trainer.poll()
    assert outcome is not None and outcome.outcome == "rejected"
    spec = store.get_run(outcome.run_id)["spec"]
    assert spec["max_seconds"] == 300 and spec["batch_size"] in settings.planner.batch_sizes
    [trial] = store.trials()
    assert trial["run_id"] == outcome.run_id and trial["state"] == "skipped"   # ended before evaluation
    lines = (settings.data_dir / "experiments.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["proposal", "result", "decision"]
    store.close()


class BrokenPlanner:
    """A planner whose every call raises, as a bug in it would."""

    def next_spec(self, run_id):
        raise RuntimeError("planner bug")

    def observe(self, run):
        raise RuntimeError("planner bug")


def test_a_failing_planner_never_fails_the_run_or_the_poll(tmp_path, caplog):
    from self_training.finetune import TrainingSpec

    settings = load_settings(_untrainable_home(tmp_path))
    store = Store(settings.memory.db)
    trainer = Trainer(settings, store)
    trainer.planner = BrokenPlanner()
    write_trigger_atomically(trigger_path(settings), manual_trigger("planned"))
    outcome = trainer.poll()
    assert outcome is not None and outcome.outcome == "rejected" and trainer.state == "idle"
    assert store.get_run(outcome.run_id)["spec"] == TrainingSpec.from_settings(settings.training).to_dict()
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "planner failed to propose a spec; using the configured one" in messages
    assert "planner failed to observe a run" in messages
    store.close()
