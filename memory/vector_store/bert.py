"""BERT-family models and their tokenizers served with torch and tokenizers alone.

Importing transformers' model code pulls in about 1,800 modules and 150 MiB of resident
memory (`transformers.models.bert.modeling_bert` alone: +121 MiB) to run what is, for a BERT
encoder such as all-MiniLM-L6-v2, a few dozen lines: embeddings, then per layer self-attention,
a feed-forward block and two LayerNorms. This module runs exactly that, with the parameter
names transformers' BertModel uses (so `encoder.merge_lora` finds its layers), on weights
mapped read-only-shared from model.safetensors (pages of the word-embedding table that no
text touches are never read), and a `tokenizers.Tokenizer` loaded from tokenizer.json.

It mirrors `BertModel.forward(...).last_hidden_state` in eval mode (transformers 5.x,
`models/bert/modeling_bert.py`, SDPA attention) and `AutoTokenizer(...)(texts, padding=True,
truncation="longest_first", max_length=n)`. Anything it does not mirror exactly raises
UnsupportedPipeline, and the caller uses transformers instead: another model_type, relative
position embeddings, a decoder, an activation not listed, sharded or .bin weights, missing
weights, a tokenizer configuration that transformers would rebuild differently.
"""

from __future__ import annotations

import copy
import json
import mmap
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from memory.vector_store.encoder import Pipeline, UnsupportedPipeline, read_json, with_lowercase

WEIGHTS = "model.safetensors"
# hidden_act values of config.json mirrored here (transformers' ACT2FN for the same names).
ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": nn.functional.relu, "silu": nn.functional.silu,
               "swish": nn.functional.silu,
               "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh")}
# safetensors dtypes a weight may be stored in (all served as float32, as ST's float32 load does).
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# tokenizer_config.json settings transformers' BertTokenizer applies over tokenizer.json's normaliser.
_NORMALIZER_FLAGS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                     "tokenize_chinese_chars": "handle_chinese_chars"}
_TOKENIZER_CLASSES = (None, "BertTokenizer", "BertTokenizerFast")


@dataclass(frozen=True)
class BertConfig:
    """The config.json values the forward pass uses."""

    hidden_size: int
    heads: int
    layers: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    activation: str


def read_config(transformer_dir: Path) -> BertConfig:
    """The BERT config in `transformer_dir`; UnsupportedPipeline for anything this module does not run."""
    config = read_json(transformer_dir / "config.json")
    if not isinstance(config, dict) or config.get("model_type") != "bert":
        raise UnsupportedPipeline(f"model_type {config.get('model_type') if isinstance(config, dict) else None!r}")
    odd = [k for k, ok in (("position_embedding_type", "absolute"), ("is_decoder", False),
                           ("add_cross_attention", False)) if config.get(k, ok) != ok]
    if odd or config.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise UnsupportedPipeline(f"config.json sets {odd or ['hidden_act']}")
    try:
        bert = BertConfig(int(config["hidden_size"]), int(config["num_attention_heads"]),
                          int(config["num_hidden_layers"]), int(config["intermediate_size"]),
                          int(config["vocab_size"]), int(config.get("max_position_embeddings", 512)),
                          int(config.get("type_vocab_size", 2)), float(config.get("layer_norm_eps", 1e-12)),
                          config.get("hidden_act", "gelu"))
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedPipeline(f"config.json: {exc!r}") from exc
    if bert.hidden_size % bert.heads:
        raise UnsupportedPipeline("hidden_size is not a multiple of num_attention_heads")
    return bert


class _Linear(nn.Linear):
    """nn.Linear whose weights come from the file: no random initialisation to throw away."""

    def reset_parameters(self) -> None:
        """Nothing: `load_bert` assigns the file's weights."""


class _Embedding(nn.Embedding):
    """nn.Embedding whose table comes from the file."""

    def reset_parameters(self) -> None:
        """Nothing: `load_bert` assigns the file's weights."""


class _LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose scale and shift come from the file."""

    def reset_parameters(self) -> None:
        """Nothing: `load_bert` assigns the file's weights."""


class Layer(nn.Module):
    """One transformer layer, named as transformers' BertLayer names its parts."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: _Linear(h, h) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": _Linear(h, h), "LayerNorm": _LayerNorm(h, eps=config.eps)})})
        self.intermediate = nn.ModuleDict({"dense": _Linear(h, config.intermediate_size)})
        self.output = nn.ModuleDict({"dense": _Linear(config.intermediate_size, h),
                                     "LayerNorm": _LayerNorm(h, eps=config.eps)})
        self.heads, self.act = config.heads, ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (batch, seq, hidden) → the same shape; `mask` (batch, 1, 1, seq) is True where a key is real."""
        batch, seq, hidden = x.shape
        attend = self.attention["self"]
        q, k, v = (attend[name](x).view(batch, seq, self.heads, -1).transpose(1, 2)
                   for name in ("query", "key", "value"))
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5)
        context = context.transpose(1, 2).reshape(batch, seq, hidden)
        out = self.attention["output"]
        x = out["LayerNorm"](out["dense"](context) + x)
        return self.output["LayerNorm"](self.output["dense"](self.act(self.intermediate["dense"](x))) + x)


class BertEncoder(nn.Module):
    """BertModel without its pooler: token ids → last hidden states."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.config = SimpleNamespace(hidden_size=h)  # what LeanEncoder reads
        self.embeddings = nn.ModuleDict({
            "word_embeddings": _Embedding(config.vocab_size, h),
            "position_embeddings": _Embedding(config.max_positions, h),
            "token_type_embeddings": _Embedding(config.type_vocab_size, h),
            "LayerNorm": _LayerNorm(h, eps=config.eps)})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(Layer(config) for _ in range(config.layers))})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, return_dict: bool = True) -> SimpleNamespace:
        """`.last_hidden_state` (batch, seq, hidden), as BertModel returns it (`return_dict` as LeanEncoder passes it)."""
        e = self.embeddings
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = e["word_embeddings"](input_ids) + e["token_type_embeddings"](token_type_ids)
        x = e["LayerNorm"](x + e["position_embeddings"](positions))
        # no padding: no mask at all (as transformers passes none), else keys that are padding are skipped
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        for layer in self.encoder["layer"]:
            x = layer(x, mask)
        return SimpleNamespace(last_hidden_state=x)


def load_bert(pipeline: Pipeline) -> BertEncoder:
    """The pipeline's BERT in eval mode, float32 on the CPU, its weights mapped from model.safetensors."""
    config = read_config(pipeline.transformer_dir)
    model = BertEncoder(config)  # uninitialised (not on the meta device: that imports torch._dynamo)
    wanted = model.state_dict()
    tensors = read_safetensors(pipeline.transformer_dir / WEIGHTS, wanted)
    shapes = [n for n, t in wanted.items() if tuple(tensors[n].shape) != tuple(t.shape)]
    if shapes:
        raise UnsupportedPipeline(f"{WEIGHTS}: {shapes[0]} has shape {tuple(tensors[shapes[0]].shape)}")
    model.load_state_dict(tensors, assign=True)
    return model.eval().requires_grad_(False)


def read_safetensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of a safetensors file (found under "bert." too: a BertFor... model's
    save), as float32; float32 ones share a private map of the file (no copy: pages are read
    when used and stay shared with the page cache until written)."""
    if not path.is_file():
        raise UnsupportedPipeline(f"no {path.name} (sharded or .bin weights)")
    with open(path, "rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (ValueError, OSError) as exc:  # an empty file, a file system that cannot map
            raise UnsupportedPipeline(f"{path.name}: {exc}") from exc
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(bytes(data[8:8 + size]))
        found = {name: header.get(name) or header.get("bert." + name) for name in names}
        missing = sorted(name for name, info in found.items() if info is None)
        if missing:
            raise UnsupportedPipeline(f"{path.name} lacks {missing[:3]}")
        return {name: _tensor(data, 8 + size, info) for name, info in found.items()}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnsupportedPipeline(f"{path.name} unreadable: {exc!r}") from exc


def _tensor(data: mmap.mmap, start: int, info: dict) -> torch.Tensor:
    """One tensor of a safetensors map, float32."""
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"dtype {info['dtype']}")
    begin, end = (start + int(offset) for offset in info["data_offsets"])
    shape = [int(n) for n in info["shape"]]
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > len(data):
        raise ValueError(f"offsets {info['data_offsets']} do not fit shape {shape}")
    if begin == end:
        return torch.zeros(shape, dtype=torch.float32)
    flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
    return flat.view(shape).to(torch.float32)


class BertTokenizer:
    """tokenizer.json through `tokenizers`, called as transformers' tokenizers are called."""

    def __init__(self, backend, pad_id: int, pad_token: str):
        self.backend_tokenizer = backend
        self.pad_id, self.pad_token = pad_id, pad_token
        self.is_fast = True
        self._lock = threading.Lock()  # truncation and padding are settings of the shared backend

    def __deepcopy__(self, memo: dict) -> BertTokenizer:
        """An independent tokenizer: its own backend (so its own settings) and its own lock."""
        return BertTokenizer(copy.deepcopy(self.backend_tokenizer, memo), self.pad_id, self.pad_token)

    def __call__(self, texts: list[str], padding: bool = False, truncation: bool | str = False,
                 max_length: int | None = None, return_tensors: str | None = None) -> dict:
        """input_ids, token_type_ids and attention_mask of `texts`: lists, or "pt" tensors."""
        with self._lock:
            encodings = self._encode(list(texts), padding, bool(truncation and max_length), max_length)
        features = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                    "attention_mask": [e.attention_mask for e in encodings]}
        if return_tensors == "pt":
            return {k: torch.tensor(v, dtype=torch.long) for k, v in features.items()}
        return features

    def _encode(self, texts: list[str], padding: bool, truncate: bool, max_length: int | None) -> list:
        """The backend's encodings of `texts` with these settings (the caller holds the lock)."""
        backend = self.backend_tokenizer
        if truncate:
            backend.enable_truncation(max_length, strategy="longest_first", direction="right")
        else:
            backend.no_truncation()
        if padding:
            backend.enable_padding(direction="right", pad_id=self.pad_id, pad_type_id=0, pad_token=self.pad_token)
        else:
            backend.no_padding()
        return backend.encode_batch(texts)


def load_bert_tokenizer(pipeline: Pipeline) -> BertTokenizer:
    """The pipeline's tokenizer.json, with ST's Lowercase in front when do_lower_case is set;
    UnsupportedPipeline when transformers would build it otherwise."""
    from tokenizers import Tokenizer

    folder = pipeline.transformer_dir
    settings = read_json(folder / "tokenizer_config.json", optional=True)
    if not isinstance(settings, dict) or settings.get("tokenizer_class") not in _TOKENIZER_CLASSES:
        raise UnsupportedPipeline(f"tokenizer class {settings.get('tokenizer_class') if isinstance(settings, dict) else None}")
    if any(settings.get(side, "right") != "right" for side in ("padding_side", "truncation_side")):
        raise UnsupportedPipeline("the tokenizer pads or truncates on the left")
    if not (folder / "tokenizer.json").is_file():
        raise UnsupportedPipeline("no tokenizer.json")
    try:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception
        raise UnsupportedPipeline(f"tokenizer.json unreadable: {exc}") from exc
    _check_normalizer(json.loads(backend.to_str()).get("normalizer") or {}, settings)
    pad_token = settings.get("pad_token", "[PAD]")
    pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
    pad_id = backend.token_to_id(pad_token) if isinstance(pad_token, str) else None
    if pad_id is None:
        raise UnsupportedPipeline(f"pad token {pad_token!r} is not in the vocabulary")
    if pipeline.do_lower_case:
        backend.normalizer = with_lowercase(backend.normalizer)
    return BertTokenizer(backend, pad_id, pad_token)


def _check_normalizer(normalizer: dict, settings: dict) -> None:
    """UnsupportedPipeline unless tokenizer.json's normaliser is a BertNormalizer that agrees with
    every flag tokenizer_config.json sets (transformers would rebuild it from the flags)."""
    if normalizer.get("type") != "BertNormalizer":
        raise UnsupportedPipeline(f"normaliser {normalizer.get('type')}")
    for key, field in _NORMALIZER_FLAGS.items():
        if key in settings and settings[key] != normalizer.get(field):
            raise UnsupportedPipeline(f"tokenizer_config.json {key}={settings[key]!r}, tokenizer.json {normalizer.get(field)!r}")
