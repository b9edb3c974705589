"""Hybrid search's fusion: normalised scores combined by a weight, the weight chosen per model
on held-out data, kept in the models table (migrations 7 and 8), used by search, overridable
in the config, shown by `gremlin models`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_core import cli
from agent_core.cli import main
from config.errors import ConfigError
from config.settings import load_settings
from memory.fusion import hybrid_fusion, normalised
from memory.service import Memory
from memory.store import MIGRATIONS, SCHEMA_VERSION, Store, rank_lexically, score_lexically, utc_now
from self_training.evaluate import (TaskRankings, calibrate_fusion, choose_fusion_weight, hybrid_mrr,
                                    split_validation)
from tests.conftest import write_config

IDENTIFIER = "FLAG_ZQKV_ENABLED"
# Lexical search finds IDENTIFIER only in the invoice diff; MiniLM prefers its look-alikes.
LOOKALIKES = [f"modified flags{n}.py\n+FLAG_ZQKV{n}X_ENABLED = True" for n in range(8)]
TARGET = ("modified billing/invoice.py\n+def total(lines):\n+    subtotal = sum(l.price * l.qty for l in lines)\n"
          "+    return round(subtotal * VAT_RATE, 2)  # see FLAG_ZQKV_ENABLED\n")


def scored(ranking):
    """A ranking of items as (item, score): 1.0 for the first, 0.1 less for each next."""
    return [(item, 1.0 - 0.1 * rank) for rank, item in enumerate(ranking)]


def task(dense, lexical, relevant) -> TaskRankings:
    return TaskRankings([scored(r) for r in dense], [scored(r) for r in lexical], relevant)


# -- the fusion: normalised scores, combined ----------------------------------------------


def test_scores_are_min_max_normalised_and_combined_by_the_weight():
    lexical = [("a", 12.0), ("b", 7.0), ("c", 2.0)]           # BM25: a 1.0, b 0.5, c 0.0
    dense = [("b", 0.9), ("d", 0.5), ("a", 0.4)]              # cosine: b 1.0, d 0.2, a 0.0
    assert normalised(lexical) == {"a": 1.0, "b": 0.5, "c": 0.0}
    fused = dict(hybrid_fusion(lexical, dense, 0.5))
    assert fused == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.0, "d": 0.1})
    assert [i for i, _ in hybrid_fusion(lexical, dense, 0.5)] == ["b", "a", "d", "c"]
    assert hybrid_fusion(lexical, dense, 0.5, limit=2) == hybrid_fusion(lexical, dense, 0.5)[:2]
    assert dict(hybrid_fusion(lexical, dense, 0.8))["b"] == pytest.approx(0.2 * 0.5 + 0.8)


def test_one_match_or_equal_scores_count_as_best_and_the_best_in_both_scores_one():
    assert normalised([("x", 3.0)]) == {"x": 1.0}
    assert normalised([("x", 0.0), ("y", 0.0)]) == {"x": 1.0, "y": 1.0}
    assert normalised([("x", float("nan")), ("y", 2.0), ("z", 1.0)]) == {"x": 0.0, "y": 1.0, "z": 0.0}
    assert normalised([]) == {} and hybrid_fusion([], [], 0.5) == []
    assert hybrid_fusion([("x", 5.0), ("y", 1.0)], [("x", 0.7), ("y", 0.1)], 0.3)[0] == ("x", 1.0)


def test_a_tie_goes_to_the_lexical_ranking():
    fused = hybrid_fusion([("x", 2.0), ("y", 1.0)], [("y", 0.9), ("x", 0.1)], 0.5)
    assert [i for i, _ in fused] == ["x", "y"] and fused[0][1] == fused[1][1] == 0.5


def test_weight_one_gives_the_dense_order_and_zero_the_lexical_order():
    lexical, dense = scored(["a", "b", "c", "d"]), scored(["d", "e", "c", "a"])
    assert [i for i, _ in hybrid_fusion(lexical, dense, 1.0)][:len(dense)] == [i for i, _ in dense]
    assert [i for i, _ in hybrid_fusion(lexical, dense, 0.0)][:len(lexical)] == [i for i, _ in lexical]
    assert [i for i, _ in hybrid_fusion(lexical, dense, 0.5)][:2] != ["d", "e"]  # equal weights differ
    with pytest.raises(ValueError):
        hybrid_fusion(lexical, dense, 1.5)


def test_a_clear_dense_lead_outweighs_a_close_lexical_one_where_ranks_alone_would_tie():
    # Lexical puts a decoy a hair above the answer; dense puts the answer far above the decoy.
    # Ranks alone (reciprocal-rank fusion) see first-and-second against second-and-first: a tie,
    # which the decoy won. Scores see the margins.
    lexical = [("decoy", 10.0), ("answer", 9.9), ("other", 1.0)]
    dense = [("answer", 0.9), ("decoy", 0.2), ("other", 0.1)]
    assert hybrid_fusion(lexical, dense, 0.5)[0][0] == "answer"


# -- choosing the weight -------------------------------------------------------------------


def test_grid_search_beats_equal_weights_when_dense_is_right_and_lexical_wrong():
    # Query q's answer is document q: dense ranks it first, lexical ranks it third behind two decoys
    # that dense ranks second, so equal weights put a decoy first.
    dense = [[q, (q + 1) % 4, (q + 2) % 4, (q + 3) % 4] for q in range(4)]
    lexical = [[(q + 1) % 4, (q + 2) % 4, q] for q in range(4)]
    ranked = task(dense, lexical, [0, 1, 2, 3])
    weight = choose_fusion_weight(ranked)
    assert weight > 0.5
    assert hybrid_mrr(ranked, weight) == 1.0 > hybrid_mrr(ranked, 0.5)


def test_a_gain_of_one_query_in_many_does_not_move_the_weight():
    # 20 queries: on one, dense is right and lexical wrong (a higher weight would win it); on
    # the others both agree. The best weight gains 1 query of 20: not beyond its standard error.
    dense = [[q, (q + 1) % 20, (q + 2) % 20] for q in range(20)]
    lexical = [[(q + 1) % 20, (q + 2) % 20, q] if q == 0 else [q, (q + 1) % 20] for q in range(20)]
    ranked = task(dense, lexical, list(range(20)))
    assert hybrid_mrr(ranked, 1.0) > hybrid_mrr(ranked, 0.5)
    assert choose_fusion_weight(ranked) == 0.5
    clear = task(dense, [[(q + 1) % 20, (q + 2) % 20, q] for q in range(20)], list(range(20)))
    assert choose_fusion_weight(clear) > 0.5  # dense right on every query: it moves


def test_ties_go_to_equal_weights():
    same = [[0, 1, 2], [1, 0, 2], [2, 1, 0]]
    assert choose_fusion_weight(task(same, same, [0, 1, 2])) == 0.5
    assert choose_fusion_weight(TaskRankings([], [], [])) == 0.5


def test_validation_is_the_older_half_and_test_the_newer():
    assert split_validation([1, 2, 3, 4, 5]) == ([1, 2], [3, 4, 5])
    assert split_validation([]) == ([], [])


def test_calibration_of_the_real_minilm_reports_every_method(embedder):
    pairs = [(f"Add the {t} handler", f"diff --git a/{t}.py b/{t}.py\n@@ -0,0 +1 @@\n+def handle_{t}(): pass")
             for t in ("parser", "cache", "upload", "retry", "logging", "config", "socket", "billing")]
    report = calibrate_fusion(embedder.encode, pairs)
    assert report["validation"] == 4 and report["test"] == 4 and 0 <= report["weight"] <= 1
    assert set(report["mrr@10"]) == {"dense", "lexical", "hybrid", "hybrid_equal"}
    assert report["mrr@10"]["lexical"] == 1.0  # each message names its file's one topic word


# -- lexical ranking of a held-out corpus ------------------------------------------------------


def test_rank_lexically_ranks_as_lexical_search_does(store):
    corpus = ["fix the retry loop in the uploader", "upload handlers retry with backoff",
              "rename the parser module", "cache invalidation for uploads"]
    for text in corpus:
        store.add_memory("code_diff", text)
    queries = ["retry the upload handler", "parser", "nothing matches zzz", ""]
    ranked = rank_lexically(corpus, queries, 10)
    assert ranked[0][0] == 1  # holds "upload", "handler" and "retry" (porter stems)
    assert ranked[1] == [2] and ranked[2] == [] and ranked[3] == []
    for query, ranking in zip(queries, score_lexically(corpus, queries, 10), strict=True):
        assert [(i - 1, score) for i, score in store.lexical_search(query, 10)] == ranking


# -- the weight in the models table, and search ------------------------------------------------


def test_migrations_7_and_8_keep_models_and_leave_them_uncalibrated(tmp_path: Path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:7]:
        conn.executescript(script)
    conn.execute("INSERT INTO models (id, path, created, status, lineage, fusion_weight)"
                 " VALUES ('m1', '/m1', ?, 'current', '{}', 0.8)", (utc_now(),))  # an RRF weight
    conn.execute("PRAGMA user_version=7")
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        assert SCHEMA_VERSION == 8
        model = store.get_model("m1")
        assert model["status"] == "current" and model["fusion_weight"] is None  # fuses equally now
        assert store.model_fusion_weight("m1") is None and store.model_fusion_weight("nope") is None
        store.register_model("m2", "/m2", "accepted", {}, fusion_weight=0.8)
        assert store.model_fusion_weight("m2") == 0.8
    finally:
        store.close()


def _memory_with_lookalikes(settings, store, embedder) -> Memory:
    memory = Memory(settings, store, embedder)
    for text in [*LOOKALIKES, TARGET]:
        memory.embed_memories([(store.add_memory("code_diff", text), text)])
    return memory


def test_search_uses_the_current_models_stored_weight(settings, store, embedder):
    store.register_model(embedder.model_id, str(embedder.path), "current", {}, fusion_weight=1.0)
    memory = _memory_with_lookalikes(settings, store, embedder)
    assert memory.fusion_weight == 1.0
    dense = [(h.id, h.score) for h in memory.search(IDENTIFIER, k=50, mode="dense")]
    lexical = [(h.id, h.score) for h in memory.search(IDENTIFIER, k=50, mode="lexical")]
    assert hybrid_fusion(lexical, dense, 0.5, limit=5)[0][0] != dense[0][0]  # equal weights would differ
    assert [h.id for h in memory.search(IDENTIFIER, k=5, mode="hybrid")] == [i for i, _ in dense[:5]]


def test_configured_weight_overrides_the_stored_one(home, embedder):
    write_config(home, watch={"roots": [], "own_source": False}, memory={"fusion_weight": 0.0})
    settings = load_settings(home)
    store = Store(settings.memory.db)
    try:
        store.register_model(embedder.model_id, str(embedder.path), "current", {}, fusion_weight=1.0)
        memory = _memory_with_lookalikes(settings, store, embedder)
        assert memory.fusion_weight == 0.0
        hybrid = [h.id for h in memory.search(IDENTIFIER, k=5, mode="hybrid")]
        assert hybrid[0] == store.lexical_search(IDENTIFIER, 1)[0][0]  # the invoice diff, lexical's only match
    finally:
        store.close()


@pytest.mark.parametrize("value", ["1.5", '"x"', "-0.1", "true", "nan"])
def test_config_rejects_a_bad_fusion_weight_naming_the_key(home, value):
    (home / "config" / "gremlin.toml").write_text(f"[memory]\nfusion_weight = {value}\n")
    with pytest.raises(ConfigError, match=r'\[memory\] fusion_weight must be "auto" or a number from 0 to 1'):
        load_settings(home)


def test_config_accepts_auto_and_numbers(home):
    for value, forced in (('"auto"', None), ("1", 1.0), ("0.3", 0.3)):
        (home / "config" / "gremlin.toml").write_text(f"[memory]\nfusion_weight = {value}\n")
        assert load_settings(home).memory.forced_fusion_weight == forced


# -- the CLI ---------------------------------------------------------------------------------------


def test_models_show_and_list_print_the_weight(home, store, monkeypatch):
    monkeypatch.setattr(cli.console, "_width", 200)  # the table's columns unfolded
    fusion = {"weight": 0.85, "validation": 10, "test": 10,
              "mrr@10": {"dense": 0.5, "lexical": 0.3, "hybrid": 0.52, "hybrid_equal": 0.45}}
    store.register_model("run-calibrated", "/m", "accepted", {"fusion": fusion}, fusion_weight=0.85)
    store.register_model("run-plain", "/p", "current", {})
    runner = CliRunner()
    shown = json.loads(runner.invoke(main, ["--home", str(home), "models", "show", "run-calibrated"],
                                     catch_exceptions=False).output)
    assert shown["fusion_weight"] == 0.85 and shown["lineage"]["fusion"] == fusion
    listed = runner.invoke(main, ["--home", str(home), "models", "list"], catch_exceptions=False).output
    assert "0.85" in listed and "0.50 (equal)" in listed
    as_json = json.loads(runner.invoke(main, ["--home", str(home), "models", "list", "--json"]).output)
    assert {m["id"]: m["fusion_weight"] for m in as_json} == {"run-calibrated": 0.85, "run-plain": None}


def test_over_the_lexical_budget_hybrid_credits_the_newest_matches_by_recency(home, embedder):
    # A budget of 1 posting: "retry" is in every memory, so lexical search lists the newest
    # matches unscored (score 0.0); fused lexical-only, they keep that order, newest first.
    write_config(home, watch={"roots": [], "own_source": False}, memory={"fusion_weight": 0.0, "lexical_budget": 1})
    settings = load_settings(home)
    store = Store(settings.memory.db)
    try:
        memory = Memory(settings, store, embedder)
        ids = [store.add_memory("log", f"retry number {n} of the upload") for n in range(4)]
        memory.embed_memories([(i, f"retry number {n} of the upload") for n, i in enumerate(ids)])
        lexical = store.lexical_search("retry", 10, budget=1)
        assert [i for i, _ in lexical] == ids[::-1] and {s for _, s in lexical} == {0.0}
        hybrid = memory.search("retry", k=4, mode="hybrid")
        assert [h.id for h in hybrid] == ids[::-1] and hybrid[0].score == 1.0 > hybrid[1].score > hybrid[3].score
    finally:
        store.close()
