"""Full fine-tuning against LoRA ([training] method): time, memory, disk, and what each one learns.

The same commit message → diff pairs of GIT_REPO's history (default: this checkout) are
split by time: the oldest N train, the newest M are held out. Each method then trains the
packaged MiniLM for one epoch through Gremlin's `fine_tune`, each in a fresh subprocess so
its peak RSS (`ru_maxrss`) is its own; methods run back to back in the order given
("other CPUs": CPUs that other processes kept busy meanwhile, i.e. a disturbed timing). Every
model is scored with `evaluate_encoder` (MRR@10, Recall@1, Recall@10) on the held-out pairs,
the base model too. The second table times serving a LoRA model: `Embedder` encodes 64
short texts with the adapter merged into the base weights (`merge_and_unload`) and with
it kept as a separate low-rank path; the best of --repeats runs counts.

Example: .venv/bin/python bench/lora.py /tmp/click --train 200 --heldout 60
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from model loading and saving in the tables

from _common import REPO, configure_logging, machine, machine_busy_s, print_table
from config.settings import TrainingSettings
from memory.vector_store.embedder import Embedder, choose_device, load_sentence_model, resolve_model_path
from self_training.evaluate import evaluate_encoder
from self_training.finetune import TrainingSpec, fine_tune
from train_throughput import repo_pairs

METHODS = ("full", "lora")


def child(spec_json: str, pairs_file: Path, out: Path) -> None:
    """Train one model (in its own process) and print its seconds and peak RSS as JSON."""
    spec = TrainingSpec(**json.loads(spec_json))
    pairs = [tuple(p) for p in json.loads(pairs_file.read_text())]
    started = time.perf_counter()
    result = fine_tune(pairs, spec, resolve_model_path("", REPO), out)
    print(json.dumps({"steps": result.steps, "train_s": result.seconds,
                      "wall_s": round(time.perf_counter() - started, 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def train(spec: TrainingSpec, pairs_file: Path, out: Path) -> dict:
    """Run `child` in a fresh interpreter; its JSON result."""
    command = [sys.executable, __file__, "--child", json.dumps(spec.to_dict()), str(pairs_file), str(out)]
    started, busy, used = time.monotonic(), machine_busy_s(), _children_cpu_s()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"training ({spec.method}) failed:\n{done.stderr[-4000:]}")
    other = (machine_busy_s() - busy) - (_children_cpu_s() - used)  # CPU others took meanwhile
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            "other_cpus": round(max(0.0, other) / (time.monotonic() - started), 2)}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def folder_mib(path: Path) -> float:
    """Disk size of a model folder in MiB."""
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 2)


def scores(path: Path, heldout: list[tuple[str, str]], max_seq_length: int) -> dict[str, float]:
    """Held-out retrieval metrics of the model in `path`."""
    return evaluate_encoder(Embedder(path, device="auto", max_seq_length=max_seq_length).encode, heldout)


def serving_speed(path: Path, repeats: int) -> list[list[object]]:
    """Encode 64 short texts with the LoRA adapter merged and unmerged: best seconds of each."""
    texts = [f"fix the retry limit of worker {i} when the queue is full" for i in range(64)]
    rows = []
    for merge in (True, False):
        model = load_sentence_model(path, choose_device("auto"), merge=merge)
        model.encode(texts[:4])  # warm-up
        best = min(_timed(lambda: model.encode(texts, batch_size=16, normalize_embeddings=True))
                   for _ in range(repeats))
        rows.append(["merged (merge_and_unload)" if merge else "base + adapter (peft)", f"{best * 1000:.0f}",
                     f"{64 / best:.0f}"])
    return rows


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    defaults = TrainingSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", nargs="?", type=Path, default=REPO, metavar="GIT_REPO",
                        help="pairs from this repository's history (default: this checkout)")
    parser.add_argument("--train", type=int, default=200, help="training pairs (default 200)")
    parser.add_argument("--heldout", type=int, default=60, help="held-out pairs (default 60)")
    parser.add_argument("--chars", type=int, default=2000, help="characters of each text kept (default 2000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="full fine-tuning")
    parser.add_argument("--lora-learning-rate", type=float, nargs="+", default=[defaults.lora_learning_rate],
                        help="LoRA, one run each (default: [training] lora_learning_rate)")
    parser.add_argument("--lora-r", type=int, default=defaults.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="serving timing runs (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser.parse_args()


def main() -> int:
    """Train each method, score all models, print the tables."""
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return 0
    args = parse_args()
    configure_logging(args.verbose)
    pairs = repo_pairs(args.repo, args.train + args.heldout, args.chars)
    train_pairs, heldout = pairs[:-args.heldout], pairs[-args.heldout:]
    base = resolve_model_path("", REPO)
    rows = [["base (no training)", "-", "-", "-", "-", "-", "-", *_metrics(scores(base, heldout, args.max_seq_length))]]
    with tempfile.TemporaryDirectory(prefix="gremlin-bench-lora-") as tmp:
        pairs_file = Path(tmp) / "pairs.json"
        pairs_file.write_text(json.dumps(train_pairs))
        for method, lr in runs(args):
            spec = TrainingSpec(method=method, epochs=args.epochs, batch_size=args.batch_size,
                                max_seq_length=args.max_seq_length, learning_rate=lr, lora_learning_rate=lr, device=args.device,
                                lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
            out = Path(tmp) / method
            shutil.rmtree(out, ignore_errors=True)  # the serving table times the last LoRA model
            run = train(spec, pairs_file, out)
            rows.append([f"{method} (lr {lr:g})", run["steps"], run["train_s"], run["wall_s"], run["peak_rss_mib"],
                         folder_mib(out), run["other_cpus"], *_metrics(scores(out, heldout, args.max_seq_length))])
        print_table(f"{len(train_pairs)} train / {len(heldout)} held-out pairs of {args.repo.name}, "
                    f"{args.epochs} epoch, batch {args.batch_size}, max_seq_length {args.max_seq_length}, "
                    f"device {choose_device(args.device)} ({machine()})", rows,
                    ["model", "steps", "train s", "wall s", "peak RSS MiB", "disk MiB", "other CPUs",
                     "MRR@10", "R@1", "R@10"])
        if "lora" in args.methods:
            print_table("serving a LoRA model: 64 short texts, batch 16", serving_speed(Path(tmp) / "lora",
                        args.repeats), ["load", "ms", "texts/s"])
    return 0


def runs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, learning rate) of each training run, in order."""
    lora = [("lora", lr) for lr in args.lora_learning_rate]
    return [run for method in args.methods for run in ([("full", args.learning_rate)] if method == "full" else lora)]


def _metrics(values: dict[str, float]) -> list[str]:
    return [f"{values[k]:.3f}" for k in ("mrr@10", "recall@1", "recall@10")]


if __name__ == "__main__":
    sys.exit(main())
