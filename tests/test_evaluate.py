"""Held-out metrics and the promotion gate, pure and on real MiniLM embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from self_training.evaluate import dense_rankings, evaluate_encoder, gate, heldout_task, ranking_metrics

PAIRS = [
    ("retry the upload when the network drops", "+ for attempt in range(3):\n+     upload(chunk)"),
    ("parse dates in ISO format", "+ return datetime.fromisoformat(text)"),
    ("close the database connection on exit", "+ atexit.register(conn.close)"),
    ("log a warning for a missing config key", "+ logger.warning('missing key %s', key)"),
    ("sort search results by score", "+ hits.sort(key=lambda h: h.score, reverse=True)"),
]


def test_ranking_metrics_counts_ranks():
    rankings = [[0, 1, 2], [2, 1, 0], [2, 0, 1], [5, 6, 7]]
    m = ranking_metrics(rankings, [0, 1, 1, 1])
    assert m["recall@1"] == 0.25                       # only the first query has its answer on top
    assert m["recall@10"] == 0.75                      # the last never finds it
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 1 / 3) / 4, abs=1e-4)


def test_ranking_metrics_ignores_ranks_beyond_ten():
    assert ranking_metrics([list(range(20))], [12])["recall@10"] == 0.0


def test_heldout_task_shares_one_corpus_entry_per_distinct_output():
    queries, corpus, relevant = heldout_task([("a", "x"), ("b", "y"), ("c", "x")])
    assert queries == ["a", "b", "c"] and corpus == ["x", "y"] and relevant == [0, 1, 0]


def test_dense_rankings_orders_by_similarity():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    c = np.array([[0.0, 1.0], [0.9, 0.1], [0.6, 0.8]], dtype=np.float32)
    assert dense_rankings(q, c) == [[1, 2, 0], [0, 2, 1]]


def test_gate_accepts_a_real_gain_and_rejects_small_gains_and_regressions():
    before = {"mrr@10": 0.50, "recall@1": 0.40, "recall@10": 0.80}
    better = {"mrr@10": 0.56, "recall@1": 0.47, "recall@10": 0.80}
    assert gate(before, better, min_gain=0.05, tolerance=0.01).accepted
    tiny = {"mrr@10": 0.51, "recall@1": 0.40, "recall@10": 0.80}
    decision = gate(before, tiny, min_gain=0.05, tolerance=0.01)
    assert not decision.accepted and "below min_gain" in decision.reason
    lopsided = {"mrr@10": 0.60, "recall@1": 0.50, "recall@10": 0.70}   # R@10 falls by 0.10
    decision = gate(before, lopsided, min_gain=0.05, tolerance=0.01)
    assert not decision.accepted and "recall@10" in decision.reason


def test_real_model_is_scored_and_a_shuffled_encoder_scores_worse(embedder):
    good = evaluate_encoder(embedder.encode, PAIRS)
    assert good["recall@10"] == 1.0 and good["mrr@10"] > 0.6

    rng = np.random.default_rng(7)

    def scrambled(texts):                      # an encoder that lost all meaning
        v = rng.normal(size=(len(texts), 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    bad = evaluate_encoder(scrambled, PAIRS)
    assert gate(bad, good, 0.05, 0.01).accepted        # the real model would replace noise
    assert not gate(good, bad, 0.05, 0.01).accepted    # and noise never replaces it
