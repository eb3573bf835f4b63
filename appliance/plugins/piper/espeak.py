"""The ``espeak-ng`` program, run as a separate process (so no GPL code is imported)."""

from __future__ import annotations

import subprocess
import threading


class EspeakProcess:
    """Runs espeak-ng once per call, in a process started ahead of time.

    espeak-ng reads all of its input before it writes anything, so one process cannot
    serve several calls; but most of a run is starting the program and loading its
    phoneme data, which a process waiting on stdin has already done: from text to
    phonemes 2.3 ms against 8.8 ms for one started then (idle, the 2-core bench machine).
    After each call the next process is started on a helper thread. Thread-safe.
    """

    def __init__(self, argv: list[str]) -> None:
        self._argv = argv
        self._lock = threading.Lock()
        self._ready: subprocess.Popen[bytes] | None = None
        self._closed = False

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def prepare(self) -> None:
        """Start the process the next call will use, unless one is waiting."""
        with self._lock:
            if self._ready is not None or self._closed:
                return
            try:
                self._ready = self._start()
            except OSError:
                return  # the next call starts its own and reports the error

    def run(self, text: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        """(exit code, stdout, stderr) of espeak-ng given `text` on stdin.

        Raises FileNotFoundError when the program is gone, subprocess.TimeoutExpired."""
        with self._lock:
            proc, self._ready = self._ready, None
        if proc is None or proc.poll() is not None:  # none waiting, or it died meanwhile
            proc = self._start()
        threading.Thread(target=self.prepare, name="espeak-prepare", daemon=True).start()
        try:
            out, err = proc.communicate(text, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return proc.returncode, out, err

    def close(self) -> None:
        """Stop the waiting process; later calls start their own."""
        with self._lock:
            proc, self._ready, self._closed = self._ready, None, True
        if proc is not None:
            proc.kill()
            proc.communicate()
