"""Fine-tune a sentence-transformers model on (input, output) pairs.

The field's trainer does the work: `SentenceTransformerTrainer` with
MultipleNegativesRankingLoss (or its cached variant for large batches) over batches that
never hold the same text twice, on CUDA (bf16/fp16) when there is one and on the CPU
otherwise. This module knows nothing of the FSM, the store or the daemon.

`fine_tune_in_child` runs the same function in a process of its own (multiprocessing
"spawn"), so the daemon never holds the optimiser, activations and datasets of a run:
steps and log records come back over a pipe, the result or the child's error at the end.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
import warnings
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from config.errors import GremlinError
from config.settings import TrainingSettings

logger = logging.getLogger(__name__)

# BERT module names LoRA adapts: the attention projections and the attention output.
LORA_TARGETS = ("query", "key", "value", "attention.output.dense")

Progress = Callable[[int, int, float | None], None]  # (step, total steps, last loss)


class TrainingError(GremlinError):
    """Fine-tuning could not run (bad spec, too little data, unusable device)."""


@dataclass(frozen=True)
class TrainingSpec:
    """How one model is fine-tuned; saved with every run beside its lineage.

    Its defaults are the [training] section's, so a spec made in code and one read from
    the config agree unless told otherwise. `max_seconds` (0 = no limit) is not a [training]
    key: the planner sets it from [planner] max_training_minutes.
    """

    epochs: int = TrainingSettings.epochs
    max_steps: int = TrainingSettings.max_steps
    min_steps: int = TrainingSettings.min_steps
    hard_negatives: bool = TrainingSettings.hard_negatives
    file_pairs: bool = TrainingSettings.file_pairs
    batch_size: int = TrainingSettings.batch_size
    mini_batch_size: int = TrainingSettings.mini_batch_size
    learning_rate: float = TrainingSettings.learning_rate
    warmup_ratio: float = TrainingSettings.warmup_ratio
    max_seq_length: int = TrainingSettings.max_seq_length
    seed: int = TrainingSettings.seed
    device: str = TrainingSettings.device
    precision: str = TrainingSettings.precision
    method: str = TrainingSettings.method
    lora_r: int = TrainingSettings.lora_r
    lora_alpha: int = TrainingSettings.lora_alpha
    lora_dropout: float = TrainingSettings.lora_dropout
    lora_learning_rate: float = TrainingSettings.lora_learning_rate
    max_seconds: float = 0.0

    @classmethod
    def from_settings(cls, training, **overrides) -> TrainingSpec:
        """The spec described by a [training] section, with `overrides` applied."""
        values = {f.name: getattr(training, f.name, f.default) for f in fields(cls)}
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class FineTuneResult:
    """What a fine-tuning run produced and how fast it ran."""

    path: Path
    steps: int
    seconds: float
    pairs_per_s: float
    device: str
    precision: str
    train_loss: float | None
    time_limited: bool = False  # stopped by spec.max_seconds before its planned steps


def resolve_precision(requested: str, device: str) -> str:
    """fp32 on the CPU; on CUDA bf16 where supported, else fp16 (for 'auto')."""
    if device == "cpu":
        if requested in ("fp16", "bf16"):
            logger.warning("mixed precision needs a GPU; training in fp32", extra={"requested": requested})
        return "fp32"
    if requested != "auto":
        return requested
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def fine_tune(pairs: Sequence[tuple[str, str]], spec: TrainingSpec, base_path: Path, out_dir: Path,
              progress: Progress | None = None, tensorboard_dir: Path | None = None,
              mlflow_uri: str = "") -> FineTuneResult:
    """Train `base_path` on `pairs` and save the new model in `out_dir`."""
    from memory.vector_store.embedder import choose_device, load_sentence_model

    if len(pairs) < 2:
        raise TrainingError(f"fine-tuning needs at least 2 pairs (got {len(pairs)})")
    _quiet_libraries()
    device = choose_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    # A LoRA base is loaded as base + adapter: a LoRA run keeps training that adapter, a full run its merge.
    model = load_sentence_model(base_path, device, merge=spec.method != "lora", trainable=True)
    model.max_seq_length = spec.max_seq_length
    limit = _TimeLimit(spec.max_seconds)
    trainer = _make_trainer(model, pairs, spec, out_dir, device, precision,
                            [*_callbacks(progress, tensorboard_dir, mlflow_uri), *limit.callbacks()])
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    _save_model(model, out_dir)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # save_strategy="no": only empty logs there
    steps = int(output.global_step)
    seen = min(len(pairs) * train_epochs(len(pairs), spec), steps * spec.batch_size) if steps else 0
    logger.info("fine-tuning finished", extra={"steps": steps, "seconds": round(seconds, 1),
                                               "device": device, "precision": precision})
    return FineTuneResult(out_dir, steps, round(seconds, 2), round(seen / seconds, 2) if seconds else 0.0,
                          device, precision, _final_loss(output), limit.stopped)


def _save_model(model, out_dir: Path) -> None:
    """Save the model; a LoRA model saves only its adapter, its base's config.json and the pipeline."""
    model.save(str(out_dir))
    transformer = model[0].model
    if hasattr(transformer, "get_base_model"):  # peft saved adapter_config.json (naming the base) + adapter weights
        # The base's config.json too: code that asks "is there a model here?" looks for it.
        transformer.get_base_model().config.to_json_file(str(out_dir / "config.json"))


def _add_lora(model, spec: TrainingSpec) -> None:
    """Wrap the transformer in a fresh LoRA adapter on its attention projections (only it trains)."""
    from peft import LoraConfig, get_peft_model

    transformer = model[0].model
    if hasattr(transformer, "peft_config"):
        return  # the base was itself a LoRA model: keep training its adapter
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                        target_modules=list(LORA_TARGETS))
    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model[0].model = get_peft_model(transformer, config)
    model[0].model.peft_config["default"].base_model_name_or_path = transformer.name_or_path


# How long a training process gets to end after SIGTERM before it is SIGKILLed.
TERMINATE_WAIT_S = 10.0
_POLL_S = 0.2  # how often the parent looks at the stop event while the child is quiet
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PORTABLE = (str, int, float, bool, type(None), list, dict, tuple)


class _ChildTraceback(Exception):
    """The traceback text of an exception raised in the training process (the cause shown in logs)."""


@dataclass(frozen=True)
class HeldOutCheck:
    """What the training process evaluates after training: the current model against the candidate."""

    pairs: list[tuple[str, str]]  # held-out (input, output) as the model sees them
    raw: list[tuple[str, str]]  # the same pairs' full texts, oldest first, for fusion calibration
    current_path: Path
    device: str
    batch_size: int
    max_seq_length: int

    def run(self, candidate_path: Path) -> tuple[dict, dict, dict]:
        """(before, after, fusion): held-out metrics of both models and each one's fusion report."""
        from memory.vector_store.embedder import Embedder
        from self_training.evaluate import calibrate_fusion, evaluate_encoder

        scores = []
        for path in (self.current_path, candidate_path):  # one model in memory at a time
            model = Embedder(path, self.device, self.batch_size, self.max_seq_length)
            scores.append((evaluate_encoder(model.encode, self.pairs), calibrate_fusion(model.encode, self.raw)))
            del model
        (before, fusion_before), (after, fusion) = scores
        return before, after, {"fusion": fusion, "fusion_before": fusion_before}


@dataclass(frozen=True)
class ChildReport:
    """What the training process sends back: how training ran and, given a check, how both models scored."""

    result: FineTuneResult
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)  # lineage's "fusion" (candidate) and "fusion_before" (current)


def fine_tune_in_child(pairs: Sequence[tuple[str, str]], spec: TrainingSpec, base_path: Path, out_dir: Path,
                       progress: Progress | None = None, tensorboard_dir: Path | None = None,
                       mlflow_uri: str = "", stop: threading.Event | None = None,
                       check: HeldOutCheck | None = None,
                       on_evaluating: Callable[[], None] | None = None) -> ChildReport:
    """`fine_tune`, then `check`, in a spawned process, so the caller never holds the training
    stack's memory nor loads the candidate model.

    `progress` runs here, in the caller's thread, after each step, and `on_evaluating` when
    the child starts the check. When either raises, or `stop` is set (then `progress` is
    called once more so the caller can raise its own error), the child gets SIGTERM, SIGKILL
    after TERMINATE_WAIT_S, and the error goes on. A child that dies or fails becomes a
    TrainingError saying how.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, name="gremlin-finetune", daemon=True, args=(
        sender, list(pairs), spec, Path(base_path), Path(out_dir), tensorboard_dir, mlflow_uri,
        os.getpid(), _log_levels(), check))
    child.start()
    sender.close()  # the child holds the only writer: end of file here means it is gone
    logger.info("training process started", extra={"pid": child.pid})
    report = None
    try:
        report = _follow(child, receiver, progress, stop or threading.Event(), on_evaluating)
        return report
    finally:
        receiver.close()
        _end_child(child, wait=TERMINATE_WAIT_S if report is not None else 0.0)


def _follow(child, receiver, progress: Progress | None, stop: threading.Event,
            on_evaluating: Callable[[], None] | None = None) -> ChildReport:
    """Relay the child's steps, phases and log records until its report or error arrives, or it dies."""
    last: tuple[int, int, float | None] = (0, 0, None)
    while True:
        if stop.is_set():
            if progress is not None:
                progress(*last)  # the caller's chance to raise its own "stopping" error
            raise TrainingError("fine-tuning was stopped before it finished")
        if not receiver.poll(_POLL_S):
            if not child.is_alive() and not receiver.poll(0):
                raise _died(child)
            continue
        try:
            kind, payload = receiver.recv()
        except EOFError:
            raise _died(child) from None
        if kind == "step":
            last = payload
            if progress is not None:
                progress(*payload)
        elif kind == "log":
            record = logging.makeLogRecord(payload)
            logging.getLogger(record.name).handle(record)
        elif kind == "phase":
            if on_evaluating is not None:
                on_evaluating()
        elif kind == "result":
            return payload
        else:
            raise _child_error(*payload)


def _died(child) -> TrainingError:
    """The error for a training process that ended without a result (a signal or an exit code)."""
    child.join(TERMINATE_WAIT_S)
    code = child.exitcode
    if code is not None and code < 0 and -code in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS):
        name = signal.Signals(-code).name
        return TrainingError(
            f"the training process was killed by {name} (exit code {code}) before it finished, most often "
            "because the machine ran out of memory (see `dmesg` for the OOM killer); lower [training] "
            "batch_size or max_seq_length, or set mini_batch_size, and train again")
    if code is not None and code < 0:
        how = f"was killed by {signal.Signals(-code).name} (exit code {code})"
    else:
        how = f"exited with code {code}"
    return TrainingError(f"the training process {how} before it finished; see the log records before "
                         "this one for its last messages, then train again")


def _child_error(kind: str, message: str, text: str) -> TrainingError:
    """The parent's TrainingError for an exception raised in the child, its traceback as the cause."""
    error = TrainingError(message if kind == "TrainingError"
                          else f"fine-tuning failed in the training process: {kind}: {message}")
    error.__cause__ = _ChildTraceback(text)
    return error


def _end_child(child, wait: float) -> None:
    """Let a finished child exit for `wait` seconds; then SIGTERM, then SIGKILL; never leave a zombie."""
    child.join(wait)
    if child.is_alive():
        child.terminate()
        child.join(TERMINATE_WAIT_S)
    if child.is_alive():
        logger.warning("training process ignored SIGTERM; killing it", extra={"pid": child.pid})
        child.kill()
        child.join()
    logger.info("training process ended", extra={"pid": child.pid, "exitcode": child.exitcode})
    child.close()


def _log_levels() -> dict[str, int]:
    """The levels set in this process (root and named loggers), for the child to filter alike."""
    levels = {"": logging.getLogger().level}
    for name, item in logging.root.manager.loggerDict.items():
        if isinstance(item, logging.Logger) and item.level:
            levels[name] = item.level
    return levels


def _child_main(sender, pairs: list, spec: TrainingSpec, base_path: Path, out_dir: Path,
                tensorboard_dir: Path | None, mlflow_uri: str, parent_pid: int, levels: dict[str, int],
                check: HeldOutCheck | None = None) -> None:
    """The training process: dies with its parent, logs through `sender`, sends its report or error."""
    _die_with_parent(parent_pid)
    _log_through(sender, levels)

    def report(step: int, total: int, loss: float | None) -> None:
        if os.getppid() != parent_pid:  # the parent is gone: nobody wants this model any more
            os._exit(1)
        sender.send(("step", (step, total, loss)))

    try:
        result = fine_tune(pairs, spec, base_path, out_dir, report, tensorboard_dir, mlflow_uri)
        outcome = ChildReport(result)
        if check is not None:
            sender.send(("phase", "evaluating"))
            outcome = ChildReport(result, *check.run(out_dir))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        sender.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
        return
    sender.send(("result", outcome))


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed daemon leaves no trainer."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the step callback's getppid check still applies
        pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


class _PipeHandler(logging.Handler):
    """Sends each record, made picklable, to the parent, which hands it to its own handlers."""

    def __init__(self, sender):
        super().__init__()
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender.send(("log", _portable(record)))
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def _portable(record: logging.LogRecord) -> dict:
    """The record's attributes with its message formatted and anything unpicklable as text."""
    data = {**record.__dict__, "msg": record.getMessage(), "args": None, "exc_info": None}
    if record.exc_info:
        data["exc_text"] = data["exc"] = logging.Formatter().formatException(record.exc_info)
    return {key: value if isinstance(value, _PORTABLE) else repr(value) for key, value in data.items()}


def _log_through(sender, levels: dict[str, int]) -> None:
    """Route every record of this process to the parent, filtered by the parent's levels."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_PipeHandler(sender))
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    logging.captureWarnings(True)


MAX_EPOCHS = 50  # min_steps never makes more passes than this over a tiny history
HARD_NEGATIVE_DEPTH = 5  # full-text hits looked at per pair for a negative that is not its own diff


def train_epochs(n_pairs: int, spec: TrainingSpec) -> int:
    """Passes over the pairs: `spec.epochs`, or more when they give fewer than `spec.min_steps`
    optimiser steps (a small history learns nothing in 7 steps), at most MAX_EPOCHS."""
    per_epoch = max(1, math.ceil(n_pairs / spec.batch_size))
    needed = math.ceil(spec.min_steps / per_epoch) if spec.min_steps else 0
    return max(spec.epochs, min(MAX_EPOCHS, needed))


def hard_negatives(pairs: Sequence[tuple[str, str]], seed: int) -> list[str] | None:
    """For each pair, the output that full-text search ranks highest for its input among the
    other pairs' outputs (a diff its words point to that is not its own): MNRL then learns to
    tell the two apart. A pair whose words match nothing else gets a random other output;
    None when the pairs have fewer than two distinct outputs."""
    from memory.store import rank_lexically

    outputs = [p[1] for p in pairs]
    if len(set(outputs)) < 2:
        return None
    ranked = rank_lexically(outputs, [p[0] for p in pairs], HARD_NEGATIVE_DEPTH)
    rng = random.Random(seed)
    negatives = []
    for i, ranking in enumerate(ranked):
        found = next((outputs[j] for j in ranking if outputs[j] != outputs[i]), None)
        while found is None or found == outputs[i]:  # ends: another distinct output exists
            found = outputs[rng.randrange(len(outputs))]
        negatives.append(found)
    return negatives



def _make_trainer(model, pairs, spec: TrainingSpec, out_dir: Path, device: str, precision: str, callbacks):
    from datasets import Dataset
    from transformers import PrinterCallback
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    if spec.method == "lora":
        _add_lora(model, spec)
    columns = {"anchor": [p[0] for p in pairs], "positive": [p[1] for p in pairs]}
    negatives = hard_negatives(pairs, spec.seed) if spec.hard_negatives else None
    if negatives is not None:
        columns["negative"] = negatives
    data = Dataset.from_dict(columns)
    if spec.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=spec.mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"), num_train_epochs=train_epochs(len(pairs), spec),
        max_steps=spec.max_steps or -1, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lora_learning_rate if spec.method == "lora" else spec.learning_rate, warmup_steps=spec.warmup_ratio, seed=spec.seed,
        data_seed=spec.seed, fp16=precision == "fp16", bf16=precision == "bf16",
        use_cpu=device == "cpu", batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no",
        logging_steps=1, report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss,
                                         callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; we log ourselves
    return trainer


def _callbacks(progress: Progress | None, tensorboard_dir: Path | None, mlflow_uri: str) -> list:
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        """Hands (step, total, loss) to the caller after every optimiser step."""

        last_loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.last_loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress(state.global_step, state.max_steps, self.last_loss)

    callbacks = [ReportProgress()]
    if tensorboard_dir is not None:
        callbacks.append(_tensorboard(tensorboard_dir))
    if mlflow_uri:
        callbacks.append(_mlflow(mlflow_uri))
    return callbacks


class _TimeLimit:
    """Ends training after the step that passes `max_seconds` of wall time (0 = never); the
    model trained so far is saved and evaluated like any other."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds
        self.stopped = False

    def callbacks(self) -> list:
        """The trainer callback that enforces the limit (none when there is no limit)."""
        from transformers import TrainerCallback

        if self.max_seconds <= 0:
            return []
        limit = self

        class StopAtTimeLimit(TrainerCallback):
            started = 0.0

            def on_train_begin(self, args, state, control, **kwargs):
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if not limit.stopped and time.perf_counter() - self.started >= limit.max_seconds:
                    limit.stopped = control.should_training_stop = True
                    logger.warning("training stopped at its time limit", extra={
                        "max_seconds": limit.max_seconds, "step": state.global_step, "max_steps": state.max_steps})

        return [StopAtTimeLimit()]


def _tensorboard(directory: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    directory.mkdir(parents=True, exist_ok=True)
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(directory)))


def _mlflow(uri: str):
    try:
        import mlflow
        from transformers.integrations import MLflowCallback
    except ImportError as exc:
        raise TrainingError("[training] mlflow_uri is set but MLflow is not installed; "
                            "run `.venv/bin/pip install mlflow` or set mlflow_uri = \"\"") from exc
    mlflow.set_tracking_uri(uri)
    return MLflowCallback()


def _quiet_libraries() -> None:
    """No per-step progress bars from datasets/transformers; Gremlin reports progress itself."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _final_loss(output) -> float | None:
    loss = getattr(output, "training_loss", None)
    return None if loss is None else round(float(loss), 4)
