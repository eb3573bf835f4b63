"""Peer input the daemon refuses: counted by kind, logged at most once per kind per interval.

A flood of bad packets must not become a flood of log lines (or tracebacks): each kind
(`malformed`, `busy`, `scanner`, ...: a fixed set named by the code, never by the peer)
gets one line per `interval` carrying the running count, and the counts are served as
`appliance_bad_input{source,kind}` (`Metrics.count_bad_input`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter


class BadInput:
    """Counts and throttled log lines for one source of peer input (e.g. "sip")."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger, self.interval = logger, interval
        self.counts: Counter[str] = Counter()
        self._logged: dict[str, float] = {}

    def __call__(
        self,
        kind: str,
        detail: str,
        *args: object,
        level: int = logging.WARNING,
        exc_info: bool = False,
    ) -> None:
        """Count one; log `detail % args` unless this kind was logged within the interval."""
        self.counts[kind] += 1
        now = time.monotonic()
        if now - self._logged.get(kind, -math.inf) < self.interval:
            return
        self._logged[kind] = now
        message = f"{detail} [{kind}: %d so far]"
        self.logger.log(level, message, *args, self.counts[kind], exc_info=exc_info)
