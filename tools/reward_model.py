"""Score a finished task's outcome in [0, 1]; scores below `[training] reward_threshold` are feedback.

The built-in model is a weighted mean of the signals an outcome has, each in [0, 1]:

- **status** (weight 4): done with exit code 0 (or none) → 1; failed, or a non-zero exit
  code → 0; cancelled → 0.5. A cancel is a person's or a shutdown's decision, not evidence
  that the work was good or bad, so it sits at the neutral midpoint: alone it scores exactly
  0.5, which is not *below* the default threshold, and the other signals tip it either way.
- **tests** (weight 1): passed / (passed + failed + errors) from the last pytest summary in
  the output, when there is one and it counted any test.
- **speed** (weight 1), done tasks only (a failure's or a cancel's duration says nothing
  about how fast the work gets done): 1 when `seconds` ≤ the type's typical duration (the
  median of its last done tasks, known after 3), falling linearly to 0 at
  `slow_factor` × typical.
- **confidence** (weight 1): a retrieval confidence or gate gain, when the task reports one.

Status outweighs the other signals together (4 > 1 + 1 + 1), so a failed task always scores
below 0.5 and a clean pass always above it, whatever its speed. A plugin
(`[reward] plugin = "package.module:function"`) may replace the score: it gets the outcome
as a dict plus "typical_seconds" and returns a number in [0, 1]. A plugin that raises or
returns anything else is logged and the built-in score is used; it never breaks a task.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import numbers
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from config.errors import GremlinError

logger = logging.getLogger(__name__)

STATES = ("done", "failed", "cancelled")
WEIGHTS = {"status": 4.0, "tests": 1.0, "speed": 1.0, "confidence": 1.0}
CANCELLED_STATUS = 0.5
MIN_HISTORY = 3  # done tasks needed before a type has a typical duration
PLUGIN_SPEC = re.compile(r"(?P<module>[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "=== 3 failed, 10 passed, 1 skipped, 2 errors in 1.23s (0:00:01) ===", "no tests ran in 0.01s",
# older pytest: "in 0.12 seconds".
SUMMARY = re.compile(r"=*\s*(?P<counts>no tests ran|\d+ \w+(?:, \d+ \w+)*) in \d+(?:\.\d+)? ?s(?:econds)?"
                     r"(?: \([\d:]+\))?\s*=*")
COUNT = re.compile(r"(\d+) (\w+)")
PLURALS = {"error": "errors", "warning": "warnings"}  # pytest writes "1 error", "2 errors"


class RewardPluginError(GremlinError):
    """The configured reward plugin cannot be loaded."""


@dataclass(frozen=True)
class Outcome:
    """How one task ended, as the reward model sees it."""

    task_type: str
    state: str
    exit_code: int | None = None
    seconds: float = 0.0
    output: str = ""
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"outcome state must be one of {', '.join(STATES)} (got {self.state!r})")

    def to_dict(self) -> dict:
        """A plain dict of the fields (what a plugin receives)."""
        return dataclasses.asdict(self)


def parse_pytest_summary(text: str) -> dict[str, int] | None:
    """The counts of the last pytest summary line in `text`, or None when it has none."""
    for line in reversed(ANSI.sub("", text).splitlines()):
        match = SUMMARY.fullmatch(line.strip())
        if match:
            counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
            for number, word in COUNT.findall(match["counts"]):
                word = PLURALS.get(word, word)
                counts[word] = counts.get(word, 0) + int(number)
            return counts
    return None


def builtin_reward(outcome: Outcome, typical_seconds: float | None, slow_factor: float) -> tuple[float, dict]:
    """The built-in score of an outcome and the signals it was made of."""
    signals = {"status": _status_signal(outcome)}
    summary = parse_pytest_summary(outcome.output) if outcome.output else None
    tests = _tests_signal(summary) if summary is not None else None
    if tests is not None:
        signals["tests"] = tests
    if outcome.state == "done" and typical_seconds:
        signals["speed"] = speed_signal(outcome.seconds, typical_seconds, slow_factor)
    if _is_number(outcome.confidence):
        signals["confidence"] = min(1.0, max(0.0, float(outcome.confidence)))
    total = sum(WEIGHTS[name] * value for name, value in signals.items())
    score = min(1.0, max(0.0, total / sum(WEIGHTS[name] for name in signals)))
    components = {**signals, "model": "builtin", "typical_seconds": typical_seconds}
    if summary is not None:
        components["pytest"] = summary
    return score, components


def _status_signal(outcome: Outcome) -> float:
    """1 for a clean finish, 0 for a failure, the neutral midpoint for a cancel."""
    if outcome.state == "cancelled":
        return CANCELLED_STATUS
    return 1.0 if outcome.state == "done" and outcome.exit_code in (0, None) else 0.0


def _tests_signal(summary: dict[str, int]) -> float | None:
    """The share of tests that passed; None when no test ran (only skipped, or none)."""
    ran = summary["passed"] + summary["failed"] + summary["errors"]
    return summary["passed"] / ran if ran else None


def speed_signal(seconds: float, typical_seconds: float, slow_factor: float) -> float:
    """1 up to the typical duration, falling linearly to 0 at `slow_factor` times it."""
    if seconds <= typical_seconds:
        return 1.0
    slowest = slow_factor * typical_seconds
    if seconds >= slowest:
        return 0.0
    return (slowest - seconds) / (slowest - typical_seconds)


def median_done_seconds(history: list[dict]) -> float | None:
    """The median duration of the done tasks in `history`; None with fewer than 3 of them."""
    durations = [row["seconds"] for row in history
                 if row.get("state") == "done" and _is_number(row.get("seconds"))]
    return float(statistics.median(durations)) if len(durations) >= MIN_HISTORY else None


def load_plugin(spec: str) -> Callable[[dict], float]:
    """Import the function that `[reward] plugin` names ("package.module:function")."""
    match = PLUGIN_SPEC.fullmatch(spec or "")
    if not match:
        raise RewardPluginError(f"[reward] plugin {spec!r} must look like \"package.module:function\"; "
                                "fix it in the config file, or set plugin = \"\" for the built-in model")
    try:
        module = importlib.import_module(match["module"])
    except Exception as exc:  # a plugin's own import-time error is reported the same way
        raise RewardPluginError(f"[reward] plugin {spec!r}: cannot import module {match['module']!r} "
                                f"({type(exc).__name__}: {exc}); install it or put it on the daemon's "
                                "PYTHONPATH, or set plugin = \"\" for the built-in model") from exc
    function = getattr(module, match["function"], None)
    if function is None:
        raise RewardPluginError(f"[reward] plugin {spec!r}: module {match['module']!r} has no attribute "
                                f"{match['function']!r}; check the function name after the colon")
    if not callable(function):
        raise RewardPluginError(f"[reward] plugin {spec!r}: {match['function']!r} is a "
                                f"{type(function).__name__}, not a function; name a function that takes "
                                "the outcome dict and returns a number in [0, 1]")
    return function


class RewardModel:
    """Scores outcomes with the configured plugin, falling back to the built-in model."""

    def __init__(self, settings):
        self.slow_factor = settings.reward.slow_factor
        self.spec = settings.reward.plugin
        try:
            self.plugin = load_plugin(self.spec) if self.spec else None
        except RewardPluginError as exc:  # fail at daemon start, naming the file to fix
            raise RewardPluginError(f"{settings.config_file}: {exc}") from exc

    def score(self, outcome: Outcome, store) -> tuple[float, dict]:
        """The outcome's reward in [0, 1] and what it was made of."""
        typical = median_done_seconds(store.task_history(outcome.task_type))
        score, components = builtin_reward(outcome, typical, self.slow_factor)
        if self.plugin is None:
            return score, components
        try:
            value = self._call_plugin(outcome, typical)
        except Exception as exc:  # a plugin must never break the task that is being scored
            logger.warning("reward plugin failed; using the built-in score",
                           extra={"plugin": self.spec, "task_type": outcome.task_type, "error": str(exc)})
            return score, {**components, "plugin_error": f"{type(exc).__name__}: {exc}"}
        return value, {**components, "model": f"plugin:{self.spec}", "builtin_score": score}

    def _call_plugin(self, outcome: Outcome, typical: float | None) -> float:
        """The plugin's score, checked to be a finite number in [0, 1]."""
        value = self.plugin({**outcome.to_dict(), "typical_seconds": typical})
        if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"returned {value!r}, not a number in [0, 1]")
        return float(value)


def _is_number(value: object) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
