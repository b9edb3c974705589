"""Reciprocal-rank fusion: one ranking from several (dense and lexical search).

RRF (Cormack et al., 2009) scores an item by the sum of 1 / (k + rank) over the rankings
it appears in; it needs no score calibration between BM25 and cosine similarity.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

RRF_K = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = RRF_K,
                           limit: int | None = None) -> list[tuple[Hashable, float]]:
    """(item, fused score) best first; each ranking lists items best first. Items with equal
    scores keep the order of the ranking they first appear in (earlier rankings win ties)."""
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    fused = sorted(scores.items(), key=lambda pair: -pair[1])  # stable: ties keep first-seen order
    return fused if limit is None else fused[:limit]
