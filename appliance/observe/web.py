"""The daemon's web server (aiohttp): kiosk page, operator view, events stream, metrics.

Routes:

- `GET /`: the kiosk page (full screen: the agent's state, the live conversation, an
  on-screen push-to-talk button in manual mode, a status strip);
- `GET /operator`: sessions and calls with their latency figures;
- `GET /static/...`: the pages' script, style and the events schema; nothing external;
- `GET /api/events`: a WebSocket of `events.EventHub` messages (a snapshot first). The
  page may send `{"type": "ptt", "action": "press" | "release"}`; anything else, malformed
  or over `MAX_MESSAGE` bytes, is answered with an error (or the socket is closed) and
  changes nothing;
- `GET /api/state`: the snapshot as JSON;
- `GET /metrics`: Prometheus text.

Access: the server listens on loopback unless `[http] host` says otherwise, and then a
token is required (the config refuses a LAN address without one). With a token, every
request needs it: `Authorization: Bearer <token>`, or `?token=<token>` (the kiosk URL),
after which a cookie carries it for the page's own requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from appliance.observe.events import EventHub
    from appliance.observe.metrics import Metrics
    from appliance.ptt.buttons import PushToTalk

logger = logging.getLogger("appliance.web")

STATIC = Path(__file__).parent.parent / "static"
MAX_MESSAGE = 1024  # bytes a page may send in one WebSocket message
COOKIE = "appliance_token"
PTT_ACTIONS = ("press", "release")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _authorized(request: web.Request, token: str) -> bool:
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    offered = [
        header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else "",
        request.query.get("token", ""),
        request.cookies.get(COOKIE, ""),
    ]
    return any(o and hmac.compare_digest(o.encode(), token.encode()) for o in offered)


def make_app(
    hub: EventHub, metrics: Metrics, *, token: str = "", ptt: PushToTalk | None = None
) -> web.Application:
    """The application; `ptt` (manual turns) makes the page's button work."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _authorized(request, token):
            return web.Response(status=401, text="401: a valid token is required\n")
        response = await handler(request)
        if token and request.query.get("token") and not response.prepared:
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    async def page(request: web.Request) -> web.StreamResponse:
        name = "operator.html" if request.path == "/operator" else "kiosk.html"
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

    async def state(_: web.Request) -> web.Response:
        return web.json_response(hub.snapshot())

    async def prometheus(_: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=metrics.text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def events(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=20.0)
        await ws.prepare(request)
        queue = hub.subscribe()
        snapshot = hub.snapshot()
        snapshot["data"]["ptt"] = ptt is not None
        await ws.send_json(snapshot)

        async def forward() -> None:
            while not ws.closed:
                await ws.send_json(await queue.get())

        sender = asyncio.create_task(forward())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    error = handle_message(msg.data, hub, ptt)
                    if error:
                        await ws.send_json({"type": "error", "error": error})
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_json(
                        {"type": "error", "error": "binary messages are not accepted"}
                    )
        finally:
            sender.cancel()
            hub.unsubscribe(queue)
        return ws

    app = web.Application(middlewares=[auth], client_max_size=MAX_MESSAGE * 64)
    app.router.add_get("/", page)
    app.router.add_get("/operator", page)
    app.router.add_get("/api/state", state)
    app.router.add_get("/api/events", events)
    app.router.add_get("/metrics", prometheus)
    app.router.add_static("/static/", STATIC)
    return app


def handle_message(raw: str, hub: EventHub, ptt: PushToTalk | None) -> str | None:
    """Act on one message from a page; the error to send back, if it was not acceptable."""
    if len(raw.encode()) > MAX_MESSAGE:
        return "message too large"
    try:
        message: Any = json.loads(raw)
    except ValueError:
        return "not JSON"
    if not isinstance(message, dict) or message.get("type") != "ptt":
        return 'expected {"type": "ptt", "action": "press" | "release"}'
    action = message.get("action")
    if action not in PTT_ACTIONS or set(message) != {"type", "action"}:
        return 'ptt: action must be "press" or "release", and nothing else'
    if ptt is None:
        return 'ptt: turns are not manual here (turn_detection is not "manual")'
    ptt.edge(action == "press", time.monotonic(), source="page")
    return None


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen; raises OSError if the address cannot be bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
