"""The two systemd protocols the daemon speaks, without libsystemd.

* `Notifier`: sd_notify, one datagram per message to `$NOTIFY_SOCKET` (READY, STATUS,
  WATCHDOG, RELOADING, STOPPING). Without the variable it does nothing,
  so the daemon runs the same by hand.
* `JournalHandler`: a logging handler that writes journald's native protocol to
  `/run/systemd/journal/socket`, so every record keeps its fields (PRIORITY, LOGGER,
  SESSION, CALL_ID, STAGE, CODE_*) instead of being one line of text.

Both are a datagram each; writing them here (rather than with the `systemd-python`
binding) keeps the daemon free of a compiled dependency and lets the tests point both at
their own sockets.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
import traceback
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# logging level -> syslog priority (journald's PRIORITY field)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
# record attributes (set with `extra=` or by `logs.ContextFilter`) sent as journal fields
RECORD_FIELDS = ("session", "call_id", "stage", "reason", "model")


def _address(path: str) -> str:
    """An abstract socket is written with a leading '@'."""
    return "\0" + path[1:] if path.startswith("@") else path


class Notifier:
    """sd_notify over `$NOTIFY_SOCKET`; every method is a no-op when it is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.path = env.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        if self.path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # systemd asks for a ping at least every WATCHDOG_USEC; half of it is the advice
        self.watchdog_interval = usec / 2e6 if usec > 0 and mine else 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send one notification (several `KEY=value` lines); False if it could not go."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), _address(self.path))
        except OSError:
            return False  # systemd is gone or busy: never let this stop the daemon
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self, status: str) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _field(name: str, value: str) -> bytes:
    """One field of journald's native protocol (binary-safe form for multi-line values)."""
    key = name.upper().encode()
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return key + b"=" + data + b"\n"
    return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


class JournalHandler(logging.Handler):
    """Log records to journald as structured entries."""

    MAX_MESSAGE = 48 * 1024  # a datagram journald accepts; longer messages are cut

    def __init__(self, identifier: str = "appliance", path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        fields = {
            "MESSAGE": message[: self.MAX_MESSAGE],
            "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName or "",
        }
        for name in RECORD_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name.upper()] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = b"".join(_field(k, v) for k, v in self.fields(record).items())
            self._sock.sendto(payload, _address(self.path))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected stderr to the journal (`$JOURNAL_STREAM` matches)."""
    env = os.environ if env is None else env
    stream = env.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"
