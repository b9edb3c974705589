"""A lean serving encoder: a sentence-transformers folder run with transformers alone.

`import sentence_transformers` pulls in scikit-learn, datasets, pandas, transformers.trainer and
peft (about 145 MiB of the daemon's resident memory) that serving never uses. A standard
folder (modules.json: Transformer, Pooling, optionally Normalize) is only a Hugging Face model,
its tokenizer and a pooling rule, so this module reads those and mirrors what
`SentenceTransformer.encode(..., normalize_embeddings=True)` of sentence-transformers 6.x does
with them (`base/modules/transformer.py` `preprocess`/`forward`, `sentence_transformer/modules/
pooling.py`, `base/modules/normalize.py`, `sentence_transformer/model.py` `_inference`), to the
same vectors. Any other folder raises UnsupportedPipeline, and the caller loads the full
SentenceTransformer instead.
"""

from __future__ import annotations

import inspect
import re
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memory.errors import ModelError

# What modules.json may list, by the last part of each module's type (ST 6 saves
# `sentence_transformers.base.modules.transformer.Transformer`, older versions
# `sentence_transformers.models.Transformer`).
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
# Pooling modes mirrored here; weightedmean and lasttoken are left to sentence-transformers.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
# Legacy `pooling_mode_*` flags in the order ST concatenates them (pooling.py `_LEGACY_POOLING_MODE_KWARGS`).
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# sentence_bert_config.json keys that change nothing for plain text without a task; any other key
# with a value (processing_kwargs, model/tokenizer/config kwargs, query expansion...) falls back.
_HARMLESS_SBERT_KEYS = {"max_seq_length", "do_lower_case", "transformer_task", "modality_config",
                        "module_output_name", "unpad_inputs"}
_TEXT_FORWARD = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
# Files that make AutoProcessor (what ST loads) return something other than the plain tokenizer.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


class UnsupportedPipeline(ModelError):
    """The folder needs the full SentenceTransformer (the message says why)."""


@dataclass(frozen=True)
class Pipeline:
    """What a sentence-transformers folder does around its transformer."""

    transformer_dir: Path  # where config.json, the weights and the tokenizer are
    pooling: tuple[str, ...]  # pooled vectors are concatenated in this order
    normalize: bool  # a Normalize module follows pooling
    do_lower_case: bool


def read_json(path: Path, optional: bool = False) -> dict | list:
    """The JSON in `path` ({} when `optional` and there is no such file); UnsupportedPipeline
    when it is missing or unreadable."""
    if optional and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedPipeline(f"{path.name} unreadable: {exc}") from exc


def _module_kind(entry: dict) -> str:
    """Transformer, Pooling or Normalize for a sentence-transformers module of modules.json, else its type."""
    kind = str(entry.get("type", ""))
    name = kind.rsplit(".", 1)[-1]
    if kind.startswith("sentence_transformers.") and name in (_TRANSFORMER, _POOLING, _NORMALIZE) \
            and not entry.get("kwargs"):
        return name
    return kind or "untyped module"


def read_pipeline(folder: Path) -> Pipeline:
    """The pipeline of the sentence-transformers model in `folder`; UnsupportedPipeline when it is
    not one this module mirrors exactly."""
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        raise UnsupportedPipeline("no modules.json")
    modules = read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UnsupportedPipeline("modules.json is not a list of modules")
    modules = sorted(modules, key=lambda m: m.get("idx", 0))
    kinds = tuple(_module_kind(m) for m in modules)
    if kinds not in ((_TRANSFORMER, _POOLING), (_TRANSFORMER, _POOLING, _NORMALIZE)):
        raise UnsupportedPipeline(f"modules are {list(kinds)}, not Transformer, Pooling[, Normalize]")
    transformer_dir = folder / modules[0].get("path", "")
    sbert = _read_sbert_config(transformer_dir)
    _check_model_config(transformer_dir)
    _check_prompts(folder)
    if len(modules) == 3:
        _check_normalize(folder / modules[2].get("path", ""))
    return Pipeline(transformer_dir, read_pooling(folder / modules[1].get("path", "")),
                    len(modules) == 3, bool(sbert.get("do_lower_case", False)))


def _read_sbert_config(transformer_dir: Path) -> dict:
    """sentence_bert_config.json ({} when absent); UnsupportedPipeline for settings not mirrored here."""
    path = transformer_dir / "sentence_bert_config.json"
    config = read_json(path, optional=True)
    if not isinstance(config, dict):
        raise UnsupportedPipeline("sentence_bert_config.json is not an object")
    extra = sorted(key for key, value in config.items() if key not in _HARMLESS_SBERT_KEYS and value)
    if extra:
        raise UnsupportedPipeline(f"sentence_bert_config.json sets {extra}")
    if config.get("transformer_task", "feature-extraction") != "feature-extraction":
        raise UnsupportedPipeline(f"transformer task {config['transformer_task']}")
    if config.get("modality_config", _TEXT_FORWARD) != _TEXT_FORWARD \
            or config.get("module_output_name", "token_embeddings") != "token_embeddings":
        raise UnsupportedPipeline("the transformer is not text → last_hidden_state → token_embeddings")
    return config


def _check_model_config(transformer_dir: Path) -> None:
    """UnsupportedPipeline for models ST loads specially: encoder-decoders, remote code, processors."""
    config = read_json(transformer_dir / "config.json")
    if not isinstance(config, dict) or config.get("is_encoder_decoder") or config.get("auto_map"):
        raise UnsupportedPipeline("config.json names an encoder-decoder or remote-code model")
    if any((transformer_dir / name).is_file() for name in _PROCESSOR_FILES):
        raise UnsupportedPipeline("the folder has a multimodal processor")


def _check_prompts(folder: Path) -> None:
    """UnsupportedPipeline when encode() would prepend a default prompt or the model is not a SentenceTransformer."""
    path = folder / "config_sentence_transformers.json"
    config = read_json(path, optional=True)
    if not isinstance(config, dict) or config.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise UnsupportedPipeline("config_sentence_transformers.json is not a SentenceTransformer's")
    name = config.get("default_prompt_name")
    if name is not None and (config.get("prompts") or {}).get(name):
        raise UnsupportedPipeline(f"default prompt {name!r}")


def _check_normalize(path: Path) -> None:
    """UnsupportedPipeline when the Normalize module works on anything but the sentence embedding."""
    config = read_json(path / "config.json", optional=True)
    if not isinstance(config, dict) or config.get("module_input_name", "sentence_embedding") != "sentence_embedding" \
            or config.get("module_output_name", "sentence_embedding") != "sentence_embedding":
        raise UnsupportedPipeline("Normalize does not act on the sentence embedding")


def read_pooling(path: Path) -> tuple[str, ...]:
    """The pooling modes of the Pooling config in `path` (legacy `pooling_mode_*` flags converted as ST does)."""
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise UnsupportedPipeline("the pooling config is not an object")
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [name for key, name in _LEGACY_POOLING.items() if config.get(key)] or ["mean"]
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unsupported = [m for m in modes if m not in POOLING_MODES]
    if not modes or unsupported:
        raise UnsupportedPipeline(f"pooling mode {unsupported or modes}")
    return modes


def load_tokenizer(pipeline: Pipeline):
    """The folder's tokenizer through transformers, with ST's Lowercase normaliser in front when
    do_lower_case is set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pipeline.transformer_dir), local_files_only=True)
    if pipeline.do_lower_case:
        if not tokenizer.is_fast:
            raise UnsupportedPipeline("do_lower_case with a slow tokenizer")
        tokenizer.backend_tokenizer.normalizer = with_lowercase(tokenizer.backend_tokenizer.normalizer)
    return tokenizer


def with_lowercase(normalizer):
    """What ST 6's Transformer does for do_lower_case: `normalizer` with a Lowercase in front
    (unchanged when it already lowercases)."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    if isinstance(normalizer, Lowercase) or (isinstance(normalizer, NormalizerSequence)
                                             and any(isinstance(n, Lowercase) for n in normalizer)):
        return normalizer
    return NormalizerSequence([Lowercase(), *(list(normalizer) if isinstance(normalizer, NormalizerSequence)
                                              else [normalizer] if normalizer is not None else [])])


def load_transformer(pipeline: Pipeline):
    """The Hugging Face model of the pipeline, float32 on the CPU (what ST's AutoModel load gives)."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(str(pipeline.transformer_dir), dtype=torch.float32, local_files_only=True)


def pool(token_embeddings, attention_mask, modes: Sequence[str]):
    """Sentence vectors from token vectors, as ST 6's Pooling `_forward_padded` computes them."""
    import torch

    vectors = []
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    for mode in modes:
        if mode == "cls":
            first = attention_mask.to(torch.int).argmax(dim=1)  # the first real token, whatever the padding side
            index = first.unsqueeze(-1).unsqueeze(1).expand(-1, 1, token_embeddings.shape[-1])
            vectors.append(torch.gather(token_embeddings, 1, index).squeeze(1))
        elif mode == "max":
            vectors.append(token_embeddings.masked_fill(mask.expand_as(token_embeddings) == 0, float("-inf"))
                           .max(dim=1).values)
        else:
            total = (token_embeddings * mask).sum(dim=1, dtype=token_embeddings.dtype)
            count = torch.clamp(mask.sum(dim=1, dtype=token_embeddings.dtype), min=1e-9)
            vectors.append(total / (count if mode == "mean" else torch.sqrt(count)))
    return torch.cat(vectors, dim=-1)


def _forward_keys(model) -> frozenset[str] | None:
    """The inputs the model's forward accepts; None when it takes **kwargs (ST passes everything then)."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


class LeanEncoder:
    """Text → normalised float32 vectors with a Hugging Face model, its tokenizer and a pooling rule."""

    def __init__(self, model, tokenizer, pipeline: Pipeline, max_seq_length: int, device: str):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.max_seq_length = max_seq_length
        self.dim = len(pipeline.pooling) * int(model.config.hidden_size)
        self._accepted = _forward_keys(model)

    def encode(self, texts: Sequence[str], batch_size: int = 32, *, normalize_embeddings: bool = True,
               show_progress_bar: bool = False) -> np.ndarray:
        """Vectors of `texts`, shape (len(texts), dim), in their order; batches of similar length.
        The keywords are SentenceTransformer.encode's (bench scripts call either); no progress bar is shown."""
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([-len(text) for text in texts])  # as ST sorts: longest first, by characters
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self._embed([texts[i] for i in order[start:start + batch_size]])
                if normalize_embeddings:
                    batch = torch.nn.functional.normalize(batch, p=2, dim=1)
                chunks.append(batch.cpu())
        vectors = torch.cat(chunks)[torch.from_numpy(np.argsort(order))]
        return vectors.numpy().astype(np.float32, copy=False)

    def _embed(self, texts: list[str]):
        """Pooled (and, with a Normalize module, normalised) vectors of one batch, on the model's device."""
        import torch

        features = self.tokenizer(texts, padding=True, truncation="longest_first", max_length=self.max_seq_length,
                                  return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in features.items()
                  if self._accepted is None or k in self._accepted}
        tokens = self.model(**inputs, return_dict=True).last_hidden_state
        vectors = pool(tokens, features["attention_mask"].to(self.device), self.pipeline.pooling)
        return torch.nn.functional.normalize(vectors, p=2, dim=-1) if self.pipeline.normalize else vectors


class UnsupportedAdapter(ModelError):
    """A LoRA adapter this module does not merge by itself (peft merges it instead)."""


# adapter_config.json values of a plain LoRA adapter: anything else is left to peft.
_PLAIN_LORA = {"peft_type": "LORA", "use_dora": False, "fan_in_fan_out": False, "bias": "none"}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


def merge_lora(model, folder: Path) -> int:
    """Merge the plain LoRA adapter in `folder` into `model`'s weights, W += B·A·(alpha/r), as
    peft's merge_and_unload does, without importing peft (~140 MiB resident); returns the
    layers changed. UnsupportedAdapter for DoRA, biases, extra modules, patterns, rsLoRA-like
    variants peft would treat otherwise."""
    import torch
    from safetensors.torch import load_file

    config = read_json(Path(folder) / "adapter_config.json")
    odd = [k for k, v in _PLAIN_LORA.items() if config.get(k, v) != v]
    odd += [k for k in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                        "trainable_token_indices") if config.get(k)]
    if odd or not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise UnsupportedAdapter(f"adapter_config.json sets {odd or ['r']}")
    rank = config["r"]
    scale = config.get("lora_alpha", rank) / (rank ** 0.5 if config.get("use_rslora") else rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(Path(folder) / "adapter_model.safetensors")).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise UnsupportedAdapter(f"adapter weight {key} is not a LoRA A/B matrix")
        pairs.setdefault(match["module"], {})[match["side"]] = tensor
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, sides in pairs.items():
            layer = modules.get(name)
            if not isinstance(layer, torch.nn.Linear) or set(sides) != {"A", "B"}:
                raise UnsupportedAdapter(f"adapter layer {name} is not a linear layer with A and B")
            delta = (sides["B"].float() @ sides["A"].float()) * scale
            if delta.shape != layer.weight.shape:
                raise UnsupportedAdapter(f"adapter layer {name}: {tuple(delta.shape)} for {tuple(layer.weight.shape)}")
            layer.weight += delta.to(layer.weight.dtype)
    return len(pairs)
