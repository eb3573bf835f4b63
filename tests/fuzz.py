"""Mutation fuzzing of the SIP stack: message, URI, SDP, digest and RTP parsers, and a live
user agent.

    python -m tests.fuzz --cases 100000 [--seed N]      (make fuzz)
    python -m tests.fuzz --flood HOST:PORT --seconds 10 --rate 2000   (the same, live)

Each case takes a real message (an INVITE with its offer, BYE, REGISTER with credentials,
INFO, NOTIFY, responses, an RTP packet...), mutates it (bytes flipped, inserted or cut;
lines dropped or repeated hundreds of times; numbers swapped for Unicode digits or
thousands of digits; quotes and <> unbalanced; lengths that lie) and gives it to one
target. An *escape* is any exception other than the target's own refusal (`SipError`,
`SdpError`, `ValueError` from `rtp.parse`), or any traceback the user agent logs for a
datagram: every one is a defect. `tests/test_sip_fuzz.py` runs a small budget in
`make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import random
import re
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance import config as config_mod
from appliance.sip import digest, rtp, sdp
from appliance.sip.message import SipError, parse, parse_address, parse_uri, response
from appliance.sip.ua import UserAgent

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
)
HEAD = (
    "{method} sip:agent@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK{branch};rport\r\n"
    "v: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKproxy\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Alice, A." <sip:+15551234@127.0.0.1:5062;user=phone>;tag=from1\r\n'
    "To: <sip:agent@127.0.0.1>{to_tag}\r\n"
    "Call-ID: {call_id}\r\n"
    "CSeq: {cseq} {method}\r\n"
    "Contact: <sip:alice@127.0.0.1:5062;transport=udp>\r\n"
    "Record-Route: <sip:p1.example;lr>\r\n"
    "User-Agent: fuzz phone\r\n"
    "{extra}"
    "Content-Length: {length}\r\n\r\n{body}"
)
AUTH = (
    'Digest username="pbx", realm="appliance", nonce="{nonce}", uri="sip:agent@127.0.0.1:5060", '
    'response="0123456789abcdef0123456789abcdef", algorithm=MD5, qop=auth, nc=00000001, '
    'cnonce="0a4f113b"'
)
SPECIAL_NUMBERS = ["\u00b2", "\u0663", "\uff11", "0" * 5000, "9" * 4400, "-1", "1e3", "", " 7 "]
NOISE = ["<", ">", '"', ";", ",", ":", "@", "\\", "\r\n", "\n", "\x00", "\u00e9", "\ufffd", "%"]


def message(
    method: str, *, body: str = "", extra: str = "", to_tag: str = "", cseq: int = 1
) -> bytes:
    text = HEAD.format(
        method=method,
        branch=f"{random.getrandbits(40):x}",
        to_tag=f";tag={to_tag}" if to_tag else "",
        call_id=f"{random.getrandbits(48):x}@fuzz",
        cseq=cseq,
        extra=extra,
        length=len(body.encode()),
        body=body,
    )
    return text.encode()


def corpus(nonce: str) -> list[bytes]:
    """Real messages to start from (their Call-IDs and branches differ per call)."""
    sdp_extra = "Content-Type: application/sdp\r\n"
    return [
        message("INVITE", body=OFFER, extra=sdp_extra),
        message(
            "INVITE", body=OFFER, extra=sdp_extra + f"Authorization: {AUTH.format(nonce=nonce)}\r\n"
        ),
        message("INVITE", body=OFFER.replace("sendrecv", "sendonly"), extra=sdp_extra, to_tag="x"),
        message("BYE", to_tag="x", cseq=2),
        message("ACK", to_tag="x"),
        message("CANCEL"),
        message("OPTIONS", extra="Accept: application/sdp\r\n"),
        message(
            "INFO",
            body="Signal=5\r\nDuration=160\r\n",
            extra="Content-Type: application/dtmf-relay\r\n",
            to_tag="x",
        ),
        message(
            "NOTIFY",
            body="SIP/2.0 200 OK\r\n",
            extra="Event: refer\r\nContent-Type: message/sipfrag\r\n",
            to_tag="x",
        ),
        message("REFER", extra="Refer-To: <sip:desk@127.0.0.1>\r\n", to_tag="x"),
        message("REGISTER", extra="Expires: 3600\r\n"),
        (
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKabc\r\n"
            "From: <sip:appliance@127.0.0.1>;tag=a\r\nTo: <sip:desk@127.0.0.1>;tag=b\r\n"
            "Call-ID: out@fuzz\r\nCSeq: 1 INVITE\r\nContact: <sip:desk@127.0.0.1:5070>\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(OFFER)}\r\n\r\n{OFFER}"
        ).encode(),
        (
            b"SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKreg\r\n"
            b"From: <sip:appliance@127.0.0.1>;tag=a\r\nTo: <sip:appliance@127.0.0.1>\r\n"
            b"Call-ID: reg@fuzz\r\nCSeq: 1 REGISTER\r\n"
            b'WWW-Authenticate: Digest realm="pbx", nonce="abc", qop="auth", algorithm=MD5\r\n'
            b"Content-Length: 0\r\n\r\n"
        ),
    ]


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One to three mutations of `data`."""
    for _ in range(rnd.randint(1, 3)):
        data = MUTATORS[rnd.randrange(len(MUTATORS))](data, rnd)
    return data


def _flip(data: bytes, rnd: random.Random) -> bytes:
    raw = bytearray(data or b" ")
    for _ in range(rnd.randint(1, 8)):
        raw[rnd.randrange(len(raw))] = rnd.randrange(256)
    return bytes(raw)


def _insert(data: bytes, rnd: random.Random) -> bytes:
    at = rnd.randint(0, len(data))
    piece = rnd.choice(NOISE).encode() * rnd.choice((1, 1, 2, 50, 3000))
    return data[:at] + piece + data[at:]


def _cut(data: bytes, rnd: random.Random) -> bytes:
    at = rnd.randint(0, len(data))
    return data[:at] + data[at + rnd.randint(1, 40) :]


def _truncate(data: bytes, rnd: random.Random) -> bytes:
    return data[: rnd.randint(0, len(data))]


def _lines(data: bytes, rnd: random.Random) -> bytes:
    lines = data.split(b"\r\n")
    i = rnd.randrange(len(lines))
    choice = rnd.randrange(3)
    if choice == 0:
        del lines[i]
    elif choice == 1:
        lines[i:i] = [lines[i]] * rnd.choice((2, 20, 150))
    else:
        j = rnd.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    return b"\r\n".join(lines)


_NUMBER = re.compile(rb"\d+")


def _number(data: bytes, rnd: random.Random) -> bytes:
    found = list(_NUMBER.finditer(data))
    if not found:
        return data
    m = rnd.choice(found)
    new = rnd.choice([*SPECIAL_NUMBERS, str(rnd.getrandbits(rnd.choice((8, 16, 33, 70))))])
    return data[: m.start()] + new.encode() + data[m.end() :]


def _token(data: bytes, rnd: random.Random) -> bytes:
    """A header value or parameter made huge or emptied."""
    found = list(re.finditer(rb"[=:] ?([^;,\r\n>]+)", data))
    if not found:
        return data
    m = rnd.choice(found)
    new = rnd.choice([b"", b"x" * 5000, b"\xc2\xb2", b"<", b'"', b"sip:", b"[", b"tel:+1"])
    return data[: m.start(1)] + new + data[m.end(1) :]


def _header(data: bytes, rnd: random.Random) -> bytes:
    """An extra header: lists, compact forms, odd names."""
    header = rnd.choice(
        [
            b"Via: "
            + b", ".join([b"SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx"] * rnd.choice((2, 40, 600))),
            b"Contact: *",
            b"Contact: <sip:a@[::1]:5060>, <sip:b@host:99999>",
            b"l: " + str(rnd.randint(0, 99999)).encode(),
            b"Authorization: Digest " + b"a=b, " * rnd.choice((1, 500)),
            b"Record-Route: <sip:x;lr>, <" * rnd.choice((1, 100)),
            b"To: <sip:agent@127.0.0.1>;tag=" + b"t" * rnd.choice((1, 9000)),
            b"Reason: Q.850;cause=16",
            b"\xff\xfe: x",
        ]
    )
    at = data.find(b"\r\n") + 2 if b"\r\n" in data else 0
    return data[:at] + header + b"\r\n" + data[at:]


MUTATORS: list[Callable[[bytes, random.Random], bytes]] = [
    _flip, _insert, _cut, _truncate, _lines, _number, _number, _token, _header,
]  # fmt: skip


@dataclass
class Escapes:
    """Unexpected exceptions by target and type, with one example each."""

    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    found: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    def add(self, target: str, data: bytes, error: str) -> None:
        key = f"{target}: {error.strip().splitlines()[-1][:120]}"
        self.found[key] += 1
        self.examples.setdefault(key, (data[:300], error))

    @property
    def total(self) -> int:
        return sum(self.found.values())


# -- targets: each takes the mutated bytes; only its own refusal may be raised ----------------


def parse_message(data: bytes) -> None:
    try:
        msg = parse(data)
    except SipError:
        return
    assert msg.cseq[0] >= 0 and isinstance(msg.branch, str)
    for name in ("From", "To"):
        parse_address(msg.get(name))
    for name in ("Contact", "Route", "Record-Route"):
        for value in msg.get_all(name):
            with contextlib.suppress(SipError):
                parse_uri(parse_address(value).uri)
    if msg.is_request:
        parse(response(msg, 400).to_bytes())  # our answer to anything we parsed is sound
        with contextlib.suppress(SipError):
            parse_uri(msg.uri)


def parse_offer(data: bytes) -> None:
    body = data.partition(b"\r\n\r\n")[2] or data
    try:
        offer = sdp.parse(body)
        sdp.answer(offer, "127.0.0.1", 30000, session_id=1, version=0)
    except sdp.SdpError:
        return


VERIFIER = digest.Verifier("appliance", {"pbx": "s3cret"})


def check_digest(data: bytes) -> None:
    header = data.decode("utf-8", "replace")
    value = header.split("Authorization: ", 1)[-1].split("\r\n", 1)[0]
    VERIFIER.check(value, "INVITE", "sip:agent@127.0.0.1:5060", "127.0.0.1")
    challenge = header.split("WWW-Authenticate: ", 1)[-1].split("\r\n", 1)[0]
    with contextlib.suppress(ValueError):  # a scheme we do not speak: registration fails
        digest.authorization(challenge, "u", "p", "REGISTER", "sip:pbx")


def parse_rtp(data: bytes) -> None:
    try:
        packet = rtp.parse(data)
    except ValueError:
        return
    rtp.dtmf_event(packet.payload)


RTP_PACKET = struct.pack("!BBHII", 0x80, 0, 1, 160, 0x1234) + bytes(160)
DTMF_PACKET = struct.pack("!BBHII", 0x80, 101, 2, 320, 0x1234) + bytes([5, 0x80, 0, 160])


class LogTrap(logging.Handler):
    """Records with a traceback (exc_info) or at ERROR: what peer input must never cause."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


def loopback_sip(**over: Any) -> config_mod.SipConfig:
    """`[sip]` on a free loopback port, answering at once (`over` changes any key)."""
    sip = {"enabled": True, "listen": "127.0.0.1", "port": 0, "ring_time": 0.0, **over}
    return config_mod.parse({"sip": sip}, "<sip on loopback>").sip


async def run(cases: int, seed: int, *, progress: bool = False) -> Escapes:
    """`cases` mutated inputs over the targets; the escapes."""
    rnd = random.Random(seed)
    random.seed(seed)
    escapes = Escapes()
    cfg = loopback_sip(rtp_ports=[33000, 33999], media_timeout=5.0)
    ua = UserAgent(cfg, lambda call: None, users={"pbx": "s3cret"})
    await ua.start()
    trap = LogTrap()
    for name in ("appliance.sip", "appliance.sip.rtp", "asyncio"):
        logging.getLogger(name).addHandler(trap)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: trap.records.append(_context_record(context)))
    nonce = VERIFIER.challenge("127.0.0.1").split('nonce="')[1].split('"')[0]
    seeds = corpus(nonce)
    targets: list[tuple[str, Callable[[bytes], None], list[bytes]]] = [
        ("message", parse_message, seeds),
        ("sdp", parse_offer, [OFFER.encode()]),
        ("digest", check_digest, [seeds[1], seeds[-1]]),
        ("rtp", parse_rtp, [RTP_PACKET, DTMF_PACKET]),
        ("agent", lambda data: ua.transport.datagram_received(data, ("127.0.0.1", 5062)), seeds),
        ("agent", lambda data: ua.transport.datagram_received(data, ("127.0.0.1", 5062)), seeds),
    ]
    started = time.monotonic()
    try:
        for n in range(cases):
            name, target, pool = targets[n % len(targets)]
            data = mutate(rnd.choice(pool), rnd)
            escapes.cases[name] += 1
            before = len(trap.records)
            try:
                target(data)
            except Exception:
                escapes.add(name, data, traceback.format_exc())
            if name == "agent" and n % 12 == 4:
                await asyncio.sleep(0)  # let the user agent's tasks run
            for record in trap.records[before:]:
                escapes.add(name, data, _describe(record))
            if progress and n and n % 10000 == 0:
                rate = n / (time.monotonic() - started)
                print(f"{n} cases, {escapes.total} escapes, {rate:.0f}/s", file=sys.stderr)
        checked = len(trap.records)
        await asyncio.sleep(1.0)  # the user agent's tasks finish what they started
        for record in trap.records[checked:]:
            escapes.add("agent (later)", b"", _describe(record))
    finally:
        for name in ("appliance.sip", "appliance.sip.rtp", "asyncio"):
            logging.getLogger(name).removeHandler(trap)
        for call in list(ua.calls.values()):
            call._end("fuzz done")
        await ua.stop()
    return escapes


def _context_record(context: dict[str, object]) -> logging.LogRecord:
    error = context.get("exception")
    record = logging.LogRecord(
        "asyncio", logging.ERROR, __file__, 0, str(context.get("message")), None, None
    )
    if isinstance(error, BaseException):
        record.exc_info = (type(error), error, error.__traceback__)
    return record


def _describe(record: logging.LogRecord) -> str:
    text = f"{record.name}: {record.getMessage()}"
    if record.exc_info and record.exc_info[1] is not None:
        text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
    return text


def flood(target: tuple[str, int], seconds: float, rate: float, seed: int) -> int:
    """Send mutated messages (and, one in four, unmutated ones) to `target` at `rate`
    per second for `seconds`; the number sent."""
    rnd = random.Random(seed)
    random.seed(seed)
    nonce = VERIFIER.challenge("127.0.0.1").split('nonce="')[1].split('"')[0]
    sent, started = 0, time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        while (elapsed := time.monotonic() - started) < seconds:
            pool = corpus(nonce)
            for data in pool:
                if rnd.random() < 0.75:
                    data = mutate(data, rnd)
                with contextlib.suppress(OSError):  # a full buffer or an ICMP error: go on
                    sock.sendto(data[:65000], target)
                sent += 1
            ahead = sent / rate - elapsed
            if ahead > 0:
                time.sleep(ahead)
            with contextlib.suppress(OSError):
                while sock.recv(65536):  # drain the answers
                    pass
    return sent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--flood", metavar="HOST:PORT", help="send over UDP instead")
    parser.add_argument("--seconds", type=float, default=10.0, help="with --flood")
    parser.add_argument("--rate", type=float, default=2000.0, help="with --flood: per second")
    args = parser.parse_args()
    if args.flood:
        host, _, port = args.flood.rpartition(":")
        sent = flood((host, int(port)), args.seconds, args.rate, args.seed)
        print(f"sent {sent} datagrams to {args.flood} in {args.seconds:.0f} s")
        return 0
    logging.basicConfig(level=logging.CRITICAL)
    started = time.monotonic()
    escapes = asyncio.run(run(args.cases, args.seed, progress=True))
    seconds = time.monotonic() - started
    total = sum(escapes.cases.values())
    print(f"{total} cases in {seconds:.0f} s (seed {args.seed}): {dict(escapes.cases)}")
    print(f"{escapes.total} unexpected exceptions")
    for key, count in escapes.found.most_common():
        data, error = escapes.examples[key]
        print(f"\n{count} x {key}\n  input: {data!r}\n{error}")
    return 1 if escapes.total else 0


if __name__ == "__main__":
    sys.exit(main())
