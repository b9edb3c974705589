"""Fine-tune a sentence-transformers model on (input, output) pairs.

The field's trainer does the work: `SentenceTransformerTrainer` with
MultipleNegativesRankingLoss (or its cached variant for large batches) over batches that
never hold the same text twice, on CUDA (bf16/fp16) when there is one and on the CPU
otherwise. This module knows nothing of the FSM, the store or the daemon.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from config.errors import GremlinError
from config.settings import TrainingSettings

logger = logging.getLogger(__name__)

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
    batch_size: int = TrainingSettings.batch_size
    mini_batch_size: int = TrainingSettings.mini_batch_size
    learning_rate: float = TrainingSettings.learning_rate
    warmup_ratio: float = TrainingSettings.warmup_ratio
    max_seq_length: int = TrainingSettings.max_seq_length
    seed: int = TrainingSettings.seed
    device: str = TrainingSettings.device
    precision: str = TrainingSettings.precision
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
    from sentence_transformers import SentenceTransformer

    from memory.vector_store.embedder import choose_device

    if len(pairs) < 2:
        raise TrainingError(f"fine-tuning needs at least 2 pairs (got {len(pairs)})")
    _quiet_libraries()
    device = choose_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    model = SentenceTransformer(str(base_path), device=device, local_files_only=True)
    model.max_seq_length = spec.max_seq_length
    limit = _TimeLimit(spec.max_seconds)
    trainer = _make_trainer(model, pairs, spec, out_dir, device, precision,
                            [*_callbacks(progress, tensorboard_dir, mlflow_uri), *limit.callbacks()])
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    model.save(str(out_dir))
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # save_strategy="no": only empty logs there
    steps = int(output.global_step)
    seen = min(len(pairs) * spec.epochs, steps * spec.batch_size) if steps else 0
    logger.info("fine-tuning finished", extra={"steps": steps, "seconds": round(seconds, 1),
                                               "device": device, "precision": precision})
    return FineTuneResult(out_dir, steps, round(seconds, 2), round(seen / seconds, 2) if seconds else 0.0,
                          device, precision, _final_loss(output), limit.stopped)


def _make_trainer(model, pairs, spec: TrainingSpec, out_dir: Path, device: str, precision: str, callbacks):
    from datasets import Dataset
    from transformers import PrinterCallback
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    data = Dataset.from_dict({"anchor": [p[0] for p in pairs], "positive": [p[1] for p in pairs]})
    if spec.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=spec.mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"), num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, warmup_steps=spec.warmup_ratio, seed=spec.seed,
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
