"""The appliance's TOML configuration: schema, defaults and validation.

One file, sections `[session]`, `[models]`, `[agent]`, `[audio]`, `[ptt]`, `[sip]`,
`[livekit]`, `[service]` and `[http]`. `[session]` carries the options of
the AgentSession reference with the reference's names and defaults; `session.turn_handling()`
maps them onto livekit-agents 1.8.9's grouped options. Errors name the file, the key, the bad
value and what is allowed.
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.store import manifest as manifest_mod
from appliance.store.manifest import tomllib

DEFAULT_PROFILE = "x86-dev"
# [models] keys a profile may not set through its `settings` (it names models directly).
_PROFILE_FIXED = ("dir", "manifest", "profile", "stt", "llm", "tts", "vad", "turn_model")
BUILTIN_TOOLS = ("current_time", "end_conversation")

DEFAULT_INSTRUCTIONS = (
    "You are a helpful voice assistant running on a small offline device. "
    "Answer in one or two short spoken sentences. "
    "Answer questions directly; for a calculation, say the number. "
    "Reply naturally to thanks, short answers, names and requests. "
    "Never say you are an AI or that you cannot help. "
    "Do not use lists, markdown or emoji."
)


class ConfigError(Exception):
    """A configuration problem, phrased for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SessionConfig(_Section):
    """The AgentSession reference's options, with the reference's defaults except
    `min_interruption_duration`, `min_endpointing_delay` and `preemptive_generation`
    (tuned for latency)."""

    allow_interruptions: bool = True
    # the three latency defaults that differ from the reference (0.5 s, 0.5 s and false):
    # see docs/latency.md. 0.1 s of speech pauses the reply; words in it end it, else it resumes
    min_interruption_duration: float = Field(0.1, ge=0.0, le=10.0)
    min_interruption_words: int = Field(0, ge=0, le=50)
    min_endpointing_delay: float = Field(0.3, ge=0.0, le=10.0)
    max_endpointing_delay: float = Field(3.0, ge=0.0, le=30.0)
    preemptive_generation: bool = True
    turn_detection: Literal["model", "vad", "stt", "manual"] = "model"
    # the words as well as the audio decide the end of a turn (smart-turn only): the LLM's
    # probability that the user's turn ends after what was said overrules the audio model
    # where it is clear either way (plugins/turn_text.py; measured in docs/quality.md)
    text_turn_detection: bool = True
    text_unfinished_below: float = Field(0.001, ge=0.0, le=1.0)
    text_finished_above: float = Field(0.5, ge=0.0, le=1.0)
    # the audio model and the words disagree, or the words are unsure: the turn ends this
    # long after the pause is detected, unless both then say the user is not done
    uncertain_endpointing_delay: float = Field(1.0, ge=0.0, le=30.0)
    userdata: dict[str, Any] = Field(default_factory=dict)
    user_away_timeout: float | None = Field(15.0, ge=0.0)


class ModelsConfig(_Section):
    """Which local models to use: a board profile, and "provider/model" ids that override it.

    After validation `stt`, `llm`, `tts`, `vad`, `turn_model` and `threads` hold the
    resolved values (the profile's unless set in the file).
    """

    dir: str = ""
    manifest: str = ""
    profile: str = DEFAULT_PROFILE
    stt: str = ""
    llm: str = ""
    tts: str = ""
    vad: str = ""
    turn_model: str = ""
    threads: int = Field(2, ge=1, le=64)
    llm_context: int = Field(2048, ge=256, le=131072)
    llm_max_tokens: int = Field(96, ge=1, le=4096)
    llm_gpu_layers: int = Field(0, ge=-1, le=1000)
    llm_temperature: float = Field(0.3, ge=0.0, le=2.0)
    stt_interim_interval: float = Field(0.0, ge=0.0, le=10.0)
    stt_interim_manual: float = Field(0.5, ge=0.0, le=10.0)  # manual turns (push-to-talk)
    stt_window: Literal["fit", "full"] = "fit"
    stt_beam_size: int = Field(1, ge=1, le=10)  # 1: greedy decoding
    llm_threads: int = Field(0, ge=0, le=64)
    llm_first_threads: int = Field(0, ge=0, le=64)  # a reply's first words; 0: as llm_threads
    llm_requantize: Literal["", "q4_0", "q8_0"] = ""
    stt_preflight: float = Field(0.02, ge=0.0, le=2.0)  # the first quiet VAD window (32 ms)
    tts_chunks: Literal["clause", "sentence"] = "clause"
    tts_first_threads: int = Field(0, ge=0, le=64)  # a reply's first chunk; 0: as `threads`
    verify: bool = True

    @model_validator(mode="after")
    def _resolve_profile(self) -> ModelsConfig:
        try:
            manifest = manifest_mod.load(self.manifest)
        except manifest_mod.ManifestError as exc:
            raise ValueError(f"manifest = {self.manifest!r}: {exc}") from None
        if self.profile not in manifest.profiles:
            known = ", ".join(repr(p) for p in sorted(manifest.profiles))
            raise ValueError(f"profile = {self.profile!r}: unknown profile; one of {known}")
        profile = manifest.profiles[self.profile]
        for key, kind in (
            ("stt", "stt"),
            ("llm", "llm"),
            ("tts", "tts"),
            ("vad", "vad"),
            ("turn_model", "turn"),
        ):
            value = getattr(self, key) or getattr(profile, key)
            try:
                manifest.check_model(value, kind)
            except ValueError as exc:
                raise ValueError(f"{key} = {value!r}: {exc}") from None
            setattr(self, key, value)
        bad = [k for k in profile.settings if k not in ModelsConfig.model_fields]
        if bad or set(profile.settings) & set(_PROFILE_FIXED):
            raise ValueError(f"profile = {self.profile!r}: cannot set {sorted(profile.settings)}")
        defaults = {k: v for k, v in profile.settings.items() if k not in self.model_fields_set}
        if defaults:
            given = self.model_dump(include=self.model_fields_set)
            try:
                checked = ModelsConfig.model_validate({**given, **defaults})
            except ValidationError as exc:
                raise ValueError(f"profile = {self.profile!r}: bad settings: {exc}") from None
            for key in defaults:
                setattr(self, key, getattr(checked, key))
        return self


class AudioConfig(_Section):
    """The USB audio bridge (kiosk): devices, echo cancellation, playback."""

    enabled: bool = False
    input: str = Field("voice_in", min_length=1)
    output: str = Field("voice_out", min_length=1)
    input_rate: int = Field(0, ge=0, le=192000)
    output_rate: int = Field(0, ge=0, le=192000)
    echo_cancellation: bool = True
    noise_suppression: bool = True
    high_pass_filter: bool = True
    auto_gain_control: bool = True
    echo_delay_ms: int = Field(40, ge=0, le=500)
    aec_warmup: float = Field(2.0, ge=0.0, le=10.0)  # 1 s let a fresh canceller's echo in
    playback_padding_ms: int = Field(100, ge=0, le=2000)
    realtime_priority: int = Field(10, ge=0, le=99)


class PttConfig(_Section):
    """A push-to-talk button (and status LED) driving the session's manual turn mode."""

    backend: Literal["none", "gpiozero", "gpiod", "evdev"] = "none"
    pin: int = Field(17, ge=0, le=63)
    chip: str = Field("gpiochip0", min_length=1)
    line: int = Field(17, ge=0, le=1023)
    device: str = Field("appliance-ptt", min_length=1)
    key: str = Field("KEY_F13", min_length=1)
    active_low: bool = True
    pull: Literal["up", "down", "none"] = "up"
    debounce_ms: int = Field(20, ge=0, le=1000)
    min_press_ms: int = Field(250, ge=0, le=5000)
    max_hold_s: float = Field(30.0, ge=1.0, le=600.0)
    cancel_window_ms: int = Field(400, ge=0, le=2000)
    led_backend: Literal["none", "gpiozero", "gpiod", "sysfs"] = "none"
    led_pin: int = Field(27, ge=0, le=63)
    led_chip: str = Field("gpiochip0", min_length=1)
    led_line: int = Field(27, ge=0, le=1023)
    led_name: str = Field("appliance", min_length=1)

    @property
    def enabled(self) -> bool:
        return self.backend != "none"


class SipConfig(_Section):
    """The SIP phone bridge: listen, register, who may call, transfers."""

    enabled: bool = False
    listen: str = Field("0.0.0.0", min_length=1)
    port: int = Field(5060, ge=0, le=65535)  # 0: any free port (appliance dial)
    public_address: str = ""
    rtp_ports: tuple[int, int] = (10000, 20000)
    allow: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1"])
    users_file: str = ""
    max_calls: int = Field(2, ge=1, le=64)
    ring_time: float = Field(0.0, ge=0.0, le=30.0)
    media_timeout: float = Field(30.0, ge=2.0, le=3600.0)
    dtmf_timeout: float = Field(1.5, ge=0.2, le=10.0)
    register_uri: str = ""
    register_user: str = ""
    register_password_file: str = ""
    register_expires: int = Field(300, ge=30, le=86400)
    outbound_proxy: str = ""
    user_agent: str = Field("appliance", min_length=1)
    transfer_targets: dict[str, str] = Field(default_factory=dict)
    headers: list[str] = Field(default_factory=lambda: ["X-Customer-Id", "Diversion"])

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(
                    f"{net!r} is not an address or network (e.g. 10.0.0.0/8)"
                ) from None
        return value

    @field_validator("rtp_ports")
    @classmethod
    def _ports(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not 1024 <= low < high <= 65535 or high - low < 2:
            raise ValueError("must be [low, high] with 1024 <= low < high <= 65535")
        return value

    @field_validator("register_uri", "outbound_proxy")
    @classmethod
    def _sip_uri(cls, value: str) -> str:
        if value and not value.startswith(("sip:", "sips:")):
            raise ValueError("must be a SIP URI such as sip:1001@pbx.lan")
        return value

    @field_validator("transfer_targets")
    @classmethod
    def _targets(cls, value: dict[str, str]) -> dict[str, str]:
        for name, uri in value.items():
            if not uri.startswith(("sip:", "sips:", "tel:")):
                raise ValueError(f"{name} = {uri!r}: must be a sip: or tel: URI")
        return value


ROOM_FIELDS = ("source", "session", "call_id", "number", "host")
CREDENTIAL_SECRET = "livekit-api-secret"  # a systemd credential (LoadCredential=) of this name


class LivekitConfig(_Section):
    """LiveKit: each local conversation also lives in a room on this server (`bridge`), or
    the appliance answers the server's jobs as an agent worker (`worker`)."""

    enabled: bool = False
    mode: Literal["bridge", "worker"] = "bridge"
    agent_name: str = Field("appliance", min_length=1, max_length=64)
    max_sessions: int = Field(2, ge=1, le=16)
    url: str = ""
    api_key: str = ""
    api_secret_file: str = ""
    room: str = Field("{host}-{session}", min_length=1)
    sources: list[Literal["sip", "usb"]] = Field(default_factory=lambda: ["sip", "usb"])  # type: ignore[arg-type]
    join_wait: float = Field(2.0, ge=0.0, le=30.0)
    connect_timeout: float = Field(5.0, ge=0.5, le=60.0)
    retry_max: float = Field(30.0, ge=1.0, le=3600.0)
    token_ttl: int = Field(3600, ge=60, le=86400)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValueError("must be a ws://, wss://, http:// or https:// URL")
        return value

    @field_validator("room")
    @classmethod
    def _template(cls, value: str) -> str:

        for _, name, _, _ in string.Formatter().parse(value):
            if name is not None and name not in ROOM_FIELDS:
                raise ValueError(
                    f"unknown field {{{name}}}: use {', '.join('{' + f + '}' for f in ROOM_FIELDS)}"
                )
        return value

    @model_validator(mode="after")
    def _complete(self) -> LivekitConfig:
        if self.enabled and not (self.url and self.api_key):
            raise ValueError("enabled = true needs url and api_key")
        return self

    def secret(self) -> str:
        """The API secret: `api_secret_file`, else the systemd credential
        `livekit-api-secret`; raises ConfigError when neither can be read."""

        path = self.api_secret_file
        if not path and os.environ.get("CREDENTIALS_DIRECTORY"):
            path = str(Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_SECRET)
        if not path:
            raise ConfigError(
                "[livekit] api_secret_file is not set and there is no systemd credential "
                f"{CREDENTIAL_SECRET!r}"
            )
        try:
            secret = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"[livekit] api_secret_file = {path!r}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"[livekit] api_secret_file = {path!r}: the file is empty")
        return secret


class ServiceConfig(_Section):
    """How `appliance run` behaves as a service."""

    drain_timeout: float = Field(20.0, ge=0.0, le=600.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


LOOPBACK = ("127.0.0.1", "::1", "localhost")


class HttpConfig(_Section):
    """The daemon's web server: the kiosk page, the events stream, Prometheus metrics."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8080, ge=1, le=65535)
    token: str = ""
    token_file: str = ""

    def secret(self) -> str:
        """The access token ("" = none); raises ConfigError if the token file is unusable."""
        if not self.token_file:
            return self.token
        try:
            token = Path(self.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"[http] token_file = {self.token_file!r}: {exc.strerror}") from None
        if len(token) < 16:
            raise ConfigError(f"[http] token_file = {self.token_file!r}: under 16 characters")
        return token

    @model_validator(mode="after")
    def _lan_needs_a_token(self) -> HttpConfig:
        if self.token and len(self.token) < 16:
            raise ValueError("token: use at least 16 characters (e.g. `openssl rand -hex 16`)")
        if self.enabled and self.host not in LOOPBACK and not (self.token or self.token_file):
            raise ValueError(
                f"host = {self.host!r} exposes the page and the events to the network: "
                "set token or token_file too"
            )
        return self


class AgentConfig(_Section):
    """The agent: what it is told, what it says first, which tools it may call."""

    instructions: str = Field(DEFAULT_INSTRUCTIONS, min_length=1)
    greeting: str = ""
    tools: list[Literal["current_time", "end_conversation"]] = Field(default_factory=list)
    tool_choice: str = "auto"

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: str) -> str:
        allowed = ("auto", "required", "none", *BUILTIN_TOOLS)
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}")
        return value


class Config(_Section):
    """The whole configuration file."""

    session: SessionConfig = Field(default_factory=lambda: SessionConfig())
    models: ModelsConfig = Field(default_factory=lambda: ModelsConfig())
    agent: AgentConfig = Field(default_factory=lambda: AgentConfig())
    audio: AudioConfig = Field(default_factory=lambda: AudioConfig())
    ptt: PttConfig = Field(default_factory=lambda: PttConfig())
    sip: SipConfig = Field(default_factory=lambda: SipConfig())
    livekit: LivekitConfig = Field(default_factory=lambda: LivekitConfig())
    service: ServiceConfig = Field(default_factory=lambda: ServiceConfig())
    http: HttpConfig = Field(default_factory=lambda: HttpConfig())
    source: str = Field(default="<defaults>", exclude=True)

    @property
    def turn_detection(self) -> Literal["model", "vad", "stt", "manual"]:
        """The turn detection in effect: a push-to-talk button makes it "manual"."""
        return "manual" if self.ptt.enabled else self.session.turn_detection

    def models_in_use(self) -> list[str]:
        """Manifest ids of the models this configuration loads."""
        m = self.models
        in_use = [m.stt, m.llm, m.tts, m.vad]
        if self.turn_detection == "model":
            in_use.append(m.turn_model)
        return in_use


def _describe(error: dict[str, Any]) -> str:
    key = error["loc"]
    section = f"[{key[0]}]" if key else "(top level)"
    name = ".".join(str(part) for part in key[1:])
    where = f"{section} {name}".strip()
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and len(key) == 1:
        return f"{where} {message}"  # a cross-key check: the message names the key
    value = error.get("input")
    return f"{where} = {value!r}: {message}"


def parse(data: dict[str, Any], source: str) -> Config:
    """Validate parsed TOML; raise ConfigError naming every bad key."""
    data = dict(data)
    data.pop("source", None)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  {_describe(dict(e))}" for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n{problems}") from None
    if config.session.max_endpointing_delay < config.session.min_endpointing_delay:
        raise ConfigError(
            f"{source}: invalid configuration:\n  [session] max_endpointing_delay = "
            f"{config.session.max_endpointing_delay!r}: must be >= min_endpointing_delay "
            f"({config.session.min_endpointing_delay!r})"
        )
    if config.ptt.enabled and not config.audio.enabled:
        raise ConfigError(
            f"{source}: invalid configuration:\n  [ptt] backend = {config.ptt.backend!r}: "
            "a push-to-talk button needs the USB microphone: set [audio] enabled = true"
        )
    tool = config.agent.tool_choice
    if tool in BUILTIN_TOOLS and tool not in config.agent.tools:
        raise ConfigError(
            f"{source}: invalid configuration:\n  [agent] tool_choice = {tool!r}: "
            f"the tool must also be listed in [agent] tools"
        )
    config.source = source
    return config


def load(path: str | Path | None) -> Config:
    """Load and validate a config file; None gives the embedded defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, str(path))


EX_CONFIG = 78  # sysexits.h: the configuration is unusable


def load_or_exit(path: str | None) -> Config:
    """`load`, or print the error and exit with EX_CONFIG: for command lines."""
    try:
        return load(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
