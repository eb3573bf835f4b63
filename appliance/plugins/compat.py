"""The private livekit-agents API the plugins rely on, in one place.

livekit-agents 1.8.9 has no public base class for a streaming end-of-turn detector (its own
`inference.TurnDetector` is built on the private one). Every such name is used through this
module (llama-cpp-python's through `appliance.plugins.llama.compat`); `tests/test_compat.py`
checks each against the pinned versions, so an upgrade that moves one fails there, by name,
instead of somewhere in a conversation.
"""

from __future__ import annotations

from livekit.agents.inference.eot.base import (
    _BaseStreamingTurnDetector as BaseStreamingTurnDetector,
)
from livekit.agents.inference.eot.base import (
    _BaseStreamingTurnDetectorStream as BaseStreamingTurnDetectorStream,
)
from livekit.agents.voice.turn import _StreamingTurnDetector as StreamingTurnDetector

__all__ = [
    "BaseStreamingTurnDetector",
    "BaseStreamingTurnDetectorStream",
    "StreamingTurnDetector",
    "audio_pending",
    "drain_audio",
    "request_id",
    "resolve_prediction",
]


async def drain_audio(stream: BaseStreamingTurnDetectorStream) -> None:
    """Run the stream's loop that moves pushed audio into its buffer (until the stream ends)."""
    await stream._drain_audio_channel()


def audio_pending(stream: BaseStreamingTurnDetectorStream) -> bool:
    """Audio pushed to the stream that its drain loop has not taken yet."""
    return not stream._audio_ch.empty()


def request_id(stream: BaseStreamingTurnDetectorStream) -> str | None:
    """The id of the prediction the session waits for now."""
    rid: str | None = stream._request_id
    return rid


def resolve_prediction(
    stream: BaseStreamingTurnDetectorStream,
    rid: str,
    probability: float,
    *,
    inference_duration: float,
    detection_delay: float,
) -> None:
    """Hand the session the end-of-turn probability for request `rid`."""
    stream._resolve_prediction(
        rid, probability, inference_duration=inference_duration, detection_delay=detection_delay
    )
