"""The SIP stack's parts on their own: messages, SDP, digest, G.711, RTP, jitter buffer."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit import rtc

from appliance.audio.live import Playout, Rechunker
from appliance.sip import digest, g711, rtp, sdp
from appliance.sip.message import MAX_MESSAGE, SipError, parse, parse_address, parse_uri, response

INVITE = (
    b"INVITE sip:agent@127.0.0.1:5070 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKproxy, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKx\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice, A." <sip:+15551234@10.0.0.5>;tag=1928301774\r\n'
    b"t: <sip:agent@127.0.0.1>\r\n"
    b"i: a84b4c76e66710@10.0.0.5\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Record-Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\n"
    b"Contact: <sip:alice@10.0.0.5:5060>\r\n"
    b"Subject: a long\r\n  folded header\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n\r\nv=0\r\nEXTRA"
)


def test_a_request_parses_with_compact_forms_lists_and_folding() -> None:
    msg = parse(INVITE)
    assert msg.method == "INVITE" and msg.uri == "sip:agent@127.0.0.1:5070"
    assert len(msg.get_all("Via")) == 3 and msg.branch == "z9hG4bK776asdhds"
    assert msg.call_id == "a84b4c76e66710@10.0.0.5" and msg.cseq == (314159, "INVITE")
    assert msg.get("To") == "<sip:agent@127.0.0.1>"
    assert msg.get_all("Record-Route") == ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]
    assert msg.get("Subject") == "a long folded header"
    assert msg.body == b"v=0\r"  # Content-Length wins
    caller = parse_address(msg.get("From"))
    assert caller.display == "Alice, A." and caller.tag == "1928301774"
    assert parse_uri(caller.uri).user == "+15551234"
    res = response(msg, 200, to_tag="abc")
    assert res.get_all("Via") == msg.get_all("Via")
    assert res.get("To") == "<sip:agent@127.0.0.1>;tag=abc"
    assert res.get_all("Record-Route") == msg.get_all("Record-Route")
    again = parse(res.to_bytes())
    assert again.status == 200 and again.get("Content-Length") == "0"


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "no blank line"),
        (b"HELLO\r\n\r\n", "bad start line"),
        (INVITE.replace(b"CSeq: 314159 INVITE", b"CSeq: x INVITE"), "bad CSeq"),
        (INVITE.replace(b"i: a84b4c76e66710@10.0.0.5\r\n", b""), "missing Call-ID"),
        (INVITE.replace(b"Max-Forwards: 70", b"Max Forwards 70"), "bad header line"),
        (INVITE.replace(b"Content-Length: 4", b"Content-Length: 400"), "shorter than"),
        (INVITE.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), "bad request line"),
        (INVITE + b"x" * MAX_MESSAGE, "bytes (limit"),
        (b"SIP/2.0 999 Odd\r\nVia: x\r\n\r\n", "bad status"),
        (b"SIP/2.0 2\xd9\xa300 OK\r\nVia: x\r\n\r\n", "bad status"),  # a Unicode digit
        (INVITE.replace(b"Content-Length: 4", "Content-Length: 4\u0663".encode()), "Content-L"),
        (INVITE.replace(b"Content-Length: 4", b"Content-Length: " + b"4" * 5000), "Content-L"),
        (INVITE.replace(b"CSeq: 314159", b"CSeq: " + b"9" * 4400), "bad CSeq"),
        (INVITE.replace(b"CSeq: 314159", "CSeq: ²".encode()), "bad CSeq"),
        (INVITE.replace(b"t: <sip:agent@127.0.0.1>", b"t: <sip:agent@127.0.0.1"), "unclosed"),
        (INVITE.replace(b"Max-Forwards", b"v: a;branch=1," * 20 + b"\r\nMax-Forwards"), "too many"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data: bytes, problem: str) -> None:
    with pytest.raises(SipError, match=re.escape(problem)):
        parse(data)


def test_a_flood_of_vias_is_not_answered_and_ports_are_checked() -> None:
    with pytest.raises(SipError) as caught:
        parse(INVITE.replace(b"Max-Forwards", b"v: a;branch=1," * 20 + b"\r\nMax-Forwards"))
    assert caught.value.partial is not None and not caught.value.partial.headers
    for port in ("\u00b2", "9" * 5000, "0", "65536"):
        with pytest.raises(SipError, match="URI port"):
            parse_uri(f"sip:alice@10.0.0.5:{port}")
    assert parse_uri("sip:alice@[::1]:5062").port == 5062


@pytest.mark.parametrize(
    "old, new",
    [
        (b"m=audio 40000", "m=audio 4\u0663000".encode()),
        (b"m=audio 40000", b"m=audio " + b"4" * 5000),
        (b"m=audio 40000", b"m=audio 70000"),
        (b"RTP/AVP 9 8 0 96", "RTP/AVP 9 8 \u0663 96".encode()),
        (b"RTP/AVP 9 8 0 96", b"RTP/AVP 9 8 0 300"),
        (b"a=rtpmap:96", "a=rtpmap:9\u0663".encode()),
        (b"a=sendonly", b"a=ptime:" + b"2" * 5000),
    ],
)
def test_bad_numbers_in_an_offer_are_sdp_errors(old: bytes, new: bytes) -> None:
    with pytest.raises(sdp.SdpError):
        sdp.parse(OFFER.replace(old, new))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_the_parser_never_raises_anything_but_sip_error_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(SipError):
        parse(data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_the_parser_survives_mutated_real_messages(data: st.DataObject) -> None:
    raw = bytearray(INVITE)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        msg = parse(bytes(raw))
        msg.cseq, msg.branch, parse_address(msg.get("From"))
        response(msg, 400).to_bytes() if msg.is_request else None
    except SipError:
        pass


OFFER = b"""v=0\r
o=- 1 1 IN IP4 192.168.1.20\r
s=-\r
c=IN IP4 192.168.1.20\r
t=0 0\r
m=audio 40000 RTP/AVP 9 8 0 96\r
a=rtpmap:9 G722/8000\r
a=rtpmap:96 telephone-event/8000\r
a=sendonly\r
"""


def test_sdp_answer_picks_g711_and_the_offers_dtmf_type_and_answers_hold() -> None:
    offer = sdp.parse(OFFER)
    assert (offer.address, offer.port, offer.payloads) == ("192.168.1.20", 40000, [9, 8, 0, 96])
    assert offer.dtmf_pt() == 96 and offer.on_hold
    body, pt, dtmf = sdp.answer(offer, "10.0.0.2", 20000, session_id=5, version=1)
    assert pt == 8 and dtmf == 96  # PCMA: the first G.711 offered; DTMF as offered
    answer = sdp.parse(body)
    assert answer.payloads == [8, 96] and answer.direction == "recvonly"
    assert answer.address == "10.0.0.2" and answer.port == 20000
    with pytest.raises(sdp.SdpError, match="no common codec"):
        sdp.choose_codec(sdp.parse(OFFER.replace(b"9 8 0 96", b"9 96")))
    with pytest.raises(sdp.SdpError, match="no audio"):
        sdp.parse(b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=video 5000 RTP/AVP 96\r\n")


def test_digest_matches_rfc_2617_and_the_verifier_checks_answers() -> None:
    # RFC 2617 section 3.5
    assert (
        digest.response(
            "MD5",
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            qop="auth",
            nc="00000001",
            cnonce="0a4f113b",
        )
        == "6629fae49393a05397450978507c4ef1"
    )
    uri, here, there = "sip:agent@10.0.0.2", "10.0.0.9", "10.0.0.66"
    verifier = digest.Verifier("appliance", {"pbx": "s3cret"})
    for algorithm in ("MD5", "SHA-256"):
        c = verifier.challenge(here).replace("algorithm=MD5", f"algorithm={algorithm}")
        good = digest.authorization(c, "pbx", "s3cret", "INVITE", uri)
        bad = digest.authorization(c, "pbx", "wrong", "INVITE", uri)
        assert verifier.check(bad, "INVITE", uri, here) is None
        assert verifier.check(good, "BYE", uri, here) is None  # the method is in the digest
        assert verifier.check(good, "INVITE", "sip:agent@10.0.0.3", here) is None
        assert verifier.check(good, "INVITE", uri, there) is None  # the nonce is bound
        assert verifier.check(good, "INVITE", uri, here) == "pbx"
        assert verifier.check(good, "INVITE", uri, here) is None  # a replay: same count
    nonce = good.split('nonce="')[1].split('"')[0]
    forged = good.replace(nonce, "0" * 24)
    assert verifier.check(forged, "INVITE", uri, here) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h: re.sub(r'response="[^"]*"', 'response="\u00e9\u00e9"', h),  # non-ASCII
        lambda h: re.sub(r'nonce="[^"]*"', 'nonce="' + "9" * 4500 + '"', h),
        lambda h: re.sub(r'nonce="([^".]*)', 'nonce="\\1' + "\u0663", h),  # a Unicode digit
        lambda h: h.replace("qop=auth", "qop=auth-int"),
        lambda h: re.sub(r"nc=\w+", "nc=" + "1" * 900, h),
        lambda h: h.replace("Digest ", "Basic "),
        lambda h: "Digest " + "x=" * 3000,
    ],
)
def test_the_verifier_refuses_mangled_answers_without_raising(mangle: Any) -> None:
    verifier = digest.Verifier("appliance", {"pbx": "s3cret"})
    header = digest.authorization(
        verifier.challenge("10.0.0.9"), "pbx", "s3cret", "INVITE", "sip:agent@10.0.0.2"
    )
    assert verifier.check(mangle(header), "INVITE", "sip:agent@10.0.0.2", "10.0.0.9") is None


def test_a_nonce_serves_increasing_counts_and_expires() -> None:
    uri, here = "sip:agent@10.0.0.2", "10.0.0.9"
    verifier = digest.Verifier("appliance", {"pbx": "s3cret"})
    first = digest.authorization(verifier.challenge(here), "pbx", "s3cret", "INVITE", uri)
    second = first.replace("nc=00000001", "nc=00000002")
    cnonce = first.split('cnonce="')[1].split('"')[0]
    p = digest.parse_params(first)[1]
    answer = digest.response(
        "MD5", "pbx", "appliance", "s3cret", "INVITE", uri, p["nonce"],
        qop="auth", nc="00000002", cnonce=cnonce,
    )  # fmt: skip
    second = re.sub(r'response="[^"]*"', f'response="{answer}"', second)
    assert verifier.check(first, "INVITE", uri, here) == "pbx"
    assert verifier.check(second, "INVITE", uri, here) == "pbx"
    assert verifier.check(first, "INVITE", uri, here) is None  # counts only go up
    stale = digest.Verifier("appliance", {"pbx": "s3cret"}, ttl=-1.0)
    header = digest.authorization(stale.challenge(here), "pbx", "s3cret", "INVITE", uri)
    assert stale.check(header, "INVITE", uri, here) is None


def test_g711_matches_the_reference_and_round_trips() -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    for name, encode, decode in g711.CODECS.values():
        back = decode(encode(samples)).astype(np.int32)
        error = np.abs(back - samples.astype(np.int32))
        assert error.max() <= 1024, name  # the largest G.711 step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            audioop = importlib.import_module("audioop")  # the C reference, up to Python 3.12
        except ImportError:
            pytest.skip("no audioop on this Python")
    raw = samples.tobytes()
    assert g711.ulaw_encode(samples) == audioop.lin2ulaw(raw, 2)
    assert g711.alaw_encode(samples) == audioop.lin2alaw(raw, 2)
    codes = bytes(range(256))
    assert g711.ulaw_decode(codes).tobytes() == audioop.ulaw2lin(codes, 2)
    assert g711.alaw_decode(codes).tobytes() == audioop.alaw2lin(codes, 2)


def test_rtp_packets_and_dtmf_events() -> None:
    packet = rtp.Packet(0, 65535, 4294967200, 0x1234ABCD, b"\xff" * 160, marker=True)
    data = rtp.build(packet)
    assert len(data) == 172 and data[1] == 0x80  # marker set, PT 0
    assert rtp.parse(data) == packet
    padded = bytearray(data)
    padded[0] |= 0x20
    padded += b"\x00\x00\x03"
    assert rtp.parse(bytes(padded)).payload == b"\xff" * 160
    with pytest.raises(ValueError):
        rtp.parse(b"\x40" + data[1:])  # version 1
    assert rtp.dtmf_event(bytes([11, 0x8A, 0x03, 0x20])) == ("#", True, 800)
    assert rtp.dtmf_event(bytes([42, 0, 0, 0])) is None


def test_the_jitter_buffer_reorders_drops_late_packets_and_conceals_losses() -> None:
    jb = rtp.JitterBuffer(depth=3)
    frame = {n: np.full(160, n * 100, np.int16) for n in range(10)}
    for n in (0, 2, 1):  # out of order
        jb.push(65534 + n & 0xFFFF, frame[n])
    out = [jb.pop() for _ in range(3)]
    assert [int(f[0]) for f in out if f is not None] == [0, 100, 200]  # reordered, seq wrapped
    jb.push(65534 + 1 & 0xFFFF, frame[1])  # late: before the playout point
    assert jb.late == 1
    jb.push(65534 + 4 & 0xFFFF, frame[4])  # 3 is lost
    jb.push(65534 + 5 & 0xFFFF, frame[5])
    concealed = jb.pop()
    assert concealed is not None and int(concealed[0]) == 100  # the last frame at half level
    assert [int(f[0]) for f in (jb.pop(), jb.pop()) if f is not None] == [400, 500]
    assert jb.lost == 1
    assert jb.pop() is None  # the peer went quiet: silence, not invented audio


def test_calls_never_wait_for_a_button() -> None:
    from appliance import config as config_mod
    from appliance.sip.bridge import phone_config

    kiosk = config_mod.parse(
        {
            "session": {"turn_detection": "manual"},
            "audio": {"enabled": True},
            "ptt": {"backend": "gpiod"},
        },
        "<test>",
    )
    assert kiosk.turn_detection == "manual"
    assert phone_config(kiosk).turn_detection == "vad"
    model = config_mod.parse({"session": {"turn_detection": "model"}}, "<test>")
    assert phone_config(model).turn_detection == "model"


def _tone(rate: int, seconds: float, hz: float = 1000.0, level: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def test_the_callers_audio_reaches_the_session_packet_by_packet() -> None:
    """8 -> 16 kHz: each 20 ms packet comes out at once (soxr held 108 ms back), clean."""
    chunker = Rechunker(8000, 16000, 160)  # what CallAudioInput uses
    tone = _tone(8000, 1.0)
    blocks = []
    for i in range(0, len(tone), 160):
        out = chunker.push(tone[i : i + 160], 8000)
        assert len(out) == 2  # two 10 ms session frames per packet, none held back
        blocks += out
    heard = np.concatenate(blocks)[1600:].astype(np.float64)  # after the first 100 ms
    assert heard.std() == pytest.approx(tone.std(), rel=0.01)
    spectrum = np.abs(np.fft.rfft(heard * np.hanning(len(heard))))
    freqs = np.fft.rfftfreq(len(heard), 1 / 16000)
    image = spectrum[np.argmin(np.abs(freqs - 7000))] / spectrum[np.argmin(np.abs(freqs - 1000))]
    assert 20 * np.log10(image) < -60  # no mirror image of the 1 kHz tone at 7 kHz


class _PhonePlayout(Playout):
    def sink_rate(self) -> int:
        return 8000


def test_a_replys_last_samples_play_with_it_not_before_the_next_reply() -> None:
    """The resampler's held-back tail (up to 82 ms at 22.05 -> 8 kHz) is flushed with the
    reply: all of it is played, and the next reply starts with its own audio."""

    async def main() -> tuple[int, np.ndarray]:
        out = _PhonePlayout("phone", padding_s=0.0)
        reply = _tone(22050, 0.6)
        for i in range(0, len(reply), 4410):  # livekit's 200 ms TTS frames
            part = reply[i : i + 4410]
            await out.capture_frame(rtc.AudioFrame(part.tobytes(), 22050, 1, len(part)))
        out.flush()
        first = np.concatenate([out.take(160)[0] for _ in range(40)])  # 0.8 s: all of it
        played = int(np.flatnonzero(np.abs(first.astype(np.int32)) > 1000)[-1]) + 1
        await asyncio.sleep(0.05)  # the first segment finishes
        silence = np.zeros(4410, np.int16)
        await out.capture_frame(rtc.AudioFrame(silence.tobytes(), 22050, 1, len(silence)))
        out.flush()
        return played, np.concatenate([out.take(160)[0] for _ in range(10)])

    played, second = asyncio.run(main())
    assert played >= int(0.6 * 8000) - 20
    assert np.abs(second.astype(np.int32)).max() < 100  # none of the first reply's tone
