"""`appliance room token`: a join token for a person who joins a conversation's room from a
browser or a LiveKit app (a supervisor listening in, a colleague taking over)."""

from __future__ import annotations

import argparse
import sys

from appliance import config as config_mod
from appliance.room.people import mint_token


def room_token(args: argparse.Namespace) -> int:
    config = config_mod.load_or_exit(args.config)
    lk = config.livekit
    if not (lk.url and lk.api_key):
        print("error: [livekit] url and api_key are not set", file=sys.stderr)
        return config_mod.EX_CONFIG
    try:
        secret = lk.secret()
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return config_mod.EX_CONFIG
    cfg = lk.model_copy(update={"token_ttl": args.ttl}) if args.ttl else lk
    token = mint_token(
        cfg,
        secret,
        room=args.room,
        identity=args.identity,
        name=args.name or args.identity,
        kind="standard",
        can_publish=not args.listen_only,
    )
    print(token)
    return 0
