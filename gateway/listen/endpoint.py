"""``/v1/listen`` connections: a Deepgram client's audio stream (a session of its own,
its transcript sent back on the same socket) or a bot's meeting followed live."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.typing import Data

from ..audio.resample import Resampler
from ..config import SUPPORTED_RATES
from ..errors import BadRequest
from ..ingest.protocol import OutputDecoder
from ..reports import ConnectionRecord
from ..routes import RESTART
from .messages import RESAMPLED_RATE, ListenOptions, ResultsFilter, control_type

logger = logging.getLogger("gateway.listen")

#: How long the last messages (``Metadata``) may take to reach a client, seconds.
SEND_WAIT = 5.0
#: What a Deepgram client's query may choose for its session, as a bot's URL may: the
#: pipelines, and the terms to expect (``keywords`` and ``keyterm``, read as one).
SESSION_PARAMS = ("pipelines", "keywords")


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
        self._draining = asyncio.Event()
        self._drain_close = RESTART
        self._streams: set[asyncio.Event] = set()  # one per audio stream, set once closed

    async def drain(self, close: tuple[int, str]) -> None:
        """The gateway stops: each audio stream ends as at a ``CloseStream`` (what was
        heard is finalized and sent, then ``Metadata``) and is closed with ``close``
        (1012 when the gateway restarts, 1001 when it goes away): its session is not
        resumed, a client that reconnects starts a new one. Returns once every stream is
        closed. Follow-mode sockets are readers: closed with the rest."""
        self._drain_close = close
        self._draining.set()
        pending = [asyncio.create_task(done.wait()) for done in self._streams]
        if pending:
            await asyncio.wait(pending)

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
                if isinstance(message, str) and control_type(message) == "CloseStream":
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
        session = gw.sessions.open(key, {k: v for k, v in params.items() if k in SESSION_PARAMS})
        record = ConnectionRecord("output", str(ws.remote_address[0]), time.time())
        session.start(rate)
        session.attach_output(ws, record)
        session.log.info("Deepgram client streaming at %d Hz", options.rate)
        sender = asyncio.create_task(follow(outlet, key))
        pump = asyncio.create_task(self._pump(ws, session, converter, results))
        draining = asyncio.create_task(self._draining.wait())
        self._streams.add(closed := asyncio.Event())
        try:
            try:
                await asyncio.wait([pump, draining], return_when=asyncio.FIRST_COMPLETED)
                close = self._drain_close if not pump.done() else (1000, "")
            finally:
                for task in (pump, draining):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                record.closed_at = time.time()
                session.detach_output(ws, record.closed_at)
                await gw.sessions.finalize(session)  # drains the pipelines: every final sent
            await self._finish(ws, outlet, sender, None, results, session.audio_seconds, close)
        finally:  # whatever happened, a drain waits no longer for this stream
            closed.set()
            self._streams.discard(closed)

    @staticmethod
    async def _pump(
        ws: Any, session: Any, converter: Resampler | None, results: ResultsFilter
    ) -> None:
        """Audio and control messages from the client, until ``CloseStream`` or its close."""
        decoder = OutputDecoder()
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                if isinstance(message, bytes):
                    samples = decoder.samples(message)
                    if samples is not None:
                        if converter is not None:
                            samples = converter.process(samples)
                        session.receive_audio(samples, time.time())
                    continue
                kind = control_type(message)
                if kind == "CloseStream":
                    return
                if kind == "Finalize":
                    results.finalize_pending = True
                    session.flush()
                elif kind != "KeepAlive":
                    session.count_rejected("listen_message")

    async def _finish(
        self,
        ws: Any,
        outlet: Outlet,
        sender: asyncio.Task[None],
        reader: asyncio.Task[None] | None,
        results: ResultsFilter,
        seconds: float,
        close: tuple[int, str] = (1000, ""),
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
        metadata = results.metadata(seconds, self._gateway.settings.model)
        with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
            await asyncio.wait_for(ws.send(metadata), SEND_WAIT)  # a client that reads
        await ws.close(*close)
