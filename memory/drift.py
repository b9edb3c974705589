"""Semantic drift: are new memories unlike anything Gremlin already knows?

Each new memory's vector shift is 1 - its cosine similarity to the nearest memory that
was already indexed. The detector keeps the last `window` shifts; when their mean
passes `threshold` the project is drifting away from what the model has seen, which the
self-training rules read as a reason to retrain. Pure: values in, a state out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class DriftState:
    """The rolling picture."""

    mean_shift: float | None
    samples: int
    window: int
    threshold: float
    drifting: bool


class DriftDetector:
    """Mean vector shift over the last `window` memories."""

    def __init__(self, window: int = 50, threshold: float = 0.30):
        self.window = window
        self.threshold = threshold
        self._shifts: deque[float] = deque(maxlen=window)

    def add(self, shifts: Iterable[float | None]) -> DriftState:
        """Take new shifts (None: nothing to compare with yet) and return the new state."""
        self._shifts.extend(s for s in shifts if s is not None)
        return self.state()

    def state(self) -> DriftState:
        """Mean shift, and drifting once the window is full and the mean passes the threshold."""
        n = len(self._shifts)
        mean = sum(self._shifts) / n if n else None
        drifting = n == self.window and mean is not None and mean > self.threshold
        return DriftState(round(mean, 4) if mean is not None else None, n, self.window, self.threshold, drifting)
