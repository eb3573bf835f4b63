"""A conversation's presence in a room (`RoomLink`): the person's published audio, the room
mixed for them, and the agent attached through RoomIO with per-kind local noise filtering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice import room_io
from livekit.agents.voice.room_io.types import NoiseCancellationParams

from appliance.audio.live import LiveInput, Playout
from appliance.audio.pcm import SESSION_RATE, mono16
from appliance.audio.processing import RATES, STANDARD, TELEPHONY, AudioProcessor
from appliance.config import LivekitConfig
from appliance.room.people import PROCESSED, Person, mint_token
from appliance.session.builder import TextSink

logger = logging.getLogger("appliance.room")
MIX_MAX_S = 0.5  # audio buffered per remote track before the oldest is dropped


class LocalNoiseFilter(rtc.FrameProcessor[rtc.AudioFrame]):
    """RoomIO's noise cancellation, done on the appliance: the `TELEPHONY` preset for
    narrow-band phone audio (as LiveKit picks BVCTelephony for SIP participants), otherwise
    `STANDARD` (`appliance.audio.processing`)."""

    def __init__(self, telephony: bool) -> None:
        self.telephony = telephony
        self._enabled = True
        self._processor = AudioProcessor(TELEPHONY if telephony else STANDARD)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value

    def _process(self, frame: rtc.AudioFrame) -> rtc.AudioFrame:
        if frame.sample_rate not in RATES or frame.num_channels != 1:
            return frame
        pcm = self._processor.process(np.frombuffer(frame.data, np.int16), frame.sample_rate)
        return rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, len(pcm))

    def _close(self) -> None:
        self._enabled = False


def noise_filter(
    params: NoiseCancellationParams,
) -> rtc.FrameProcessor[rtc.AudioFrame] | None:
    """The reference's per-kind choice: telephony-tuned for SIP participants, standard for
    others, none for a track the appliance already cleaned (its own kiosk microphone)."""
    participant = params.participant
    if participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_SIP:
        return LocalNoiseFilter(telephony=True)
    if participant.attributes.get(PROCESSED) == "true":
        return None
    return LocalNoiseFilter(telephony=False)


def room_options(
    person: Person, text: TextSink | None, *, close_on_disconnect: bool = False
) -> room_io.RoomOptions:
    """RoomIO's options for the agent: linked to the person, audio at the STT's rate with
    the local per-kind noise filter; by default the conversation (not RoomIO) decides when
    it ends."""
    return room_io.RoomOptions(
        participant_identity=person.identity,
        audio_input=room_io.AudioInputOptions(
            sample_rate=SESSION_RATE, frame_size_ms=20, noise_cancellation=noise_filter
        ),
        text_output=room_io.TextOutputOptions(next_in_chain=text),
        close_on_disconnect=close_on_disconnect,
    )


class RoomMixer:
    """Every remote audio track of the room, mixed for the caller or the USB speaker.

    Tracks are read on the event loop at the sink's rate; `pull` is called by the sink's
    clock (the RTP sender or the speaker's device thread).
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._buffers: dict[str, deque[np.ndarray]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.samples_mixed = 0

    def add(self, track: rtc.Track | None, key: str) -> None:
        """Mix a track (None: audio will be `push`ed for `key`)."""
        if key in self._buffers:
            return
        with self._lock:
            self._buffers[key] = deque()
        if track is not None:
            self._tasks[key] = asyncio.create_task(self._read(track, key), name=f"mix {key}")

    def remove(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        with self._lock:
            self._buffers.pop(key, None)

    async def _read(self, track: rtc.Track, key: str) -> None:
        stream = rtc.AudioStream.from_track(track=track, sample_rate=self.rate, num_channels=1)
        try:
            async for event in stream:
                if not self.push(key, mono16(event.frame)):
                    return
        finally:
            await stream.aclose()

    def push(self, key: str, pcm: np.ndarray) -> bool:
        """Audio from one track, at the mixer's rate (False: the track was removed)."""
        limit = int(self.rate * MIX_MAX_S)
        with self._lock:
            buffer = self._buffers.get(key)
            if buffer is None:
                return False
            buffer.append(pcm)
            while sum(len(p) for p in buffer) > limit:  # a stalled sink: keep the newest
                buffer.popleft()
        return True

    def pull(self, n: int) -> np.ndarray:
        """The next `n` samples of the mix (silence where a track has nothing yet)."""
        mix = np.zeros(n, np.int32)
        with self._lock:
            for buffer in self._buffers.values():
                filled = 0
                while filled < n and buffer:
                    head = buffer[0]
                    k = min(n - filled, len(head))
                    mix[filled : filled + k] += head[:k]
                    if k == len(head):
                        buffer.popleft()
                    else:
                        buffer[0] = head[k:]
                    filled += k
                self.samples_mixed += filled
        return np.clip(mix, -32768, 32767).astype(np.int16)

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for key in list(self._buffers):
            self.remove(key)
        await asyncio.gather(*tasks, return_exceptions=True)


class Link(Protocol):
    """A conversation's presence in a room (the real one is `RoomLink`)."""

    dropped: asyncio.Event

    async def attach(
        self, session: AgentSession, local_in: LiveInput, local_out: Playout, text: TextSink
    ) -> None: ...

    def detach(self, local_in: LiveInput, local_out: Playout) -> None: ...

    async def aclose(self, hangup: bool = False) -> None: ...


Connect = Callable[[], Awaitable[Link]]


class RoomLink:
    """The person's and the agent's connections to one room."""

    def __init__(self, room: str, person: Person, person_room: rtc.Room, agent_room: rtc.Room):
        self.room, self.person = room, person
        self.person_room, self.agent_room = person_room, agent_room
        self.dropped = asyncio.Event()
        self.room_io: room_io.RoomIO | None = None
        self._source: rtc.AudioSource | None = None
        self._outgoing: asyncio.Queue[rtc.AudioFrame] = asyncio.Queue(maxsize=50)
        self._tasks: list[asyncio.Task[None]] = []
        self.mixer: RoomMixer | None = None
        for r in (person_room, agent_room):
            r.on("connection_state_changed", self._state_changed)

    @classmethod
    async def connect(
        cls, cfg: LivekitConfig, secret: str, room: str, person: Person, agent_identity: str
    ) -> RoomLink:
        """Join `room` as the person and as the agent (raises on failure, leaving nothing)."""
        person_room, agent_room = rtc.Room(), rtc.Room()
        tokens = (
            mint_token(
                cfg,
                secret,
                room=room,
                identity=person.identity,
                name=person.name,
                kind=person.kind,
                attributes=person.attributes,
            ),
            mint_token(cfg, secret, room=room, identity=agent_identity, name="Agent", kind="agent"),
        )
        options = rtc.RoomOptions(auto_subscribe=True, connect_timeout=cfg.connect_timeout)
        try:
            for r, token in zip((person_room, agent_room), tokens, strict=True):
                # the FFI retries by itself; the bound here only guards against a hang
                await asyncio.wait_for(
                    r.connect(cfg.url, token, options), 4 * cfg.connect_timeout + 5
                )
        except BaseException:
            for r in (person_room, agent_room):
                with contextlib.suppress(Exception):
                    await r.disconnect()
            raise
        return cls(room, person, person_room, agent_room)

    def _state_changed(self, state: rtc.ConnectionState.ValueType) -> None:
        if state in (
            rtc.ConnectionState.CONN_RECONNECTING,
            rtc.ConnectionState.CONN_DISCONNECTED,
        ):
            self.dropped.set()

    async def attach(
        self, session: AgentSession, local_in: LiveInput, local_out: Playout, text: TextSink
    ) -> None:
        """Publish the person's audio, mix the room for them, attach the session (RoomIO)."""
        self._source = rtc.AudioSource(SESSION_RATE, 1, queue_size_ms=200)
        track = rtc.LocalAudioTrack.create_audio_track("microphone", self._source)
        publish = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.person_room.local_participant.publish_track(track, publish)
        self._tasks.append(asyncio.create_task(self._publish(), name="room publish"))
        self.mixer = RoomMixer(local_out.sink_rate() or SESSION_RATE)
        self.person_room.on("track_subscribed", self._subscribed)
        self.person_room.on("track_unsubscribed", self._unsubscribed)
        for participant in self.person_room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.kind == rtc.TrackKind.KIND_AUDIO:
                    self.mixer.add(publication.track, publication.sid)
        options = room_options(self.person, text)
        self.room_io = room_io.RoomIO(session, self.agent_room, options=options)
        await self.room_io.start()
        local_in.divert(self._tap)
        local_out.divert(self.mixer.pull)
        logger.info("in room %r as %s", self.room, self.person.identity)

    def _subscribed(self, track: rtc.Track, publication: Any, participant: Any) -> None:
        if self.mixer is not None and track.kind == rtc.TrackKind.KIND_AUDIO:
            self.mixer.add(track, publication.sid)

    def _unsubscribed(self, track: rtc.Track, publication: Any, participant: Any) -> None:
        if self.mixer is not None:
            self.mixer.remove(publication.sid)

    def _tap(self, frame: rtc.AudioFrame) -> None:
        if self._outgoing.full():
            self._outgoing.get_nowait()
        self._outgoing.put_nowait(frame)

    async def _publish(self) -> None:
        while self._source is not None:
            frame = await self._outgoing.get()
            if frame.sample_rate != SESSION_RATE:
                continue
            await self._source.capture_frame(frame)

    def detach(self, local_in: LiveInput, local_out: Playout) -> None:
        """The local side stops using the room (its own audio paths take over)."""
        local_in.divert(None)
        local_out.divert(None)

    async def aclose(self, hangup: bool = False) -> None:
        """Leave the room; `hangup` first marks a caller's `sip.callStatus` as hangup."""
        if hangup and self.person.kind == "sip" and self.person_room.isconnected():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.person_room.local_participant.set_attributes({"sip.callStatus": "hangup"}),
                    2,
                )
        for task in self._tasks:
            task.cancel()
        if self.room_io is not None:
            with contextlib.suppress(Exception):
                await self.room_io.aclose()
        if self.mixer is not None:
            await self.mixer.aclose()
        if self._source is not None:
            source, self._source = self._source, None
            with contextlib.suppress(Exception):
                await source.aclose()
        for r in (self.person_room, self.agent_room):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.disconnect(), 5)
