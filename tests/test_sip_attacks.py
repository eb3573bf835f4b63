"""The SIP user agent against a hostile peer on loopback: each attack the hardening review
found, replayed against a real `UserAgent` on a real UDP socket, with the right answer.

No models: calls are answered and kept open with silence. Peers send from 127.0.0.1 (on
the allow-list) and, for spoofing, 127.0.0.2 (also loopback on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.sip import transaction
from appliance.sip.message import Message, SipError, parse, parse_address
from appliance.sip.ua import Call, UserAgent

from .fuzz import loopback_sip

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
)


class Phone(asyncio.DatagramProtocol):
    """A SIP peer that sends raw text and keeps every message it gets back."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None
        self.rtp_port = 40000 + secrets.randbelow(10000) * 2

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(SipError):  # the test checks what it can read
            self.got.append(parse(data))
            self.arrived.set()

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]  # type: ignore[no-any-return]

    def send(self, text: str | bytes, ua: UserAgent) -> None:
        assert self.transport is not None
        data = text.encode() if isinstance(text, str) else text
        self.transport.sendto(data, ("127.0.0.1", ua.transport.local[1]))

    async def final(self, call_id: str, method: str = "INVITE", timeout: float = 3.0) -> Message:
        """The first final response to `method` in `call_id`."""
        async with asyncio.timeout(timeout):
            while True:
                for msg in self.got:
                    if msg.call_id == call_id and msg.cseq[1] == method and msg.status >= 200:
                        return msg
                self.arrived.clear()
                await self.arrived.wait()

    def statuses(self, call_id: str) -> list[int]:
        return [m.status for m in self.got if m.call_id == call_id]


def request(
    phone: Phone,
    method: str,
    call_id: str,
    *,
    cseq: int = 1,
    branch: str | None = None,
    from_tag: str = "caller",
    to_tag: str = "",
    from_uri: str = "sip:+15550100@127.0.0.1",
    body: str = "",
    headers: str = "",
) -> str:
    host, port = phone.address
    branch = f";branch=z9hG4bK{secrets.token_hex(6)}" if branch is None else branch
    to = "<sip:agent@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} sip:agent@127.0.0.1 SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:{port}{branch}",
        f"From: <{from_uri}>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:phone@{host}:{port}>",
        "Max-Forwards: 70",
        *([headers] if headers else []),
        *(["Content-Type: application/sdp"] if body else []),
        f"Content-Length: {len(body.encode())}",
    ]
    return "\r\n".join(lines) + "\r\n\r\n" + body


def invite(phone: Phone, call_id: str, **kw: Any) -> str:
    return request(phone, "INVITE", call_id, body=OFFER.format(port=phone.rtp_port), **kw)


@contextlib.asynccontextmanager
async def agent(**sip: Any) -> AsyncIterator[tuple[UserAgent, list[Call]]]:
    """A user agent on a free loopback port that answers at once and keeps its calls."""
    cfg = loopback_sip(rtp_ports=[32000, 32999], **sip)
    calls: list[Call] = []
    ua = UserAgent(cfg, calls.append)
    await ua.start()
    try:
        yield ua, calls
    finally:
        for call in list(ua.calls.values()):
            call._end("test done")  # no BYE: the test's phones are gone
        await ua.stop()


@contextlib.asynccontextmanager
async def phone(host: str = "127.0.0.1") -> AsyncIterator[Phone]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Phone, local_addr=(host, 0))
    try:
        yield protocol
    finally:
        transport.close()


async def answered(p: Phone, ua: UserAgent, call_id: str, **kw: Any) -> str:
    """Place a good call from `p` and ACK it; the appliance's To tag."""
    p.send(invite(p, call_id, **kw), ua)
    ok = await p.final(call_id)
    assert ok.status == 200
    tag = parse_address(ok.get("To")).tag
    p.send(request(p, "ACK", call_id, to_tag=tag, **kw), ua)
    return tag


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_odd_numbers_in_an_invite_leave_no_ghost_call() -> None:
    async def main() -> None:
        async with agent(max_calls=3) as (ua, calls), phone() as p:
            fds = open_fds()
            for n, port in enumerate(("\u00b2", "9" * 5000, "0")):  # where the route goes
                bad = invite(p, f"ghost-{n}").replace(
                    f"Contact: <sip:phone@{p.address[0]}:{p.address[1]}>",
                    f"Contact: <sip:phone@127.0.0.1:{port}>",
                )
                p.send(bad, ua)
                assert (await p.final(f"ghost-{n}")).status == 400
                assert 100 not in p.statuses(f"ghost-{n}")  # refused before anything started
            assert not ua.calls and not ua._pending and not calls and open_fds() == fds
            for n, port in enumerate(("\u00b2", "9" * 5000, "0")):  # only the caller's name
                uri = f"sip:+1555@127.0.0.1:{port}"
                tag = await answered(p, ua, f"odd-{n}", from_uri=uri)
                p.send(request(p, "BYE", f"odd-{n}", cseq=2, to_tag=tag, from_uri=uri), ua)
                assert (await p.final(f"odd-{n}", "BYE")).status == 200
            assert [c.number for c in calls] == ["", "", ""]  # answered, with no number
            await asyncio.sleep(0.1)
            assert not ua.calls and open_fds() == fds
            await answered(p, ua, "real")  # the appliance is not busy
            assert list(ua.calls) == ["real"]

    asyncio.run(main())


def test_max_calls_counts_each_dialog_once() -> None:
    async def main() -> None:
        async with agent(max_calls=2) as (ua, calls), phone() as p:
            for n in range(4):  # no branch: no transaction, refused
                p.send(invite(p, f"nobranch-{n}", branch=""), ua)
                assert (await p.final(f"nobranch-{n}")).status == 400
            p.send(invite(p, "twice"), ua)
            p.send(invite(p, "twice"), ua)  # same Call-ID, another branch
            await asyncio.sleep(0.3)
            finals = sorted(s for s in p.statuses("twice") if s >= 200)
            assert finals == [200, 482], finals
            await answered(p, ua, "second")
            p.send(invite(p, "third"), ua)
            assert (await p.final("third")).status == 486
            assert len(calls) == 2 and len(ua.calls) == 2

    asyncio.run(main())


def test_in_dialog_requests_must_match_the_tags_and_the_peer() -> None:
    async def main() -> None:
        async with agent() as (ua, _), phone() as p, phone("127.0.0.2") as spoofer:
            tag = await answered(p, ua, "dialog")
            call = ua.calls["dialog"]
            rtp_peer = call.rtp.remote
            for n, (sender, from_tag, to_tag) in enumerate(
                [(spoofer, "caller", tag), (p, "caller", "wrong"), (p, "other", tag)]
            ):
                sender.send(
                    request(sender, "BYE", "dialog", cseq=2 + n, from_tag=from_tag, to_tag=to_tag),
                    ua,
                )
                assert (await sender.final("dialog", "BYE")).status == 481
                sender.got.clear()
            offer = OFFER.format(port=50000).replace("127.0.0.1", "127.0.0.2")
            spoofer.send(request(spoofer, "INVITE", "dialog", cseq=9, to_tag=tag, body=offer), ua)
            assert (await spoofer.final("dialog")).status == 481
            assert call.rtp.remote == rtp_peer and not call.ended.is_set()  # no hijack
            p.send(request(p, "BYE", "dialog", cseq=1, to_tag=tag), ua)  # older than seen
            assert (await p.final("dialog", "BYE")).status == 500
            p.got.clear()
            p.send(request(p, "BYE", "dialog", cseq=20, to_tag=tag), ua)
            assert (await p.final("dialog", "BYE")).status == 200
            assert call.ended.is_set() and not ua.calls

    asyncio.run(main())


def test_bad_numbers_get_400_and_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with agent() as (ua, _), phone() as p:
            good = request(p, "OPTIONS", "numbers")
            bad = [
                good.replace("Content-Length: 0", "Content-Length: \u0660"),
                good.replace("Content-Length: 0", "Content-Length: " + "0" * 4400),
                good.replace("CSeq: 1", "CSeq: " + "1" * 4400),
                good.replace("To: <sip:agent@127.0.0.1>", "To: <sip:agent@127.0.0.1"),
                good.replace(
                    "Contact: <sip:phone@127.0.0.1", "Contact: <sip:phone@127.0.0.1:\u00b2"
                ),
            ]
            for n, text in enumerate(bad * 20):
                p.send(text.replace("Call-ID: numbers", f"Call-ID: numbers-{n}"), ua)
                await asyncio.sleep(0.001)  # within the socket's receive buffer
            offer = OFFER.format(port="4\u0663")
            p.send(request(p, "INVITE", "port", body=offer), ua)
            await asyncio.sleep(0.5)
            assert (await p.final("port")).status == 488
            answers = [m for m in p.got if m.call_id.startswith("numbers-")]
            # the two Content-Lengths: 400; CSeq and To unreadable: no answer (it would copy
            # them); a Contact nobody uses (OPTIONS): 200
            assert sorted({m.status for m in answers}) == [200, 400]
            assert len([m for m in answers if m.status == 400]) == 40
            assert all(m.reason == "Bad Request" for m in answers if m.status == 400)

    with caplog.at_level(logging.DEBUG, logger="appliance.sip"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.exc_info], "a traceback for peer input"
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) == 1  # one line per kind per interval


def test_the_transaction_table_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transaction, "MAX_SERVERS", 500)

    async def main() -> None:
        async with agent() as (ua, _), phone() as p:
            for n in range(3000):
                p.send(request(p, "OPTIONS", f"o-{n}"), ua)
                await asyncio.sleep(0.0005)
            await asyncio.sleep(0.5)
            assert len(ua.transport._servers) <= 500
            assert sum(m.status == 200 for m in p.got) >= 2900  # loopback may drop a few

    asyncio.run(main())


def test_responses_are_not_amplified() -> None:
    async def main() -> None:
        async with agent(max_calls=1) as (ua, _), phone() as p:
            vias = ", ".join(f"SIP/2.0/UDP 10.0.0.{n % 250}" for n in range(600))
            big = request(p, "OPTIONS", "amplify", headers=f"Via: {vias}")
            assert len(big) > 12000
            p.send(big, ua)
            await answered(p, ua, "busy-maker")
            for n in range(40):
                p.send(invite(p, f"busy-{n}"), ua)
                await asyncio.sleep(0.001)
            await asyncio.sleep(2.5)
            assert not p.statuses("amplify")  # not answered at all
            refusals = [m for m in p.got if m.call_id.startswith("busy-") and m.status == 486]
            assert len({m.call_id for m in refusals}) == 40
            # each one answered; only MAX_RESENDING of them resent (2.5 s: 3 sends each)
            assert len(refusals) <= 40 + transaction.MAX_RESENDING * 2

    asyncio.run(main())


def test_scanners_get_silence_even_when_malformed(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with agent(max_calls=1) as (ua, _), phone() as p:
            await answered(p, ua, "busy-maker")
            scan = request(p, "OPTIONS", "scan", headers="User-Agent: friendly-scanner")
            p.send(scan.replace("CSeq: 1 OPTIONS", "CSeq: x OPTIONS"), ua)
            p.send(scan, ua)
            for n in range(30):
                p.send(invite(p, f"busy-{n}"), ua)
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.5)
            assert not p.statuses("scan")
            assert ua.bad.counts["scanner"] == 2 and ua.bad.counts["busy"] == 30

    with caplog.at_level(logging.INFO, logger="appliance.sip"):
        asyncio.run(main())
    assert len([r for r in caplog.records if ": busy (" in r.getMessage()]) == 1
