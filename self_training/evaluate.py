"""Held-out retrieval metrics and the promotion gate.

Each held-out pair is a query (its `input`) whose one relevant document is its `output`;
the corpus is every distinct output of the held-out set. A model is scored by how high it
ranks the right document: MRR@10 and Recall@1/@10. The gate compares the candidate with
the current model on the same pairs; both sides are pure functions of their inputs.

Hybrid search's fusion weight (memory/fusion.py) is calibrated per model on the same
held-out pairs, split by time: the older half chooses the weight (grid search on hybrid
MRR@10), the newer half reports dense, lexical and hybrid MRR@10 with it, so the reported
number is not the one the weight was fitted to. Ranked and scored as search ranks: dense by
cosine over the model's view of the texts, lexical by SQLite FTS5 BM25 over the full texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np

from memory.fusion import EQUAL_WEIGHT, hybrid_fusion
from memory.service import HYBRID_DEPTH, HYBRID_DEPTH_FACTOR
from memory.store import score_lexically
from memory.text import embedding_text

METRICS = ("mrr@10", "recall@1", "recall@10")
DEPTH = 10
FUSION_DEPTH = max(HYBRID_DEPTH, HYBRID_DEPTH_FACTOR * DEPTH)  # as deep as hybrid search fuses for 10 results
WEIGHT_GRID = tuple(i / 20 for i in range(21))  # 0.0, 0.05, ..., 1.0
T = TypeVar("T")


def ranking_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[int]) -> dict[str, float]:
    """MRR@10, Recall@1 and Recall@10 of ranked corpus indices against each query's answer."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} queries")
    if not rankings:
        return dict.fromkeys(METRICS, 0.0)
    ranks = _ranks(rankings, relevant)
    n = len(ranks)
    return {
        "mrr@10": round(sum(1.0 / r for r in ranks if r) / n, 4),
        "recall@1": round(sum(1 for r in ranks if r == 1) / n, 4),
        "recall@10": round(sum(1 for r in ranks if r) / n, 4),
    }


def _ranks(rankings: Sequence[Sequence[int]], relevant: Sequence[int]) -> list[int]:
    """Each query's 1-based rank of its answer in the top DEPTH, 0 when absent."""
    return [_rank_of(list(r[:DEPTH]), answer) for r, answer in zip(rankings, relevant, strict=True)]


def _rank_of(ranking: list[int], answer: int) -> int:
    """1-based rank of `answer` in `ranking`, 0 when absent."""
    return ranking.index(answer) + 1 if answer in ranking else 0


def dense_rankings(query_vecs: np.ndarray, corpus_vecs: np.ndarray, depth: int = 100) -> list[list[int]]:
    """For each query, corpus indices by descending inner product (cosine for unit vectors)."""
    return [[i for i, _ in ranking] for ranking in dense_scores(query_vecs, corpus_vecs, depth)]


def dense_scores(query_vecs: np.ndarray, corpus_vecs: np.ndarray, depth: int = 100) -> list[list[tuple[int, float]]]:
    """For each query, (corpus index, inner product) best first, `depth` deep."""
    scores = np.asarray(query_vecs, dtype=np.float32) @ np.asarray(corpus_vecs, dtype=np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return [[(int(i), float(row[i])) for i in ranked] for row, ranked in zip(scores, order, strict=True)]


def heldout_task(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str], list[int]]:
    """(queries, corpus of distinct outputs, index of each query's answer in the corpus)."""
    corpus: dict[str, int] = {}
    for _, output in pairs:
        corpus.setdefault(output, len(corpus))
    return [q for q, _ in pairs], list(corpus), [corpus[o] for _, o in pairs]


def evaluate_encoder(encode: Callable[[list[str]], np.ndarray],
                     pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Retrieval metrics of one model (its normalised `encode`) on held-out (input, output) pairs."""
    queries, corpus, relevant = heldout_task(pairs)
    if not queries:
        return dict.fromkeys(METRICS, 0.0)
    rankings = dense_rankings(encode(queries), encode(corpus), DEPTH)
    return ranking_metrics(rankings, relevant)


class TaskRankings(NamedTuple):
    """One retrieval task ranked both ways: (corpus index, score) best first per query, and
    each query's answer."""

    dense: list[list[tuple[int, float]]]
    lexical: list[list[tuple[int, float]]]
    relevant: list[int]

    def ranked(self, side: str) -> list[list[int]]:
        """The corpus indices of one side's rankings ("dense" or "lexical"), best first."""
        return [[i for i, _ in ranking] for ranking in getattr(self, side)]


def split_validation(pairs: Sequence[T]) -> tuple[list[T], list[T]]:
    """(validation, test): the older half of time-ordered held-out pairs, and the newer half."""
    half = len(pairs) // 2
    return list(pairs[:half]), list(pairs[half:])


def fused_rankings(task: TaskRankings, fusion_weight: float) -> list[list[int]]:
    """Hybrid search's ranking of each query (memory/fusion.py), DEPTH deep."""
    return [[int(i) for i, _ in hybrid_fusion(lex, dense, fusion_weight, DEPTH)]
            for lex, dense in zip(task.lexical, task.dense, strict=True)]


def hybrid_mrr(task: TaskRankings, fusion_weight: float) -> float:
    """MRR@10 of hybrid search with `fusion_weight` on one task."""
    return ranking_metrics(fused_rankings(task, fusion_weight), task.relevant)["mrr@10"]


def reciprocal_ranks(rankings: Sequence[Sequence[int]], relevant: Sequence[int]) -> np.ndarray:
    """Each query's 1 / rank of its answer in the top DEPTH (0 when absent): MRR@10 is their mean."""
    return np.array([1.0 / r if r else 0.0 for r in _ranks(rankings, relevant)])


def choose_fusion_weight(task: TaskRankings, grid: Sequence[float] = WEIGHT_GRID) -> float:
    """The grid weight nearest 0.5 whose hybrid MRR@10 is within one standard error (of the
    per-query difference) of the best weight's: a small validation slice moves the weight
    away from equal only as far as it clearly pays (with 30-180 pairs the best weight alone
    did not carry over to the newer half: bench/selftrain.py on five histories)."""
    by_preference = sorted(grid, key=lambda w: abs(w - EQUAL_WEIGHT))  # stable: equal distance keeps grid order
    if not task.relevant:
        return by_preference[0]
    scores = {w: reciprocal_ranks(fused_rankings(task, w), task.relevant) for w in by_preference}
    best = max(by_preference, key=lambda w: round(float(scores[w].mean()), 4))  # first of equal scores
    return next(w for w in by_preference if _within_one_error(scores[best] - scores[w]))


def _within_one_error(gain: np.ndarray) -> bool:
    """Whether a mean per-query gain is at most one standard error of itself (or nothing)."""
    if len(gain) < 2:
        return float(gain.sum()) <= 0
    return float(gain.mean()) <= float(gain.std(ddof=1)) / len(gain) ** 0.5 + 1e-12


def task_rankings(encode: Callable[[list[str]], np.ndarray], pairs: Sequence[tuple[str, str]],
                  depth: int = FUSION_DEPTH) -> TaskRankings:
    """Rank raw (input, output) pairs as search does: dense over the model's view of the texts
    (memory/text.py), lexical (FTS5 BM25) over the full texts."""
    queries, corpus, relevant = heldout_task(pairs)
    if not queries:
        return TaskRankings([], [], [])
    view = encode([embedding_text(t) for t in queries]), encode([embedding_text(t) for t in corpus])
    return TaskRankings(dense_scores(*view, depth), score_lexically(corpus, queries, depth), relevant)


def fusion_report(validation: TaskRankings, test: TaskRankings) -> dict:
    """The weight chosen on `validation` and test MRR@10 of dense, lexical and hybrid search
    (with that weight, and with equal weights): the lineage's `fusion` block."""
    weight = choose_fusion_weight(validation)
    return {"weight": weight, "validation": len(validation.relevant), "test": len(test.relevant),
            "mrr@10": {"dense": ranking_metrics(test.ranked("dense"), test.relevant)["mrr@10"],
                       "lexical": ranking_metrics(test.ranked("lexical"), test.relevant)["mrr@10"],
                       "hybrid": hybrid_mrr(test, weight), "hybrid_equal": hybrid_mrr(test, EQUAL_WEIGHT)}}


def calibrate_fusion(encode: Callable[[list[str]], np.ndarray], pairs: Sequence[tuple[str, str]]) -> dict:
    """`fusion_report` of one model on raw time-ordered held-out (input, output) pairs."""
    validation, test = split_validation(pairs)
    return fusion_report(task_rankings(encode, validation), task_rankings(encode, test))


@dataclass(frozen=True)
class GateDecision:
    """Whether a candidate model may replace the current one, and why."""

    accepted: bool
    gain: float
    reason: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"accepted": self.accepted, "gain": self.gain, "reason": self.reason}


def gate(before: dict[str, float], after: dict[str, float], min_gain: float,
         tolerance: float) -> GateDecision:
    """Accept only if MRR@10 rises by ≥ min_gain and no metric falls by more than tolerance."""
    gain = round(after["mrr@10"] - before["mrr@10"], 4)
    regressed = [f"{m} {before[m]:.4f} → {after[m]:.4f}" for m in METRICS
                 if after[m] < before[m] - tolerance]
    if regressed:
        return GateDecision(False, gain, "regressed beyond tolerance "
                            f"{tolerance}: " + ", ".join(regressed))
    if gain < min_gain:
        return GateDecision(False, gain, f"MRR@10 gain {gain:+.4f} is below min_gain {min_gain}")
    return GateDecision(True, gain, f"MRR@10 {before['mrr@10']:.4f} → {after['mrr@10']:.4f} "
                        f"(gain {gain:+.4f} ≥ {min_gain})")
