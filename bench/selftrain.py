"""Self-training on real history: does fine-tuning on a repository's commits improve search?

For each GIT_REPO: walk the first-parent history with Gremlin's `iter_commits` (the newest
--max-commits; merges count as one change against their first parent unless --no-merges),
skip commits whose diff is empty or over --max-diff-bytes, and make pairs (cleaned message
→ diff cut to --chars), cleaned as Gremlin's dataset is (duplicates and trivial pairs
dropped). The oldest 80 % train, the newest 20 % test (`split_chronologically`: no test
text appears in training). The test pairs are split again by time, as the trainer splits its
held-out pairs (self_training/evaluate.py `split_validation`): the older half chooses hybrid
search's fusion weight for each model, every method is reported on the newer half. Each test
message is a query; the corpus is every diff of its half.

Ranked exactly as the trainer's calibration ranks (evaluate.py `task_rankings`): lexical =
Gremlin's own full-text search (SQLite FTS5 BM25, memories_fts's tokenizer) over the full diff
text; dense = the base MiniLM and the model Gremlin's `fine_tune` makes from the training
pairs, over diffs as Gremlin embeds them (memory/text.py); hybrid = hybrid search's fusion of
the two (memory/fusion.py: a convex combination of min-max-normalised scores), with equal
weights and with the weight calibrated on the older half.
Reported: MRR@10, Recall@1, Recall@10; the weights; training time and pairs/s; the gain's 95 %
paired bootstrap interval; and a closing table of every repository with the mean gain over all of
them (each repository weighted equally, its queries resampled on their own).

Target (issue 5): on at least two repositories the fine-tuned model beats the base MiniLM
by >= 0.05 MRR@10 and beats BM25, and hybrid search with it beats both. Issue 13: hybrid
with the calibrated weight is at least as good as the better of tuned dense and BM25.

With --branches (issue 13) the training pairs also hold the commits merges brought, dated when
they landed, while the test pairs stay the first-parent ones: both modes are judged on the
same test. --save-pairs DIR keeps each repository's pairs (both modes) as DIR/<name>.json,
which can stand in for the repository elsewhere; --spec KEY=VALUE sets any training spec field.

Example: .venv/bin/python bench/selftrain.py /tmp/bench-repos/click /tmp/bench-repos/requests
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
from memory.fusion import EQUAL_WEIGHT
from memory.text import embedding_text
from memory.vector_store.embedder import Embedder, choose_device, resolve_model_path
from self_training.evaluate import (METRICS, TaskRankings, choose_fusion_weight, fused_rankings, heldout_task,
                                    ranking_metrics, reciprocal_ranks, split_validation, task_rankings)
from self_training.finetune import TrainingSpec, fine_tune
from self_training.trainer import model_pairs
from self_training.generate_dataset import Pair, clean_pairs, split_chronologically, with_file_pairs
from self_training.git_history import (clean_message, load_commit, range_shas, read_log, repository_root,
                                       with_branches)

logger = logging.getLogger(__name__)

TARGET_GAIN = 0.05
MIN_REPOS = 2
QUICK = {"max_seq_length": 128, "max_train_pairs": 300, "epochs": 1, "batch_size": 16}
METHODS = ("bm25", "base", "tuned", "hybrid_base", "hybrid_tuned", "hybrid_tuned_calibrated")
LABELS = {"bm25": "BM25 (Gremlin's FTS5)", "base": "base MiniLM", "tuned": "fine-tuned MiniLM",
          "hybrid_base": "hybrid: BM25 + base (equal)", "hybrid_tuned": "hybrid: BM25 + fine-tuned (equal)",
          "hybrid_tuned_calibrated": "hybrid: BM25 + fine-tuned (calibrated)"}


@dataclass(frozen=True)
class RepoResult:
    """Everything measured on one repository."""

    repo: str
    commits: int
    train_pairs: int
    test_pairs: int
    validation_pairs: int
    corpus: int
    weights: dict[str, float]
    metrics: dict[str, dict[str, float]]
    train: dict
    gate: dict
    reciprocal: dict[str, list[float]]  # per test query, tuned and base: the gain's bootstrap input


# -- pairs ---------------------------------------------------------------------------------


def history_pairs(repo: Path, max_commits: int, chars: int, max_diff_bytes: int, merges: bool,
                  branches: bool = False) -> tuple[list[Pair], int]:
    """(cleaned pairs oldest first, commits read) of the newest `max_commits` commits; with
    `branches`, the commits merges brought as well, dated when they landed (replay's rule)."""
    if repo.suffix == ".json":  # pairs saved by --save-pairs (a machine without the repository)
        saved = json.loads(repo.read_text(encoding="utf-8"))["branches" if branches else "first_parent"]
        pairs = [Pair(p["input"], p["output"], "commit", (), p["time"]) for p in saved["pairs"]]
        return clean_pairs(pairs), saved["commits"]  # saved by an older version: today's rules apply
    root = repository_root(repo)
    history = read_log(root, range_shas(root, merges=merges or branches))
    entries = (with_branches(root, history, merges) if branches else history).entries[-max_commits:]
    pairs = []
    for entry in entries:
        commit = load_commit(root, entry, max_diff_bytes)
        if commit.diff.strip() and not commit.truncated:
            pairs.append(Pair(clean_message(commit.message)[:chars], commit.diff[:chars], "commit", (), commit.time))
    return clean_pairs(pairs), len(entries)


def split_pairs(repo: Path, args: argparse.Namespace) -> tuple[list[Pair], list[Pair], int]:
    """(train, test, commits read). The test pairs are always the newest of the first-parent
    history; with --branches the training pairs are every pair (branch commits included)
    that landed before the first test pair, so both modes are judged on the same test."""
    pairs, commits = history_pairs(repo, args.max_commits, args.chars, args.max_diff_bytes, args.merges)
    saved = {"first_parent": {"commits": commits, "pairs": [asdict(p) for p in pairs]}}
    train, test = split_chronologically(pairs, args.test_fraction, 1)
    if args.branches:
        more, commits = history_pairs(repo, args.max_commits, args.chars, args.max_diff_bytes, args.merges, True)
        saved["branches"] = {"commits": commits, "pairs": [asdict(p) for p in more]}
        cutoff, tested = min(p.time for p in test), {p.output for p in test} | {p.input for p in test}
        train = [p for p in more if p.time < cutoff and p.output not in tested and p.input not in tested]
    if args.save_pairs:
        args.save_pairs.mkdir(parents=True, exist_ok=True)
        (args.save_pairs / f"{_name(repo)}.json").write_text(json.dumps(saved), encoding="utf-8")
    return train, test, commits


def _name(repo: Path) -> str:
    return repo.stem if repo.suffix == ".json" else repo.name


# -- rankings ------------------------------------------------------------------------------


def ranked_halves(path: Path, args: argparse.Namespace, spec: TrainingSpec,
                  validation: list[tuple[str, str]], test: list[tuple[str, str]]) -> tuple[TaskRankings, TaskRankings]:
    """Both halves ranked by one model (dense) and by FTS5 (lexical), as the trainer ranks them."""
    model = Embedder(path, spec.device, args.encode_batch_size, spec.max_seq_length)
    return task_rankings(model.encode, validation), task_rankings(model.encode, test)


def dump_views(path: Path, models: dict[str, Path], args: argparse.Namespace, spec: TrainingSpec,
               validation: list[tuple[str, str]], test: list[tuple[str, str]]) -> None:
    """Each model's vectors of both halves' queries and corpora (float16), to study fusion offline."""
    arrays = {}
    for name, model_path in models.items():
        encode = Embedder(model_path, spec.device, args.encode_batch_size, spec.max_seq_length).encode
        for half, pairs in (("validation", validation), ("test", test)):
            queries, corpus, relevant = heldout_task(pairs)
            arrays[f"{name}_{half}_queries"] = encode([embedding_text(t) for t in queries]).astype(np.float16)
            arrays[f"{name}_{half}_corpus"] = encode([embedding_text(t) for t in corpus]).astype(np.float16)
            arrays[f"{half}_relevant"] = np.array(relevant)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


# -- one repository ------------------------------------------------------------------------


def train_spec(args: argparse.Namespace) -> TrainingSpec:
    """The fine-tuning spec: Gremlin's [training] defaults with the command-line overrides."""
    overrides = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "max_seq_length",
                                               "learning_rate", "device", "precision", "seed")}
    for item in args.spec:  # KEY=VALUE, typed like the spec's field
        key, _, value = item.partition("=")
        if key not in TrainingSpec.__dataclass_fields__:
            raise GremlinError(f"--spec {item}: {key!r} is not a training spec field")
        default = getattr(TrainingSpec(), key)
        overrides[key] = (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(value)
    return TrainingSpec.from_settings(TrainingSettings(), **overrides)


def measure_repo(repo: Path, args: argparse.Namespace, workdir: Path) -> RepoResult:
    """Pairs, the three rankers and the three hybrids on one repository."""
    train, test, commits = split_pairs(repo, args)
    if args.max_train_pairs:
        train = train[-args.max_train_pairs:]  # the newest: nearest in time to the test pairs
    if len(train) < 2 or len(test) < 4:  # two test pairs per half at least
        raise GremlinError(f"{repo}: only {len(train)} training and {len(test)} test pairs; "
                           "use a repository with more history or raise --max-commits")
    validation, reported = split_validation([(p.input, p.output) for p in test])
    corpus = len({output for _, output in reported})
    console.print(f"[bold]{repo}[/]: {commits} commits → {len(train)} train / {len(test)} test pairs "
                  f"({len(validation)} choose the fusion weight, {len(reported)} report over {corpus} diffs)",
                  highlight=False)
    spec = train_spec(args)
    base_path = resolve_model_path("", REPO)
    base_val, base_test = ranked_halves(base_path, args, spec, validation, reported)
    meter = LoadMeter([os.getpid()])
    result = fine_tune(model_pairs(with_file_pairs(train) if spec.file_pairs else train), spec, base_path,
                       workdir / _name(repo), progress=_progress(args.verbose))
    other = meter.other_cores()
    tuned_val, tuned_test = ranked_halves(result.path, args, spec, validation, reported)
    if args.dump:
        dump_views(args.dump / f"{_name(repo)}.npz", {"base": base_path, "tuned": result.path}, args, spec,
                   validation, reported)
    weights = {"base": choose_fusion_weight(base_val), "tuned": choose_fusion_weight(tuned_val)}
    rankings = {"bm25": tuned_test.ranked("lexical"), "base": base_test.ranked("dense"),
                "tuned": tuned_test.ranked("dense"),
                "hybrid_base": fused_rankings(base_test, EQUAL_WEIGHT),
                "hybrid_tuned": fused_rankings(tuned_test, EQUAL_WEIGHT),
                "hybrid_tuned_calibrated": fused_rankings(tuned_test, weights["tuned"])}
    metrics = {m: ranking_metrics(r, tuned_test.relevant) for m, r in rankings.items()}
    training = {"seconds": result.seconds, "pairs_per_s": result.pairs_per_s, "steps": result.steps,
                "device": result.device, "precision": result.precision, "train_loss": result.train_loss,
                "other_cores_busy": round(other, 2), "spec": spec.to_dict()}
    reciprocal = {m: reciprocal_ranks(rankings[m], tuned_test.relevant) for m in ("tuned", "base")}
    interval = gain_interval([reciprocal["tuned"] - reciprocal["base"]], args.seed)
    return RepoResult(str(repo), commits, len(train), len(reported), len(validation), corpus, weights, metrics,
                      training, {**gate(metrics), "gain_95ci": interval},
                      {m: [round(float(x), 6) for x in r] for m, r in reciprocal.items()})


def gain_interval(differences: list[np.ndarray], seed: int, draws: int = 2000) -> tuple[float, float]:
    """95 % paired bootstrap interval of the mean gain (tuned − base per test query) over
    repositories weighted equally, resampling each one's queries on its own (one repository:
    how far a test half of a few dozen queries pins its gain down)."""
    differences = [d for d in differences if len(d)]
    if not differences:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.mean([d[rng.integers(0, len(d), size=(draws, len(d)))].mean(axis=1) for d in differences], axis=0)
    return round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)


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
              "hybrid_beats_both": mrr["hybrid_tuned_calibrated"] > max(mrr["tuned"], mrr["bm25"])}
    return {**checks, "gain_over_base": round(mrr["tuned"] - mrr["base"], 4), "passed": all(checks.values())}


# -- report --------------------------------------------------------------------------------


def report(results: list[RepoResult], args: argparse.Namespace, seconds: float) -> int:
    """Tables per repository, the gate, and the verdict."""
    for r in results:
        rows = [(LABELS[m], *(f"{r.metrics[m][k]:.4f}" for k in METRICS)) for m in METHODS]
        print_table(_name(Path(r.repo)), rows, ("ranker", *METRICS))
        t = r.train
        g = r.gate
        print_table(f"{_name(Path(r.repo))}: training and target", [
            ("history", f"{r.commits} commits: {r.train_pairs} older pairs trained on; of the newest, "
                        f"{r.validation_pairs} chose the fusion weight, {r.test_pairs} ranked over their {r.corpus} diffs"),
            ("fusion weight (dense share)", f"tuned {r.weights['tuned']:.2f}, base {r.weights['base']:.2f} "
                                            "(0.5 = equal)"),
            ("fine-tuning", f"{t['steps']} steps in {t['seconds']:.1f} s, {t['pairs_per_s']:.1f} pairs/s on "
                            f"{t['device']} ({t['precision']}), loss {t['train_loss']}"),
            ("spec", json.dumps(t["spec"], sort_keys=True)),
            ("tuned − base MRR@10 ≥ 0.05", f"{g['gain_over_base']:+.4f} {'yes' if g['tuned_beats_base_by_0.05'] else 'no'}"
                                           f" (95 % interval {g['gain_95ci'][0]:+.3f} … {g['gain_95ci'][1]:+.3f}, "
                                           f"{r.test_pairs} queries)"),
            ("tuned beats BM25", "yes" if g["tuned_beats_bm25"] else "no"),
            ("hybrid (tuned, calibrated) beats tuned and BM25", "yes" if g["hybrid_beats_both"] else "no"),
        ], ("what", "value"))
        warn_if_disturbed(t["other_cores_busy"])
    summary(results, args.seed)
    console.print(f"{machine()}; total {seconds:.0f} s; command: {' '.join(sys.argv)}", highlight=False)
    passed = [_name(Path(r.repo)) for r in results if r.gate["passed"]]
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": [asdict(r) for r in results], "passed": passed,
                                             "seconds": round(seconds, 1), "machine": machine(),
                                             "command": sys.argv}, indent=2) + "\n")
    return verdict(len(passed) >= MIN_REPOS, f"target met on {len(passed)} of {len(results)} repositories "
                   f"({', '.join(passed) or 'none'}); needed on at least {MIN_REPOS}")


def summary(results: list[RepoResult], seed: int) -> None:
    """One row per repository and the mean gain over all of them, with its 95 % interval."""
    rows = []
    for r in results:
        mrr = {m: r.metrics[m]["mrr@10"] for m in METHODS}
        low, high = r.gate["gain_95ci"]
        rows.append((_name(Path(r.repo)), r.train_pairs, r.test_pairs, f"{mrr['bm25']:.3f}", f"{mrr['base']:.3f}",
                     f"{mrr['tuned']:.3f} ({mrr['tuned'] - mrr['base']:+.3f})", f"{low:+.3f} … {high:+.3f}",
                     f"{mrr['hybrid_tuned_calibrated']:.3f} ({r.weights['tuned']:.2f})",
                     "yes" if mrr["hybrid_tuned_calibrated"] >= max(mrr["tuned"], mrr["bm25"]) else "no"))
    if len(results) > 1:
        gains = [np.array(r.reciprocal["tuned"]) - np.array(r.reciprocal["base"]) for r in results]
        low, high = gain_interval(gains, seed)
        rows.append((f"mean of {len(results)}", "", sum(r.test_pairs for r in results), "", "",
                     f"({np.mean([g.mean() for g in gains if len(g)]):+.3f})", f"{low:+.3f} … {high:+.3f}", "", ""))
    print_table("all repositories: MRR@10 of the newer test half", rows,
                ("repository", "train pairs", "queries", "BM25", "base", "tuned (gain)", "gain 95 % interval",
                 "hybrid calibrated (w)", "hybrid ≥ better part"))


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
    parser.add_argument("--branches", action="store_true",
                        help="also the commits merges brought, dated when they landed ([training] replay_branches)")
    parser.add_argument("--save-pairs", type=Path, default=None, metavar="DIR",
                        help="write each repository's cleaned pairs to DIR/<name>.json; pass such a file "
                             "instead of a repository to run where the repository is not (e.g. a GPU machine)")
    parser.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE",
                        help="set any training spec field (e.g. min_steps=40, method=lora); repeatable")
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
    parser.add_argument("--dump", type=Path, default=None, metavar="DIR",
                        help="write base and tuned vectors of the held-out halves to DIR/<name>.npz")
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
