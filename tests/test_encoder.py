"""The lean serving encoder: SentenceTransformer's vectors without importing sentence-transformers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from memory.vector_store.bert import BertEncoder, BertTokenizer, load_bert, read_config, read_safetensors
from memory.vector_store.embedder import Embedder, load_sentence_model, load_serving_model, resolve_model_path
from memory.vector_store.encoder import LeanEncoder, UnsupportedAdapter, UnsupportedPipeline, merge_lora, read_pipeline
from self_training.finetune import TrainingSpec, fine_tune

from tests.conftest import REPO

BASE = resolve_model_path("", REPO)
TEXTS = ["", "   whitespace around   ", "\ttabs\nand newlines\n", "héllo wörld ✓ 日本語 🙂 Ünïcödé",
         "short", "MiXeD CaSe Words", "def retry(n):\n    return n + 3  # bump the limit",
         "a longer sentence about the worker that retries three times before it gives up " * 3,
         "tokens beyond any limit " * 200]
HEAVY = ("sentence_transformers", "sklearn", "datasets", "pandas", "transformers", "torch._dynamo", "sympy")


@pytest.fixture(scope="module")
def full():
    """The packaged MiniLM as a full SentenceTransformer (the reference)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(BASE), device="cpu")


def reference(model, max_seq_length: int, texts=TEXTS) -> np.ndarray:
    """What serving produced before the lean encoder: SentenceTransformer.encode, normalised."""
    model.max_seq_length = max_seq_length
    return model.encode(texts, batch_size=4, normalize_embeddings=True, show_progress_bar=False)


def variant(tmp_path: Path, name: str, pooling: dict | None = None, modules: list | None = None,
            sbert: dict | None = None, config: dict | None = None, tokenizer: dict | None = None) -> Path:
    """A copy of the packaged model (files linked, not copied) with another pooling config, modules.json,
    sentence_bert_config.json, or config.json / tokenizer_config.json keys changed."""
    folder = tmp_path / name
    for source in BASE.rglob("*"):
        if source.is_file():
            target = folder / source.relative_to(BASE)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    changed = {"1_Pooling/config.json": pooling, "modules.json": modules, "sentence_bert_config.json": sbert,
               "config.json": config and {**json.loads((BASE / "config.json").read_text()), **config},
               "tokenizer_config.json": tokenizer and {**json.loads((BASE / "tokenizer_config.json").read_text()),
                                                       **tokenizer}}
    for relative, content in changed.items():
        if content is not None:
            (folder / relative).unlink()
            (folder / relative).write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("max_seq_length", [256, 32])
def test_lean_vectors_are_sentence_transformers_vectors(full, max_seq_length: int):
    lean = load_serving_model(BASE, "cpu", max_seq_length)
    assert isinstance(lean, LeanEncoder) and lean.dim == 384 and lean.device.type == "cpu"
    assert isinstance(lean.model, BertEncoder) and isinstance(lean.tokenizer, BertTokenizer)   # no transformers
    vectors = lean.encode(TEXTS, batch_size=4)                       # batches of sorted lengths, order restored
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    assert np.abs(vectors - reference(full, max_seq_length)).max() < 1e-5
    assert np.allclose(lean.encode(TEXTS[::-1], batch_size=3), vectors[::-1], atol=1e-6)
    counts = [[len(ids) for ids in tokenizer(TEXTS, truncation=True, max_length=max_seq_length)["input_ids"]]
              for tokenizer in (lean.tokenizer, full.tokenizer)]
    assert counts[0] == counts[1] and max(counts[0]) == max_seq_length


def test_the_embedder_serves_the_lean_encoder(embedder: Embedder, full):
    assert isinstance(embedder.model, LeanEncoder) and embedder.device == "cpu" and embedder.batch_size == 16
    assert np.abs(embedder.encode(TEXTS) - reference(full, 128)).max() < 1e-5
    assert embedder.token_counts(["", "short"]) == [2, 3]
    assert embedder.encode([]).shape == (0, 384)


@pytest.mark.parametrize("mode", ["cls", "max", "mean_sqrt_len_tokens", ["cls", "mean"]])
def test_every_mirrored_pooling_mode_matches(tmp_path: Path, mode):
    from sentence_transformers import SentenceTransformer

    folder = variant(tmp_path, "pooled", pooling={"embedding_dimension": 384, "pooling_mode": mode})
    lean = load_serving_model(folder, "cpu", 64)
    assert isinstance(lean, LeanEncoder) and lean.dim == 384 * (len(mode) if isinstance(mode, list) else 1)
    expected = reference(SentenceTransformer(str(folder), device="cpu"), 64)
    assert np.abs(lean.encode(TEXTS, batch_size=4) - expected).max() < 1e-5


def test_do_lower_case_puts_the_same_lowercase_normaliser_in_front(tmp_path: Path):
    from sentence_transformers import SentenceTransformer
    from tokenizers.normalizers import Lowercase

    folder = variant(tmp_path, "lower", sbert={"max_seq_length": 256, "do_lower_case": True})
    lean, full = load_serving_model(folder, "cpu", 64), SentenceTransformer(str(folder), device="cpu")
    assert isinstance(lean, LeanEncoder)
    normalizer = lean.tokenizer.backend_tokenizer.normalizer
    assert isinstance(lean.tokenizer, BertTokenizer)
    assert repr(normalizer) == repr(full.tokenizer.backend_tokenizer.normalizer)
    assert isinstance(list(normalizer)[0], Lowercase)
    assert np.abs(lean.encode(TEXTS, batch_size=4) - reference(full, 64)).max() < 1e-5


def test_legacy_pooling_flags_are_read_as_sentence_transformers_reads_them(tmp_path: Path):
    flags = {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}
    assert read_pipeline(variant(tmp_path, "legacy", pooling=flags)).pooling == ("cls", "mean")
    assert read_pipeline(BASE).pooling == ("mean",) and read_pipeline(BASE).normalize


def test_a_saved_model_goes_through_the_lean_path(tmp_path: Path, full):
    """What training saves (ST 6's save(): new-style module types and configs) is served lean."""
    saved = tmp_path / "saved"
    full.save(str(saved))
    assert "sentence_transformers.base.modules" in (saved / "modules.json").read_text()   # new-style type paths
    lean = load_serving_model(saved, "cpu", 128)
    assert isinstance(lean, LeanEncoder)
    assert np.abs(lean.encode(TEXTS, batch_size=4) - reference(full, 128)).max() < 1e-5


@pytest.mark.parametrize("prefix, dtype", [("", "float32"), ("bert.", "float16")])
def test_our_bert_gives_the_hidden_states_transformers_gives(tmp_path: Path, prefix: str, dtype: str):
    """bert.py against transformers' BertModel on the same weights file: as saved by ST, and saved
    from a BertFor... model ("bert." names) in float16."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    folder = variant(tmp_path, "weights")
    (folder / "model.safetensors").unlink()
    save_file({prefix + name: tensor.to(getattr(torch, dtype))
               for name, tensor in load_file(str(BASE / "model.safetensors")).items()}, str(folder / "model.safetensors"))
    ours = load_bert(read_pipeline(folder))
    theirs = AutoModel.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    features = AutoTokenizer.from_pretrained(str(folder))(TEXTS, padding=True, truncation=True, max_length=64,
                                                          return_tensors="pt")
    with torch.inference_mode():
        difference = (ours(**features).last_hidden_state - theirs(**features).last_hidden_state).abs()
    assert difference[features["attention_mask"].bool()].max() < 1e-5      # every real token
    assert features["attention_mask"].min() == 0                            # a padded batch


def test_float32_weights_stay_in_the_mapped_file():
    """No copy of the weights: float32 tensors point into the map of model.safetensors."""
    model = load_bert(read_pipeline(BASE))
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    files = [(int(m[0].split("-")[0], 16), int(m[0].split("-")[1], 16), m[-1]) for m in maps if len(m) == 6]

    def mapped_file(tensor) -> str | None:
        return next((name for low, high, name in files if low <= tensor.data_ptr() < high), None)

    assert {mapped_file(p) for p in model.parameters()} == {str(BASE / "model.safetensors")}


def test_a_bert_we_do_not_mirror_is_served_through_transformers(tmp_path: Path, caplog):
    from sentence_transformers import SentenceTransformer

    folder = variant(tmp_path, "tanh", config={"hidden_act": "gelu_new"})
    with pytest.raises(UnsupportedPipeline, match="hidden_act"):
        read_config(folder)
    with caplog.at_level(logging.INFO, logger="memory.vector_store.embedder"):
        lean = load_serving_model(folder, "cpu", 64)
    assert isinstance(lean, LeanEncoder) and not isinstance(lean.model, BertEncoder)
    assert "model served through transformers" in caplog.text
    expected = reference(SentenceTransformer(str(folder), device="cpu"), 64)
    assert np.abs(lean.encode(TEXTS, batch_size=4) - expected).max() < 1e-5


@pytest.mark.parametrize("change, reason", [({"model_type": "roberta"}, "model_type"),
                                            ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                                            ({"is_decoder": True}, "is_decoder"),
                                            ({"hidden_size": 383}, "multiple")])
def test_configs_bert_py_does_not_run_are_named(tmp_path: Path, change: dict, reason: str):
    with pytest.raises(UnsupportedPipeline, match=reason):
        read_config(variant(tmp_path, "odd", config=change))


def test_a_tokenizer_config_that_disagrees_with_tokenizer_json_goes_to_transformers(tmp_path: Path):
    from transformers import AutoTokenizer

    folder = variant(tmp_path, "cased", tokenizer={"do_lower_case": False})
    lean = load_serving_model(folder, "cpu", 64)
    assert not isinstance(lean.tokenizer, BertTokenizer) and not isinstance(lean.model, BertEncoder)
    expected = AutoTokenizer.from_pretrained(str(folder))(TEXTS, truncation=True, max_length=64)["input_ids"]
    assert lean.tokenizer(TEXTS, truncation=True, max_length=64)["input_ids"] == expected


def test_unreadable_or_incomplete_weights_are_unsupported_not_a_crash(tmp_path: Path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(UnsupportedPipeline, match="unreadable"):
        read_safetensors(bad, ["embeddings.word_embeddings.weight"])
    bad.write_bytes(b"")
    with pytest.raises(UnsupportedPipeline, match="model.safetensors"):
        read_safetensors(bad, ["embeddings.word_embeddings.weight"])
    with pytest.raises(UnsupportedPipeline, match="lacks.*layer.9"):
        read_safetensors(BASE / "model.safetensors", ["encoder.layer.9.output.dense.weight"])


def _count_while_padding(count, tokenizer, rounds: int = 150) -> list[str]:
    """Run `count` (token counts of the texts, truncated to 32) on one thread and padded batches
    of the texts through `tokenizer` on another, as the watcher and the embed worker do; what
    came out wrong (an exception in either counts as wrong)."""
    import torch

    texts = TEXTS * 20
    counts = count(texts)
    padded = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    wrong: list[str] = []

    def counting() -> None:
        for _ in range(rounds):
            try:
                wrong.extend(["counts"] if count(texts) != counts else [])
            except Exception as exc:  # noqa: BLE001 - a race shows up as any error
                wrong.append(f"counts: {exc}")

    def padding() -> None:
        for _ in range(rounds):
            try:
                batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
                wrong.extend([] if torch.equal(batch["input_ids"], padded) else ["padded"])
            except Exception as exc:  # noqa: BLE001
                wrong.append(f"padded: {exc}")

    threads = [threading.Thread(target=work) for work in (counting, padding)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return wrong


def test_the_tokenizer_is_safe_to_share_between_threads():
    """Token counting and padded batches on one BertTokenizer at once: the backend's truncation
    and padding settings are per call."""
    tokenizer = load_serving_model(BASE, "cpu", 32).tokenizer

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=32)["input_ids"]]

    assert _count_while_padding(count, tokenizer) == []


@pytest.mark.parametrize("served", ["bert", "transformers"])
def test_counting_tokens_never_disturbs_a_batch_being_encoded(tmp_path: Path, served: str):
    """The watcher counts tokens (Embedder.token_counts) while the embed worker tokenizes a padded
    batch, with either tokenizer: transformers' keeps truncation and padding in its backend too."""
    folder = BASE if served == "bert" else variant(tmp_path, "cased", tokenizer={"do_lower_case": False})
    embedder = Embedder(folder, "cpu", 0, 32)
    assert isinstance(embedder.model.tokenizer, BertTokenizer) == (served == "bert")
    assert _count_while_padding(embedder.token_counts, embedder.model.tokenizer) == []


def test_a_dense_module_falls_back_to_sentence_transformers(tmp_path: Path, full, caplog):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense

    folder = tmp_path / "dense"
    SentenceTransformer(modules=[full[0], full[1], Dense(384, 64)], device="cpu").save(str(folder))
    with pytest.raises(UnsupportedPipeline, match="Dense"):
        read_pipeline(folder)
    with caplog.at_level(logging.INFO, logger="memory.vector_store.embedder"):
        embedder = Embedder(folder, device="cpu", max_seq_length=32)
        vectors = embedder.encode(TEXTS)
    assert not isinstance(embedder.model, LeanEncoder) and embedder.dim == 64
    assert vectors.shape == (len(TEXTS), 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    reasons = [r.reason for r in caplog.records if r.getMessage() == "model needs the full sentence-transformers stack"]
    assert len(reasons) == 1 and "Dense" in reasons[0]
    assert embedder.token_counts(["short"]) == [3]


def test_an_unsupported_pooling_mode_falls_back(tmp_path: Path):
    from sentence_transformers import SentenceTransformer

    folder = variant(tmp_path, "weighted", pooling={"embedding_dimension": 384, "pooling_mode": "weightedmean"})
    model = load_serving_model(folder, "cpu", 32)
    assert isinstance(model, SentenceTransformer)
    expected = reference(SentenceTransformer(str(folder), device="cpu"), 32)
    assert np.abs(Embedder(folder, device="cpu", max_seq_length=32).encode(TEXTS) - expected).max() < 1e-5


def test_missing_or_odd_modules_fall_back(tmp_path: Path):
    odd = variant(tmp_path, "odd", modules=[{"idx": 0, "name": "0", "path": "", "type": "my_package.Transformer"},
                                            {"idx": 1, "name": "1", "path": "1_Pooling",
                                             "type": "sentence_transformers.models.Pooling"}])
    with pytest.raises(UnsupportedPipeline, match="my_package.Transformer"):
        read_pipeline(odd)
    (odd / "modules.json").unlink()
    with pytest.raises(UnsupportedPipeline, match="no modules.json"):
        read_pipeline(odd)


def test_a_lora_folder_is_served_lean_with_the_adapter_merged(tmp_path: Path):
    spec = TrainingSpec(method="lora", max_steps=2, batch_size=4, max_seq_length=32, lora_learning_rate=1e-2,
                        device="cpu")
    lora = tmp_path / "lora"
    fine_tune([(f"bump the retry limit of worker {i}", f"-RETRIES = {i}\n+RETRIES = {i + 3}") for i in range(8)],
              spec, BASE, lora)
    lean = load_serving_model(lora, "cpu", 32)
    assert isinstance(lean, LeanEncoder)
    merged = reference(load_sentence_model(lora, "cpu", merge=True).eval(), 32)   # the serving path before
    vectors = lean.encode(TEXTS, batch_size=4)
    assert np.abs(vectors - merged).max() < 1e-5                  # merged by hand as peft merges
    assert np.abs(vectors - load_serving_model(BASE, "cpu", 32).encode(TEXTS, batch_size=4)).max() > 1e-3
    probe = ("import sys; from memory.vector_store.embedder import load_serving_model as load; "
             f"load({str(lora)!r}, 'cpu', 32).encode(['x']); print('peft' in sys.modules)")
    served = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert served.stdout.split()[-1] == "False", served.stderr          # no peft in a daemon serving LoRA


def test_an_adapter_merge_lora_does_not_cover_is_merged_by_peft(tmp_path: Path, caplog):
    spec = TrainingSpec(method="lora", max_steps=1, batch_size=4, max_seq_length=32, device="cpu")
    lora = tmp_path / "lora"
    fine_tune([(f"rename the option number {i}", f"-opt{i} = 1\n+option{i} = 1") for i in range(8)], spec, BASE, lora)
    expected = load_serving_model(lora, "cpu", 32).encode(TEXTS, batch_size=4)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": list(range(6))}))
    with pytest.raises(UnsupportedAdapter, match="layers_to_transform"):
        merge_lora(load_serving_model(BASE, "cpu", 32).model, lora)
    with caplog.at_level(logging.INFO):
        lean = load_serving_model(lora, "cpu", 32)                  # every layer named: the same adapter
    assert isinstance(lean, LeanEncoder) and "LoRA adapter merged by peft" in caplog.text
    assert np.abs(lean.encode(TEXTS, batch_size=4) - expected).max() < 1e-5


RSS_PROBE = """
import json, sys
from memory.vector_store.embedder import Embedder, resolve_model_path
from tests.conftest import REPO
embedder = Embedder(resolve_model_path("", REPO), device="cpu")
embedder.encode([f"change {i} to the retry limit of the worker" for i in range(50)])
status = open("/proc/self/status").read()
rss = int(status.split("VmRSS:")[1].split()[0]) // 1024
print(json.dumps({"loaded": sorted(m for m in sys.modules if m in %r), "rss_mib": rss,
                  "encoder": type(embedder.model).__name__}))
""" % (HEAVY,)


def test_serving_never_imports_the_training_stack():
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["encoder"] == "LeanEncoder" and result["loaded"] == [], f"VmRSS {result['rss_mib']} MiB: {result}"
