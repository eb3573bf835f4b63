"""Answer time of OPTIONS under a steady load, start against end (the transaction table
must not make requests slower as history grows).

    .venv/bin/python scripts/sip-options-load.py [--rate 900] [--seconds 20]

Runs a user agent on loopback in this process and a sender in a child process; prints the
median and p95 answer time in the first and the last 2 s, and how many went unanswered.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys

from appliance import config as config_mod
from appliance.sip.ua import UserAgent

SENDER = r"""
import socket, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
s.settimeout(0)
sent = {}; got = {}; start = time.monotonic(); n = 0
while (now := time.monotonic()) - start < seconds + 1:
    if n < rate * seconds and n <= (now - start) * rate:
        msg = (f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{s.getsockname()[1]};branch=z9hG4bK{n}\r\n"
               f"From: <sip:load@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\n"
               f"Call-ID: load-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
        sent[n] = time.monotonic(); s.sendto(msg, ("127.0.0.1", port)); n += 1
    try:
        while True:
            data = s.recv(65536)
            k = int(data.split(b"Call-ID: load-", 1)[1].split(b"\r\n", 1)[0])
            got.setdefault(k, time.monotonic())
    except (BlockingIOError, IndexError, ValueError):
        time.sleep(0.0002)
for k, t in sent.items():
    print(k, t - start, (got[k] - t) if k in got else -1)
"""


async def main(rate: float, seconds: float) -> None:
    cfg = config_mod.parse({"sip": {"enabled": True, "listen": "127.0.0.1", "port": 0}}, "<load>")
    ua = UserAgent(cfg.sip, lambda call: None)
    await ua.start()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SENDER, str(ua.transport.local[1]), str(rate), str(seconds),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await child.communicate()
    await ua.stop()
    rows = [line.split() for line in out.decode().splitlines()]
    times = [(float(at), float(wait)) for _, at, wait in rows]
    lost = sum(wait < 0 for _, wait in times)
    for name, low, high in (("first 2 s", 0, 2), ("last 2 s", seconds - 2, seconds)):
        waits = sorted(w * 1000 for at, w in times if low <= at < high and w >= 0)
        p95 = waits[int(0.95 * (len(waits) - 1))]
        print(f"{name}: n={len(waits)} median {statistics.median(waits):.2f} ms, p95 {p95:.2f} ms")
    print(f"{len(times)} sent at {rate:.0f}/s for {seconds:.0f} s; {lost} unanswered")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=900.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds))
