"""A real 2-step fine-tune of MiniLM on the CPU changes its embeddings."""

from __future__ import annotations

import numpy as np

from memory.vector_store.embedder import Embedder, resolve_model_path
from self_training.finetune import MAX_EPOCHS, TrainingSpec, fine_tune, hard_negatives, resolve_precision, train_epochs

from tests.conftest import REPO

PAIRS = [(f"bump the retry limit of worker {i}", f"-RETRIES = {i}\n+RETRIES = {i + 3}") for i in range(8)]


def test_two_steps_change_the_embeddings_and_save_a_loadable_model(tmp_path, embedder):
    steps = []
    spec = TrainingSpec(max_steps=2, batch_size=4, max_seq_length=32, learning_rate=1e-4, device="cpu")
    result = fine_tune(PAIRS, spec, resolve_model_path("", REPO), tmp_path / "model",
                       progress=lambda step, total, loss: steps.append((step, total)),
                       tensorboard_dir=tmp_path / "tb")
    assert result.steps == 2 and steps[-1] == (2, 2) and result.device == "cpu"
    assert result.train_loss is not None and result.pairs_per_s > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))      # TensorBoard scalars
    tuned = Embedder(tmp_path / "model", device="cpu", max_seq_length=32)
    text = ["bump the retry limit of worker 3"]
    before, after = embedder.encode(text)[0], tuned.encode(text)[0]
    assert float(np.dot(before, after)) < 0.9999                     # the weights moved
    assert tuned.model_id != embedder.model_id                        # and the model id says so
    assert not (tmp_path / "model" / "trainer").exists()


def test_precision_is_fp32_on_cpu_whatever_was_asked():
    assert resolve_precision("fp16", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"


def test_a_time_limit_stops_training_early_and_the_model_is_still_saved(tmp_path, caplog):
    spec = TrainingSpec(max_steps=20, batch_size=4, max_seq_length=16, device="cpu", max_seconds=0.01)
    result = fine_tune(PAIRS, spec, resolve_model_path("", REPO), tmp_path / "model")
    assert result.steps == 1 < spec.max_steps and result.time_limited
    assert (tmp_path / "model" / "config.json").is_file()
    assert any(r.getMessage() == "training stopped at its time limit" for r in caplog.records)


def test_a_spec_from_settings_has_no_time_limit(settings):
    spec = TrainingSpec.from_settings(settings.training, epochs=2)
    assert spec.max_seconds == 0.0 and spec.epochs == 2
    assert TrainingSpec.from_settings(settings.training, max_seconds=60).max_seconds == 60


def test_min_steps_adds_epochs_to_a_small_history_and_never_removes_any():
    assert train_epochs(220, TrainingSpec(batch_size=32, min_steps=0)) == 1  # 7 steps, as configured
    assert train_epochs(220, TrainingSpec(batch_size=32, min_steps=40)) == 6  # 7 steps an epoch
    assert train_epochs(5000, TrainingSpec(batch_size=32, min_steps=40)) == 1  # already 157 steps
    assert train_epochs(220, TrainingSpec(batch_size=32, epochs=3, min_steps=10)) == 3
    assert train_epochs(3, TrainingSpec(batch_size=32, min_steps=10_000)) == MAX_EPOCHS


def test_min_steps_really_trains_that_many_steps(tmp_path):
    spec = TrainingSpec(batch_size=4, max_seq_length=16, device="cpu", min_steps=5)
    result = fine_tune(PAIRS, spec, resolve_model_path("", REPO), tmp_path / "model")
    assert result.steps == 6  # 2 steps an epoch, 3 epochs


def test_hard_negatives_are_the_other_diffs_full_text_search_points_to():
    pairs = [("retry the upload after a timeout", "+upload.retry(timeout=5)"),
             ("retry the download after a timeout", "+download.retry(timeout=5)"),
             ("rename the logger", "+log = logging.getLogger(name)"),
             ("document the config file", "+# config.toml holds defaults")]
    negatives = hard_negatives(pairs, seed=1)
    assert negatives[0] == "+download.retry(timeout=5)" and negatives[1] == "+upload.retry(timeout=5)"
    assert all(n != p[1] for n, p in zip(negatives, pairs))  # never a pair's own diff
    assert hard_negatives([("a", "same"), ("b", "same")], seed=1) is None


def test_training_with_hard_negatives_runs(tmp_path):
    spec = TrainingSpec(max_steps=2, batch_size=4, max_seq_length=16, device="cpu", hard_negatives=True)
    result = fine_tune(PAIRS, spec, resolve_model_path("", REPO), tmp_path / "model")
    assert result.steps == 2 and result.train_loss is not None
