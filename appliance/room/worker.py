"""The appliance as a LiveKit agent worker (`[livekit] mode = "worker"`).

The daemon registers with the server under `agent_name` (explicit dispatch: a dispatch API
call, a token's room configuration or a LiveKit SIP dispatch rule sends it jobs) and takes
a job while it has fewer than `max_sessions`: its reported load is active sessions /
`max_sessions`, not CPU, so the server sees it full exactly when it is. Each job runs
in this process, in livekit-agents' thread executor (a thread and event loop per job), on
the one shared model set: the job joins its room, waits for the first person (a LiveKit
SIP caller or any participant), and runs an AgentSession attached to them through RoomIO
with the reference's `RoomOptions` (telephony noise filter for SIP participants) until
they leave. `lk.agent.state` is published by RoomIO. A LiveKit SIP caller is treated as a
phone call on our own SIP stack: keypad digits become the caller's words ("The caller
pressed 4 2 #"), `transfer_call` (with `[sip] transfer_targets`) is LiveKit SIP's transfer
API (a REFER to the caller's side), and when the agent ends the call the caller is removed
from the room (LiveKit SIP hangs up).

Stopping drains: the worker stops taking jobs at once, lets the sessions end within
`[service] drain_timeout`, then ends what is left. A lost server connection is retried
with backoff (1 s doubling to `retry_max`), logged once until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import threading
from typing import Any

from livekit import api, rtc
from livekit.agents import (
    AgentServer,
    AgentSession,
    JobContext,
    JobExecutorType,
    JobRequest,
)

from appliance.config import Config
from appliance.logs import guard_livekit_logs, redact_tokens
from appliance.room.bridge import RETRY_MIN_S
from appliance.room.link import room_options
from appliance.room.people import Person
from appliance.session.builder import ApplianceAgent, build_session, log_conversation
from appliance.session.modelset import ModelSet
from appliance.sip.bridge import DtmfCollector, phone_config, transfer_tool

logger = logging.getLogger("appliance.worker")
# livekit-server dispatches only while some worker reports a load under its target (0.7):
# a worker with room reports sessions / max_sessions scaled under it, a full one 1.0
TARGET_LOAD = 0.7


def person_of(participant: rtc.RemoteParticipant) -> Person:
    """The person a job answers, as the room shows them (LiveKit SIP callers: kind SIP)."""
    sip = participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_SIP
    return Person(
        identity=participant.identity,
        name=participant.name or participant.identity,
        kind="sip" if sip else "standard",
        attributes=dict(participant.attributes),
    )


class ApplianceWorker:
    """One registration with the server; `run` until `stop` is set, then drain."""

    def __init__(self, config: Config, models: ModelSet) -> None:
        self.config, self.models = config, models
        self.lk = config.livekit
        self._lock = threading.Lock()
        self.active = 0
        self.jobs_done = 0
        self.registered = asyncio.Event()
        self.server: AgentServer | None = None
        self.sessions: dict[str, AgentSession] = {}  # room -> its session, while it runs
        self._pending = 0  # calls accepted, not started

    def load(self, *_: Any) -> float:
        """What the server balances on: sessions (and calls accepted, not yet started) /
        max_sessions, scaled under the server's target load; 1.0 when full."""
        with self._lock:
            taken = self.active + self._pending
            cap = self.lk.max_sessions
            return 1.0 if taken >= cap else TARGET_LOAD * taken / cap

    def _server(self) -> AgentServer:
        cap = self.lk.max_sessions
        server = AgentServer(
            job_executor_type=JobExecutorType.THREAD,
            # full (no more jobs offered) exactly at max_sessions
            load_threshold=TARGET_LOAD,
            load_fnc=self.load,
            num_idle_processes=cap,
            ws_url=self.lk.url,
            api_key=self.lk.api_key,
            api_secret=self.lk.secret(),
            host="127.0.0.1",
            port=0,
            drain_timeout=math.ceil(self.config.service.drain_timeout),
            shutdown_process_timeout=5.0,
            max_retry=3,
        )
        server.rtc_session(self._job, agent_name=self.lk.agent_name, on_request=self._request)
        server.on("worker_registered", lambda *_: self.registered.set())
        return server

    async def _request(self, request: JobRequest) -> None:
        """Take a call while there is room; else the server offers it to the next worker."""
        with self._lock:
            take = self.active + self._pending < self.lk.max_sessions
            if take:
                self._pending += 1
        if not take:
            await request.reject(terminate=False)
            return
        host = socket.gethostname()
        await request.accept(
            identity=f"agent_{host}_{request.id[-8:]}",
            name="Agent",
            attributes={"appliance.host": host, "appliance.pid": str(os.getpid())},
        )

    async def _job(self, ctx: JobContext) -> None:
        """One job: join, wait for the person, converse until they leave."""
        with self._lock:
            self.active += 1
            self._pending = max(0, self._pending - 1)
        room = ctx.job.room.name
        try:
            await ctx.connect()
            participant = await ctx.wait_for_participant()
            person = person_of(participant)
            await self._converse(ctx, room, person)
        finally:
            self.sessions.pop(room, None)
            with self._lock:
                self.active -= 1
                self.jobs_done += 1
            ctx.shutdown("the person left")

    async def _converse(self, ctx: JobContext, room: str, person: Person) -> None:
        """The session with `person`, until it closes."""
        phone = person.kind == "sip"
        config = phone_config(self.config) if phone else self.config
        userdata: dict[str, Any] = {"room": room, "participant": person.identity}
        tools = []
        call: dict[str, Any] = {
            "phone_number": person.attributes.get("sip.phoneNumber", ""),
            "call_id": person.attributes.get("sip.callID", ""),
            "dtmf": [],
        }
        if phone:
            userdata["call"] = call
            if config.sip.transfer_targets:

                async def transfer(uri: str) -> bool:
                    return await self.transfer(room, person.identity, uri)

                tools.append(transfer_tool(transfer, config.sip.transfer_targets))
        session = build_session(config, self.models, userdata=userdata)
        self.sessions[room] = session
        log_conversation(session)
        if phone:
            dtmf = DtmfCollector(session, call["dtmf"], config.sip.dtmf_timeout)

            def pressed(event: rtc.SipDTMF) -> None:
                if event.participant and event.participant.identity == person.identity:
                    dtmf.digit(event.digit)

            ctx.room.on("sip_dtmf_received", pressed)
        closed = asyncio.Event()
        session.on("close", lambda _: closed.set())
        options = room_options(person, None, close_on_disconnect=True)
        agent = ApplianceAgent(config.agent, extra_tools=tools)
        await session.start(agent, room=ctx.room, room_options=options)
        logger.info("job in room %r for %s", room, person.identity)
        await closed.wait()
        if phone and person.identity in ctx.room.remote_participants:
            await self.hang_up(room, person.identity)  # the agent ended the call

    def _api(self) -> api.LiveKitAPI:
        return api.LiveKitAPI(self.lk.url, self.lk.api_key, self.lk.secret())

    async def transfer(self, room: str, identity: str, uri: str) -> bool:
        """Transfer a LiveKit SIP caller (LiveKit SIP sends the REFER); True when done."""
        lkapi = self._api()
        try:
            request = api.TransferSIPParticipantRequest(
                room_name=room, participant_identity=identity, transfer_to=uri
            )
            await lkapi.sip.transfer_sip_participant(request)
            logger.info("transferred %s in %r to %s", identity, room, uri)
            return True
        except Exception as exc:
            logger.warning("transfer of %s to %s failed: %s", identity, uri, exc)
            return False
        finally:
            await lkapi.aclose()

    async def hang_up(self, room: str, identity: str) -> None:
        """End a LiveKit SIP caller's call: removed from the room, LiveKit SIP sends BYE."""
        lkapi = self._api()
        try:
            await lkapi.room.remove_participant(
                api.RoomParticipantIdentity(room=room, identity=identity)
            )
        except Exception as exc:
            logger.warning("could not hang up %s in %r: %s", identity, room, exc)
        finally:
            await lkapi.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Register (again after a lost connection, with backoff) until `stop`; then drain."""
        guard_livekit_logs()
        failures = 0
        while not stop.is_set():
            self.server = server = self._server()
            running = asyncio.create_task(server.run(devmode=False), name="agent worker")
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                await self._drain(server, running)
                return
            error = running.exception() if not running.cancelled() else None
            with contextlib.suppress(Exception):
                await server.aclose()
            self.registered.clear()
            failures += 1
            log = logger.warning if failures == 1 else logger.debug
            log("LiveKit worker at %s lost: %s; retrying", self.lk.url, redact_tokens(str(error)))
            delay = min(self.lk.retry_max, RETRY_MIN_S * 2 ** (failures - 1))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _drain(self, server: AgentServer, running: asyncio.Task[None]) -> None:
        logger.info("draining: no new jobs; %d session(s) finishing", self.active)
        try:
            await server.drain(timeout=math.ceil(self.config.service.drain_timeout))
        except asyncio.TimeoutError:
            logger.warning("sessions still running after the drain timeout; ending them")
        with contextlib.suppress(Exception):
            await server.aclose()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
