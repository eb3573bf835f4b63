"""Logging for the command line and the service: journald when systemd runs us, else stderr.

Every record carries the conversation it belongs to: `SESSION` and `CALL_ID` are context
variables, set when a bridge starts a session, and asyncio copies them into every task the
session creates (livekit's included), so even the framework's own log lines are tagged.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys

from appliance.systemd import RECORD_FIELDS, JournalHandler, stderr_is_journal

SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("session", default=None)
CALL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_id", default=None)
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
QUIET_LOGGERS = ("faster_whisper",)  # a line per utterance at INFO
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*")


def redact_tokens(text: str) -> str:
    """`text` with every JSON web token replaced by `<token>` (a token is a credential)."""
    return _JWT.sub("<token>", text)


class TokenFilter(logging.Filter):
    """Redacts access tokens from records: livekit's native client logs a refused token
    whole, three times per try."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "eyJ" in message:
            record.msg, record.args = redact_tokens(message), None
        return True


def guard_livekit_logs() -> None:
    """Put a `TokenFilter` on the `livekit` logger (the native client's), once."""
    livekit = logging.getLogger("livekit")
    if not any(isinstance(f, TokenFilter) for f in livekit.filters):
        livekit.addFilter(TokenFilter())


class ContextFilter(logging.Filter):
    """Adds `session`/`call_id` from the context and a `context` suffix for text logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session", None) is None:
            record.session = SESSION.get()
        if getattr(record, "call_id", None) is None:
            record.call_id = CALL_ID.get()
        tags = [
            f"{name}={value}"
            for name in RECORD_FIELDS
            if (value := getattr(record, name, None)) is not None
        ]
        record.context = f" [{' '.join(tags)}]" if tags else ""
        return True


def setup(level: int, *, journal: bool | None = None) -> logging.Handler:
    """Configure the root logger once; returns the handler in use.

    `journal=None` picks journald when stderr is connected to it (under systemd).
    """
    use_journal = stderr_is_journal() if journal is None else journal
    handler: logging.Handler
    if use_journal:
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if level > logging.DEBUG:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return handler
