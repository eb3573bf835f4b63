"""The SIP fuzzing suite on a small fixed budget (`make fuzz` runs 100,000 cases)."""

from __future__ import annotations

import asyncio

from . import fuzz


def test_mutated_sip_rtp_sdp_and_digest_input_raises_nothing_unexpected() -> None:
    escapes = asyncio.run(fuzz.run(6000, seed=20261204))
    assert sum(escapes.cases.values()) == 6000
    examples = {key: escapes.examples[key][1][-600:] for key in escapes.found}
    assert escapes.total == 0, examples
