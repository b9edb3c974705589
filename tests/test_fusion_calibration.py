"""Hybrid search's fusion weight: weighted RRF, the weight chosen per model on held-out data,
kept in the models table (migration 7), used by search, overridable in the config, shown
by `gremlin models`."""

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
from memory.fusion import RRF_K, hybrid_fusion, reciprocal_rank_fusion
from memory.service import Memory
from memory.store import MIGRATIONS, SCHEMA_VERSION, Store, rank_lexically, utc_now
from self_training.evaluate import (TaskRankings, calibrate_fusion, choose_fusion_weight, hybrid_mrr,
                                    split_validation)
from tests.conftest import write_config

IDENTIFIER = "FLAG_ZQKV_ENABLED"
# Lexical search finds IDENTIFIER only in the invoice diff; MiniLM prefers its look-alikes.
LOOKALIKES = [f"modified flags{n}.py\n+FLAG_ZQKV{n}X_ENABLED = True" for n in range(8)]
TARGET = ("modified billing/invoice.py\n+def total(lines):\n+    subtotal = sum(l.price * l.qty for l in lines)\n"
          "+    return round(subtotal * VAT_RATE, 2)  # see FLAG_ZQKV_ENABLED\n")


def plain_rrf(rankings, k=RRF_K, limit=None):
    """The unweighted RRF that hybrid search used before weights (the reference)."""
    scores = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    fused = sorted(scores.items(), key=lambda pair: -pair[1])
    return fused if limit is None else fused[:limit]


# -- weighted RRF ------------------------------------------------------------------------


def test_equal_weight_is_exactly_plain_rrf_scores_order_and_ties():
    lexical, dense = ["a", "b", "c", "d"], ["b", "e", "a", "f", "c"]
    tie_lexical, tie_dense = ["x", "y"], ["y", "x"]  # a tie: lexical (first) wins
    for lex, den in ((lexical, dense), (tie_lexical, tie_dense)):
        assert hybrid_fusion(lex, den, 0.5) == plain_rrf([lex, den])
        assert reciprocal_rank_fusion([lex, den]) == plain_rrf([lex, den])
    assert [i for i, _ in hybrid_fusion(tie_lexical, tie_dense, 0.5)] == ["x", "y"]


def test_weight_one_gives_the_dense_order_and_zero_the_lexical_order():
    lexical, dense = ["a", "b", "c", "d"], ["d", "e", "c", "a"]
    assert [i for i, _ in hybrid_fusion(lexical, dense, 1.0)][:len(dense)] == dense
    assert [i for i, _ in hybrid_fusion(lexical, dense, 0.0)][:len(lexical)] == lexical
    assert [i for i, _ in hybrid_fusion(lexical, dense, 0.5)][:2] != dense[:2]  # equal weights differ
    with pytest.raises(ValueError):
        hybrid_fusion(lexical, dense, 1.5)


# -- choosing the weight -------------------------------------------------------------------


def test_grid_search_beats_equal_rrf_when_dense_is_right_and_lexical_wrong():
    # Query q's answer is document q: dense ranks it first, lexical ranks it third behind two decoys
    # that dense ranks second, so equal-weight RRF puts a decoy first.
    dense = [[q, (q + 1) % 4, (q + 2) % 4, (q + 3) % 4] for q in range(4)]
    lexical = [[(q + 1) % 4, (q + 2) % 4, q] for q in range(4)]
    task = TaskRankings(dense, lexical, [0, 1, 2, 3])
    weight = choose_fusion_weight(task)
    assert weight > 0.5
    assert hybrid_mrr(task, weight) == 1.0 > hybrid_mrr(task, 0.5)


def test_a_gain_of_one_query_in_many_does_not_move_the_weight():
    # 20 queries: on one, dense is right and lexical wrong (a higher weight would win it); on
    # the others both agree. The best weight gains 1 query of 20: not beyond its standard error.
    dense = [[q, (q + 1) % 20, (q + 2) % 20] for q in range(20)]
    lexical = [[(q + 1) % 20, (q + 2) % 20, q] if q == 0 else [q, (q + 1) % 20] for q in range(20)]
    task = TaskRankings(dense, lexical, list(range(20)))
    assert hybrid_mrr(task, 1.0) > hybrid_mrr(task, 0.5)
    assert choose_fusion_weight(task) == 0.5
    clear = TaskRankings(dense, [[(q + 1) % 20, (q + 2) % 20, q] for q in range(20)], list(range(20)))
    assert choose_fusion_weight(clear) > 0.5  # dense right on every query: it moves


def test_ties_go_to_equal_weights():
    same = [[0, 1, 2], [1, 0, 2], [2, 1, 0]]
    assert choose_fusion_weight(TaskRankings(same, same, [0, 1, 2])) == 0.5
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
    for query, ranking in zip(queries, ranked, strict=True):
        assert [i - 1 for i, _ in store.lexical_search(query, 10)] == ranking


# -- the weight in the models table, and search ------------------------------------------------


def test_migration_7_keeps_models_and_leaves_them_uncalibrated(tmp_path: Path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:6]:
        conn.executescript(script)
    conn.execute("INSERT INTO models (id, path, created, status, lineage) VALUES ('m1', '/m1', ?, 'current', '{}')",
                 (utc_now(),))
    conn.execute("PRAGMA user_version=6")
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        assert SCHEMA_VERSION == 7
        model = store.get_model("m1")
        assert model["status"] == "current" and model["fusion_weight"] is None
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
    dense = [h.id for h in memory.search(IDENTIFIER, k=5, mode="dense")]
    lexical = [h.id for h in memory.search(IDENTIFIER, k=50, mode="lexical")]
    assert [i for i, _ in hybrid_fusion(lexical, dense, 0.5, limit=5)] != dense  # equal weights would differ
    assert [h.id for h in memory.search(IDENTIFIER, k=5, mode="hybrid")] == dense


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
