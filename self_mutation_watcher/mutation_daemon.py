"""The mutation daemon: optional (off by default), it asks a proposer for a patch that fixes
the newest failure and submits it as a `mutate` task, so it goes through the kernel.

The proposer is any program in `[shell] allow` named by `[mutation] proposer` (e.g. a
local LLM's command line). It reads one JSON object on stdin, the failure and its nearest
memories (`{"failure": {...}, "neighbours": [...], "roots": [...]}`), and prints a unified
diff on stdout (nothing, or a non-zero exit, means no proposal). It runs at most once per
`min_interval_s`, and only for a failure it has not seen; failures that Gremlin's own
mutations caused are skipped, so a bad patch cannot feed the next one.

This package sits below the task queue and the shell executor in the import order, so the
daemon hands in how to search, how to run the proposer and how to submit a task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from memory.store import Store

logger = logging.getLogger(__name__)

LAST_FAILURE = "mutation.last_failure"  # markers: the newest failure seen, and when it last proposed
LAST_PROPOSAL = "mutation.last_proposal"
MAX_FAILURE_CHARS = 8000

Search = Callable[[str, int], Sequence[dict]]
RunProposer = Callable[[Sequence[str], bytes], tuple[bool, str, str]]  # (ok, stdout, why not)
Submit = Callable[[dict], int]


class MutationDaemon:
    """Turns the newest unseen failure into a proposed patch, rate-limited."""

    def __init__(self, settings, store: Store, search: Search, run_proposer: RunProposer, submit: Submit):
        self.settings = settings
        self.store = store
        self.search = search
        self.run_proposer = run_proposer
        self.submit = submit

    def check(self, now: datetime | None = None) -> int | None:
        """Propose a patch for the newest unseen failure when due; returns the mutate task's id."""
        cfg = self.settings.mutation
        now = now or datetime.now(timezone.utc)
        if not (cfg.enabled and cfg.proposer) or not self._due(now):
            return None
        failure = self.store.newest_memory_of("failure", int(self.store.get_marker(LAST_FAILURE) or 0))
        if failure is None:
            return None
        # spent before the proposer runs: a proposer that fails is not asked again every check
        self.store.set_markers({LAST_FAILURE: str(failure["id"]), LAST_PROPOSAL: now.isoformat()})
        if failure["meta"].get("type") == "mutate" or failure["meta"].get("by_gremlin"):
            return None
        return self._propose(failure)

    def _due(self, now: datetime) -> bool:
        last = self.store.get_marker(LAST_PROPOSAL)
        try:
            return last is None or (now - datetime.fromisoformat(last)).total_seconds() >= \
                self.settings.mutation.min_interval_s
        except ValueError:
            return True  # an unreadable marker must not stop proposals for good

    def _propose(self, failure: dict) -> int | None:
        request = proposal_request(failure, self._neighbours(failure), self.settings.watch_roots)
        ok, patch, why = self.run_proposer(self.settings.mutation.proposer, json.dumps(request).encode())
        if not ok or not patch.strip():
            logger.warning("the proposer made no patch", extra={"failure_id": failure["id"], "why": why or "no output"})
            return None
        task_id = self.submit({"type": "mutate", "patch": patch, "failure_id": failure["id"],  # kept from retention
                               "note": f"proposed by {self.settings.mutation.proposer[0]} for failure {failure['id']}"})
        logger.info("patch proposed", extra={"failure_id": failure["id"], "task_id": task_id})
        return task_id

    def _neighbours(self, failure: dict) -> list[dict]:
        k = self.settings.mutation.neighbours
        if k == 0:
            return []
        try:
            hits = self.search(failure["text"][:2000], k + 1)
        except Exception:  # noqa: BLE001 - a proposal without neighbours is still worth asking for
            logger.exception("searching neighbours for a proposal failed", extra={"failure_id": failure["id"]})
            return []
        return [h for h in hits if h.get("id") != failure["id"]][:k]


def proposal_request(failure: dict, neighbours: Sequence[dict], roots: Sequence) -> dict:
    """The JSON the proposer reads on stdin."""
    return {"failure": {"id": failure["id"], "time": failure["created"], "text": failure["text"][:MAX_FAILURE_CHARS],
                        "meta": failure["meta"]},
            "neighbours": [dict(h) for h in neighbours],
            "roots": [str(r) for r in roots],
            "answer": "print a unified diff (paths relative to a root, a/ b/ prefixes allowed) or nothing"}
