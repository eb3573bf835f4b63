"""Prometheus metrics: per-stage latency, sessions, turns, interruptions, errors, loop lag.

One `Metrics` per process. Bridges call `observe(session, bridge)` for each AgentSession;
the figures come from livekit's own per-message metrics (the same ones `python -m bench latency`
reports). `appliance.observe.web` serves the text format at GET /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from appliance.session.modelset import LoadTimes

# livekit's per-message metric -> our stage name, by the message's role: the one map behind
# the /metrics histogram, the events stream (`<stage>_ms`) and the benchmarks
STAGES: dict[str, dict[str, str]] = {
    "user": {"end_of_turn_delay": "end_of_turn", "transcription_delay": "stt"},
    "assistant": {
        "llm_node_ttft": "llm_first_token",
        "llm_node_ttfs": "llm_first_sentence",
        "tts_node_ttfb": "tts_first_audio",
        "e2e_latency": "voice_to_voice",
    },
}
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def stage_figures(role: str, metrics: Mapping[str, object] | None) -> dict[str, float]:
    """The stage figures (seconds) in one chat message's livekit metrics, by stage name."""
    figures = {}
    for key, stage in STAGES.get(role, {}).items():
        value = (metrics or {}).get(key)
        if isinstance(value, int | float) and value >= 0:
            figures[stage] = float(value)
    return figures


class Metrics:
    """The process's metrics registry and the updates the daemon makes to it."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "appliance_stage_seconds",
            "Per-turn latency by stage (livekit's metrics): end_of_turn and stt after the "
            "end of user speech, llm_first_token, llm_first_sentence, tts_first_audio, "
            "voice_to_voice",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions_active = Gauge(
            "appliance_sessions_active", "AgentSessions running", ["bridge"], registry=r
        )
        self.sessions_total = Counter(
            "appliance_sessions", "AgentSessions started", ["bridge"], registry=r
        )
        self.calls_active = Gauge("appliance_calls_active", "Phone calls in progress", registry=r)
        self.turns = Counter("appliance_turns", "Conversation turns", ["role"], registry=r)
        self.interruptions = Counter(
            "appliance_interruptions", "Agent replies cut short by the user", registry=r
        )
        self.session_errors = Counter(
            "appliance_session_errors",
            "Errors reported by sessions (llm_error, stt_error, tts_error, ...)",
            ["kind"],
            registry=r,
        )
        self.logged_errors = Counter(
            "appliance_logged_errors", "Records logged at ERROR or above", ["logger"], registry=r
        )
        self.model_load_seconds = Gauge(
            "appliance_model_load_seconds",
            "Start-up time per step: verify, stt, llm, tts, turn, warm",
            ["step"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "appliance_event_loop_lag_seconds",
            "How late the event loop ran a timer (a blocked loop delays every call's audio)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.ready = Gauge("appliance_ready", "1 once the daemon is serving", registry=r)
        self._bad_input: dict[str, Mapping[str, int]] = {}
        r.register(self)  # collect() below serves the bad-input counts

    def count_bad_input(self, source: str, counts: Mapping[str, int]) -> None:
        """Serve `counts` (kind -> refused inputs, kept up to date by their owner)."""
        self._bad_input[source] = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "appliance_bad_input",
            "Peer input refused or dropped (malformed, busy, scanner, ...) by source and kind",
            labels=["source", "kind"],
        )
        for source, counts in self._bad_input.items():
            for kind, count in sorted(counts.items()):
                family.add_metric([source, kind], count)
        yield family

    def models_loaded(self, times: LoadTimes) -> None:
        self.model_load_seconds.labels("verify").set(times.verify_s)
        for step, seconds in times.load_s.items():
            self.model_load_seconds.labels(step).set(seconds)
        self.model_load_seconds.labels("warm").set(times.warm_s)

    def observe(self, session: AgentSession, bridge: str) -> None:
        """Count this session and everything it reports until it closes."""
        self.sessions_total.labels(bridge).inc()
        self.sessions_active.labels(bridge).inc()

        def on_item(ev: Any) -> None:
            item = ev.item
            role = getattr(item, "role", None)
            if role not in ("user", "assistant"):
                return  # handoffs and tool items have no turn figures
            self.turns.labels(role).inc()
            if role == "assistant" and getattr(item, "interrupted", False):
                self.interruptions.inc()
            for stage, seconds in stage_figures(role, getattr(item, "metrics", None)).items():
                self.stage_seconds.labels(stage).observe(seconds)

        def on_error(ev: Any) -> None:
            self.session_errors.labels(str(getattr(ev.error, "type", "unknown"))).inc()

        def on_close(_: Any) -> None:
            self.sessions_active.labels(bridge).dec()

        session.on("conversation_item_added", on_item)
        session.on("error", on_error)
        session.on("close", on_close)

    def log_handler(self) -> logging.Handler:
        """A handler that counts ERROR records by logger (add it to the root logger)."""
        metrics = self

        class _Count(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                metrics.logged_errors.labels(record.name).inc()

        return _Count(logging.ERROR)

    def text(self) -> bytes:
        return generate_latest(self.registry)
