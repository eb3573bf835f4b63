"""Configuration: reference defaults, validation messages, the turn_handling mapping."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.session.builder import tool_choice, turn_handling

# The AgentSession reference's documented defaults.
REFERENCE_DEFAULTS = {
    "allow_interruptions": True,
    "min_interruption_duration": 0.5,
    "min_interruption_words": 0,
    "min_endpointing_delay": 0.5,
    "max_endpointing_delay": 3.0,
    "preemptive_generation": False,
}


# The defaults that differ from the reference, for latency (docs/latency.md).
LATENCY_DEFAULTS = {
    "min_endpointing_delay": 0.3,
    "preemptive_generation": True,
    "min_interruption_duration": 0.1,
}


def test_defaults_are_the_reference_defaults_but_three() -> None:
    session = config_mod.Config().session
    for key, value in {**REFERENCE_DEFAULTS, **LATENCY_DEFAULTS}.items():
        assert getattr(session, key) == value, key
    assert session.turn_detection == "model"
    assert session.userdata == {}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_full_file_loads(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[session]
turn_detection = "manual"
min_endpointing_delay = 0.3
userdata = { site = "lobby", floor = 2 }
[models]
turn_model = "smart-turn/v3.2"
[agent]
greeting = "Hello."
tools = ["current_time"]
tool_choice = "current_time"
""",
    )
    cfg = config_mod.load(path)
    assert cfg.session.turn_detection == "manual"
    assert cfg.session.userdata == {"site": "lobby", "floor": 2}
    assert cfg.models.turn_model == "smart-turn/v3.2"
    assert tool_choice(cfg.agent) == {"type": "function", "function": {"name": "current_time"}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[session]\nturn_detection = "magic"',
            ["[session] turn_detection = 'magic'", "'model'", "'manual'"],
        ),
        (
            "[session]\nmin_endpointing_delay = -1",
            ["[session] min_endpointing_delay = -1", "greater than or equal to 0"],
        ),
        (
            '[models]\nstt = "deepgram/nova-3"',
            ["[models] stt = 'deepgram/nova-3'", "'whisper/tiny.en'"],
        ),
        ("[session]\nallow_interuptions = false", ["[session] allow_interuptions: unknown key"]),
        (
            "[session]\nmax_endpointing_delay = 0.2",
            ["max_endpointing_delay = 0.2", "min_endpointing_delay"],
        ),
        (
            '[agent]\ntool_choice = "current_time"',
            ["tool_choice = 'current_time'", "[agent] tools"],
        ),
        ("[session\n", ["not valid TOML"]),
    ],
)
def test_bad_config_names_file_key_value_and_allowed(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_missing_file() -> None:
    with pytest.raises(config_mod.ConfigError, match="config file not found"):
        config_mod.load("/nonexistent/appliance.toml")


def test_config_check_command(tmp_path: Path) -> None:
    good = _write(tmp_path, '[session]\nturn_detection = "vad"\n')
    run = [sys.executable, "-m", "appliance", "config", "check"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[models]\nllm = "openai/gpt-4o"\n')
    out = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert out.returncode == 78  # EX_CONFIG
    assert "[models] llm = 'openai/gpt-4o'" in out.stderr
    assert str(bad) in out.stderr


def test_turn_handling_mapping() -> None:
    session = config_mod.parse(
        {
            "session": {
                "allow_interruptions": False,
                "min_interruption_duration": 0.8,
                "min_interruption_words": 2,
                "min_endpointing_delay": 0.4,
                "max_endpointing_delay": 2.0,
                "preemptive_generation": True,
                "turn_detection": "vad",
            }
        },
        "<test>",
    ).session
    handling = turn_handling(session, detector=None)
    assert handling["turn_detection"] == "vad"
    assert handling["endpointing"] == {"min_delay": 0.4, "max_delay": 2.0}
    assert handling["interruption"] == {
        "enabled": False,
        "mode": "vad",
        "min_duration": 0.8,
        "min_words": 2,
    }
    assert handling["preemptive_generation"] == {
        "enabled": True,
        "preemptive_tts": True,
        "max_retries": 6,
    }
    marker = object()
    model = config_mod.Config().session
    assert turn_handling(model, detector=marker)["turn_detection"] is marker
    # manual turns (a push-to-talk button) end when the application says: no minimum wait
    manual = turn_handling(session, detector=None, mode="manual")
    assert manual["turn_detection"] == "manual"
    assert manual["endpointing"] == {"min_delay": 0.0, "max_delay": 2.0}


def test_session_options_reach_agentsession_without_deprecation(models, caplog) -> None:  # type: ignore[no-untyped-def]
    """The built session carries the config's values, and no deprecation is logged."""
    import asyncio

    from appliance.session.builder import build_session

    cfg = config_mod.parse(
        {"session": {"min_endpointing_delay": 0.7, "min_interruption_words": 3}}, "<test>"
    )

    async def build() -> None:
        session = build_session(cfg, models)
        assert session.options.endpointing["min_delay"] == 0.7
        assert session.options.interruption["min_words"] == 3
        assert session.options.preemptive_generation["enabled"] is True
        await session.aclose()

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        asyncio.run(build())
    assert "deprecated" not in caplog.text.lower()
