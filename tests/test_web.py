"""The kiosk page and the events API.

In headless Chromium (Debian's `chromium`, driven by Playwright) against the real daemon
(`Service`, in this process so it shares the test's loaded models) with the USB bridge in
the simulated PulseAudio room: the page shows what the user said, the agent's reply and
the state changes; in manual mode its on-screen button commits a turn. The events seen
meanwhile validate against `appliance/static/events.schema.json`. Screenshots go to
`test-artifacts/`. Without a browser: tokens, malformed messages, requests for another
host or from another origin (DNS rebinding), and a stop with an events stream open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import numpy as np
import pytest

from appliance import config as config_mod
from appliance.observe.events import EventHub
from appliance.observe.metrics import Metrics
from appliance.observe.web import MAX_MESSAGE, host_names, make_app, serve
from appliance.ptt.turns import PushToTalk
from appliance.service import Service
from appliance.systemd import Notifier
from bench.room_sim import Room

from .conftest import free_tcp_port, transcribed_as

REPO = Path(__file__).parent.parent
ARTIFACTS = REPO / "test-artifacts"
SCHEMA = json.loads((REPO / "appliance" / "static" / "events.schema.json").read_text())
CHROMIUM = shutil.which("chromium")
TOKEN = "test-token-0123456789abcdef"


def web_config(port: int, **session: Any) -> config_mod.Config:
    return config_mod.parse(
        {
            "session": {"turn_detection": "vad", **session},
            "audio": {"enabled": True, "input_rate": 16000, "output_rate": 16000},
            "agent": {"greeting": "Hello."},
            "http": {"port": port},
        },
        "<web test>",
    )


async def collect(url: str, into: list[dict[str, Any]], headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        async for msg in ws:
            into.append(json.loads(msg.data))


def run_service(
    models: Any, config: config_mod.Config, scenario: Callable[..., Awaitable[Any]]
) -> tuple[Any, list[dict[str, Any]]]:
    """The daemon in this process; `scenario(service, page)` with Chromium on the page."""
    from playwright.async_api import async_playwright

    async def main() -> tuple[Any, list[dict[str, Any]]]:
        service = Service(config, None, notifier=Notifier({}), models=models)
        daemon = asyncio.create_task(service.run())
        base = f"http://127.0.0.1:{config.http.port}"
        while service.status().startswith(("starting", "verifying")) or not service.sessions:
            assert not daemon.done(), daemon
            await asyncio.sleep(0.05)
        seen: list[dict[str, Any]] = []
        ws_url = base.replace("http", "ws") + "/api/events"
        collector = asyncio.create_task(collect(ws_url, seen, {}))
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=CHROMIUM,
                    args=["--disable-gpu", "--disable-background-networking", "--no-first-run"],
                )
                context = await browser.new_context(viewport={"width": 1280, "height": 800})
                page = await context.new_page()
                await page.goto(base + "/")
                result = await asyncio.wait_for(scenario(service, page), 120)
                await browser.close()
        finally:
            service.request_stop("test done")
            assert await asyncio.wait_for(daemon, 60) == 0
            collector.cancel()
        return result, seen

    return asyncio.run(main())


async def wait_js(page: Any, expression: str, timeout: float = 45) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await page.evaluate(expression)
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {expression}: {await page.content()}")


BUBBLES = (
    "[...document.querySelectorAll('.bubble')].map(b => [b.className, b.textContent, "
    "b.dataset.final || ''])"
)


def validate(seen: list[dict[str, Any]]) -> set[str]:
    for message in seen:
        jsonschema.validate(message, SCHEMA)
    return {m["type"] for m in seen}


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_the_page_shows_the_conversation_and_the_states(
    models: Any, speak: Callable[..., np.ndarray], room: Room
) -> None:
    question = speak("What is the capital of France?")

    async def scenario(service: Service, page: Any) -> dict[str, Any]:
        await wait_js(page, "window.__kiosk.states.includes('listening')")
        await wait_js(page, "document.querySelector('.bubble.assistant[data-final]')")  # greeting
        room.say(question)
        # mid-reply: the agent's words appear as they are spoken
        await wait_js(
            page,
            "document.querySelector('#state.speaking') && [...document.querySelectorAll("
            "'.bubble.assistant:not([data-final])')].some(b => b.textContent.length > 3)",
        )
        out: dict[str, Any] = {"mid_reply": await page.evaluate(BUBBLES)}
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "kiosk-speaking.png"))
        await wait_js(
            page,
            "[...document.querySelectorAll('.bubble.assistant[data-final]')].length >= 2"
            " && window.__kiosk.states[window.__kiosk.states.length - 1] === 'listening'",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "kiosk.png"))
        return {
            **out,
            "bubbles": await page.evaluate(BUBBLES),
            "states": await page.evaluate("window.__kiosk.states"),
            "latency": await page.text_content("#status-latency"),
            "models": await page.text_content("#status-models"),
            "button_visible": await page.is_visible("#ptt"),
            "operator": await operator_rows(page),
        }

    out, seen = run_service(models, web_config(free_tcp_port()), scenario)
    users = [text for cls, text, _ in out["bubbles"] if "user" in cls]
    replies = [text for cls, text, final in out["bubbles"] if "assistant" in cls and final]
    assert any(transcribed_as("What is the capital of France?", u) for u in users), out["bubbles"]
    assert replies[0] == "Hello." and len(replies) >= 2 and replies[1], out["bubbles"]
    assert "paris" in replies[1].lower(), out["bubbles"]  # the page (and its screenshot) is right
    partial = [text for cls, text, final in out["mid_reply"] if "assistant" in cls and not final]
    assert partial and replies[1].startswith(partial[0][:3]), out  # in step with the speech
    states = iter(out["states"])  # the question's turn, in order (after the greeting's)
    assert all(s in states for s in ("listening", "thinking", "speaking", "listening")), out
    assert out["states"][-1] == "listening"
    assert out["latency"].startswith("last reply: ") and out["latency"].endswith(" ms")
    assert "whisper/tiny.en" in out["models"]
    assert out["button_visible"] is False  # not manual: no push-to-talk button
    assert out["operator"] and out["operator"][0][4] != "0"  # a session with turns
    types = validate(seen)
    for needed in (
        "snapshot",
        "user_state_changed",
        "agent_state_changed",
        "conversation_item_added",
        "metrics",
        "user_input_transcribed",
        "agent_transcript",
    ):
        assert needed in types, types
    ended = [m for m in seen if m["type"] == "session_ended"]
    assert ended and ended[-1]["session"] == seen[1]["session"]  # the stop ended it


async def operator_rows(page: Any) -> list[list[str]]:
    """The operator view's sessions table (opened in a second tab)."""
    tab = await page.context.new_page()
    await tab.goto(page.url.rstrip("/") + "/operator")
    await wait_js(tab, "document.querySelectorAll('#sessions tr').length > 0")
    rows: list[list[str]] = await tab.evaluate(
        "[...document.querySelectorAll('#sessions tr')]"
        ".map(r => [...r.children].map(c => c.textContent))"
    )
    await tab.close()
    return rows


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_the_on_screen_push_to_talk_commits_a_turn(
    models: Any, speak: Callable[..., np.ndarray], room: Room
) -> None:
    question = speak("How many legs does a spider have?")

    async def scenario(service: Service, page: Any) -> dict[str, Any]:
        await wait_js(page, "window.__kiosk.manual && window.__kiosk.ptt")
        await wait_js(page, "document.querySelector('.bubble.assistant[data-final]')")  # greeting
        assert await page.is_visible("#ptt")
        room.say(question)  # said with the button up: nobody listens
        await asyncio.sleep(len(question) / 16000 + 1.0)
        before = await page.evaluate(BUBBLES)
        box = await page.locator("#ptt").bounding_box()
        await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        await page.mouse.down()
        await asyncio.sleep(0.2)
        room.say(question)
        await asyncio.sleep(len(question) / 16000 + 0.3)
        held = await page.text_content("#ptt")
        await page.mouse.up()
        await wait_js(
            page, "[...document.querySelectorAll('.bubble.assistant[data-final]')].length >= 2"
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "kiosk-ptt.png"))
        return {"before": before, "after": await page.evaluate(BUBBLES), "held": held}

    config = web_config(free_tcp_port(), turn_detection="manual")
    out, seen = run_service(models, config, scenario)
    assert not any("user" in cls for cls, _, _ in out["before"])  # button up: nothing heard
    users = [text for cls, text, _ in out["after"] if "user" in cls]
    assert len(users) == 1 and "spider" in users[0].lower(), out["after"]
    assert out["held"].startswith("Listening")
    ptt = [(m["data"]["action"], m["data"]["source"]) for m in seen if m["type"] == "ptt"]
    assert ptt == [("press", "page"), ("release", "page")], ptt
    validate(seen)


# -- access and bad input (no browser, no models) ---------------------------------------------


def test_tokens_and_malformed_messages_are_rejected_without_effect(tmp_path: Path) -> None:
    cfg = config_mod.PttConfig(min_press_ms=0)
    hub = EventHub({"models": {}})
    ptt = PushToTalk(cfg, None, lambda action, source, sid: hub.ptt(sid, action, source))
    port = free_tcp_port()
    base = f"http://127.0.0.1:{port}"

    async def main() -> dict[str, Any]:
        runner = await serve(make_app(hub, Metrics(), token=TOKEN, ptt=ptt), "127.0.0.1", port)
        out: dict[str, Any] = {}
        try:
            async with aiohttp.ClientSession() as http:
                for name, url, headers in (
                    ("page_none", "/", {}),
                    ("page_wrong", "/?token=wrong-token-0123456789", {}),
                    ("metrics_wrong", "/metrics", {"Authorization": "Bearer nope"}),
                    ("page_ok", f"/?token={TOKEN}", {}),
                    ("metrics_ok", "/metrics", {"Authorization": f"Bearer {TOKEN}"}),
                ):
                    async with http.get(base + url, headers=headers) as r:
                        out[name] = r.status
                        if name == "page_ok":
                            out["cookie"] = r.cookies.get("appliance_token") is not None
                try:
                    await http.ws_connect(base + "/api/events")
                except aiohttp.WSServerHandshakeError as exc:
                    out["ws_none"] = exc.status
                ws = await http.ws_connect(
                    base + "/api/events", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                snapshot = json.loads((await ws.receive()).data)
                replies = []
                for bad in (
                    "not json",
                    "[1, 2]",
                    json.dumps({"type": "shutdown"}),
                    json.dumps({"type": "ptt", "action": "explode"}),
                    json.dumps({"type": "ptt", "action": "press", "extra": 1}),
                ):
                    await ws.send_str(bad)
                    replies.append(json.loads((await ws.receive()).data))
                await ws.send_bytes(b"\x00\x01")
                replies.append(json.loads((await ws.receive()).data))
                await ws.send_str("x" * (MAX_MESSAGE * 5))
                closing = await ws.receive()
                out["oversized"] = (closing.type, ws.close_code)
                # the server is unaffected: a new connection works, no turn was taken
                ws2 = await http.ws_connect(
                    base + "/api/events", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                out["second"] = json.loads((await ws2.receive()).data)["type"]
                await ws2.close()
                out["replies"] = replies
                out["snapshot"] = snapshot
                await cli_events(out, port, hub)
        finally:
            await runner.cleanup()
        return out

    out = asyncio.run(main())
    assert (out["page_none"], out["page_wrong"], out["metrics_wrong"]) == (401, 401, 401)
    assert out["ws_none"] == 401
    assert (out["page_ok"], out["metrics_ok"], out["cookie"]) == (200, 200, True)
    assert [r["type"] for r in out["replies"]] == ["error"] * 6, out["replies"]
    assert out["oversized"] == (aiohttp.WSMsgType.CLOSE, 1009)
    assert out["second"] == "snapshot"
    assert ptt.turns_committed == 0 and not [m for m in hub.recent if m["type"] == "ptt"]
    jsonschema.validate(out["snapshot"], SCHEMA)
    assert out["cli"]["code"] == -15  # terminated by the test, not failed
    assert "snapshot" in out["cli"]["lines"][0] and "agent_state_changed" in out["cli"]["text"]
    assert "listening -> thinking" in out["cli"]["text"]


async def cli_events(out: dict[str, Any], port: int, hub: EventHub) -> None:
    """`appliance events` against the running server, while an event is published."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "appliance",
        "events",
        "--url",
        f"ws://127.0.0.1:{port}/api/events",
        "--token",
        TOKEN,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(3.0)  # the client starts and prints the snapshot
    hub.publish("agent_state_changed", "usb-1", None, old="listening", new="thinking")
    await asyncio.sleep(0.5)
    proc.terminate()
    stdout, _ = await proc.communicate()
    text = stdout.decode()
    out["cli"] = {"code": proc.returncode, "text": text, "lines": text.splitlines()}


def test_a_lan_address_needs_a_token() -> None:
    with pytest.raises(config_mod.ConfigError, match="exposes the page and the events"):
        config_mod.parse({"http": {"host": "0.0.0.0"}}, "<test>")
    with pytest.raises(config_mod.ConfigError, match="at least 16 characters"):
        config_mod.parse({"http": {"host": "0.0.0.0", "token": "short"}}, "<test>")
    ok = config_mod.parse({"http": {"host": "0.0.0.0", "token": TOKEN}}, "<test>")
    assert ok.http.secret() == TOKEN


def test_requests_for_another_host_or_from_another_origin_are_refused() -> None:
    hub = EventHub({"models": {}})
    port = free_tcp_port()
    base = f"http://127.0.0.1:{port}"
    me = socket.gethostname().split(".")[0]

    async def status(http: aiohttp.ClientSession, path: str, **headers: str) -> int:
        async with http.get(base + path, headers=headers) as r:
            return r.status

    async def ws_status(http: aiohttp.ClientSession, url: str, **headers: str) -> Any:
        try:
            ws = await http.ws_connect(url, headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        first = json.loads((await ws.receive()).data)["type"]
        await ws.close()
        return first

    async def main() -> dict[str, Any]:
        runner = await serve(make_app(hub, Metrics()), "127.0.0.1", port)
        wild = free_tcp_port()  # bound to every address: 127.0.0.2 is one of this machine's
        wild_runner = await serve(
            make_app(hub, Metrics(), allowed_hosts=host_names("0.0.0.0")), "0.0.0.0", wild
        )
        out: dict[str, Any] = {}
        events = base.replace("http", "ws") + "/api/events"
        try:
            async with aiohttp.ClientSession() as http:
                for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
                    out[f"host {host}"] = await status(http, "/api/state", Host=host)
                for host in (f"localhost:{port}", "localhost", f"[::1]:{port}", me, f"{me}.local"):
                    out[f"host {host}"] = await status(http, "/api/state", Host=host)
                out["metrics, no origin"] = await status(http, "/metrics")
                out["page"] = await status(http, "/")
                out["state, evil origin"] = await status(
                    http, "/api/state", Origin="http://evil.example"
                )
                out["ws, evil host"] = await ws_status(http, events, Host="evil.example")
                out["ws, evil origin"] = await ws_status(http, events, Origin="http://evil.example")
                out["ws, null origin"] = await ws_status(http, events, Origin="null")
                out["ws, other port"] = await ws_status(http, events, Origin="http://127.0.0.1:1")
                out["ws, same origin"] = await ws_status(http, events, Origin=base)
                out["ws, localhost"] = await ws_status(
                    http,
                    events,
                    Host=f"localhost:{port}",
                    Origin=f"http://localhost:{port}",
                )
                out["ws, no origin"] = await ws_status(http, events)
                for ip in ("127.0.0.2", "127.0.0.3"):  # reached on .2; .3 is not where it came
                    async with http.get(
                        f"http://127.0.0.2:{wild}/api/state", headers={"Host": f"{ip}:{wild}"}
                    ) as r:
                        out[f"wildcard, host {ip}"] = r.status
        finally:
            await runner.cleanup()
            await wild_runner.cleanup()
        return out

    out = asyncio.run(main())
    assert out == {
        "host evil.example": 421,
        f"host evil.example:{port}": 421,
        "host 127.0.0.1.evil.example": 421,
        f"host localhost:{port}": 200,
        "host localhost": 200,
        f"host [::1]:{port}": 200,
        f"host {me}": 200,
        f"host {me}.local": 200,
        "metrics, no origin": 200,
        "page": 200,
        "state, evil origin": 403,
        "ws, evil host": 421,
        "ws, evil origin": 403,
        "ws, null origin": 403,
        "ws, other port": 403,
        "ws, same origin": "snapshot",
        "ws, localhost": "snapshot",
        "ws, no origin": "snapshot",
        "wildcard, host 127.0.0.2": 200,
        "wildcard, host 127.0.0.3": 421,
    }, out


def test_a_stop_closes_an_open_events_stream_at_once() -> None:
    """The server's cleanup must not wait on an idle page (aiohttp's default: 60 s)."""
    hub = EventHub({"models": {}})
    port = free_tcp_port()

    async def main() -> dict[str, Any]:
        runner = await serve(make_app(hub, Metrics()), "127.0.0.1", port)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}/api/events")
            assert json.loads((await ws.receive()).data)["type"] == "snapshot"
            closing = asyncio.create_task(ws.receive())
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):  # a bound on the hang, not a benchmark
                await asyncio.wait_for(runner.cleanup(), 15)
            elapsed = time.monotonic() - t0
            done, _ = await asyncio.wait([closing], timeout=5)
            msg = closing.result() if done else None
            return {"elapsed": elapsed, "msg": msg and (msg.type, msg.data, msg.extra)}

    out = asyncio.run(main())
    assert out["elapsed"] < 5, out
    assert out["msg"] == (aiohttp.WSMsgType.CLOSE, 1001, "server shutting down"), out


def test_the_daemon_stops_at_once_with_a_page_open(models: Any, room: Room) -> None:
    """SIGTERM's path (`request_stop`) with an idle events stream open: no wait on it."""
    port = free_tcp_port()
    config = config_mod.parse(
        {
            "session": {"turn_detection": "vad"},
            "audio": {"enabled": True, "input_rate": 16000, "output_rate": 16000},
            "http": {"port": port},
        },
        "<web test>",
    )

    async def main() -> dict[str, Any]:
        service = Service(config, None, notifier=Notifier({}), models=models)
        daemon = asyncio.create_task(service.run())
        while service.status().startswith(("starting", "verifying")) or not service.sessions:
            assert not daemon.done(), daemon
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}/api/events")
            assert json.loads((await ws.receive()).data)["type"] == "snapshot"
            t0 = time.monotonic()
            service.request_stop("test done")
            done, _ = await asyncio.wait([daemon], timeout=20)
            elapsed = time.monotonic() - t0
            if not done:
                return {"elapsed": elapsed, "code": None}
            seen = []
            while not ws.closed:
                seen.append(await asyncio.wait_for(ws.receive(), 5))
            close = (seen[-1].type, seen[-1].data, seen[-1].extra)
            return {"elapsed": elapsed, "code": daemon.result(), "close": close}

    out = asyncio.run(main())
    # the idle kiosk session drains in well under a second; the bound is for the hang
    assert out["code"] == 0 and out["elapsed"] < 10, out
    assert out["close"] == (aiohttp.WSMsgType.CLOSE, 1001, "server shutting down"), out
