"""Command line: ``meeting-gateway serve | simulate | bot-config | say | play | stop``.

This is the only module that reads flags and the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from . import __version__, keywords, logs, memory, tokens
from .config import SUPPORTED_RATES, Settings, language_code_ok
from .errors import ConfigError, GatewayError

SERVE_FLAGS = [f.name for f in dataclasses.fields(Settings)]


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(settings: Settings) -> None:
    from .server import Gateway

    gateway = Gateway(settings)
    await gateway.start()
    # The process is the gateway's alone: what start-up left alive stays for its life.
    memory.after_startup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("gateway").info("signal received; draining sessions")
    await gateway.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_sources(args)
    logs.setup(settings.log_level, settings.log_format)
    from .cluster.supervisor import supervise, worker_count

    if worker_count(settings) > 1:
        return supervise(settings, args.argv)
    _install_uvloop()
    asyncio.run(_serve(settings))
    return 0


#: Recognition workers live with the transcription pipeline; the gateway names them only
#: by import string, as it does pipelines (it never imports ``pipelines``).
WORKER = "pipelines.transcription.worker:main"
WORKER_FLAGS = [
    "redis_url",
    "node_id",
    "device",
    "model",
    "model_cache",
    "asr_threads",
    "partial_interval",
    "log_level",
    "log_format",
]


def cmd_worker(args: argparse.Namespace) -> int:
    import importlib

    settings = Settings.from_sources(args)
    if not settings.redis_url:
        raise ConfigError("worker: --redis-url (GATEWAY_REDIS_URL) is required")
    logs.setup(settings.log_level, settings.log_format)
    module, _, name = WORKER.partition(":")
    code: int = getattr(importlib.import_module(module), name)(settings)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator import SimulatedBot, read_wav

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    samples, rate = read_wav(Path(args.wav), args.rate)
    roster = json.loads(Path(args.roster).read_text()) if args.roster else []
    bot = SimulatedBot(
        url=args.url,
        samples=samples,
        rate=rate,
        frame_ms=args.frame_ms,
        speed=args.speed,
        roster=roster,
        reconnect_after=args.reconnect_after,
        bot_id=args.bot_id or str(uuid.uuid4()),
    )
    _install_uvloop()
    asyncio.run(bot.run())
    print(
        json.dumps(
            {
                "bot_id": bot.bot_id,
                "frames": bot.frames_sent,
                "bytes": bot.bytes_sent,
                "seconds": round(bot.bytes_sent / (2 * rate), 3),
                "connections": bot.connections,
            }
        )
    )
    return 0


def bot_config(
    public_url: str,
    rate: int,
    secret: str,
    ttl: float,
    dual: bool,
    key: str | None = None,
    session: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The streaming objects to paste into a Meeting BaaS bot request; ``session``
    holds the output URL's own parameters (``keywords``, ``language``)."""
    key = key or uuid.uuid4().hex
    base = public_url.rstrip("/")

    def url(path: str, role: tokens.Role) -> str:
        query: dict[str, str] = {"rate": str(rate)} if role in ("output", "input") else {}
        if role == "output":
            query |= session or {}
        if secret:
            query["token"] = tokens.mint(secret, role, key, ttl)
        return f"{base}{path}?{urlencode(query)}" if query else f"{base}{path}"

    output = url(f"/bots/{key}", "output")
    input_ = output if dual else url(f"/bots/{key}/input", "input")
    config: dict[str, Any] = {
        "key": key,
        "v2": {
            "streaming_enabled": True,
            "streaming_config": {
                "output_url": output,
                "input_url": input_,
                "audio_frequency": rate,
            },
        },
    }
    if rate in (16000, 24000):
        config["v1"] = {
            "streaming": {
                "output": output,
                "input": input_,
                "audio_frequency": f"{rate // 1000}khz",
            }
        }
    http = base.replace("wss://", "https://").replace("ws://", "http://")
    config["transcripts_url"] = url(f"/bots/{key}/transcripts", "read")
    config["control_url"] = url(f"/bots/{key}/control", "control")
    # The session's row in GET /sessions: with a secret, the read token lists it alone.
    read = urlsplit(config["transcripts_url"]).query
    config["sessions_url"] = f"{http}/sessions" + (f"?{read}" if read else "")
    return config


def cmd_bot_config(args: argparse.Namespace) -> int:
    settings = Settings.from_sources(args)
    public = settings.public_url or f"ws://localhost:{settings.port}"
    rate = int(args.rate)
    if rate not in SUPPORTED_RATES:
        raise GatewayError(f"--rate {rate}: must be one of {SUPPORTED_RATES}")
    language, terms = args.meeting_language, args.meeting_keywords
    if language and not language_code_ok(language):
        raise GatewayError(f"--language {language[:12]!r}: an ISO 639-1 code, or auto")
    session = {"language": language} if language else {}
    if terms:
        try:
            session["keywords"] = ",".join(keywords.parse(terms, "--keywords"))
        except ValueError as exc:
            raise GatewayError(str(exc)) from None
    config = bot_config(
        public, rate, settings.secret, settings.token_ttl, args.dual, args.key, session
    )
    print(json.dumps(config, indent=2))
    return 0


def _token(
    args: argparse.Namespace, settings: Settings, role: tokens.Role, key: str, ttl: float
) -> str | None:
    """The client commands' token: ``--token``, else one minted from the secret, if set."""
    if args.token:
        return str(args.token)
    return tokens.mint(settings.secret, role, key, ttl) if settings.secret else None


def _control(args: argparse.Namespace, request: dict[str, Any] | bytes) -> int:
    """Send one control request and print every event it brings back, one JSON a line."""
    from websockets.exceptions import InvalidHandshake, InvalidURI

    from .speech.control import command, control_url

    settings = Settings.from_sources(args)
    token = _token(args, settings, "control", args.key, 300)
    url = control_url(args.url, args.key, token)

    async def run() -> int:
        code = 0
        async for event in command(url, request, args.timeout):
            print(json.dumps(event), flush=True)
            if event.get("type") in ("error", "failed"):
                code = 1
        return code

    try:
        return asyncio.run(run())
    except TimeoutError:
        raise GatewayError(f"no final event within {args.timeout} s") from None
    except (OSError, InvalidURI, InvalidHandshake) as exc:
        raise GatewayError(f"cannot reach the control endpoint: {exc}") from None


def cmd_say(args: argparse.Namespace) -> int:
    return _control(args, {"type": "say", "text": args.text})


def cmd_play(args: argparse.Namespace) -> int:
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise GatewayError(f"cannot read {args.file}: {exc.strerror}") from None
    return _control(args, data)


def cmd_stop(args: argparse.Namespace) -> int:
    return _control(args, {"type": "stop"})


def cmd_watch(args: argparse.Namespace) -> int:
    from websockets.exceptions import InvalidHandshake, InvalidURI

    from .terminal import transcripts_url, watch

    settings = Settings.from_sources(args)
    token = _token(args, settings, "read", args.key or tokens.ANY_KEY, 3600)
    try:
        return asyncio.run(watch(transcripts_url(args.url, args.key, token), sessions=not args.key))
    except (OSError, InvalidURI, InvalidHandshake) as exc:
        raise GatewayError(f"cannot follow {args.url}: {exc}") from None


def cmd_sessions(args: argparse.Namespace) -> int:
    from .terminal import fetch_sessions, sessions_table

    settings = Settings.from_sources(args)
    token = _token(args, settings, "read", tokens.ANY_KEY, 300)
    try:
        rows = fetch_sessions(args.url, token)
    except (OSError, ValueError) as exc:
        raise GatewayError(f"cannot list sessions at {args.url}: {exc}") from None
    print(json.dumps(rows, indent=1) if args.json else sessions_table(rows))
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    from .terminal import download, fetch_files, files_table

    settings = Settings.from_sources(args)
    token = _token(args, settings, "read", args.key, 300)
    try:
        if args.name is None:
            print(files_table(fetch_files(args.url, args.key, token)))
            return 0
        target = args.out or args.name
        if target == "-":
            download(args.url, args.key, args.name, sys.stdout.buffer, token)
            return 0
        # Written beside the target and renamed once whole: a failure leaves no half file.
        part = Path(f"{target}.part")
        try:
            with part.open("wb") as out:
                size = download(args.url, args.key, args.name, out, token)
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        raise GatewayError(f"cannot fetch from {args.url}: {exc}") from None
    print(f"{target}: {size} bytes", file=sys.stderr)
    return 0


def _control_parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("--url", required=True, help="the gateway, ws://host:port (or a control URL)")
    p.add_argument("--key", required=True, help="the session key (from bot-config)")
    p.add_argument("--token", help="control token (default: minted from GATEWAY_SECRET if set)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after S seconds")
    Settings.add_arguments(p, ["secret"])
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meeting-gateway", description="Audio streaming gateway for Meeting BaaS bots."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    Settings.add_arguments(serve, SERVE_FLAGS)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run recognition for a cluster, taking jobs from Redis")
    Settings.add_arguments(worker, WORKER_FLAGS)
    worker.set_defaults(func=cmd_worker)

    sim = sub.add_parser("simulate", help="play a WAV file into a gateway like a bot")
    sim.add_argument("--url", required=True, help="the bot's output URL")
    sim.add_argument("--wav", required=True, help="16-bit WAV file to stream")
    sim.add_argument("--rate", type=int, default=24000, help="rate to stream at (resampled)")
    sim.add_argument("--frame-ms", type=int, default=10, help="audio per message, ms")
    sim.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    sim.add_argument("--roster", help="JSON roster script: [{at, roster: [...]}, ...]")
    sim.add_argument("--reconnect-after", type=float, help="drop and reconnect after S seconds")
    sim.add_argument("--bot-id", help="bot_id for the handshake (default: a new UUID)")
    sim.set_defaults(func=cmd_simulate)

    cfg = sub.add_parser("bot-config", help="print streaming settings for a bot request")
    Settings.add_arguments(cfg, ["public_url", "secret", "token_ttl", "port"])
    cfg.add_argument("--rate", default="24000", help="audio_frequency: 16000/24000/32000/48000")
    cfg.add_argument("--dual", action="store_true", help="one socket for output and input")
    cfg.add_argument("--key", help="session key (default: a new random key)")
    # The meeting's own, on its URL: not the settings of the same names.
    terms = "names and terms the meeting's transcript should expect, comma-separated"
    cfg.add_argument("--keywords", dest="meeting_keywords", help=terms)
    language = "the language spoken in the meeting, or auto"
    cfg.add_argument("--language", dest="meeting_language", help=language)
    cfg.set_defaults(func=cmd_bot_config)

    say = _control_parser(sub, "say", "make a session's bot say a text; prints its events")
    say.add_argument("text", help="what to say")
    say.set_defaults(func=cmd_say)
    play = _control_parser(sub, "play", "play a 16-bit PCM WAV file into a session's meeting")
    play.add_argument("file", help="WAV file (sent over the control socket)")
    play.set_defaults(func=cmd_play)
    stop = _control_parser(sub, "stop", "stop a session's bot speaking and clear its queue")
    stop.set_defaults(func=cmd_stop)

    watching = sub.add_parser("watch", help="follow a session's live transcript (or all)")
    watching.add_argument("key", nargs="?", help="the session key (default: every session)")
    watching.add_argument("--url", default="ws://localhost:8080", help="the gateway")
    watching.add_argument("--token", help="read token (default: minted from GATEWAY_SECRET)")
    Settings.add_arguments(watching, ["secret"])
    watching.set_defaults(func=cmd_watch)
    listing = sub.add_parser("sessions", help="list the gateway's sessions as a table")
    listing.add_argument("--url", default="http://localhost:8080", help="the gateway")
    listing.add_argument("--json", action="store_true", help="print the JSON instead")
    listing.add_argument("--token", help="read token (default: minted from GATEWAY_SECRET if set)")
    Settings.add_arguments(listing, ["secret"])
    listing.set_defaults(func=cmd_sessions)
    files = sub.add_parser("files", help="list a session's files, or download one")
    files.add_argument("key", help="the session key")
    files.add_argument("name", nargs="?", help="the file to download (default: list them)")
    files.add_argument("--url", default="http://localhost:8080", help="the gateway")
    files.add_argument("--out", help="where to write it (default: NAME here; - for stdout)")
    files.add_argument("--token", help="read token (default: minted from GATEWAY_SECRET if set)")
    Settings.add_arguments(files, ["secret"])
    files.set_defaults(func=cmd_files)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]  # after the command
    try:
        code: int = args.func(args)
    except GatewayError as exc:
        print(f"meeting-gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
