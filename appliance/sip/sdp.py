"""SDP offer/answer (RFC 4566, RFC 3264) for one audio stream: G.711 and telephone-event."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from appliance.sip.g711 import CODECS
from appliance.sip.message import SipError, number


class SdpError(ValueError):
    """An offer we cannot answer (no audio, no common codec): 488 Not Acceptable Here."""


DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
DTMF_PT = 101  # what we offer; in an answer we use the offer's


@dataclass
class Media:
    """The first audio stream of a session description."""

    address: str
    port: int
    payloads: list[int]
    rtpmap: dict[int, str] = field(default_factory=dict)
    direction: str = "sendrecv"
    ptime: int = 20

    @property
    def on_hold(self) -> bool:
        """The peer stops sending (sendonly/inactive) or uses the old 0.0.0.0 form."""
        return self.direction in ("sendonly", "inactive") or self.address == "0.0.0.0"

    def dtmf_pt(self) -> int | None:
        for pt, name in self.rtpmap.items():
            if name.lower().startswith("telephone-event/8000"):
                return pt
        return None


def parse(body: bytes) -> Media:
    """The first audio stream; raises SdpError for anything malformed."""
    try:
        return _parse(body)
    except SipError as exc:  # a bad number
        raise SdpError(str(exc)) from None


def _parse(body: bytes) -> Media:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SdpError("SDP is not UTF-8") from None
    session_address, media, session_direction = "", None, "sendrecv"
    for raw in text.splitlines():
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        if kind == "c":
            parts = value.split()
            if len(parts) != 3 or parts[0] != "IN":
                raise SdpError("bad c= line")
            if media is None:
                session_address = parts[2]
            else:
                media.address = parts[2]
        elif kind == "m":
            if media is not None:
                break  # only the first audio stream
            parts = value.split()
            if len(parts) < 4 or parts[0] != "audio":
                continue
            port = number(parts[1].split("/")[0], "media port", 0, 65535)
            payloads = [number(p, "payload type", 0, 127) for p in parts[3:]]
            media = Media(session_address, port, payloads)
            media.direction = session_direction
        elif kind == "a":
            name, _, arg = value.partition(":")
            if name in DIRECTIONS:
                if media is None:
                    session_direction = name
                else:
                    media.direction = name
            elif media is not None and name == "rtpmap":
                pt, _, encoding = arg.partition(" ")
                media.rtpmap[number(pt, "payload type", 0, 127)] = encoding.strip()
            elif media is not None and name == "ptime":
                media.ptime = number(arg, "ptime", 1, 1000)
    if media is None:
        raise SdpError("no audio stream in the offer")
    if not media.address:
        raise SdpError("no connection address")
    return media


def choose_codec(media: Media, supported: tuple[int, ...] = (0, 8)) -> int:
    """The first payload type of the offer that we speak (static or by rtpmap name)."""
    names = {name: pt for pt, (name, _, _) in CODECS.items()}
    for pt in media.payloads:
        if pt in supported and pt not in media.rtpmap:
            return pt
        encoding = media.rtpmap.get(pt, "").split("/")[0].upper()
        if encoding in names and names[encoding] in supported and media.rtpmap[pt].endswith("8000"):
            return pt
    raise SdpError(f"no common codec (offered {media.payloads}; we speak PCMU and PCMA)")


def codec_of(media: Media, pt: int) -> int:
    """The static G.711 payload type behind `pt` (a dynamic number mapped by rtpmap)."""
    if pt in CODECS:
        return pt
    name = media.rtpmap.get(pt, "").split("/")[0].upper()
    for static, (codec, _, _) in CODECS.items():
        if codec == name:
            return static
    raise SdpError(f"payload type {pt} is not G.711")


def build(
    address: str,
    port: int,
    payloads: list[int],
    dtmf_pt: int | None,
    *,
    direction: str = "sendrecv",
    session_id: int = 0,
    version: int = 0,
    rtpmap: dict[int, str] | None = None,
) -> bytes:
    """A session description for one audio stream."""
    session_id = session_id or int(time.time())
    formats = [*payloads, *([dtmf_pt] if dtmf_pt is not None else [])]
    lines = [
        "v=0",
        f"o=appliance {session_id} {version} IN IP4 {address}",
        "s=appliance",
        f"c=IN IP4 {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(str(p) for p in formats)}",
    ]
    for pt in payloads:
        name = (rtpmap or {}).get(pt) or f"{CODECS[codec_fallback(pt)][0]}/8000"
        lines.append(f"a=rtpmap:{pt} {name}")
    if dtmf_pt is not None:
        lines += [f"a=rtpmap:{dtmf_pt} telephone-event/8000", f"a=fmtp:{dtmf_pt} 0-16"]
    lines += ["a=ptime:20", f"a={direction}"]
    return ("\r\n".join(lines) + "\r\n").encode()


def codec_fallback(pt: int) -> int:
    return pt if pt in CODECS else 0


def answer(
    offer: Media, address: str, port: int, *, session_id: int, version: int
) -> tuple[bytes, int, int | None]:
    """Our answer to `offer`: (SDP, the codec's payload type, the DTMF payload type)."""
    pt = choose_codec(offer)
    dtmf = offer.dtmf_pt()
    direction = ANSWER_DIRECTION.get(offer.direction, "sendrecv")
    if offer.address == "0.0.0.0":
        direction = "inactive"
    body = build(
        address,
        port,
        [pt],
        dtmf,
        direction=direction,
        session_id=session_id,
        version=version,
        rtpmap={pt: offer.rtpmap[pt]} if pt in offer.rtpmap else None,
    )
    return body, pt, dtmf
