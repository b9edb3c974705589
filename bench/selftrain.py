"""Self-training on real history: does fine-tuning on a repository's commits improve search?

For each GIT_REPO: walk the first-parent history with Gremlin's `iter_commits` (the newest
--max-commits; merges count as one change against their first parent unless --no-merges),
skip commits whose diff is empty or over --max-diff-bytes, and make pairs (cleaned message
→ diff cut to --chars), cleaned as Gremlin's dataset is (duplicates and trivial pairs
dropped). The oldest 80 % train, the newest 20 % test (`split_chronologically`: no test
text appears in training). Each test message is a query; the corpus is every test diff.

Ranked: BM25 (rank_bm25, code-aware tokens: split on non-word characters, snake_case and
camelCase, lowercased), the base MiniLM, the model Gremlin's `fine_tune` makes from the
training pairs, and hybrid search (reciprocal-rank fusion of BM25 and each dense ranking).
Dense models see diffs as Gremlin embeds them (memory/text.py: file names, hunk context and
changed lines); BM25 ranks the full diff text, as Gremlin's full-text index does.
Reported: MRR@10, Recall@1, Recall@10; training time and pairs/s.

Target (issue 5): on at least two repositories the fine-tuned model beats the base MiniLM
by >= 0.05 MRR@10 and beats BM25, and hybrid search with it beats both.

Example: .venv/bin/python bench/selftrain.py /tmp/bench-repos/click /tmp/bench-repos/requests
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from model loading and saving in the tables

from _common import REPO, LoadMeter, configure_logging, console, machine, print_table, verdict, warn_if_disturbed
from config.errors import GremlinError
from config.settings import TrainingSettings
from memory.fusion import RRF_K, reciprocal_rank_fusion
from memory.vector_store.embedder import Embedder, choose_device, resolve_model_path
from self_training.evaluate import METRICS, dense_rankings, heldout_task, ranking_metrics
from memory.text import embedding_text
from self_training.finetune import TrainingSpec, fine_tune
from self_training.trainer import model_pairs
from self_training.generate_dataset import Pair, clean_pairs, split_chronologically
from self_training.git_history import clean_message, load_commit, log_entries, repository_root

logger = logging.getLogger(__name__)

TARGET_GAIN = 0.05
MIN_REPOS = 2
DEPTH = 100  # each ranking fused by hybrid search is this deep
QUICK = {"max_seq_length": 128, "max_train_pairs": 300, "epochs": 1, "batch_size": 16}
METHODS = ("bm25", "base", "tuned", "hybrid_base", "hybrid_tuned")
LABELS = {"bm25": "BM25 (rank_bm25)", "base": "base MiniLM", "tuned": "fine-tuned MiniLM",
          "hybrid_base": "hybrid: BM25 + base", "hybrid_tuned": "hybrid: BM25 + fine-tuned"}


@dataclass(frozen=True)
class RepoResult:
    """Everything measured on one repository."""

    repo: str
    commits: int
    train_pairs: int
    test_pairs: int
    corpus: int
    metrics: dict[str, dict[str, float]]
    train: dict
    gate: dict


# -- pairs ---------------------------------------------------------------------------------


def history_pairs(repo: Path, max_commits: int, chars: int, max_diff_bytes: int, merges: bool) -> tuple[list[Pair], int]:
    """(cleaned pairs oldest first, commits read) of the newest `max_commits` commits."""
    root = repository_root(repo)
    entries = log_entries(root, merges=merges)[-max_commits:]
    pairs = []
    for entry in entries:
        commit = load_commit(root, entry, max_diff_bytes)
        if commit.diff.strip() and not commit.truncated:
            pairs.append(Pair(clean_message(commit.message)[:chars], commit.diff[:chars], "commit", (), commit.time))
    return clean_pairs(pairs), len(entries)


_IDENTIFIER_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def code_tokens(text: str) -> list[str]:
    """Lowercased words: identifiers split at snake_case and camelCase, the whole kept too."""
    tokens = []
    for word in re.findall(r"[A-Za-z0-9_]+", text):
        parts = [p.lower() for p in _IDENTIFIER_PARTS.findall(word)]
        tokens += parts
        if len(parts) > 1:
            tokens.append(word.lower())
    return tokens


# -- rankings ------------------------------------------------------------------------------


def bm25_rankings(queries: list[str], corpus: list[str], depth: int = DEPTH) -> list[list[int]]:
    """Corpus indices by BM25 score (rank_bm25's BM25Okapi), best first."""
    try:
        from rank_bm25 import BM25Okapi
    except ImportError as exc:
        raise GremlinError("bench/selftrain.py compares with rank-bm25, a benchmark-only dependency: "
                           "install it with `.venv/bin/pip install -e '.[bench]'` (make bench does)") from exc

    index = BM25Okapi([code_tokens(doc) or ["∅"] for doc in corpus])
    return [np.argsort(-index.get_scores(code_tokens(q)), kind="stable")[:depth].tolist() for q in queries]


def dense(embedder: Embedder, queries: list[str], corpus: list[str], depth: int = DEPTH) -> list[list[int]]:
    """Corpus indices by cosine similarity of the model's vectors, best first."""
    return dense_rankings(embedder.encode(queries), embedder.encode(corpus), depth)


def hybrid(lexical: list[list[int]], semantic: list[list[int]]) -> list[list[int]]:
    """Reciprocal-rank fusion of two rankings per query (as Gremlin's hybrid search does)."""
    return [[item for item, _ in reciprocal_rank_fusion([a, b], RRF_K, 10)]
            for a, b in zip(lexical, semantic, strict=True)]


# -- one repository ------------------------------------------------------------------------


def train_spec(args: argparse.Namespace) -> TrainingSpec:
    """The fine-tuning spec: Gremlin's [training] defaults with the command-line overrides."""
    overrides = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "max_seq_length",
                                               "learning_rate", "device", "precision", "seed")}
    return TrainingSpec.from_settings(TrainingSettings(), **overrides)


def measure_repo(repo: Path, args: argparse.Namespace, workdir: Path) -> RepoResult:
    """Pairs, the three rankers and the two hybrids on one repository."""
    pairs, commits = history_pairs(repo, args.max_commits, args.chars, args.max_diff_bytes, args.merges)
    train, test = split_chronologically(pairs, args.test_fraction, 1)
    if args.max_train_pairs:
        train = train[-args.max_train_pairs:]  # the newest: nearest in time to the test pairs
    if len(train) < 2 or len(test) < 2:
        raise GremlinError(f"{repo}: only {len(train)} training and {len(test)} test pairs; "
                           "use a repository with more history or raise --max-commits")
    queries, corpus, relevant = heldout_task([(p.input, p.output) for p in test])
    console.print(f"[bold]{repo}[/]: {commits} commits → {len(train)} train / {len(test)} test pairs, "
                  f"corpus {len(corpus)} diffs", highlight=False)
    spec = train_spec(args)
    base_path = resolve_model_path("", REPO)
    rankings = {"bm25": bm25_rankings(queries, corpus)}
    viewed = [embedding_text(doc) for doc in corpus]  # what Gremlin embeds (memory/text.py)
    base = Embedder(base_path, spec.device, args.encode_batch_size, spec.max_seq_length)
    rankings["base"] = dense(base, queries, viewed)
    del base
    meter = LoadMeter([os.getpid()])
    result = fine_tune(model_pairs(train), spec, base_path, workdir / repo.name,
                       progress=_progress(args.verbose))
    other = meter.other_cores()
    tuned = Embedder(result.path, spec.device, args.encode_batch_size, spec.max_seq_length)
    rankings["tuned"] = dense(tuned, queries, viewed)
    rankings["hybrid_base"] = hybrid(rankings["bm25"], rankings["base"])
    rankings["hybrid_tuned"] = hybrid(rankings["bm25"], rankings["tuned"])
    metrics = {m: ranking_metrics(r, relevant) for m, r in rankings.items()}
    training = {"seconds": result.seconds, "pairs_per_s": result.pairs_per_s, "steps": result.steps,
                "device": result.device, "precision": result.precision, "train_loss": result.train_loss,
                "other_cores_busy": round(other, 2), "spec": spec.to_dict()}
    return RepoResult(str(repo), commits, len(train), len(test), len(corpus), metrics, training, gate(metrics))


def _progress(verbose: bool):
    def report(step: int, total: int, loss: float | None) -> None:
        if verbose:
            logger.info("training step %d/%d loss %s", step, total, loss)
    return report


def gate(metrics: dict[str, dict[str, float]]) -> dict:
    """The issue's target on one repository, each part checked."""
    mrr = {m: metrics[m]["mrr@10"] for m in METHODS}
    checks = {"tuned_beats_base_by_0.05": mrr["tuned"] - mrr["base"] >= TARGET_GAIN,
              "tuned_beats_bm25": mrr["tuned"] > mrr["bm25"],
              "hybrid_beats_both": mrr["hybrid_tuned"] > max(mrr["tuned"], mrr["bm25"])}
    return {**checks, "gain_over_base": round(mrr["tuned"] - mrr["base"], 4), "passed": all(checks.values())}


# -- report --------------------------------------------------------------------------------


def report(results: list[RepoResult], args: argparse.Namespace, seconds: float) -> int:
    """Tables per repository, the gate, and the verdict."""
    for r in results:
        rows = [(LABELS[m], *(f"{r.metrics[m][k]:.4f}" for k in METRICS)) for m in METHODS]
        print_table(Path(r.repo).name, rows, ("ranker", *METRICS))
        t = r.train
        g = r.gate
        print_table(f"{Path(r.repo).name}: training and target", [
            ("history", f"{r.commits} commits: {r.train_pairs} older pairs trained on, {r.test_pairs} newest "
                        f"messages ranked over their {r.corpus} diffs"),
            ("fine-tuning", f"{t['steps']} steps in {t['seconds']:.1f} s, {t['pairs_per_s']:.1f} pairs/s on "
                            f"{t['device']} ({t['precision']}), loss {t['train_loss']}"),
            ("spec", json.dumps(t["spec"], sort_keys=True)),
            ("tuned − base MRR@10 ≥ 0.05", f"{g['gain_over_base']:+.4f} {'yes' if g['tuned_beats_base_by_0.05'] else 'no'}"),
            ("tuned beats BM25", "yes" if g["tuned_beats_bm25"] else "no"),
            ("hybrid (tuned) beats tuned and BM25", "yes" if g["hybrid_beats_both"] else "no"),
        ], ("what", "value"))
        warn_if_disturbed(t["other_cores_busy"])
    console.print(f"{machine()}; total {seconds:.0f} s; command: {' '.join(sys.argv)}", highlight=False)
    passed = [Path(r.repo).name for r in results if r.gate["passed"]]
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": [asdict(r) for r in results], "passed": passed,
                                             "seconds": round(seconds, 1), "machine": machine(),
                                             "command": sys.argv}, indent=2) + "\n")
    return verdict(len(passed) >= MIN_REPOS, f"target met on {len(passed)} of {len(results)} repositories "
                   f"({', '.join(passed) or 'none'}); needed on at least {MIN_REPOS}")


def parse_args() -> argparse.Namespace:
    """Command-line options; unset training options come from --quick, else from [training] defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repos", nargs="+", type=Path, metavar="GIT_REPO", help="git repositories (work trees)")
    parser.add_argument("--max-commits", type=int, default=2000, help="newest commits read (default 2000)")
    parser.add_argument("--chars", type=int, default=4000, help="characters of each diff and message kept "
                        "(default 4000, [memory] memory_chars)")
    parser.add_argument("--max-diff-bytes", type=int, default=262_144, help="skip commits with a larger diff")
    parser.add_argument("--no-merges", dest="merges", action="store_false",
                        help="skip merge commits (default: a merge is one change against its first parent)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="newest share held out (default 0.2)")
    parser.add_argument("--max-train-pairs", type=int, default=None, help="train on the newest N pairs only")
    parser.add_argument("--epochs", type=int, default=None, help="default: [training] epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N steps; 0 = all epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: [training] batch_size")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens per text, for training and for every dense model's encoding")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: [training] learning_rate")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument("--seed", type=int, default=TrainingSettings().seed)
    parser.add_argument("--encode-batch-size", type=int, default=0, help="0 = the device's default")
    parser.add_argument("--quick", action="store_true",
                        help=f"small CPU preset: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return fill_defaults(parser.parse_args())


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Options left unset: the --quick preset's value, else Gremlin's [training] default."""
    defaults = {**asdict(TrainingSettings()), "max_train_pairs": 0}
    for key in ("max_train_pairs", "epochs", "max_steps", "batch_size", "max_seq_length", "learning_rate"):
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick and key in QUICK else defaults[key])
    return args


def main() -> int:
    """Run the benchmark on every repository and print the tables."""
    args = parse_args()
    configure_logging(args.verbose)
    console.print(f"device: {choose_device(args.device)}", highlight=False)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="gremlin-bench-selftrain-") as tmp:
        for repo in args.repos:
            try:
                results.append(measure_repo(repo.expanduser().resolve(), args, Path(tmp)))
            except GremlinError as exc:
                console.print(f"[bold red]error[/] {exc}", highlight=False)
                return 1
    return report(results, args, time.perf_counter() - started)


if __name__ == "__main__":
    raise SystemExit(main())
