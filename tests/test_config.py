"""Config loading: defaults, validation messages that name the key, homes."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_core.cli import main
from config.errors import ConfigError
from config.settings import DEFAULT_CONFIG, RANGES, SECTIONS, Settings, init_home, load_settings, parse_settings
from tests.conftest import write_config


def test_default_config_file_states_every_default(tmp_path: Path):
    from_file = parse_settings(tomllib.loads(DEFAULT_CONFIG.read_text()), tmp_path, DEFAULT_CONFIG)
    from_code = parse_settings({}, tmp_path, DEFAULT_CONFIG)
    assert from_file == from_code
    documented = tomllib.loads(DEFAULT_CONFIG.read_text())
    for name in ("watch", "model", "memory", "logging", "dashboard"):
        fields = {f.name for f in dataclasses.fields(getattr(from_code, name))}
        assert set(documented[name]) == fields, f"[{name}] in gremlin.toml must list every key"


def test_relative_paths_resolve_against_the_home(tmp_path: Path):
    init_home(tmp_path)
    s = load_settings(tmp_path)
    assert s.memory.db == tmp_path / "data" / "gremlin.db"
    assert s.watch.roots == (tmp_path / "data" / "logs",)
    assert s.logging.dir == tmp_path / "data" / "logs"


@pytest.mark.parametrize("text, expected", [
    ("[watch\nroots = 1", "invalid TOML"),
    ("[watch]\ndebouce_ms = 5\n", "unknown key 'debouce_ms' in [watch]"),
    ("[wach]\n", "unknown section [wach]"),
    ("[watch]\ndebounce_ms = \"fast\"\n", "[watch] debounce_ms must be an integer"),
    ("[watch]\nroots = \"src\"\n", "[watch] roots must be a list of a path string"),
    ("[watch]\nown_source = 1\n", "[watch] own_source must be true or false"),
    ("[model]\ndevice = \"tpu\"\n", "[model] device must be one of auto, cpu, cuda"),
    ("[model]\nbatch_size = -1\n", "[model] batch_size must be a number from 0 to 4096 (got -1)"),
    ("[training]\npoll_interval_s = nan\n", "[training] poll_interval_s must be a number from 0.1 to 86400 (got nan)"),
    ("[watch]\nreconcile_interval_s = inf\n", "[watch] reconcile_interval_s must be a number from 0 to 604800 (got inf)"),
    ("[training]\nheldout_fraction = 5.0\n", "[training] heldout_fraction must be a number from 0.05 to 0.5"),
    ("[dashboard]\nport = 70000\n", "[dashboard] port must be a number from 1 to 65535 (got 70000)"),
    ("[watch]\ndebounce_ms = 9999999999999\n", "[watch] debounce_ms must be a number from 0 to 60000"),
    ("[training]\nlearning_rate = -inf\n", "[training] learning_rate must be a number from 1e-09 to 1"),
    ("watch = 3\n", "[watch] must be a table"),
    ('[training]\nmethod = "x"\n', "[training] method must be one of full, lora"),
    ("[training]\nlora_r = 0\n", "[training] lora_r must be a number from 1"),
    ("[training]\nlora_r = 2.5\n", "[training] lora_r must be an integer"),
    ("[training]\nlora_dropout = 1.5\n", "[training] lora_dropout must be a number from 0"),
    ("[training]\nlora_learning_rate = 0\n", "[training] lora_learning_rate must be a number from"),
    ("[training]\nmin_steps = -1\n", "[training] min_steps must be a number from 0"),
    ("[training]\nreplay_branches = 2\n", "[training] replay_branches must be true or false"),
])
def test_invalid_config_names_the_problem(tmp_path: Path, text: str, expected: str):
    init_home(tmp_path)
    config = tmp_path / "config" / "gremlin.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert expected in str(info.value)
    assert str(config) in str(info.value)


def test_missing_home_says_how_to_create_one(tmp_path: Path):
    with pytest.raises(ConfigError, match="gremlin init"):
        load_settings(tmp_path / "nowhere")


def test_gremlin_home_environment_variable_selects_the_home(tmp_path: Path, monkeypatch):
    init_home(tmp_path)
    monkeypatch.setenv("GREMLIN_HOME", str(tmp_path))
    assert load_settings().home == tmp_path


def test_init_keeps_an_existing_config(tmp_path: Path):
    init_home(tmp_path)
    write_config(tmp_path, watch={"debounce_ms": 999})
    init_home(tmp_path)
    assert load_settings(tmp_path).watch.debounce_ms == 999
    assert (tmp_path / "run").is_dir() and (tmp_path / "data").is_dir()


def test_extra_roots_are_added_once(tmp_path: Path):
    init_home(tmp_path)
    s = load_settings(tmp_path)
    more = s.with_extra_roots([tmp_path / "a", tmp_path / "a"])
    assert more.watch.roots == (tmp_path / "data" / "logs", tmp_path / "a")
    assert isinstance(more, Settings) and s.watch.roots == (tmp_path / "data" / "logs",)


def test_cli_exits_1_before_starting_on_a_bad_config(tmp_path: Path):
    init_home(tmp_path)
    (tmp_path / "config" / "gremlin.toml").write_text("[watch]\nmax_file_bytes = \"big\"\n")
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "daemon"])
    assert result.exit_code == 1
    assert "[watch] max_file_bytes must be an integer" in result.output
    assert not (tmp_path / "data" / "gremlin.db").exists()


def test_every_number_in_the_config_has_a_range():
    numbers = {(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if f.type in ("int", "float", int, float)}
    assert numbers == set(RANGES), "give every numeric key a range in config.settings.RANGES"
    for (section, key), (low, high) in RANGES.items():
        default = getattr(SECTIONS[section](), key)
        assert low <= default <= high, (section, key)


@pytest.mark.parametrize("text, expected", [
    ("[retention.max_count]\ncode_dif = 5\n", "[retention.max_count] code_dif: unknown memory kind 'code_dif'"),
    ("[retention.max_count]\nretrain = 5\n", "[retention.max_count] retrain: retrain memories (training results) "
                                             "are never evicted"),
    ("[retention.max_count]\ntask = 0\n", "[retention.max_count] task must be a number from 1 to"),
    ("[retention.max_count]\ntask = 2.5\n", "[retention.max_count] task must be an integer"),
    ("[retention.max_age_days]\nfailure = -3\n", "[retention.max_age_days] failure must be a number from 0.001"),
    ("[retention.max_age_days]\nfailure = nan\n", "[retention.max_age_days] failure must be a number from 0.001"),
    ("[retention]\nmax_count = 5\n", "[retention] max_count must be a table of memory kind = an integer"),
    ("[retention]\nbatch = 0\n", "[retention] batch must be a number from 1 to 1000000"),
])
def test_invalid_retention_names_the_key(tmp_path: Path, text: str, expected: str):
    init_home(tmp_path)
    (tmp_path / "config" / "gremlin.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert expected in str(info.value) and str(tmp_path / "config" / "gremlin.toml") in str(info.value)


def test_retention_limits_load_per_kind_and_default_to_none(tmp_path: Path):
    init_home(tmp_path)
    assert load_settings(tmp_path).retention.limited_kinds == ()
    write_config(tmp_path, **{"retention.max_count": {"code_diff": 10}, "retention.max_age_days": {"failure": 1.5}})
    retention = load_settings(tmp_path).retention
    assert (retention.max_count, retention.max_age_days) == ({"code_diff": 10}, {"failure": 1.5})
    assert retention.limited_kinds == ("code_diff", "failure") and retention.batch == 5000
