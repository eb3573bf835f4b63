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

from appliance.room.bridge import RETRY_MIN_S, RoomBridge, conversation_bridge
from appliance.room.link import (
    Link,
    LocalNoiseFilter,
    NoiseCancellationParams,
    RoomLink,
    RoomMixer,
    noise_filter,
    room_options,
)
from appliance.room.people import (
    PROCESSED,
    Kind,
    Person,
    caller_person,
    kiosk_person,
    mint_token,
    room_name,
)

__all__ = [
    "PROCESSED",
    "RETRY_MIN_S",
    "Kind",
    "Link",
    "LocalNoiseFilter",
    "NoiseCancellationParams",
    "Person",
    "RoomBridge",
    "RoomLink",
    "RoomMixer",
    "caller_person",
    "conversation_bridge",
    "kiosk_person",
    "mint_token",
    "noise_filter",
    "room_name",
    "room_options",
]
