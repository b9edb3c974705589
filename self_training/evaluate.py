"""Held-out retrieval metrics and the promotion gate.

Each held-out pair is a query (its `input`) whose one relevant document is its `output`;
the corpus is every distinct output of the held-out set. A model is scored by how high it
ranks the right document: MRR@10 and Recall@1/@10. The gate compares the candidate with
the current model on the same pairs; both sides are pure functions of their inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("mrr@10", "recall@1", "recall@10")
DEPTH = 10


def ranking_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[int]) -> dict[str, float]:
    """MRR@10, Recall@1 and Recall@10 of ranked corpus indices against each query's answer."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} queries")
    if not rankings:
        return dict.fromkeys(METRICS, 0.0)
    ranks = [_rank_of(list(r[:DEPTH]), answer) for r, answer in zip(rankings, relevant, strict=True)]
    n = len(ranks)
    return {
        "mrr@10": round(sum(1.0 / r for r in ranks if r) / n, 4),
        "recall@1": round(sum(1 for r in ranks if r == 1) / n, 4),
        "recall@10": round(sum(1 for r in ranks if r) / n, 4),
    }


def _rank_of(ranking: list[int], answer: int) -> int:
    """1-based rank of `answer` in `ranking`, 0 when absent."""
    return ranking.index(answer) + 1 if answer in ranking else 0


def dense_rankings(query_vecs: np.ndarray, corpus_vecs: np.ndarray, depth: int = 100) -> list[list[int]]:
    """For each query, corpus indices by descending inner product (cosine for unit vectors)."""
    scores = np.asarray(query_vecs, dtype=np.float32) @ np.asarray(corpus_vecs, dtype=np.float32).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :depth].tolist()


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
