"""A status line on stderr for planner searches that run past a second (rich); short searches print nothing."""

from __future__ import annotations

import time

SHOW_AFTER_S = 1.0
"""Seconds a search runs before its status line appears: most searches end sooner and stay silent."""

CHECK_EVERY = 32
"""Steps between clock reads (a step is one candidate: microseconds to milliseconds)."""


class SearchProgress:
    """Counts the search's steps; after SHOW_AFTER_S, shows the phase, the steps and the best step time."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        self.steps = 0
        self._status = None

    def step(self, phase: str, done: int, total: int, best_s: float | None) -> None:
        """One candidate of ``phase`` visited (``done`` of ``total``), the best step so far ``best_s``."""
        if not self.enabled:
            return
        self.steps += 1
        if self.steps % CHECK_EVERY:
            return
        if self._status is None:
            if time.perf_counter() - self.start < SHOW_AFTER_S:
                return
            from rich.console import Console

            self._status = Console(stderr=True).status("planning")
            self._status.start()
        best = f", best step so far {best_s:.3g} s" if best_s is not None else ""
        self._status.update(f"planning: {phase}, {done:,} of {total:,} layouts{best}")

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
