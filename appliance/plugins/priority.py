"""A reply's first audio first: the LLM steps aside while Piper renders it.

On a small CPU the models slow each other down when they run at the same time (measured on
the 2-core bench machine: Piper 1.5-1.7x slower beside another model, bench/README.md).
After the LLM has written a reply's first words it keeps writing the rest while Piper
synthesizes them; the listener waits for that first chunk only, and the LLM is far ahead
of playback. So the first chunk runs `urgent()`, and the LLM waits between tokens
(`wait_turn()`) meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

MAX_WAIT_S = 0.3
"""The longest an LLM token waits for an urgent job (a stuck synthesis never stalls it)."""


class Priority:
    """Shared by the model set's plugins; thread-safe, cheap when nothing is urgent."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._urgent = 0

    @contextmanager
    def urgent(self) -> Iterator[None]:
        """Mark a latency-critical job for its duration."""
        with self._cond:
            self._urgent += 1
        try:
            yield
        finally:
            with self._cond:
                self._urgent -= 1
                self._cond.notify_all()

    def wait_turn(self, timeout: float = MAX_WAIT_S) -> None:
        """Block while an urgent job runs (at most `timeout` seconds)."""
        if self._urgent:  # unlocked read: a stale value only costs or saves one wait
            with self._cond:
                self._cond.wait_for(lambda: self._urgent == 0, timeout)
