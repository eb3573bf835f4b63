"""One VAD stream per session, heard by the session and by the STT.

livekit runs the session's VAD on the user's audio for turn-taking; our Whisper STT needs
the same speech/silence decisions to cut segments. Without sharing, each session runs two
Silero streams on the same audio (one more executor hop every 32 ms, about 1.5 % of a core
while idle on a 2-core machine). `SharedVAD` wraps the session's VAD: the stream livekit
opens passes every event on to `listeners` as well (the STT's segmenter).
"""

from __future__ import annotations

from collections.abc import Callable

from livekit import rtc
from livekit.agents import vad

Listener = Callable[[vad.VADEvent], None]
SPEECH_PROBABILITY = 0.5
"""Silero's activation threshold (livekit's default): a window at or above it is speech."""


class SharedVAD(vad.VAD):
    """A VAD whose streams' events also go to `listeners` (called on the event loop)."""

    def __init__(self, inner: vad.VAD) -> None:
        super().__init__(capabilities=inner.capabilities)
        self._inner = inner
        self.listeners: list[Listener] = []

    @property
    def model(self) -> str:
        return self._inner.model

    @property
    def provider(self) -> str:
        return self._inner.provider

    def stream(self) -> vad.VADStream:
        return _SharedStream(self, self._inner.stream())


class _SharedStream(vad.VADStream):
    """Frames go straight to the inner stream; its events come back out and to listeners."""

    def __init__(self, owner: SharedVAD, inner: vad.VADStream) -> None:
        self._owner = owner
        self._inner = inner
        super().__init__(owner)

    def push_frame(self, frame: rtc.AudioFrame) -> None:
        self._check_input_not_ended()
        self._check_not_closed()
        self._inner.push_frame(frame)

    def flush(self) -> None:
        self._check_input_not_ended()
        self._check_not_closed()
        self._inner.flush()

    def end_input(self) -> None:
        self._inner.end_input()
        self._input_ch.close()

    async def _main_task(self) -> None:
        async for event in self._inner:
            self._event_ch.send_nowait(event)
            for listener in list(self._owner.listeners):
                listener(event)

    async def aclose(self) -> None:
        await super().aclose()
        await self._inner.aclose()
