"""Load `config/gremlin.toml` into one frozen dataclass tree and validate it.

Every error names the file, the key and what to do. Environment variables are read
here and nowhere else (`GREMLIN_HOME`, `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`, `JOURNAL_STREAM`,
`XDG_CONFIG_HOME`, `XDG_DATA_HOME`, `XDG_RUNTIME_DIR`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import stat
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from config.errors import ConfigError

CONFIG_NAME = "gremlin.toml"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path(__file__).resolve().parent / CONFIG_NAME
# The fixed top-level source packages (DESIGN.md); `watch.own_source` watches those present.
SOURCE_PACKAGES = ("config", "memory", "self_mutation_watcher", "self_training", "agents",
                   "agent_core", "tools", "dashboard")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The kinds a memory may have (DESIGN.md); `retrain` memories (training results) are never evicted.
MEMORY_KINDS = ("code_diff", "failure", "feedback", "task", "log", "retrain")
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # the modes of the home's folders and files
# The folders every home has (DESIGN.md layout).
HOME_DIRS = ("config", "run", "run/checkpoints", "run/queue", "run/queue/inbox", "run/queue/rejected", "data", "data/logs", "data/logs/system", "data/logs/modules",
             "data/logs/services", "data/logs/applications", "data/nlp_training_sets")
# Version control, caches, editor temp files and likely secrets (kept out of memory).
DEFAULT_EXCLUDE = (
    ".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", ".venv/", "venv/", "node_modules/",
    ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/",
    "*.swp", "*.swx", "*.swo", "*~", ".#*", "4913", "*___jb_tmp___", "*___jb_old___",
    ".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", ".netrc", ".pgpass",
    "credentials", "credentials.json", ".git-credentials",
)


@dataclass(frozen=True)
class WatchSettings:
    """What to watch and how changes are batched."""

    roots: tuple[Path, ...] = (Path("data/logs"),)
    own_source: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    log_globs: tuple[str, ...] = ("*.log",)
    log_files: tuple[Path, ...] = ()
    gitignore: bool = False
    debounce_ms: int = 200
    max_wait_ms: int = 2000
    max_file_bytes: int = 1_048_576
    max_diff_bytes: int = 262_144
    reconcile_interval_s: float = 300.0
    redact: bool = True
    redact_patterns: tuple[str, ...] = ()
    log_repeat_window_s: float = 300.0
    drift_window: int = 50
    drift_threshold: float = 0.30


@dataclass(frozen=True)
class ModelSettings:
    """Which embedding model and how it encodes."""

    path: str = ""
    device: str = "auto"
    batch_size: int = 0
    max_seq_length: int = 256


@dataclass(frozen=True)
class MemorySettings:
    """Where memory lives on disk."""

    db: Path = Path("data/gremlin.db")
    index_dir: Path = Path("data/memory")
    shadow_dir: Path = Path("data/shadow")
    synchronous: str = "NORMAL"
    index_save_interval_s: float = 5.0
    memory_chars: int = 4000
    ann_threshold: int = 50_000
    ann_nprobe: int = 128
    ann_rerank: int = 2
    lexical_budget: int = 20_000
    fusion_weight: float | str = "auto"  # "auto" = the current model's calibrated weight; a number forces it

    @property
    def forced_fusion_weight(self) -> float | None:
        """The configured fusion weight, or None for "auto" (each model's calibrated one)."""
        return None if self.fusion_weight == "auto" else float(self.fusion_weight)


@dataclass(frozen=True)
class TrainingSettings:
    """When to retrain, how to fine-tune, and what a new model must prove first."""

    enabled: bool = True
    logic_globs: tuple[str, ...] = ("*.py",)
    min_logic_changes: int = 20
    confidence_threshold: float = 0.70
    confidence_window: int = 50
    reward_threshold: float = 0.5
    cooldown_s: float = 3600.0
    min_new_pairs: int = 16
    check_interval_s: float = 30.0
    poll_interval_s: float = 10.0
    pair_window_s: float = 3600.0
    heldout_fraction: float = 0.2
    min_train_pairs: int = 16
    min_heldout_pairs: int = 8
    max_pairs: int = 20000
    replay_branches: bool = True
    epochs: int = 1
    max_steps: int = 0
    min_steps: int = 60
    hard_negatives: bool = False
    file_pairs: bool = False
    batch_size: int = 32
    mini_batch_size: int = 0
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    max_seq_length: int = 256
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    method: str = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_learning_rate: float = 2e-3
    min_gain: float = 0.01
    tolerance: float = 0.01
    keep_models: int = 3
    tensorboard: bool = True
    mlflow_uri: str = ""


@dataclass(frozen=True)
class LoggingSettings:
    """Log files and their rotation."""

    dir: Path = Path("data/logs")
    level: str = "INFO"
    max_bytes: int = 10_485_760
    backup_count: int = 5


@dataclass(frozen=True)
class DashboardSettings:
    """Where the local dashboard listens, and whether it may listen beyond this machine."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    allow_remote: bool = False
    threads: int = 4


@dataclass(frozen=True)
class TaskSettings:
    """How queued tasks are claimed, retried and timed out."""

    workers: int = 1
    lease_s: float = 60.0
    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    inbox_poll_s: float = 1.0
    timeout_s: float = 7200.0
    keep_memory_chars: int = 2000


@dataclass(frozen=True)
class ShellSettings:
    """What `shell` tasks and the kernel's verify command may run, and how."""

    allow: tuple[str, ...] = ("pytest", "make", "git", "ruff", "mypy", "echo", "true", "false", "sleep")
    timeout_s: float = 600.0
    max_output_bytes: int = 65_536
    env_keep: tuple[str, ...] = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
                                 "TERM", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


@dataclass(frozen=True)
class RewardSettings:
    """How a task's outcome is scored (rewards below [training] reward_threshold are feedback)."""

    plugin: str = ""
    slow_factor: float = 3.0


@dataclass(frozen=True)
class PlannerSettings:
    """The bounds inside which the planner may change the training spec."""

    enabled: bool = True
    max_epochs: int = 4
    max_training_minutes: float = 30.0
    min_heldout: int = 20
    learning_rate_min: float = 1e-5
    learning_rate_max: float = 3e-4
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    max_seq_lengths: tuple[int, ...] = (128, 256)


@dataclass(frozen=True)
class MutationSettings:
    """The kernel's verify command, and the optional mutation daemon that proposes patches."""

    verify: tuple[str, ...] = ()
    verify_timeout_s: float = 900.0
    max_patch_bytes: int = 1_048_576
    enabled: bool = False
    proposer: tuple[str, ...] = ()
    proposer_timeout_s: float = 300.0
    min_interval_s: float = 600.0
    neighbours: int = 5


@dataclass(frozen=True)
class RetentionSettings:
    """Which memories are dropped as they age or pile up, per kind; empty tables keep everything.

    `max_count` and `max_age_days` map a memory kind to its limit (never changed after load).
    Retrain memories (training results) are never evicted, so they take no limit.
    """

    interval_s: float = 3600.0
    batch: int = 5000
    max_count: dict[str, int] = field(default_factory=dict)
    max_age_days: dict[str, float] = field(default_factory=dict)

    @property
    def limited_kinds(self) -> tuple[str, ...]:
        """The kinds with a limit, in MEMORY_KINDS order."""
        return tuple(k for k in MEMORY_KINDS if k in self.max_count or k in self.max_age_days)


SECTIONS: dict[str, type] = {
    "watch": WatchSettings,
    "model": ModelSettings,
    "memory": MemorySettings,
    "training": TrainingSettings,
    "logging": LoggingSettings,
    "dashboard": DashboardSettings,
    "tasks": TaskSettings,
    "shell": ShellSettings,
    "reward": RewardSettings,
    "planner": PlannerSettings,
    "mutation": MutationSettings,
    "retention": RetentionSettings,
}
# Allowed values, checked after types: (section, key) -> choices.
CHOICES = {
    ("model", "device"): ("auto", "cpu", "cuda"),
    ("memory", "synchronous"): ("NORMAL", "FULL"),
    ("logging", "level"): LOG_LEVELS,
    ("training", "device"): ("auto", "cpu", "cuda"),
    ("training", "precision"): ("auto", "fp32", "fp16", "bf16"),
    ("training", "method"): ("full", "lora"),
}
DAY_S, MIB = 86_400, 1 << 20
# Every number's range (inclusive), checked at load, before anything slow starts: (section, key) -> (min, max).
RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("watch", "debounce_ms"): (0, 60_000), ("watch", "max_wait_ms"): (0, 600_000),
    ("watch", "max_file_bytes"): (1, 1024 * MIB), ("watch", "max_diff_bytes"): (1, 64 * MIB),
    ("watch", "reconcile_interval_s"): (0, 7 * DAY_S), ("watch", "log_repeat_window_s"): (0, 30 * DAY_S),
    ("watch", "drift_window"): (1, 100_000), ("watch", "drift_threshold"): (0, 2),
    ("model", "batch_size"): (0, 4096), ("model", "max_seq_length"): (8, 8192),
    ("memory", "index_save_interval_s"): (0, DAY_S), ("memory", "memory_chars"): (64, 1_000_000),
    ("memory", "ann_threshold"): (1_000, 1_000_000_000), ("memory", "ann_nprobe"): (1, 16384),
    ("memory", "ann_rerank"): (1, 100), ("memory", "lexical_budget"): (0, 1_000_000_000),
    ("logging", "max_bytes"): (1024, 10 * 1024 * MIB), ("logging", "backup_count"): (0, 1000),
    ("dashboard", "port"): (1, 65_535), ("dashboard", "threads"): (1, 64),
    ("training", "min_logic_changes"): (1, 1_000_000), ("training", "confidence_threshold"): (0, 1),
    ("training", "confidence_window"): (1, 100_000), ("training", "reward_threshold"): (0, 1),
    ("training", "cooldown_s"): (0, 30 * DAY_S), ("training", "min_new_pairs"): (0, 1_000_000),
    ("training", "check_interval_s"): (1, DAY_S), ("training", "poll_interval_s"): (0.1, DAY_S),
    ("training", "pair_window_s"): (0, 30 * DAY_S), ("training", "heldout_fraction"): (0.05, 0.5),
    ("training", "min_train_pairs"): (2, 1_000_000), ("training", "min_heldout_pairs"): (2, 1_000_000),
    ("training", "max_pairs"): (4, 10_000_000), ("training", "epochs"): (1, 1000),
    ("training", "max_steps"): (0, 10_000_000), ("training", "min_steps"): (0, 10_000_000), ("training", "batch_size"): (2, 65_536),
    ("training", "mini_batch_size"): (0, 65_536), ("training", "learning_rate"): (1e-9, 1),
    ("training", "warmup_ratio"): (0, 1), ("training", "max_seq_length"): (8, 8192),
    ("training", "seed"): (0, 2**32 - 1), ("training", "min_gain"): (-1, 1), ("training", "tolerance"): (0, 1),
    ("training", "keep_models"): (1, 1000),
    ("training", "lora_r"): (1, 1024), ("training", "lora_alpha"): (1, 65_536), ("training", "lora_dropout"): (0, 0.9),
    ("training", "lora_learning_rate"): (1e-9, 1),
    ("tasks", "workers"): (1, 64), ("tasks", "lease_s"): (5, DAY_S), ("tasks", "max_attempts"): (1, 100),
    ("tasks", "retry_backoff_s"): (0, DAY_S), ("tasks", "inbox_poll_s"): (0.05, 3600),
    ("tasks", "timeout_s"): (1, 7 * DAY_S), ("tasks", "keep_memory_chars"): (100, 1_000_000),
    ("shell", "timeout_s"): (0.1, DAY_S), ("shell", "max_output_bytes"): (1024, 64 * MIB),
    ("reward", "slow_factor"): (1, 1000),
    ("planner", "max_epochs"): (1, 100), ("planner", "max_training_minutes"): (0.1, 7 * 24 * 60),
    ("planner", "min_heldout"): (2, 1_000_000), ("planner", "learning_rate_min"): (1e-9, 1),
    ("planner", "learning_rate_max"): (1e-9, 1),
    ("mutation", "verify_timeout_s"): (1, DAY_S), ("mutation", "max_patch_bytes"): (1, 64 * MIB),
    ("mutation", "proposer_timeout_s"): (1, DAY_S), ("mutation", "min_interval_s"): (0, 30 * DAY_S),
    ("mutation", "neighbours"): (0, 100),
    ("retention", "interval_s"): (1, 30 * DAY_S), ("retention", "batch"): (1, 1_000_000),
}

# Lists of integers: every item must lie in the range.
ITEM_RANGES: dict[tuple[str, str], tuple[int, int]] = {
    ("planner", "batch_sizes"): (2, 65_536), ("planner", "max_seq_lengths"): (8, 8192),
}
# Tables of kind = limit: every value must lie in the range (an age may be a fraction of a day).
LIMIT_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("retention", "max_count"): (1, 10**12), ("retention", "max_age_days"): (0.001, 100_000),
}
PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration of one home."""

    home: Path
    config_file: Path
    watch: WatchSettings = field(default_factory=WatchSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    tasks: TaskSettings = field(default_factory=TaskSettings)
    shell: ShellSettings = field(default_factory=ShellSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    mutation: MutationSettings = field(default_factory=MutationSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    @property
    def run_dir(self) -> Path:
        """Runtime state: lock, socket, checkpoints."""
        return self.home / "run"

    @property
    def data_dir(self) -> Path:
        """Durable state: database, indexes, shadow copies, logs."""
        return self.home / "data"

    @property
    def queue_dir(self) -> Path:
        """The task inbox (`inbox/`) and its quarantine (`rejected/`)."""
        return self.run_dir / "queue"

    @property
    def snapshot_dir(self) -> Path:
        """The private git object store that holds snapshots."""
        return self.data_dir / "snapshots"

    @property
    def watch_roots(self) -> tuple[Path, ...]:
        """Configured roots plus Gremlin's own source packages when `own_source` is on."""
        roots = list(self.watch.roots)
        if self.watch.own_source:
            roots += [p for p in own_source_roots() if p not in roots]
        return tuple(roots)

    def with_extra_roots(self, paths: typing.Iterable[Path]) -> Settings:
        """A copy that also watches `paths` (the daemon's `--watch`)."""
        extra = (Path(p).expanduser().resolve() for p in paths)
        roots = tuple(dict.fromkeys((*self.watch.roots, *extra)))
        return dataclasses.replace(self, watch=dataclasses.replace(self.watch, roots=roots))


def toml_value(value: object) -> str:
    """A Python value as TOML (the few types the config uses), for writing configs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def own_source_roots() -> list[Path]:
    """Gremlin's own source package folders that exist in this installation."""
    return [REPO_ROOT / name for name in SOURCE_PACKAGES if (REPO_ROOT / name / "__init__.py").is_file()]


def default_home() -> Path:
    """`GREMLIN_HOME`, else the repository when run from a checkout, else the XDG data dir."""
    env = os.environ.get("GREMLIN_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "config" / CONFIG_NAME).is_file():
        return REPO_ROOT
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "gremlin"


def runtime_dir() -> str | None:
    """`$XDG_RUNTIME_DIR` when it names a folder (the user's private runtime folder), else None."""
    path = os.environ.get("XDG_RUNTIME_DIR")
    return path if path and os.path.isdir(path) else None


def notify_socket() -> str | None:
    """The systemd notification socket, when run as a `Type=notify` service."""
    return os.environ.get("NOTIFY_SOCKET") or None


def watchdog_interval_s() -> float | None:
    """systemd's watchdog interval (`$WATCHDOG_USEC`) in seconds, or None when there is none for
    this process (`$WATCHDOG_PID`, when set, names the process it is meant for)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


def config_home() -> Path:
    """`$XDG_CONFIG_HOME`, else ~/.config (where a user's systemd units live, under systemd/user/)."""
    value = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(value) if os.path.isabs(value) else Path.home() / ".config"  # a relative one is invalid (XDG spec)


def journal_stream() -> str | None:
    """`$JOURNAL_STREAM` ("device:inode" of the journal stream), set by systemd when a service's
    stdout or stderr goes to the journal."""
    return os.environ.get("JOURNAL_STREAM") or None


def init_home(home: Path) -> Path:
    """Create a home's folders (mode 0700) and a copy of the default config (kept if present);
    return its config."""
    home = Path(home).expanduser().resolve()
    target = home / "config" / CONFIG_NAME
    try:
        for sub in HOME_DIRS:
            (home / sub).mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(DEFAULT_CONFIG, target)
    except OSError as exc:
        raise ConfigError(f"cannot make a home at {home}: {exc.strerror or exc} ({exc.filename or home}); "
                          "choose a folder this user may write, not inside a file") from exc
    if not target.is_file():
        raise ConfigError(f"{target} is not a file (a folder?); remove it, then run: gremlin init {home}")
    return target


def secure_home(settings: Settings) -> list[Path]:
    """Make the home's state private: folders under run/ and data/ 0700, files 0600 (those of
    this user; symlinks are not followed). Returns the paths whose mode was changed."""
    changed: list[Path] = []
    state = [settings.run_dir, settings.data_dir, settings.memory.index_dir, settings.memory.shadow_dir,
             settings.logging.dir / "system"]
    for top in dict.fromkeys(state):
        if top.is_dir():
            changed += _tighten(top)
            for folder, dirs, files in os.walk(top):
                changed += [p for name in dirs + files for p in _tighten(Path(folder) / name)]
    db = settings.memory.db
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        changed += _tighten(path)
    return changed


def _tighten(path: Path) -> list[Path]:
    """[path] when its group/other permission bits had to be removed, else []."""
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or not st.st_mode & 0o077:
            return []
        os.chmod(path, PRIVATE_DIR if stat.S_ISDIR(st.st_mode) else st.st_mode & 0o700)
    except OSError:  # gone meanwhile, or not ours to change
        return []
    return [path]


def load_settings(home: Path | str | None = None) -> Settings:
    """Read and validate `<home>/config/gremlin.toml`; raise ConfigError naming the key."""
    home = Path(home).expanduser().resolve() if home else default_home()
    config_file = home / "config" / CONFIG_NAME
    if config_file.exists() and not config_file.is_file():
        raise ConfigError(f"{config_file} is not a file (a folder?); remove it, then run: gremlin init {home}")
    if not config_file.is_file():
        raise ConfigError(f"no Gremlin home at {home} (missing {config_file}); "
                          f"create one with: gremlin init {home}")
    try:
        raw = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file}: invalid TOML: {exc}; fix the syntax") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_file}: cannot read: {exc}") from exc
    return parse_settings(raw, home, config_file)


def parse_settings(raw: dict, home: Path, config_file: Path) -> Settings:
    """Turn a parsed TOML document into Settings; unknown or mistyped keys raise ConfigError."""
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{config_file}: unknown section [{name}]; "
                              f"valid sections are {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{config_file}: [{name}] must be a table of keys")
    sections = {name: _parse_section(name, raw.get(name, {}), home, config_file)
                for name in SECTIONS}
    planner = sections["planner"]
    if planner.learning_rate_min > planner.learning_rate_max:
        raise ConfigError(f"{config_file}: [planner] learning_rate_min ({planner.learning_rate_min}) is above "
                          f"learning_rate_max ({planner.learning_rate_max}); swap them")
    _check_dashboard(sections["dashboard"], config_file)
    if sections["mutation"].enabled and not sections["mutation"].proposer:
        raise ConfigError(f"{config_file}: [mutation] enabled = true needs a proposer command "
                          '(e.g. proposer = ["my-llm", "--patch"]); set one or turn it off')
    return Settings(home=home, config_file=config_file, **sections)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address is this machine only (127.0.0.0/8, ::1, localhost)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _check_dashboard(dashboard: DashboardSettings, config_file: Path) -> None:
    if dashboard.enabled and not is_loopback(dashboard.host) and not dashboard.allow_remote:
        raise ConfigError(f"{config_file}: [dashboard] host = {dashboard.host!r} is reachable from other machines; "
                          "keep host = \"127.0.0.1\" (use an SSH tunnel), or set allow_remote = true to mean it")


def _parse_section(name: str, values: dict, home: Path, config_file: Path):
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{config_file}: unknown key '{key}' in [{name}]; "
                              f"valid keys are {', '.join(hints)}")
        where = f"{config_file}: [{name}] {key}"
        if (name, key) == ("memory", "fusion_weight"):
            kwargs[key] = _fusion_weight(value, where)
            continue
        kwargs[key] = _convert(value, hints[key], home, where)
        _check_rules(name, key, kwargs[key], where)
    return _resolve_paths(cls(**kwargs), home)


def _convert(value, hint, home: Path, where: str):
    """Check `value` against the annotation `hint` and convert TOML values to it."""
    origin = typing.get_origin(hint)
    if origin is dict:
        item = typing.get_args(hint)[1]
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of memory kind = {_type_name(item)} "
                              f"(got {value!r}); e.g. {{ code_diff = 100000 }}")
        return {k: _convert(v, item, home, _table_key(where, k)) for k, v in value.items()}
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item)} (got {value!r})")
        return tuple(_convert(v, item, home, where + " item") for v in value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str and Path
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(hint)} (got {value!r}); "
                          "fix the value or delete the line to use the default")
    return Path(value) if hint is Path else value


def _fusion_weight(value, where: str) -> float | str:
    """[memory] fusion_weight: "auto", or a number from 0 (lexical only) to 1 (dense only)."""
    if value == "auto":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    raise ConfigError(f'{where} must be "auto" or a number from 0 to 1 (got {value!r}); "auto" uses the '
                      "weight the trainer calibrated for the current model")


def _type_name(hint) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path string"}.get(hint, str(hint))


def _check_rules(section: str, key: str, value, where: str) -> None:
    if (section, key) == ("watch", "redact_patterns"):
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from exc
    if (section, key) == ("reward", "plugin") and value and not PLUGIN.fullmatch(value):
        raise ConfigError(f"{where} must look like \"package.module:function\" (got {value!r}); "
                          "or leave it empty for the built-in reward model")
    if (section, key) in ITEM_RANGES:
        low, high = ITEM_RANGES[(section, key)]
        if not value or any(not low <= v <= high for v in value):
            raise ConfigError(f"{where} must be a non-empty list of integers from {low} to {high} (got {list(value)})")
    if key in ("verify", "proposer", "allow") and any(not v.strip() for v in value):
        raise ConfigError(f"{where} has an empty item; write a command as a list of arguments, "
                          'e.g. ["pytest", "-q"]')
    if (section, key) in LIMIT_RANGES:
        _check_limits(value, LIMIT_RANGES[(section, key)], where)
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)} (got {value!r})")
    bounds = RANGES.get((section, key))
    if bounds is not None and not (math.isfinite(value) and bounds[0] <= value <= bounds[1]):
        raise ConfigError(f"{where} must be a number from {_number(bounds[0])} to {_number(bounds[1])} "
                          f"(got {value!r}); "
                          "fix the value or delete the line to use the default")


def _check_limits(limits: dict, bounds: tuple[float, float], where: str) -> None:
    """A [retention] table: known, evictable kinds, each with a limit in range."""
    for kind, limit in limits.items():
        if kind == "retrain":
            raise ConfigError(f"{_table_key(where, kind)}: retrain memories (training results) are never "
                              "evicted; remove the line")
        if kind not in MEMORY_KINDS:
            raise ConfigError(f"{_table_key(where, kind)}: unknown memory kind {kind!r}; kinds are "
                              f"{', '.join(k for k in MEMORY_KINDS if k != 'retrain')}")
        if not (math.isfinite(limit) and bounds[0] <= limit <= bounds[1]):
            raise ConfigError(f"{_table_key(where, kind)} must be a number from {_number(bounds[0])} to "
                              f"{_number(bounds[1])} (got {limit!r}); fix the value or delete the line to keep "
                              f"every {kind} memory")


def _table_key(where: str, key: str) -> str:
    """`file: [section] table` and `key` as `file: [section.table] key`, as the user wrote it."""
    head, table = where.rsplit("] ", 1)
    return f"{head}.{table}] {key}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _resolve_paths(obj, home: Path):
    """Make every relative Path field absolute against the home."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Path):
            changes[f.name] = _absolute(value, home)
        elif isinstance(value, tuple) and value and isinstance(value[0], Path):
            changes[f.name] = tuple(_absolute(v, home) for v in value)
    return dataclasses.replace(obj, **changes)


def _absolute(path: Path, home: Path) -> Path:
    path = path.expanduser()
    return (path if path.is_absolute() else home / path).resolve()
