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
after which a cookie carries it for the page's own requests. Against DNS rebinding (a
page on evil.example, resolved to 127.0.0.1), every request must also name this server
in its `Host` header (`host_names`, or the address the connection arrived on), else 421,
and a request with an `Origin` header must come from the same host and port, else 403;
clients that send no `Origin` (scripts, Prometheus) are unaffected.

Stopping: the cleanup of `serve`'s runner closes the open WebSockets (1001, going away)
and waits at most `SHUTDOWN_TIMEOUT` for the other requests, so an open page never
holds up a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

if TYPE_CHECKING:
    from appliance.observe.events import EventHub
    from appliance.observe.metrics import Metrics
    from appliance.ptt.turns import PushToTalk

logger = logging.getLogger("appliance.web")

STATIC = Path(__file__).parent.parent / "static"
MAX_MESSAGE = 1024  # bytes a page may send in one WebSocket message
COOKIE = "appliance_token"
PTT_ACTIONS = ("press", "release")
SHUTDOWN_TIMEOUT = 2.0  # seconds a stopping server waits for open requests and sockets
WILDCARDS = ("0.0.0.0", "::", "")
SOCKETS = web.AppKey("sockets", set[web.WebSocketResponse])  # the open /api/events

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


def host_names(bind: str) -> frozenset[str]:
    """The names a `Host` header may give besides the IP address the connection arrived
    on: loopback, this machine's name and `name.local`, and `bind` unless a wildcard."""
    name = socket.gethostname().lower()
    short = name.split(".")[0]
    names = {"localhost", "127.0.0.1", "::1", name, short, f"{short}.local"}
    if bind not in WILDCARDS:
        names.add(bind.lower().strip("[]"))
    return frozenset(names)


def _split_host(value: str) -> tuple[str, str]:
    """A `Host` header, `host[:port]` -> (host: lowercase, no brackets or final dot, port)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, port = value[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = value.partition(":")
    return host.rstrip("."), port


def _local_address(request: web.Request, host: str) -> bool:
    """Whether `host` is the IP address this request's connection arrived on."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple):
        return False
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
        local = ipaddress.ip_address(str(sockname[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:
        local = local.ipv4_mapped
    return ip == local


def _same_origin(origin: str, host: str, port: str) -> bool:
    try:
        url = URL(origin)
    except ValueError:
        return False
    explicit = "" if url.explicit_port is None else str(url.explicit_port)
    return url.absolute and (url.raw_host or "").rstrip(".") == host and explicit == port


def make_app(
    hub: EventHub,
    metrics: Metrics,
    *,
    token: str = "",
    ptt: PushToTalk | None = None,
    allowed_hosts: Collection[str] | None = None,
) -> web.Application:
    """The application; `ptt` (manual turns) makes the page's button work; `allowed_hosts`
    (default: `host_names("127.0.0.1")`) are the names a request's `Host` may give."""
    names = host_names("127.0.0.1") if allowed_hosts is None else frozenset(allowed_hosts)

    @web.middleware
    async def same_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        """DNS rebinding: only this server's names, and only same-origin pages."""
        header = request.headers.get("Host")  # only HTTP/1.0 clients omit it, never a browser
        host, port = _split_host(header or "")
        if header is not None and host not in names and not _local_address(request, host):
            return web.Response(status=421, text="421: not a name of this server\n")
        origin = request.headers.get("Origin")
        if origin is not None and not (header and _same_origin(origin, host, port)):
            return web.Response(status=403, text="403: cross-origin request refused\n")
        return await handler(request)

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
        request.app[SOCKETS].add(ws)
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
            request.app[SOCKETS].discard(ws)
        return ws

    app = web.Application(middlewares=[same_host, auth], client_max_size=MAX_MESSAGE * 64)
    app[SOCKETS] = set()
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/", page)
    app.router.add_get("/operator", page)
    app.router.add_get("/api/state", state)
    app.router.add_get("/api/events", events)
    app.router.add_get("/metrics", prometheus)
    app.router.add_static("/static/", STATIC)
    return app


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: close the open event streams (1001, going away) before anything else."""
    sockets = app[SOCKETS]
    closing = [
        ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        for ws in list(sockets)
    ]
    if closing:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*closing, return_exceptions=True), SHUTDOWN_TIMEOUT
            )


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
    """Listen; raises OSError if the address cannot be bound. `runner.cleanup()` closes
    the WebSockets first, then gives other requests `SHUTDOWN_TIMEOUT` to finish."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
