"""Training throughput: Gremlin's `fine_tune` against a plain sentence-transformers script.

The same N pairs are trained for the same number of steps, batch size, sequence length,
precision and device, once by `self_training.finetune.fine_tune` and once by the few lines
anyone would write (SentenceTransformerTrainer + MultipleNegativesRankingLoss, default
batch sampler). Pairs/s = steps × batch size / seconds of `trainer.train()` (model loading
and saving are outside the timing on both sides). With --repeats R each side runs R times
in alternating order and the best run counts.

Pairs: the commit message → diff pairs of GIT_REPO's history when given, else synthetic
pairs whose texts fill --max-seq-length tokens.

Target (issue 5): ratio (ours / plain) >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from model loading and saving in the tables

from _common import REPO, LoadMeter, configure_logging, machine, print_table, verdict, warn_if_disturbed
from config.settings import TrainingSettings
from memory.vector_store.embedder import choose_device, resolve_model_path
from self_training.finetune import TrainingSpec, fine_tune, resolve_precision
from self_training.generate_dataset import Pair, clean_pairs
from self_training.trainer import model_pairs
from self_training.git_history import clean_message, load_commit, log_entries, repository_root

logger = logging.getLogger(__name__)

TARGET_RATIO = 0.9
LABELS = {"plain": "plain SentenceTransformerTrainer script", "ours": "Gremlin fine_tune"}
WORDS = ("parser config cache token request session retry timeout handler router schema record index "
         "vector buffer stream socket thread worker queue event logger metric trace span loader plugin").split()


def repo_pairs(repo: Path, n: int, chars: int) -> list[tuple[str, str]]:
    """The newest `n` usable commit message → diff pairs of a repository."""
    root = repository_root(repo)
    pairs = []
    for entry in reversed(log_entries(root, merges=True)):
        commit = load_commit(root, entry)
        if commit.diff.strip() and not commit.truncated:
            pairs.append(Pair(clean_message(commit.message)[:chars], commit.diff[:chars], "commit", (), commit.time))
        if len(pairs) >= 2 * n:  # cleaning drops some
            break
    return model_pairs(clean_pairs(pairs))[-n:]  # the texts as Gremlin trains on them (memory/text.py)


def synthetic_pairs(n: int, seq_len: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct pairs: a short query and a diff-like text of about `seq_len` words."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = " ".join(rng.sample(WORDS, 4))
        lines = [f"{rng.choice('+- ')}    {rng.choice(WORDS)}_{i} = {rng.choice(WORDS)}({rng.choice(WORDS)})"
                 for _ in range(max(4, seq_len // 6))]
        pairs.append((f"change {i}: make the {topic} faster", "\n".join(lines)))
    return pairs


def ours(pairs, spec: TrainingSpec, base: Path, out: Path) -> dict:
    """Gremlin's fine_tune: steps, seconds of trainer.train(), pairs/s."""
    result = fine_tune(pairs, spec, base, out)
    return {"steps": result.steps, "seconds": result.seconds,
            "pairs_per_s": round(result.steps * spec.batch_size / result.seconds, 2)}


def plain(pairs, spec: TrainingSpec, base: Path, out: Path, device: str, precision: str) -> dict:
    """The plain script: SentenceTransformerTrainer + MultipleNegativesRankingLoss (its cached
    variant when the spec has a mini-batch), nothing else."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from transformers.trainer_callback import PrinterCallback

    model = SentenceTransformer(str(base), device=device, local_files_only=True)
    model.max_seq_length = spec.max_seq_length
    data = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [b for _, b in pairs]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, warmup_steps=spec.warmup_ratio, seed=spec.seed,
        fp16=precision == "fp16", bf16=precision == "bf16", use_cpu=device == "cpu", save_strategy="no",
        report_to="none", disable_tqdm=True)
    loss = (CachedMultipleNegativesRankingLoss(model, mini_batch_size=spec.mini_batch_size) if spec.mini_batch_size
            else MultipleNegativesRankingLoss(model))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    trainer.remove_callback(PrinterCallback)  # it only prints the final log line
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    model.save(str(out / "model"))
    return {"steps": int(output.global_step), "seconds": round(seconds, 2),
            "pairs_per_s": round(output.global_step * spec.batch_size / seconds, 2)}


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    defaults = TrainingSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", nargs="?", type=Path, metavar="GIT_REPO", help="pairs from this repository's history")
    parser.add_argument("-n", "--pairs", type=int, default=1024, help="pairs (default 1024)")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps (default: one pass, n / batch)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-seq-length", type=int, default=defaults.max_seq_length)
    parser.add_argument("--chars", type=int, default=4000, help="characters of each text (repository pairs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument("--mini-batch-size", type=int, default=0,
                        help="> 0: both sides use CachedMultipleNegativesRankingLoss with this mini-batch "
                             "(large batches in little memory); 0 = MultipleNegativesRankingLoss")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating order (default 2)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser.parse_args()


def main() -> int:
    """Train both ways, print the table and the verdict."""
    args = parse_args()
    configure_logging(args.verbose)
    device = choose_device(args.device)
    precision = resolve_precision(args.precision, device)
    pairs = repo_pairs(args.repo, args.pairs, args.chars) if args.repo else \
        synthetic_pairs(args.pairs, args.max_seq_length, args.seed)
    steps = args.steps or max(1, len(pairs) // args.batch_size)
    spec = TrainingSpec(max_steps=steps, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                        device=device, precision=precision, seed=args.seed, mini_batch_size=args.mini_batch_size)
    base = resolve_model_path("", REPO)
    runs: dict[str, list[dict]] = {"plain": [], "ours": []}
    meter = LoadMeter([os.getpid()])
    with tempfile.TemporaryDirectory(prefix="gremlin-bench-throughput-") as tmp:
        for i in range(args.repeats):
            for side in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
                out = Path(tmp) / f"{side}-{i}"
                run = ours(pairs, spec, base, out) if side == "ours" else plain(pairs, spec, base, out, device, precision)
                logger.info("%s run %d: %s", side, i, run)
                runs[side].append(run)
    other = meter.other_cores()
    best = {side: max(r["pairs_per_s"] for r in found) for side, found in runs.items()}
    ratio = best["ours"] / best["plain"] if best["plain"] else 0.0
    rows = [(LABELS[side], *(f"{r['pairs_per_s']:.1f}" for r in found), f"{best[side]:.1f}")
            for side, found in runs.items()]
    print_table("training throughput (pairs/s)", rows,
                ("trainer", *(f"run {i + 1}" for i in range(args.repeats)), "best"))
    print_table("setup", [("pairs", f"{len(pairs)} {'from ' + str(args.repo) if args.repo else 'synthetic'}"),
                          ("loss", f"CachedMNRL, mini-batch {args.mini_batch_size}" if args.mini_batch_size
                           else "MultipleNegativesRankingLoss"),
                          ("training", f"{steps} steps × batch {args.batch_size}, max_seq_length "
                                       f"{args.max_seq_length}, {device} ({precision})"),
                          ("ratio ours / plain", f"{ratio:.3f} (target >= {TARGET_RATIO})"),
                          ("machine", f"{machine()}; other processes used {other:.2f} CPUs meanwhile"),
                          ("command", " ".join(sys.argv))], ("what", "value"))
    warn_if_disturbed(other)
    if args.json_out:
        args.json_out.write_text(json.dumps({"runs": runs, "best": best, "ratio": round(ratio, 3), "pairs": len(pairs),
                                             "spec": spec.to_dict(), "machine": machine(), "command": sys.argv},
                                            indent=2) + "\n")
    return verdict(ratio >= TARGET_RATIO, f"fine_tune / plain trainer = {ratio:.3f} (target >= {TARGET_RATIO})")


if __name__ == "__main__":
    raise SystemExit(main())
