"""The live events stream: what every conversation does, as versioned JSON.

`EventHub` turns each session's livekit events into plain JSON messages (schema:
`appliance/static/events.schema.json`, version `SCHEMA_VERSION`) and fans them out to
subscribers (the kiosk page, the operator view, `appliance events`). Every message is

    {"v": 1, "type": "...", "ts": <unix seconds>, "session": "usb-3" | null,
     "call": "<SIP Call-ID>" | null, "data": {...}}

A subscriber that cannot keep up loses its oldest messages, never the daemon's time. New
subscribers get a snapshot first (sessions, their state, the recent messages).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.observe.metrics import stage_figures

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from appliance.config import HttpConfig
    from appliance.room.bridge import RoomBridge
    from appliance.session.builder import TextSink

SCHEMA_VERSION = 1
RECENT = 200  # messages replayed to a new subscriber
QUEUE = 500  # messages a slow subscriber may lag behind


@dataclass
class SessionInfo:
    """One session as the bridges and the observers see it."""

    id: str
    bridge: str  # "usb", "sip"
    session: AgentSession
    text: TextSink  # the agent's words, in step with its speech
    manual: bool = False  # turns end with commit_user_turn() (push-to-talk)
    call: str | None = None  # the SIP Call-ID of a phone call
    room: RoomBridge | None = None  # its LiveKit room bridge (mode, room name, attempts)


@dataclass
class SessionStats:
    id: str
    bridge: str
    manual: bool
    call: str | None
    started: float
    agent_state: str = "initializing"
    user_state: str = "listening"
    turns: int = 0
    voice_to_voice_ms: list[float] = field(default_factory=list)
    room: RoomBridge | None = None

    def summary(self) -> dict[str, Any]:
        v2v = self.voice_to_voice_ms
        return {
            "session": self.id,
            "bridge": self.bridge,
            "call": self.call,
            "manual": self.manual,
            "started": round(self.started, 3),
            "agent_state": self.agent_state,
            "user_state": self.user_state,
            "turns": self.turns,
            "last_voice_to_voice_ms": v2v[-1] if v2v else None,
            "p50_voice_to_voice_ms": round(statistics.median(v2v), 1) if v2v else None,
            "room": (
                {"name": self.room.room, "mode": self.room.mode}
                if self.room is not None and self.room.room
                else None
            ),
        }


class EventHub:
    """Publishes conversation events to every subscriber."""

    def __init__(self, info: dict[str, Any] | None = None) -> None:
        self.info = info or {}  # models in use etc., for the snapshot
        self.sessions: dict[str, SessionStats] = {}
        self.calls_active = 0
        self.last_voice_to_voice_ms: float | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    # -- fan-out --

    def publish(
        self, type_: str, session: str | None = None, call: str | None = None, **data: Any
    ) -> dict[str, Any]:
        message = {
            "v": SCHEMA_VERSION,
            "type": type_,
            "ts": round(time.time(), 3),
            "session": session,
            "call": call,
            "data": data,
        }
        self.recent.append(message)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()  # a slow client loses its oldest message
            queue.put_nowait(message)
        return message

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def snapshot(self) -> dict[str, Any]:
        """What a new subscriber needs to draw the page at once (a `snapshot` message)."""
        return {
            "v": SCHEMA_VERSION,
            "type": "snapshot",
            "ts": round(time.time(), 3),
            "session": None,
            "call": None,
            "data": {
                "info": self.info,
                "sessions": [s.summary() for s in self.sessions.values()],
                "calls_active": self.calls_active,
                "last_voice_to_voice_ms": self.last_voice_to_voice_ms,
                "recent": list(self.recent),
            },
        }

    # -- sessions --

    def observe(self, conv: SessionInfo) -> None:
        """Publish this conversation's events until it closes."""
        sid, call = conv.id, conv.call
        stats = SessionStats(sid, conv.bridge, conv.manual, call, time.time(), room=conv.room)
        self.sessions[sid] = stats
        session = conv.session

        def pub(type_: str, **data: Any) -> None:
            self.publish(type_, sid, call, **data)

        bridge = conv.room
        if bridge is not None:
            bridge.listeners.append(lambda mode: pub("room", name=bridge.room, mode=mode))

        def agent_state(ev: Any) -> None:
            stats.agent_state = ev.new_state
            pub("agent_state_changed", old=ev.old_state, new=ev.new_state)

        def user_state(ev: Any) -> None:
            stats.user_state = ev.new_state
            pub("user_state_changed", old=ev.old_state, new=ev.new_state)

        def transcribed(ev: Any) -> None:
            pub(
                "user_input_transcribed",
                transcript=ev.transcript,
                final=bool(ev.is_final),
                language=str(ev.language) if ev.language else None,
            )

        def item_added(ev: Any) -> None:
            item = ev.item
            role = getattr(item, "role", None)
            if role not in ("user", "assistant", "system", "developer"):
                return  # agent handoffs
            if role == "user":
                stats.turns += 1
            pub(
                "conversation_item_added",
                id=item.id,
                role=role,
                text=item.text_content or "",
                interrupted=bool(getattr(item, "interrupted", False)),
            )
            seconds = stage_figures(role, getattr(item, "metrics", None))
            figures = {f"{stage}_ms": round(value * 1000, 1) for stage, value in seconds.items()}
            if figures:
                pub("metrics", role=role, **figures)
                if "voice_to_voice_ms" in figures:
                    stats.voice_to_voice_ms.append(figures["voice_to_voice_ms"])
                    self.last_voice_to_voice_ms = figures["voice_to_voice_ms"]

        def closed(ev: Any) -> None:
            error = getattr(ev, "error", None)
            reason = getattr(ev, "reason", None)
            pub(
                "session_ended",
                reason=str(getattr(reason, "value", reason) or ""),
                error=str(error) if error else None,
            )
            self.sessions.pop(sid, None)

        session.on("agent_state_changed", agent_state)
        session.on("user_state_changed", user_state)
        session.on("user_input_transcribed", transcribed)
        session.on("conversation_item_added", item_added)
        session.on("close", closed)
        conv.text.listeners.append(lambda text: pub("agent_transcript", **text_delta(text)))
        pub("session_started", bridge=conv.bridge, manual=conv.manual)

    def ptt(self, session: str | None, action: str, source: str) -> None:
        """A push-to-talk action (press, release, ignored, cancel) from a button or a page."""
        self.publish("ptt", session, None, action=action, source=source)


def text_delta(text: str | None) -> dict[str, Any]:
    """An agent transcript listener's argument as message data (None: the segment ended)."""
    return {"text": text or "", "segment_end": text is None}


def describe(message: dict[str, Any]) -> str:
    """One message as a line for `appliance events`."""
    ts = time.strftime("%H:%M:%S", time.localtime(message.get("ts", 0)))
    d = message.get("data", {})
    kind = message.get("type", "?")
    who = message.get("session") or "-"
    if kind in ("agent_state_changed", "user_state_changed"):
        what = f"{d.get('old')} -> {d.get('new')}"
    elif kind == "conversation_item_added":
        what = f"{d.get('role')}: {d.get('text')}" + (
            " (interrupted)" if d.get("interrupted") else ""
        )
    elif kind == "user_input_transcribed":
        what = f"{'final' if d.get('final') else 'interim'}: {d.get('transcript')}"
    elif kind == "snapshot":
        what = f"{len(d.get('sessions', []))} session(s), {d.get('calls_active', 0)} call(s)"
    else:
        what = " ".join(f"{k}={v}" for k, v in d.items())
    return f"{ts} {who:8} {kind:24} {what}"


def stream_url(http: HttpConfig) -> str:
    """The daemon's events WebSocket as this machine reaches it (loopback for a wildcard)."""
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"ws://{host}:{http.port}/api/events"


async def follow(url: str, token: str, as_json: bool) -> int:
    """Print the stream at `url` until it closes (`appliance events`); the exit status."""
    import json
    import sys

    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                message = json.loads(msg.data)
                print(msg.data if as_json else describe(message), flush=True)
    except aiohttp.WSServerHandshakeError as exc:
        why = "a valid token is required ([http] token)" if exc.status == 401 else exc.message
        print(f"error: {url}: {exc.status} {why}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as exc:
        print(f"error: {url}: {exc}; is the appliance running?", file=sys.stderr)
        return 1
    print("the appliance closed the stream", file=sys.stderr)
    return 0
