"""Reciprocal-rank fusion: one ranking from several (dense and lexical search).

RRF (Cormack et al., 2009) scores an item by the sum of 1 / (k + rank) over the rankings
it appears in; it needs no score calibration between BM25 and cosine similarity. Weighted
RRF multiplies each ranking's terms by its weight. Hybrid search has one knob, the fusion
weight w in [0, 1]: the dense ranking's share, the lexical ranking getting 1 - w. The
trainer chooses w per model on held-out data (self_training/evaluate.py): a tuned model
often ranks better than BM25, and equal weights would let BM25 drag it down.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

RRF_K = 60
EQUAL_WEIGHT = 0.5  # a model never calibrated fuses its rankings as plain (unweighted) RRF


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = RRF_K,
                           limit: int | None = None,
                           weights: Sequence[float] | None = None) -> list[tuple[Hashable, float]]:
    """(item, fused score) best first; each ranking lists items best first, `weights` (default
    all 1) multiply each ranking's terms. Items with equal scores keep the order of the ranking
    they first appear in (earlier rankings win ties)."""
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    scores: dict[Hashable, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    fused = sorted(scores.items(), key=lambda pair: -pair[1])  # stable: ties keep first-seen order
    return fused if limit is None else fused[:limit]


def hybrid_weights(fusion_weight: float) -> tuple[float, float]:
    """(lexical, dense) RRF weights for a dense share w: 2(1 - w) and 2w, so w = 0.5 is plain RRF."""
    if not 0.0 <= fusion_weight <= 1.0:
        raise ValueError(f"fusion weight {fusion_weight} is outside [0, 1]")
    return 2.0 * (1.0 - fusion_weight), 2.0 * fusion_weight


def hybrid_fusion(lexical: Sequence[Hashable], dense: Sequence[Hashable], fusion_weight: float = EQUAL_WEIGHT,
                  k: int = RRF_K, limit: int | None = None) -> list[tuple[Hashable, float]]:
    """Hybrid search's fusion of a lexical and a dense ranking, (item, score) best first.

    Lexical comes first: on a tie (say first in one list each) the item that holds the
    query's words wins, e.g. the exact match of a rare identifier over a look-alike.
    """
    return reciprocal_rank_fusion([lexical, dense], k, limit, hybrid_weights(fusion_weight))
