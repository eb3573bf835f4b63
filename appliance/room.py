"""The LiveKit room bridge: a conversation also lives in a LiveKit room when a server answers.

For each conversation two participants join the room, with tokens the appliance mints itself:

- the person: the phone caller (participant kind SIP, identity `sip_<number>`, LiveKit
  SIP's `sip.*` attributes) or the kiosk's microphone (kind standard). It publishes what the
  caller or the microphone says, and the caller or the USB speaker hears every other audio
  track in the room mixed: the agent and any human who joins;
- the agent (kind agent): the local AgentSession attached through livekit-agents' RoomIO to
  the person, with the reference's `RoomOptions`. Noise suppression is chosen per
  participant kind and done locally (WebRTC APM): telephony-tuned for SIP participants.
  Replies are published with transcriptions, and the agent's state as an attribute.

Without a server the conversation runs direct (offline), as it does with the bridge off. A
conversation waits `join_wait` seconds for the room, then starts direct; the bridge keeps
trying with backoff and moves the conversation into the room when it answers, between turns.
When the room drops mid-conversation (either participant reconnecting or disconnected), the
conversation goes back to direct at once, the caller stays on the line, and the bridge
retries. Nothing here blocks the event loop: connecting is the livekit FFI's asynchronous
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol

import numpy as np
from livekit import api, rtc
from livekit.agents import AgentSession
from livekit.agents.voice import room_io
from livekit.agents.voice.room_io.types import NoiseCancellationParams
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

from appliance.audio.live import LiveInput, Playout
from appliance.audio.pcm import SESSION_RATE, mono16
from appliance.config import Config, ConfigError, LivekitConfig
from appliance.session.builder import TextSink, connect_audio

logger = logging.getLogger("appliance.room")
PROCESSED = "appliance.audio_processed"  # attribute: the track is already echo-cancelled

RETRY_MIN_S = 1.0
MIX_MAX_S = 0.5  # audio buffered per remote track before the oldest is dropped
Kind = Literal["sip", "standard"]


@dataclass
class Person:
    """Who the local side of a conversation is, in the room."""

    identity: str
    name: str
    kind: Kind
    attributes: dict[str, str] = field(default_factory=dict)


def caller_person(call: dict[str, Any]) -> Person:
    """A phone caller as LiveKit SIP shows one: `sip_<number>`, kind SIP, `sip.*` attributes.

    `call` is the call's `userdata["call"]` (call_id, phone_number, display_name, ...).
    """
    number = str(call.get("phone_number") or "")
    ident = re.sub(r"[^A-Za-z0-9+_.-]", "_", number or str(call["call_id"]))
    return Person(
        identity=f"sip_{ident}",
        name=str(call.get("display_name") or "") or f"Phone {number or 'caller'}",
        kind="sip",
        attributes={
            "sip.callID": str(call["call_id"]),
            "sip.phoneNumber": number,
            "sip.callStatus": "active",
            "sip.callDirection": str(call.get("direction", "inbound")),
            "sip.uri": str(call.get("uri") or ""),
        },
    )


def kiosk_person(host: str | None = None) -> Person:
    """The kiosk's microphone and speaker (echo-cancelled on the appliance)."""
    host = host or socket.gethostname()
    return Person(
        identity=f"kiosk_{host}",
        name=f"Kiosk {host}",
        kind="standard",
        attributes={"appliance.source": "usb", "appliance.host": host, PROCESSED: "true"},
    )


def room_name(template: str, **fields: str) -> str:
    """The room of a conversation from `[livekit] room` (characters LiveKit may not
    like in a room name become '-')."""
    fields.setdefault("host", socket.gethostname())
    for name in ("source", "session", "call_id", "number"):
        fields.setdefault(name, "")
    name = template.format(**fields)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "appliance"


def mint_token(
    cfg: LivekitConfig,
    secret: str,
    *,
    room: str,
    identity: str,
    name: str,
    kind: Literal["standard", "sip", "agent"],
    attributes: dict[str, str] | None = None,
) -> str:
    """A join token for one participant of one room, signed with the API secret."""
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_subscribe=True,
        can_publish_data=True,
        agent=True if kind == "agent" else None,
    )
    token = (
        api.AccessToken(cfg.api_key, secret)
        .with_identity(identity)
        .with_name(name)
        .with_kind(kind)
        .with_grants(grants)
        .with_ttl(timedelta(seconds=cfg.token_ttl))
    )
    if attributes:
        token = token.with_attributes(attributes)
    return token.to_jwt()


class LocalNoiseFilter(rtc.FrameProcessor[rtc.AudioFrame]):
    """RoomIO's noise cancellation, done on the appliance with the WebRTC APM.

    `telephony`: noise suppression, high-pass and gain control for narrow-band phone audio
    (as LiveKit picks BVCTelephony for SIP participants); otherwise suppression and high-pass.
    """

    RATES = (8000, 16000, 32000, 48000)

    def __init__(self, telephony: bool) -> None:
        self.telephony = telephony
        self._enabled = True
        self._apm = rtc.AudioProcessingModule(
            noise_suppression=True, high_pass_filter=True, auto_gain_control=telephony
        )

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value

    def _process(self, frame: rtc.AudioFrame) -> rtc.AudioFrame:
        if frame.sample_rate not in self.RATES or frame.num_channels != 1:
            return frame
        step = frame.sample_rate // 100
        pcm = np.frombuffer(frame.data, np.int16).copy()
        for start in range(0, len(pcm) - step + 1, step):  # the APM takes 10 ms at a time
            piece = rtc.AudioFrame(pcm[start : start + step].tobytes(), frame.sample_rate, 1, step)
            self._apm.process_stream(piece)
            pcm[start : start + step] = np.frombuffer(piece.data, np.int16)
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


def room_options(person: Person, text: TextSink | None) -> room_io.RoomOptions:
    """RoomIO's options for the agent: linked to the person, audio at the STT's rate with
    the local per-kind noise filter; the conversation (not RoomIO) decides when it ends."""
    return room_io.RoomOptions(
        participant_identity=person.identity,
        audio_input=room_io.AudioInputOptions(
            sample_rate=SESSION_RATE, frame_size_ms=20, noise_cancellation=noise_filter
        ),
        text_output=room_io.TextOutputOptions(next_in_chain=text),
        close_on_disconnect=False,
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
        local_in.tap = self._tap
        local_out.feed = self.mixer.pull
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
        local_in.tap = None
        local_out.feed = None

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


class RoomBridge:
    """One conversation's mode, room or direct, and the retries between them.

    `connect` joins the room (None: the bridge is off, the conversation is direct); the
    direct path is the conversation's own microphone and speaker, wired by `connect_audio`.
    """

    def __init__(
        self,
        cfg: LivekitConfig,
        connect: Connect | None,
        session: AgentSession,
        local_in: LiveInput,
        local_out: Playout,
        text: TextSink,
        *,
        room: str = "",
    ) -> None:
        self.cfg, self._connect = cfg, connect
        self.session = session
        self.local_in, self.local_out, self.text = local_in, local_out, text
        self.room = room
        self.mode: Literal["starting", "room", "direct"] = "starting"
        self.link: Link | None = None
        self.attempts: list[dict[str, Any]] = []  # every try: when, how long, the outcome
        self.switches: list[tuple[float, str]] = []  # (monotonic time, mode)
        self.listeners: list[Callable[[str], None]] = []  # each mode change (events stream)
        self._syncs: list[TranscriptSynchronizer] = []
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self._closing = False
        self._leaving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Try the room for up to `join_wait` seconds, else go direct; retries run on."""
        if self._connect is None:
            self._direct()
            return
        self._task = asyncio.create_task(self._run(), name=f"room bridge {self.room}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first.wait(), self.cfg.join_wait)
        if self.mode == "starting":
            if self.cfg.join_wait > 0:
                logger.warning(
                    "room %r: no answer from %s within %.1f s; the conversation starts offline",
                    self.room,
                    self.cfg.url,
                    self.cfg.join_wait,
                )
            self._direct()

    def _direct(self) -> None:
        sync, _ = connect_audio(self.session, self.local_in, self.local_out, self.text)
        self._syncs.append(sync)
        self._set_mode("direct")

    def _set_mode(self, mode: Literal["room", "direct"]) -> None:
        self.mode = mode
        self.switches.append((time.monotonic(), mode))
        if self.room:
            for listener in self.listeners:
                listener(mode)

    async def _run(self) -> None:
        assert self._connect is not None
        failures = 0
        while not self._closing:
            started = time.monotonic()
            try:
                link = await self._connect()
            except Exception as exc:
                failures += 1
                self._record(started, f"failed: {exc}")
                self._first.set()
                await asyncio.sleep(self._backoff(failures))
                continue
            self._record(started, "joined")
            try:
                await self._between_turns()
                if self._closing:
                    await link.aclose(hangup=True)
                    return
                await link.attach(self.session, self.local_in, self.local_out, self.text)
            except Exception as exc:
                logger.warning("room %r: could not attach the conversation: %s", self.room, exc)
                link.detach(self.local_in, self.local_out)
                await link.aclose()
                if self.mode != "starting":  # RoomIO may have taken the session's audio
                    self._direct()
                self._first.set()
                failures += 1
                await asyncio.sleep(self._backoff(failures))
                continue
            self.link = link
            self._set_mode("room")
            self._first.set()
            failures = 0
            await link.dropped.wait()
            if self._closing:
                return
            logger.warning("room %r dropped; the conversation goes on offline", self.room)
            with contextlib.suppress(RuntimeError):  # a reply into a dead room never ends
                self.session.interrupt(force=True)
            link.detach(self.local_in, self.local_out)
            self.link = None
            self._direct()
            leaving = asyncio.create_task(link.aclose())  # leaving a dead room takes a while
            self._leaving.add(leaving)
            leaving.add_done_callback(self._leaving.discard)
            failures = 1
            await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Seconds before the next try: 1, 2, 4 ... up to `retry_max`."""
        return min(self.cfg.retry_max, RETRY_MIN_S * 2 ** (failures - 1))

    def _record(self, started: float, outcome: str) -> None:
        took = time.monotonic() - started
        self.attempts.append({"at": started, "took_s": round(took, 3), "outcome": outcome})
        log = logger.info if outcome == "joined" else logger.warning
        log("room %r at %s: %s (%.1f s)", self.room, self.cfg.url, outcome, took)

    async def _between_turns(self) -> None:
        """Wait until nobody speaks and the agent is not replying (the session may not
        have started yet: then it is free)."""
        while not self._closing and self.mode != "starting":
            s = self.session
            if s.agent_state in ("listening", "initializing") and s.user_state != "speaking":
                return
            await asyncio.sleep(0.1)

    async def aclose(self, hangup: bool = False) -> None:
        """Stop retrying and leave the room; call after the session has closed."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.link is not None:
            self.link.detach(self.local_in, self.local_out)
            await self.link.aclose(hangup=hangup)
            self.link = None
        for task in list(self._leaving):
            with contextlib.suppress(Exception):
                await task
        for sync in self._syncs:
            await sync.aclose()


def conversation_bridge(
    config: Config,
    session: AgentSession,
    local_in: LiveInput,
    local_out: Playout,
    text: TextSink,
    *,
    source: Literal["sip", "usb"],
    sid: str,
    person: Person,
    call_id: str = "",
    number: str = "",
) -> RoomBridge:
    """The audio wiring of one conversation: through a room when `[livekit]` bridges this
    source, else direct. An unreadable API secret is logged and the conversation is direct."""
    lk = config.livekit
    if not lk.enabled or source not in lk.sources:
        return RoomBridge(lk, None, session, local_in, local_out, text)
    name = room_name(lk.room, source=source, session=sid, call_id=call_id, number=number)
    try:
        secret = lk.secret()
    except ConfigError as exc:
        logger.error("%s; the conversation runs offline", exc)
        return RoomBridge(lk, None, session, local_in, local_out, text, room=name)
    agent = f"agent_{socket.gethostname()}"

    def connect() -> Awaitable[Link]:
        return RoomLink.connect(lk, secret, name, person, agent)

    return RoomBridge(lk, connect, session, local_in, local_out, text, room=name)
