"""`appliance run`: the daemon under systemd (Type=notify), or by hand.

Start-up: the models are verified, loaded and warmed off the event loop, the web server
(kiosk page, events, metrics) is bound, the bridges start, and only then READY=1 goes to
systemd. While running, STATUS says what the daemon is doing and the event loop itself
sends WATCHDOG=1 at half of WATCHDOG_USEC: a stalled loop stops the pings and systemd
restarts the service. A bridge that dies stops the daemon with exit status 1 (restarted
by the unit).

SIGTERM/SIGINT: STOPPING=1, no new conversations, every session drains (its reply
finishes, at most `[service] drain_timeout` seconds), exit 0. SIGHUP: the config file is
read again; `[session]`, `[agent]` and `[service]` apply from the next conversation on,
changes to `[models]`, `[audio]`, `[ptt]`, `[sip]` or `[http]` are logged as needing a restart,
and a bad file keeps the running configuration. Configuration and model errors exit with
78 (EX_CONFIG), which the unit does not restart on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Any

from appliance import config as config_mod
from appliance.observe.events import EventHub, SessionInfo
from appliance.observe.metrics import Metrics
from appliance.store.disk import ModelError
from appliance.systemd import Notifier

if TYPE_CHECKING:
    from aiohttp import web
    from livekit.agents import AgentSession

    from appliance.ptt.led import StatusLed
    from appliance.ptt.turns import PushToTalk
    from appliance.room.worker import ApplianceWorker
    from appliance.session.modelset import ModelSet
    from appliance.sip.ua import Call

logger = logging.getLogger("appliance.service")

EX_CONFIG = 78
LAG_TICK_S = 0.5  # how often the loop measures its own lag
RELOADABLE = ("session", "agent", "livekit", "service")
NEEDS_RESTART = ("models", "audio", "ptt", "sip", "http")
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class Service:
    """The running appliance: models, bridges, metrics, and the systemd conversation."""

    def __init__(
        self,
        config: config_mod.Config,
        config_path: str | None,
        *,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        models: ModelSet | None = None,
    ) -> None:
        """`models`: an already loaded model set to use (and not close), e.g. in tests."""
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        m = config.models
        self.events = EventHub(
            {"profile": m.profile, "models": {"stt": m.stt, "llm": m.llm, "tts": m.tts}}
        )
        self.sessions: set[AgentSession] = set()
        self.calls = 0
        self.sip_ready: asyncio.Future[Any] | None = None
        self.bridges: dict[str, asyncio.Task[None]] = {}
        self.worker: ApplianceWorker | None = None  # [livekit] mode = "worker"
        self.stopping = False
        self.exit_status = 0
        self._stop: asyncio.Event | None = None
        self._state = "starting"
        self._led: StatusLed | None = None
        self._models = models

    # -- status --

    def status(self) -> str:
        if self._state != "ready":
            return self._state
        names = ", ".join(self.bridges) or "no bridge"
        n = len(self.sessions)
        text = f"ready: {names}; {n} session{'s' if n != 1 else ''} active"
        if self.config.sip.enabled:
            text += f", {self.calls} call{'s' if self.calls != 1 else ''} active"
        return text

    def _set_state(self, state: str) -> None:
        self._state = state
        self.notifier.status(self.status())

    def _session_started(self, conv: SessionInfo) -> None:
        session = conv.session
        self.metrics.observe(session, conv.bridge)
        self.events.observe(conv)
        self.sessions.add(session)
        session.on("close", lambda _: self._session_closed(session))
        self.notifier.status(self.status())

    def _session_closed(self, session: AgentSession) -> None:
        self.sessions.discard(session)
        if not self.stopping:
            self.notifier.status(self.status())

    # -- life cycle --

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        lk = self.config.livekit
        worker = lk.enabled and lk.mode == "worker"
        if not (self.config.audio.enabled or self.config.sip.enabled or worker):
            logger.error(
                "%s: no bridge is enabled; set [audio] enabled = true for a USB kiosk, "
                '[sip] enabled = true for phone calls, or [livekit] mode = "worker"',
                self.config.source,
            )
            return EX_CONFIG
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        log_errors = self.metrics.log_handler()
        logging.getLogger().addHandler(log_errors)
        models: ModelSet | None = None
        runner: web.AppRunner | None = None
        try:
            self._set_state("verifying and loading models")
            loaded = self._models
            try:
                if loaded is None:
                    loaded = await asyncio.to_thread(_load_models, self.config)
            except ModelError as exc:
                logger.error("%s", exc)
                return EX_CONFIG
            models = loaded
            self.metrics.models_loaded(loaded.times)
            ptt = self._push_to_talk()
            if self.config.http.enabled:
                try:
                    runner = await self._serve_http(ptt)
                except config_mod.ConfigError as exc:
                    logger.error("%s: %s", self.config.source, exc)
                    return EX_CONFIG
                except OSError as exc:
                    h = self.config.http
                    logger.error("http: cannot listen on %s:%d: %s", h.host, h.port, exc)
                    return 1
            if lk.enabled:
                try:
                    lk.secret()
                except config_mod.ConfigError as exc:
                    logger.error("%s: %s", self.config.source, exc)
                    return EX_CONFIG
                if worker:
                    logger.info(
                        "LiveKit agent worker %r at %s, up to %d session(s)",
                        lk.agent_name,
                        lk.url,
                        lk.max_sessions,
                    )
                else:
                    logger.info("LiveKit room bridge: %s for %s", lk.url, ", ".join(lk.sources))
            self._start_bridges(loaded, ptt)
            status = await self._listening()
            if status is not None:
                return status
            self._state = "ready"
            self.metrics.ready.set(1)
            self.notifier.ready(self.status())
            logger.info("%s", self.status(), extra={"stage": "ready"})
            await self._stop.wait()
            await self._drain()
            return self.exit_status
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            watchdog.cancel()
            if self._led is not None:
                self._led.close()
            logging.getLogger().removeHandler(log_errors)
            if runner is not None:  # after the drain, so pages see the sessions end;
                await runner.cleanup()  # it closes open sockets (1001) first, then the rest
            if models is not None and models is not self._models:
                models.close()

    async def _serve_http(self, ptt: PushToTalk | None) -> web.AppRunner:
        """The kiosk page, the events stream and /metrics (raises OSError, ConfigError)."""
        from appliance.observe import web as web_mod

        h = self.config.http
        token = h.secret()
        hosts = web_mod.host_names(h.host)
        app = web_mod.make_app(self.events, self.metrics, token=token, ptt=ptt, allowed_hosts=hosts)
        runner = await web_mod.serve(app, h.host, h.port)
        where = f"http://{h.host}:{h.port}/"
        logger.info("kiosk page %s, events %sapi/events, metrics %smetrics", where, where, where)
        return runner

    def _start_bridges(self, models: ModelSet, ptt: PushToTalk | None) -> None:
        from appliance.usb.kiosk import serve_usb

        assert self._stop is not None
        if self.config.audio.enabled:
            a = self.config.audio
            logger.info("USB kiosk on %r / %r", a.input, a.output)
            self.bridges["usb kiosk"] = asyncio.create_task(
                serve_usb(
                    lambda: self.config,
                    models,
                    self._stop,
                    on_session=self._session_started,
                    ptt=ptt,
                ),
                name="usb kiosk",
            )
        if self.config.sip.enabled:
            from appliance.sip.bridge import serve_sip

            self.sip_ready = asyncio.get_running_loop().create_future()
            self.bridges["sip"] = asyncio.create_task(
                serve_sip(
                    lambda: self.config,
                    models,
                    self._stop,
                    on_session=self._session_started,
                    on_call=self._call_event,
                    ready=self.sip_ready,
                ),
                name="sip",
            )
        lk = self.config.livekit
        if lk.enabled and lk.mode == "worker":
            from appliance.room.worker import ApplianceWorker

            self.worker = ApplianceWorker(self.config, models)
            self.bridges["livekit worker"] = asyncio.create_task(
                self.worker.run(self._stop), name="livekit worker"
            )
        for task in self.bridges.values():
            task.add_done_callback(self._bridge_ended)

    async def _listening(self) -> int | None:
        """Wait for the SIP socket to be bound; an exit status if it could not be."""
        sip = self.bridges.get("sip")
        if sip is None or self.sip_ready is None:
            return None
        await asyncio.wait([sip, self.sip_ready], return_when=asyncio.FIRST_COMPLETED)
        if self.sip_ready.done():
            self.metrics.count_bad_input("sip", self.sip_ready.result().bad.counts)
            return None
        self.stopping = True  # not a crash: the bridge could not start
        if self._stop is not None:
            self._stop.set()
        error = sip.exception()
        if isinstance(error, config_mod.ConfigError):
            logger.error("%s: %s", self.config.source, error)
            return EX_CONFIG
        s = self.config.sip
        logger.error("sip: cannot listen on udp %s:%d: %s", s.listen, s.port, error)
        return 1

    def _call_event(self, call: Call, started: bool) -> None:
        """A phone call began or ended: the events stream, the metrics, the status line."""
        self.calls += 1 if started else -1
        self.events.calls_active = self.calls
        self.metrics.calls_active.set(self.calls)
        if started:
            self.events.publish(
                "call_started",
                None,
                call.call_id,
                **{"from": call.number or call.caller.uri, "to": str(call.dialog.local.uri)},
                calls_active=self.calls,
            )
        else:
            self.events.publish(
                "call_ended", None, call.call_id, reason=call.end_reason, calls_active=self.calls
            )
        if not self.stopping:
            self.notifier.status(self.status())

    def _push_to_talk(self) -> PushToTalk | None:
        """Manual turns: the session side, and the button's task (a bridge) if configured.

        With `turn_detection = "manual"` and no button, the kiosk page's on-screen button
        (and the events API) drive the turns.
        """
        from appliance.ptt.inputs import ButtonError
        from appliance.ptt.led import make_led
        from appliance.ptt.turns import PushToTalk, serve_button

        cfg = self.config.ptt
        if self.config.turn_detection != "manual":
            return None

        def report(action: str, source: str, session: str | None) -> None:
            self.events.ptt(session, action, source)

        if not cfg.enabled:
            return PushToTalk(cfg, None, report)
        assert self._stop is not None
        if self.config.session.turn_detection != "manual":
            logger.warning(
                "[ptt] backend = %r: the button ends each turn; [session] turn_detection = %r "
                "is not used",
                cfg.backend,
                self.config.session.turn_detection,
            )
        try:
            led = make_led(cfg)
        except (ButtonError, OSError) as exc:
            logger.error("status LED unavailable: %s; running without it", exc)
            led = None
        self._led = led
        ptt = PushToTalk(cfg, led, report)
        self.bridges["push-to-talk"] = asyncio.create_task(
            serve_button(cfg, ptt, self._stop), name="push-to-talk"
        )
        return ptt

    def _bridge_ended(self, task: asyncio.Task[None]) -> None:
        """A bridge that ends while the daemon is not stopping is a failure: exit 1."""
        if self.stopping:
            return
        error = None if task.cancelled() else task.exception()
        logger.error("bridge %s stopped unexpectedly", task.get_name(), exc_info=error)
        self.exit_status = 1
        self.request_stop(f"bridge {task.get_name()} failed")

    def request_stop(self, why: str = "stop requested") -> None:
        if self._stop is None or self._stop.is_set():
            return
        logger.info("%s: stopping; letting %d session(s) finish", why, len(self.sessions))
        self.stopping = True
        self.notifier.stopping(f"stopping: draining {len(self.sessions)} session(s)")
        self._stop.set()

    async def _drain(self) -> None:
        """Wait for the bridges to end their sessions (each bounded by drain_timeout)."""
        grace = self.config.service.drain_timeout + 5.0
        tasks = list(self.bridges.values())
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            logger.warning(
                "bridge %s did not stop in %.0f s; cancelling it", task.get_name(), grace
            )
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.error("bridge %s failed", task.get_name(), exc_info=task.exception())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)

    # -- SIGHUP --

    async def reload(self) -> None:
        """Re-read the config file; apply what can change without dropping conversations."""
        self.notifier.reloading("reloading configuration")
        try:
            if self.config_path is None:
                logger.warning("reload: running on the embedded defaults; nothing to reload")
                return
            try:
                new = config_mod.load(self.config_path)
                if new.livekit.enabled:
                    new.livekit.secret()
            except config_mod.ConfigError as exc:
                logger.error("reload failed, the running configuration stays: %s", exc)
                return
            changed = [
                s
                for s in (*RELOADABLE, *NEEDS_RESTART)
                if getattr(new, s) != getattr(self.config, s)
            ]
            apply = [s for s in changed if s in RELOADABLE]
            restart = [s for s in changed if s in NEEDS_RESTART]
            self.config = self.config.model_copy(update={s: getattr(new, s) for s in apply})
            if "service" in apply:
                logging.getLogger().setLevel(LOG_LEVELS[new.service.log_level])
            if apply:
                logger.info(
                    "reloaded %s: applies from the next conversation",
                    ", ".join(f"[{s}]" for s in apply),
                )
            if restart:
                logger.warning(
                    "%s changed: needs a restart to apply (systemctl restart appliance)",
                    ", ".join(f"[{s}]" for s in restart),
                )
            if not changed:
                logger.info("reload: no change")
        finally:
            self.notifier.ready(self.status())

    # -- watchdog --

    async def _watchdog(self) -> None:
        """Ping systemd from the loop itself (a blocked loop stops the pings); record lag."""
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_interval
        tick = min(interval, LAG_TICK_S) if interval else LAG_TICK_S
        next_ping = 0.0
        while True:
            t0 = loop.time()
            await asyncio.sleep(tick)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - t0 - tick))
            if not interval or loop.time() < next_ping:
                continue
            self.notifier.watchdog()
            next_ping = loop.time() + interval


def _load_models(config: config_mod.Config) -> ModelSet:
    from appliance.session.modelset import ModelSet

    models = ModelSet(config)
    models.warm()
    return models


def run(config: config_mod.Config, config_path: str | None) -> int:
    """`appliance run`: serve until stopped; the exit status."""
    return asyncio.run(Service(config, config_path).run())
