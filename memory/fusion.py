"""Hybrid search's fusion: one ranking from a lexical and a dense one, by their scores.

A convex combination of normalised scores (Bruch et al., 2023, "An Analysis of Fusion
Functions for Hybrid Retrieval"): each ranking's scores are min-max scaled over the items
it returned (its best 1.0, its last 0.0; an item it did not return counts 0.0), and an item
scores w · dense + (1 − w) · lexical. The fusion weight w in [0, 1] is the dense ranking's
share; the trainer chooses it per model on held-out data (self_training/evaluate.py).

Why not reciprocal-rank fusion (what hybrid search did before): RRF keeps only ranks, so a
tuned model's clear lead (its first hit far above its second) counts no more than a coin
toss between look-alikes. On five real histories (bench/selftrain.py, held-out commit
message → diff) the calibrated convex combination beat the better of dense and lexical on
all five, where calibrated RRF lost to the better part on two.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

EQUAL_WEIGHT = 0.5  # a model never calibrated weighs both rankings alike

Scored = Sequence[tuple[Hashable, float]]


def normalised(ranking: Scored) -> dict[Hashable, float]:
    """Each item's score min-max scaled to [0, 1] over the ranking (1.0 each when all tie)."""
    scores = [s for _, s in ranking if math.isfinite(s)]
    if not scores:
        return dict.fromkeys((item for item, _ in ranking), 1.0)
    low, high = min(scores), max(scores)
    span = high - low
    return {item: ((s - low) / span if span > 0 else 1.0) if math.isfinite(s) else 0.0 for item, s in ranking}


def hybrid_fusion(lexical: Scored, dense: Scored, fusion_weight: float = EQUAL_WEIGHT,
                  limit: int | None = None) -> list[tuple[Hashable, float]]:
    """Hybrid search's fusion of a lexical and a dense ranking of (item, score: higher is
    better), as (item, fused score in [0, 1]) best first; 1.0 = best in both.

    Lexical comes first: on a tie the item that holds the query's words wins, e.g. the
    exact match of a rare identifier over a look-alike.
    """
    if not 0.0 <= fusion_weight <= 1.0:
        raise ValueError(f"fusion weight {fusion_weight} is outside [0, 1]")
    lex, den = normalised(lexical), normalised(dense)
    fused = [(item, (1.0 - fusion_weight) * lex.get(item, 0.0) + fusion_weight * den.get(item, 0.0))
             for item in dict.fromkeys([*lex, *den])]
    fused.sort(key=lambda pair: -pair[1])  # stable: ties keep lexical, then dense order
    return fused if limit is None else fused[:limit]
