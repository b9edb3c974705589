"""A real 2-step fine-tune of MiniLM on the CPU changes its embeddings."""

from __future__ import annotations

import numpy as np

from memory.vector_store.embedder import Embedder, resolve_model_path
from self_training.finetune import TrainingSpec, fine_tune, resolve_precision

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
