"""``/v1/listen``: Deepgram's live transcription API, served by the gateway.

Deepgram SDKs (and anything built on them: pipecat's Deepgram service, the vendor's
examples) open ``wss://<host>/v1/listen?model=...&encoding=linear16&sample_rate=16000``
with ``Authorization: Token <key>``, stream binary audio, send ``KeepAlive``,
``Finalize`` and ``CloseStream`` as JSON text frames, and read ``Results``,
``SpeechStarted``, ``UtteranceEnd`` and, after ``CloseStream``, ``Metadata`` followed by
a 1000 close. Pointed at the gateway, they get exactly that:

- **Audio mode** (the default): the socket is a session of its own, ``listen-<id>``,
  run by the deployment's pipelines like a bot's; its transcript comes back on the
  same socket. ``Finalize`` finalizes what was heard at once (the next final carries
  ``from_finalize: true``); ``CloseStream`` (or a dropped socket) ends the session.
- **Follow mode** (``?session=KEY``): no audio is sent; the socket reads a bot's
  meeting live, with the finals so far first, so a Deepgram SDK user follows a
  meeting with no other code.

Query parameters the SDKs send are accepted; ``interim_results`` (default false, as
Deepgram), ``vad_events`` and ``utterance_end_ms`` choose which messages are sent,
``sample_rate`` and ``encoding`` describe the audio (linear16 mono only: anything else
is refused with 400 before the upgrade, like ``channels`` other than 1), ``extra``
(``key:value``) is echoed in each result's ``metadata.extra``; the others (model,
language, punctuate, smart_format, diarize, keywords ...) are ignored: the gateway's
model, punctuation and roster speakers apply. Speaker names: every result carries the
gateway's ``speaker_name`` fields, and, for SDKs that drop fields they do not know
(deepgram-sdk 3.x and 4.x), ``metadata.extra["speaker_name"]`` (the result's speaker)
and ``metadata.extra["speaker_names"]`` (``id=name`` pairs for its words).

Credentials: the deployment's secret, or a token from ``bot-config``, as
``Authorization: Token <key>`` or ``Bearer <key>``, the browser form
``Sec-WebSocket-Protocol: token, <key>``, or ``?token=<key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.typing import Data

from . import tokens
from .audio.resample import Resampler
from .config import SUPPORTED_RATES
from .errors import AuthError, ProtocolError
from .ingest.protocol import OutputDecoder
from .keys import valid_key
from .reports import ConnectionRecord

logger = logging.getLogger("gateway.listen")

#: Rates accepted from Deepgram clients; those a session cannot run at are resampled.
LISTEN_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
#: The session rate for audio at a rate sessions do not take.
RESAMPLED_RATE = 16000


def model_uuid(model: str) -> str:
    """The ``model_uuid`` Deepgram messages carry: derived from the model's name, so it
    is stable across restarts and the same in ``Results`` and ``Metadata``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"meeting-gateway:model:{model}"))


class BadRequest(ProtocolError):
    close_code = 1003
    reason = "bad request"
    metric_reason = "bad_request"
    status = 400


def _flag(params: Mapping[str, str], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """What a ``/v1/listen`` request asks for, checked before the upgrade."""

    follow: str | None
    """A session key to follow (follow mode), else None (audio mode)."""
    rate: int
    interim_results: bool
    vad_events: bool
    utterance_end: bool
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ListenOptions:
        """Raise :class:`BadRequest` for audio the gateway cannot decode."""
        encoding = params.get("encoding", "linear16").lower()
        if encoding not in ("linear16", "pcm_s16le"):
            raise BadRequest(f"encoding {encoding[:32]!r}: only linear16 (16-bit PCM) is taken")
        channels = params.get("channels", "1")
        if channels != "1":
            raise BadRequest(f"channels={channels[:8]}: only mono audio is taken")
        rate_text = params.get("sample_rate", "16000")
        if not rate_text.isdigit() or int(rate_text) not in LISTEN_RATES:
            raise BadRequest(
                f"sample_rate={rate_text[:12]}: one of {', '.join(map(str, LISTEN_RATES))}"
            )
        follow = params.get("session") or None
        if follow is not None and not valid_key(follow):
            raise BadRequest(f"invalid session key {follow[:40]!r}")
        extra: dict[str, str] = {}
        for item in params.get("extra", "").split(","):
            key, sep, value = item.partition(":")
            if sep and key.strip():
                extra[key.strip()[:64]] = value.strip()[:256]
        return cls(
            follow=follow,
            rate=int(rate_text),
            interim_results=_flag(params, "interim_results", False),
            vad_events=_flag(params, "vad_events", False),
            utterance_end=bool(params.get("utterance_end_ms")),
            extra=extra,
        )


def credential(headers: Any, params: Mapping[str, str]) -> str | None:
    """The key a Deepgram client presents, wherever it put it."""
    auth: str = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    protocols: str = headers.get("Sec-WebSocket-Protocol", "")
    offered = [p.strip() for p in protocols.split(",")]
    if len(offered) >= 2 and offered[0].lower() == "token" and offered[1]:
        return offered[1]
    return params.get("token") or None


def authorize(secret: str, key: str | None, options: ListenOptions) -> None:
    """Raise :class:`AuthError` unless ``key`` is the secret or a token for this use."""
    if key is None:
        raise AuthError("missing credentials")
    if hmac.compare_digest(key.encode(), secret.encode()):
        return
    if options.follow is not None:
        tokens.verify(secret, key, "read", options.follow)
    else:
        tokens.verify(secret, key, "output", tokens.ANY_KEY)


class ResultsFilter:
    """Turns the gateway's transcript messages into what this Deepgram client asked
    for: partials only with ``interim_results``, ``SpeechStarted`` only with
    ``vad_events``, ``UtteranceEnd`` only with ``utterance_end_ms``; speaker names in
    ``metadata.extra``; ``from_finalize`` on the first final after a ``Finalize``."""

    def __init__(self, options: ListenOptions) -> None:
        self.options = options
        self.request_id: str | None = None
        self.finalize_pending = False

    def __call__(self, text: str) -> str | None:
        message = json.loads(text)
        kind = message.get("type")
        if kind == "SpeechStarted":
            return text if self.options.vad_events else None
        if kind == "UtteranceEnd":
            return text if self.options.utterance_end else None
        if kind != "Results":
            return text
        if not message.get("is_final") and not self.options.interim_results:
            return None
        meta = message.setdefault("metadata", {})
        self.request_id = self.request_id or meta.get("request_id")
        words = message["channel"]["alternatives"][0]["words"]
        names = {str(w["speaker"]): w["speaker_name"] for w in words if w.get("speaker_name")}
        extra = dict(self.options.extra)
        extra["speaker_name"] = message.get("speaker_name") or ""
        extra["speaker_names"] = ",".join(f"{k}={v}" for k, v in names.items())
        meta["extra"] = extra
        message.pop("session", None)
        if message.get("is_final") and self.finalize_pending:
            message["from_finalize"] = True
            self.finalize_pending = False
        return json.dumps(message, ensure_ascii=False, separators=(",", ":"))

    def metadata(self, seconds: float, model: str) -> str:
        """The ``Metadata`` message sent before the close."""
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        model_id = model_uuid(model)
        return json.dumps(
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.request_id or str(uuid.uuid4()),
                "sha256": "",
                "created": created.replace("+00:00", "Z"),
                "duration": round(seconds, 3),
                "channels": 1,
                "models": [model_id],
                "model_info": {model_id: {"name": model, "version": "", "arch": "whisper"}},
            }
        )


class Outlet:
    """What a transcript subscriber handler is given instead of the client's socket.

    It sends through :class:`ResultsFilter`; it never reads the socket (the listen
    handler does: audio and control messages), it only waits for the end; and a close
    it asks for is handed to the listen handler, which sends ``Metadata`` first."""

    def __init__(self, ws: Any, results: ResultsFilter) -> None:
        self._ws = ws
        self._results = results
        self.ended = asyncio.Event()
        self.close_code: int | None = None
        self.closed_by_hub = asyncio.Event()
        self.remote_address = ws.remote_address
        self.close_timeout = ws.close_timeout
        self.ping_timeout = ws.ping_timeout

    async def send(self, text: Data) -> None:
        out = self._results(text if isinstance(text, str) else text.decode())
        if out is not None:
            await self._ws.send(out)

    async def ping(self, data: Data | None = None) -> Awaitable[float]:
        return await self._ws.ping(data)  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[Data]:
        return self._until_ended()

    async def _until_ended(self) -> AsyncIterator[Data]:
        await self.ended.wait()
        if False:  # pragma: no cover - an async generator that yields nothing
            yield b""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The subscriber side is done: a normal end goes through the listen handler
        (``Metadata``, then 1000); anything else (too slow) closes at once."""
        self.close_code = code
        if code != 1000:
            await self._ws.close(code, reason)
        self.closed_by_hub.set()

    @property
    def transport(self) -> Any:
        return self._ws.transport

    @property
    def protocol(self) -> Any:
        return self._ws.protocol

    @property
    def state(self) -> Any:
        return self._ws.state


Follow = Callable[[Any, str | None], Coroutine[Any, Any, None]]


class ListenEndpoint:
    """Serves ``/v1/listen`` connections (see the module docstring)."""

    def __init__(self, gateway: Any) -> None:
        self._gateway = gateway

    def _follow_handler(self) -> Follow:
        route = self._gateway.routes.get("transcripts")
        if route is None:
            raise BadRequest("no transcription pipeline is enabled")
        handler: Follow = route[1]
        return handler

    async def handle(self, ws: Any, params: Mapping[str, str]) -> None:
        options = ListenOptions.parse(params)
        results = ResultsFilter(options)
        outlet = Outlet(ws, results)
        follow = self._follow_handler()
        if options.follow is not None:
            await self._follow(ws, options.follow, follow, outlet, results)
        else:
            await self._stream(ws, params, options, follow, outlet, results)

    async def _follow(
        self, ws: Any, key: str, follow: Follow, outlet: Outlet, results: ResultsFilter
    ) -> None:
        sender = asyncio.create_task(follow(outlet, key))
        reader = asyncio.create_task(self._control_only(ws))
        await asyncio.wait([sender, reader], return_when=asyncio.FIRST_COMPLETED)
        await self._finish(ws, outlet, sender, reader, results, 0.0)

    async def _control_only(self, ws: Any) -> None:
        """Follow mode: the client only sends control messages."""
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                if isinstance(message, str) and _control(message) == "CloseStream":
                    return

    async def _stream(
        self,
        ws: Any,
        params: Mapping[str, str],
        options: ListenOptions,
        follow: Follow,
        outlet: Outlet,
        results: ResultsFilter,
    ) -> None:
        gw = self._gateway
        key = f"listen-{uuid.uuid4().hex[:16]}"
        rate = options.rate if options.rate in SUPPORTED_RATES else RESAMPLED_RATE
        converter = Resampler(options.rate, rate) if rate != options.rate else None
        session = gw.sessions.open(key, {k: v for k, v in params.items() if k == "pipelines"})
        record = ConnectionRecord("output", str(ws.remote_address[0]), time.time())
        session.start(rate)
        session.attach_output(ws, record)
        session.log.info("Deepgram client streaming at %d Hz", options.rate)
        sender = asyncio.create_task(follow(outlet, key))
        decoder = OutputDecoder()
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    samples = decoder.samples(message)
                    if samples is not None:
                        if converter is not None:
                            samples = converter.process(samples)
                        session.receive_audio(samples, time.time())
                    continue
                kind = _control(message)
                if kind == "CloseStream":
                    break
                if kind == "Finalize":
                    results.finalize_pending = True
                    session.flush()
                elif kind != "KeepAlive":
                    session.count_rejected("listen_message")
        except ConnectionClosed:
            pass
        finally:
            record.closed_at = time.time()
            session.detach_output(ws, record.closed_at)
            await gw.sessions.finalize(session)  # drains the pipelines: every final sent
        await self._finish(ws, outlet, sender, None, results, session.audio_seconds)

    async def _finish(
        self,
        ws: Any,
        outlet: Outlet,
        sender: asyncio.Task[None],
        reader: asyncio.Task[None] | None,
        results: ResultsFilter,
        seconds: float,
    ) -> None:
        outlet.ended.set()
        with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
            await asyncio.wait_for(asyncio.shield(sender), 5.0)
        for task in (sender, reader):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
        if outlet.close_code not in (None, 1000):
            return  # closed already (too slow)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(results.metadata(seconds, self._gateway.settings.model))
            await ws.close(1000, "")


def _control(message: str) -> str | None:
    """The ``type`` of a Deepgram control message, or None."""
    try:
        data = json.loads(message)
    except ValueError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None
