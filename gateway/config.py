"""One frozen settings object for the whole process.

Every setting is declared once, below, as a dataclass field with its help text. The
command line flag (``--data-dir``) and the environment variable (``GATEWAY_DATA_DIR``)
are derived from the field name, so the two never drift apart. Flags win over the
environment, the environment over defaults. :meth:`Settings.validate` is the one place
that checks values; its messages name the setting and the bad value.

Only :mod:`gateway.__main__` reads flags and the environment; everything else receives
a :class:`Settings` explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import keywords
from .errors import ConfigError

ENV_PREFIX = "GATEWAY_"

#: WebSocket keepalive on every connection: a ping every ``KEEPALIVE_INTERVAL`` seconds,
#: and a connection whose pong is ``KEEPALIVE_TIMEOUT`` seconds late is closed (1011).
#: Transcript subscribers have a stricter policy of their own that acts first
#: (``subscriber_max_lag``).
KEEPALIVE_INTERVAL = 20.0
KEEPALIVE_TIMEOUT = 20.0

#: Voice activity models (``--vad``): :mod:`gateway.audio.vad` has one frame classifier each.
VAD_MODELS = ("webrtc", "silero")

#: Rates a Meeting BaaS bot can stream at (API v2 allows all four; v1 only 16k and 24k).
SUPPORTED_RATES = (16000, 24000, 32000, 48000)


def language_code_ok(code: str) -> bool:
    """Whether ``code`` looks like a language Whisper may know (``auto``: detect it)."""
    return code == "auto" or (2 <= len(code) <= 3 and code.isascii() and code.isalpha())


def _setting(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True, slots=True)
class Settings:
    # --- server
    host: str = _setting("0.0.0.0", "interface to listen on")
    port: int = _setting(8080, "TCP port for WebSockets, health, metrics and sessions")
    data_dir: Path = _setting(Path("data"), "where recordings, transcripts and metadata go")
    public_url: str = _setting("", "URL bots reach this gateway at (bot-config default)")
    log_level: str = _setting(
        "INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    log_format: str = _setting("text", "log line format", choices=("text", "json"))
    # --- cluster
    redis_url: str = _setting(
        "", "join a cluster on this Redis (redis://host:6379/0); empty: one process, no Redis"
    )
    node_id: str = _setting("", "this node's name in the cluster (default: host name and pid)")
    workers: int = _setting(
        0, "processes serving the port (SO_REUSEPORT); 0: one, or one per core with a Redis URL"
    )
    lease: float = _setting(
        10.0, "seconds a node owns a session without renewing it (renewed every lease/5)"
    )
    # --- security and limits
    secret: str = _setting("", "HMAC secret; when set, every bot and client URL needs a token")
    token_ttl: float = _setting(86400.0, "lifetime of tokens minted by bot-config, seconds")
    max_connections: int = _setting(2000, "connections accepted at once, all clients")
    max_connections_per_ip: int = _setting(500, "connections accepted at once from one address")
    max_message_bytes: int = _setting(1 << 20, "largest message accepted; larger closes with 1009")
    compression: bool = _setting(
        False, "accept permessage-deflate (PCM barely compresses; it costs CPU per frame)"
    )
    # --- sessions and audio
    default_rate: int = _setting(24000, "sample rate when neither handshake nor URL gives one")
    linger: float = _setting(
        180.0, "seconds a session waits for its bot to reconnect (covers a 2-minute outage)"
    )
    resume: bool = _setting(
        True, "keep live sessions across a restart: a stop suspends them, the next start resumes"
    )
    ring_seconds: float = _setting(30.0, "audio kept in memory per session, seconds")
    pipelines: str = _setting(
        "recording,transcription", "comma-separated pipelines run for every session"
    )
    pipeline_queue: int = _setting(
        256, "roster messages queued per pipeline before drops are counted"
    )
    max_speakers: int = _setting(1000, "speakers remembered per session; the longest silent go")
    bot_name: str = _setting("", "the bot's display name in rosters, to recognise its own voice")
    vad: str = _setting(
        "webrtc",
        "voice activity model: webrtc, or silero (hears pauses through typing and voices in"
        " the background; about 4 ms of CPU per stream-second)",
        choices=VAD_MODELS,
    )
    vad_aggressiveness: int = _setting(2, "webrtcvad aggressiveness, 0 (least) to 3 (most)")
    vad_frame_ms: int = _setting(30, "webrtcvad frame length: 10, 20 or 30 ms")
    vad_min_speech_ms: int = _setting(90, "voiced audio needed to start speech, ms")
    vad_hangover_ms: int = _setting(300, "unvoiced audio needed to end speech, ms")
    vad_pause_ms: int = _setting(
        240, "unvoiced audio reported as a pause, before the end is certain, ms; 0: never"
    )
    wav_refresh: float = _setting(2.0, "seconds between WAV header refreshes while recording")
    disk_backlog_seconds: float = _setting(
        60.0, "recorded audio held in memory per session while the disk refuses it, seconds"
    )
    # --- transcription
    model: str = _setting("tiny.en", "Whisper model: tiny.en, base, or a CTranslate2 directory")
    language: str = _setting(
        "en",
        "language spoken: an ISO 639-1 code, or auto to detect it (other than en needs a"
        " multilingual model such as base); a bot URL's ?language= overrides it",
    )
    model_cache: Path = _setting(
        Path.home() / ".cache" / "meeting-gateway", "where assembled models are kept"
    )
    asr_threads: int = _setting(
        0, "recognition lanes (one model copy, one thread); 0: one per core"
    )
    recognition: str = _setting(
        "local",
        "where recognition runs: local lanes, or pool (the cluster's workers on Redis,"
        " local lanes when none is alive)",
        choices=("local", "pool"),
    )
    device: str = _setting(
        "cpu", "where the model runs: cpu, or cuda (a GPU worker)", choices=("cpu", "cuda")
    )
    keywords: str = _setting(
        "",
        "terms every meeting's transcript should expect, comma-separated (names, products);"
        " a bot URL's ?keywords= adds its own",
    )
    roster_keywords: bool = _setting(
        False, "expect the names of the people on each meeting's roster (the first 16)"
    )
    partial_interval: float = _setting(0.5, "seconds between partial results while speaking")
    max_utterance: float = _setting(15.0, "longest utterance before a final is forced, seconds")
    bot_speech: str = _setting(
        "label", "what transcription does with the bot's own voice", choices=("label", "drop")
    )
    webhook_url: str = _setting("", "POST finals and the final transcript here")
    webhook_secret: str = _setting("", "HMAC key signing webhook bodies (default: the secret)")
    allow_session_webhooks: bool = _setting(
        False, "honour a bot URL's ?webhook=URL (the gateway will POST to any address given)"
    )
    webhook_queue: int = _setting(1000, "webhook bodies pending per process before spilling")
    webhook_attempts: int = _setting(6, "POST attempts per webhook body, with backoff between")
    subscriber_queue: int = _setting(256, "messages queued per transcript subscriber")
    subscriber_max_lag: float = _setting(
        10.0, "seconds a transcript subscriber may fall behind before it is closed (at most 12)"
    )
    # --- speech
    playback_lead_ms: int = _setting(100, "how far playback runs ahead of real time, ms")
    playback_frame_ms: int = _setting(20, "audio per message sent to the bot, ms")
    barge_in: str = _setting(
        "stop", "what human speech does to the bot's speech", choices=("stop", "duck", "ignore")
    )
    on_input_drop: str = _setting(
        "resume",
        "an utterance cut by a dropped input socket",
        choices=("resume", "drop"),
    )

    def validate(self) -> Settings:
        """Return ``self`` if every value is usable, else raise :class:`ConfigError`."""

        def bad(name: str, why: str) -> ConfigError:
            value = getattr(self, name)
            return ConfigError(f"{name}={value!r}: {why} (flag --{_flag(name)}, env {_env(name)})")

        if not 0 <= self.port <= 65535:
            raise bad("port", "must be between 0 and 65535")
        if self.default_rate not in SUPPORTED_RATES:
            raise bad("default_rate", f"must be one of {SUPPORTED_RATES}")
        for name in ("linger", "ring_seconds", "token_ttl", "wav_refresh", "partial_interval"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be positive")
        if not self.disk_backlog_seconds >= 0:
            raise bad("disk_backlog_seconds", "must be 0 or more")
        if self.ring_seconds < 1:
            raise bad("ring_seconds", "must be at least 1 second")
        if self.max_utterance < 2:
            raise bad("max_utterance", "must be at least 2 seconds")
        if not language_code_ok(self.language):
            raise bad("language", "must be an ISO 639-1 code such as en, es, de, or auto")
        if self.language != "en" and self.model.endswith(".en"):
            raise bad("language", f"{self.model} knows only English: use --model base")
        try:
            keywords.parse(self.keywords, "keywords")
        except ValueError as exc:
            raise bad("keywords", str(exc).partition(": ")[2]) from None
        for name in (
            "max_connections",
            "max_connections_per_ip",
            "max_message_bytes",
            "pipeline_queue",
            "max_speakers",
            "webhook_queue",
            "webhook_attempts",
            "subscriber_queue",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if not 0 < self.subscriber_max_lag <= 12:
            # Pinged every max_lag / 2 s, a reader that stops is closed within 1.5 * max_lag
            # s: that must beat websockets' keepalive, which fails it after 20 s.
            raise bad("subscriber_max_lag", "must be more than 0 and at most 12 seconds")
        if self.asr_threads < 0:
            raise bad("asr_threads", "must be 0 (automatic) or more")
        if self.vad_aggressiveness not in (0, 1, 2, 3):
            raise bad("vad_aggressiveness", "must be 0, 1, 2 or 3")
        if self.vad_frame_ms not in (10, 20, 30):
            raise bad("vad_frame_ms", "webrtcvad takes only 10, 20 or 30 ms frames")
        if self.vad_min_speech_ms < self.vad_frame_ms or self.vad_hangover_ms < self.vad_frame_ms:
            raise bad("vad_min_speech_ms", "speech and hangover must be at least one VAD frame")
        if self.vad_pause_ms < 0:
            raise bad("vad_pause_ms", "must be 0 (no pauses) or more")
        if not 20 <= self.playback_lead_ms <= 1000:
            raise bad("playback_lead_ms", "must be between 20 and 1000")
        if self.playback_frame_ms not in (10, 20, 40):
            raise bad("playback_frame_ms", "must be 10, 20 or 40")
        if self.workers < 0:
            raise bad("workers", "must be 0 (automatic) or more")
        if self.workers > 1 and not self.redis_url:
            raise bad("workers", "more than one process needs a cluster: set --redis-url")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise bad("redis_url", "must be a redis://, rediss:// or unix:// URL")
        if self.recognition == "pool" and not self.redis_url:
            raise bad("recognition", "the pool is the cluster's: set --redis-url")
        if not 2 <= self.lease <= 300:
            raise bad("lease", "must be between 2 and 300 seconds")
        for name in ("public_url", "webhook_url"):
            url = getattr(self, name)
            if url and "://" not in url:
                raise bad(name, "must be an absolute URL")
        for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)):
            choices = _choices(name)
            if choices is not None and value not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        if not self.pipeline_names:
            raise bad("pipelines", "name at least one pipeline")
        return self

    @property
    def pipeline_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.pipelines.split(",") if n.strip())

    @property
    def open(self) -> bool:
        """Whether the gateway runs without authentication."""
        return not self.secret

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from defaults, then ``environ``, then parsed flags."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw: Any = None
            if args is not None and getattr(args, f.name, None) is not None:
                raw = getattr(args, f.name)
            elif _env(f.name) in environ:
                raw = environ[_env(f.name)]
            if raw is not None:
                values[f.name] = _convert(f.name, f.default, raw)
        return cls(**values).validate()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
        """Add ``--flag`` options for the settings in ``names`` (defaults stay None)."""
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        for name in names:
            f = by_name[name]
            parser.add_argument(
                f"--{_flag(name)}",
                dest=name,
                default=None,
                choices=f.metadata["choices"],
                help=f"{f.metadata['help']} (env {_env(name)}, default {f.default!s})",
            )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _choices(name: str) -> Sequence[str] | None:
    for f in dataclasses.fields(Settings):
        if f.name == name:
            choices: Sequence[str] | None = f.metadata["choices"]
            return choices
    return None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, default: Any, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, bool):
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw).expanduser()
    except ValueError:
        kind = type(default).__name__
        raise ConfigError(
            f"{name}={raw!r}: not a valid {kind} (flag --{_flag(name)}, env {_env(name)})"
        ) from None
    return raw
