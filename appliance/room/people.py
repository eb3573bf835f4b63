"""Who joins a conversation's room: the caller or the kiosk, their attributes, room names and
the access tokens the appliance mints itself.
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from livekit import api

from appliance.config import LivekitConfig

logger = logging.getLogger("appliance.room")
PROCESSED = "appliance.audio_processed"  # attribute: the track is already echo-cancelled
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
    can_publish: bool = True,
) -> str:
    """A join token for one participant of one room, signed with the API secret
    (`can_publish=False`: a listener, who hears the room and cannot be heard)."""
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=can_publish,
        can_subscribe=True,
        can_publish_data=can_publish,
        # attributes: the agent's lk.agent.state, the caller's sip.callStatus at hang-up
        can_update_own_metadata=can_publish,
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
