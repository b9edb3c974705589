"""LoRA fine-tuning: a real 2-step run of MiniLM saves only an adapter, and serving loads base + adapter."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from config.settings import init_home, load_settings
from memory.errors import ModelError
from memory.vector_store.embedder import Embedder, adapter_base_path, is_adapter, model_fingerprint, \
    resolve_model_path
from self_training.finetune import TrainingSpec, fine_tune
from self_training.trainer import prune_models

from tests.conftest import REPO, write_config

PAIRS = [(f"bump the retry limit of worker {i}", f"-RETRIES = {i}\n+RETRIES = {i + 3}") for i in range(8)]
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
TEXT = ["bump the retry limit of worker 3", "-RETRIES = 3\n+RETRIES = 6"]


def lora_spec(**overrides) -> TrainingSpec:
    """Two tiny steps on the CPU; a high learning rate so two steps visibly move a fresh adapter."""
    return TrainingSpec(**{"method": "lora", "max_steps": 2, "batch_size": 4, "max_seq_length": 32,
                           "lora_learning_rate": 1e-2, "device": "cpu", **overrides})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A LoRA model fine-tuned for 2 steps on the packaged MiniLM."""
    out = tmp_path_factory.mktemp("lora") / "model"
    result = fine_tune(PAIRS, lora_spec(), resolve_model_path("", REPO), out)
    assert result.steps == 2
    return out


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_lora_settings_reach_the_spec(tmp_path: Path):
    init_home(tmp_path)
    write_config(tmp_path, training={"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                     "lora_learning_rate": 1e-3})
    spec = TrainingSpec.from_settings(load_settings(tmp_path).training)
    assert (spec.method, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.lora_learning_rate) == \
        ("lora", 8, 16, 0.1, 1e-3)
    assert TrainingSpec().method == "full"


def test_a_lora_run_saves_only_the_adapter_and_a_pointer_to_its_base(lora_dir: Path):
    names = {p.relative_to(lora_dir).as_posix() for p in lora_dir.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "modules.json", "config.json",
            "sentence_bert_config.json", "1_Pooling/config.json", "tokenizer.json"} <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names     # no full weights
    assert folder_bytes(lora_dir) < 10 * 2**20
    assert is_adapter(lora_dir) and adapter_base_path(lora_dir) == resolve_model_path("", REPO)
    assert not (lora_dir / "trainer").exists()


def test_training_on_a_lora_model_keeps_one_adapter_over_the_first_base(lora_dir: Path, tmp_path: Path):
    """A LoRA run goes on training the adapter (no adapter over an adapter); a full run saves the merge."""
    again, full = tmp_path / "again", tmp_path / "full"
    fine_tune(PAIRS, lora_spec(), lora_dir, again)
    assert adapter_base_path(again) == resolve_model_path("", REPO)
    assert model_fingerprint(again) != model_fingerprint(lora_dir)
    fine_tune(PAIRS, lora_spec(method="full"), lora_dir, full)
    assert (full / "model.safetensors").is_file() and not is_adapter(full)


def test_the_embedder_serves_base_plus_adapter(lora_dir: Path, embedder: Embedder):
    tuned = Embedder(lora_dir, device="cpu", max_seq_length=32)
    before, after = embedder.encode(TEXT), tuned.encode(TEXT)
    assert after.shape == before.shape and tuned.dim == embedder.dim
    assert float(np.min(np.sum(before * after, axis=1))) < 0.9999      # the adapter moved the vectors
    assert np.allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    assert tuned.model_id != embedder.model_id
    assert tuned.model_id == model_fingerprint(lora_dir)               # stable


def test_the_model_id_covers_the_adapter_files(lora_dir: Path, tmp_path: Path):
    copy = tmp_path / lora_dir.name
    shutil.copytree(lora_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(lora_dir)
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                                      # same size, other weights
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(copy)
    assert changed != model_fingerprint(lora_dir)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    assert model_fingerprint(copy) not in (changed, model_fingerprint(lora_dir))


def test_a_lora_folder_whose_base_is_gone_says_what_to_do(lora_dir: Path, tmp_path: Path):
    orphan = tmp_path / "orphan"
    shutil.copytree(lora_dir, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    gone = tmp_path / "deleted-base"
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(gone)}))
    with pytest.raises(ModelError) as info:
        Embedder(orphan, device="cpu").encode(["x"])
    message = str(info.value)
    assert str(orphan) in message and str(gone) in message and "method = \"full\"" in message


def test_pruning_keeps_the_base_of_a_kept_lora_model(settings, store, lora_dir: Path):
    """A full model that a kept LoRA model builds on must keep its weights when it is pruned."""
    models = settings.run_dir / "checkpoints" / "models"
    base = models / "run-base"
    shutil.copytree(resolve_model_path("", REPO), base)
    child = models / "run-lora"
    shutil.copytree(lora_dir, child)
    config = json.loads((child / "adapter_config.json").read_text())
    (child / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    newer = models / "run-newer"
    newer.mkdir()
    (newer / "config.json").write_text("{}")
    day = timedelta(days=1)
    store.register_model("base", str(base), "retired", {}, now=NOW - 2 * day)
    store.register_model("newer", str(newer), "retired", {}, now=NOW - day)
    store.register_model("lora", str(child), "current", {}, now=NOW)
    write_config(settings.home, training={"keep_models": 1})
    assert prune_models(load_settings(settings.home), store) == []     # base is older than keep_models
    assert (base / "model.safetensors").is_file()
    (child / "adapter_config.json").write_text(json.dumps(config))     # the child's base is elsewhere now
    assert prune_models(load_settings(settings.home), store) == ["base"]
