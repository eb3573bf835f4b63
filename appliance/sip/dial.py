"""`appliance dial`: an outbound call with the agent on the line, from a process of its own."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TYPE_CHECKING, Any

from appliance.sip.bridge import serve_sip
from appliance.sip.message import SipError

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.session.modelset import ModelSet


async def dial_with_agent(config: Config, models: ModelSet, uri: str, timeout: float) -> int:
    """Call `uri` and serve the call until either side hangs up (Ctrl-C or SIGTERM hang up);
    the exit status. Raises ConfigError if the SIP bridge cannot start for its config."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    ready: asyncio.Future[Any] = loop.create_future()
    bridge = asyncio.create_task(serve_sip(lambda: config, models, stop, ready=ready))
    try:
        await asyncio.wait([bridge, ready], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            bridge.result()  # raises why the bridge could not start
        ua = ready.result()
        try:
            call = await ua.dial(uri, timeout=timeout)
        except (ConnectionRefusedError, TimeoutError, OSError, SipError) as exc:
            print(f"error: {uri}: {exc}", file=sys.stderr)
            return 1
        print(f"connected to {uri} (call {call.call_id})", file=sys.stderr)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(call.hangup("Ctrl-C")))
        await call.ended.wait()
        print(f"call ended: {call.end_reason}", file=sys.stderr)
        return 0
    finally:
        stop.set()
        await bridge
