"""The gateway server: WebSockets and HTTP on one port.

Routes (the bot uses its URLs verbatim, so identity and tokens live in path and query):

=========================  ==================================================
``/bots/{key}``            the bot's output socket (also the dual socket)
``/bots/{key}/input``      the bot's separate input socket, paired by ``key``
``/bots/{key}/control``    speech control: say, play, stop (:mod:`gateway.speech.control`)
``/``                      output socket keyed by the handshake's ``bot_id``
``/bots/{key}/{name}``     an endpoint a pipeline factory serves (per session)
``/{name}``                the same endpoint across every session
``GET /healthz``           the process is up
``GET /readyz``            pipelines are loaded and the gateway is not draining
``GET /metrics``           Prometheus text format
``GET /sessions``          JSON list of sessions
=========================  ==================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import http, listen, routes, tokens
from .admission import Admission
from .config import KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Settings
from .errors import AuthError, OverloadError, ProtocolError, RouteError
from .ingest.protocol import Handshake, OutputDecoder, ProviderEvent, Rejected, Roster
from .keys import key_from_bot_id
from .metrics import Metrics, close_label
from .pipeline import Environment, PipelineFactory, RouteHandler, load_factory
from .reports import ConnectionRecord
from .routes import Route, parse_route, remote_ip, response, select_subprotocol, url_rate
from .session import Session
from .sessions import SessionManager
from .speech import voice
from .speech.control import ControlEndpoint

if TYPE_CHECKING:
    from .cluster.member import Membership
    from .cluster.relay import TranscriptRelay

logger = logging.getLogger("gateway.server")

LAG_INTERVAL = 0.1
#: Routes whose session a cluster node must own before serving them.
BOT_ROLES = ("output", "input")
EMPTY_AUDIO = Rejected("empty_audio", "binary message with no bytes")


class Gateway:
    """Owns the settings, metrics, pipeline factories, sessions and the listening socket."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.relay: TranscriptRelay | None = None
        if settings.redis_url:
            from .cluster.relay import TranscriptRelay

            self.relay = TranscriptRelay(settings.redis_url, self.metrics.registry)
        self.env = Environment(settings, self.metrics.registry, self.relay)
        self.factories: dict[str, PipelineFactory] = {
            name: load_factory(name, self.env) for name in settings.pipeline_names
        }
        self.sessions = SessionManager(settings, self.metrics, self.factories)
        self.routes: dict[str, tuple[str, RouteHandler]] = {}
        for factory in self.factories.values():
            self.routes.update(factory.routes())
        self.routes["control"] = ("control", ControlEndpoint(self.sessions, self.metrics).handle)
        self.listen = listen.ListenEndpoint(self)
        self.ready = False
        self._stopped = False
        self._server: Server | None = None
        self.admission = Admission(settings.max_connections, settings.max_connections_per_ip)
        self._lag_task: asyncio.Task[None] | None = None
        self.cluster: Membership | None = None
        if settings.redis_url:
            from .cluster.member import Membership

            self.cluster = Membership(self)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Load the pipelines, then listen. Returns the bound host and port."""
        s = self.settings
        if s.open:
            logger.warning(
                "no GATEWAY_SECRET set: the gateway is open, any client can stream or read"
            )
        for factory in self.factories.values():
            await factory.startup()
        if self.cluster is not None:
            # Joining sweeps the shared data directory for sessions no live node owns.
            await self.cluster.start()
        elif s.resume:
            # Meetings an earlier process left unfinished linger again for their bots.
            self.sessions.recover()
        # The voice loads alongside the pipelines: the first ``say`` should not wait for it.
        await voice.preload()
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            max_size=s.max_message_bytes,
            ping_interval=KEEPALIVE_INTERVAL,
            ping_timeout=KEEPALIVE_TIMEOUT,
            compression="deflate" if s.compression else None,
            server_header=None,
            select_subprotocol=select_subprotocol,
            # Cluster nodes may share the port (``serve --workers N``).
            reuse_port=bool(s.redis_url),
        )
        self._lag_task = asyncio.create_task(self._watch_loop_lag(), name="loop-lag")
        self.ready = True
        sock = next(iter(self._server.sockets))
        host, port = sock.getsockname()[:2]
        logger.info("listening on %s:%d with pipelines %s", host, port, ",".join(self.factories))
        return host, port

    async def stop(self) -> None:
        """Drain: close all but readers (bots retry), end Deepgram clients' streams, suspend
        (``resume``) or finalize every session, then close the readers, last finals first."""
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        last = routes.RESTART if self.settings.resume else routes.GOING_AWAY
        if self._server is not None:
            self._server.close(close_connections=False)
            bots = routes.close_all(self._server.connections, but_readers_of=self.routes)
            await asyncio.gather(bots, self.listen.drain(last))
        if self.settings.resume:
            await self.sessions.suspend_all()
        else:
            await self.sessions.finalize_all()
        if self._server is not None:
            await routes.close_all(self._server.connections, close=last)
            await self._server.wait_closed()
        if self.cluster is not None:
            await self.cluster.stop()
        for factory in self.factories.values():
            await factory.shutdown()
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        logger.info("stopped")

    async def _watch_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - before - LAG_INTERVAL))

    # -- HTTP -----------------------------------------------------------------------------

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        try:
            plain = await http.answer(self, ws, request)  # may refuse: no read token
            if plain is not None:
                return plain
            route = parse_route(request.path)
            self._check(route, remote_ip(ws), request.headers)
        except ProtocolError as exc:
            return self._refusal(exc, remote_ip(ws))
        if self.cluster is not None and route.key is not None and route.kind in BOT_ROLES:
            # Own the session before the upgrade: the bot drops what it captures until
            # its socket opens, so the hand-over's wait is part of its outage, not a lag.
            await self.cluster.claim(route.key)
        return None

    def _check(self, route: Route, ip: str, headers: Headers) -> None:
        """Everything the request alone decides: route, token, limits, draining.

        Run before the upgrade, so a refusal is an HTTP status the bot's client treats as
        a failed attempt (it backs off) rather than an open socket closed at once (it
        resets its backoff and retries every second).
        """
        s = self.settings
        if self._stopped or not self.ready:
            raise OverloadError("the gateway is not accepting connections", retry_after=1)
        self.admission.check(ip)
        if route.kind == "output":
            if route.key is None and not s.open:
                # A token binds a key; the bare URL has none until the handshake.
                raise AuthError("the bare URL is not available when a secret is set")
            self._authorize(route, "output", route.key)
        elif route.kind == "input" and route.key is not None:
            self._authorize(route, "input", route.key)
        elif route.kind == "listen":
            if "transcripts" not in self.routes:
                raise RouteError("/v1/listen needs the transcription pipeline")
            options = listen.ListenOptions.parse(route.params)
            if not s.open:
                listen.authorize(s.secret, tokens.presented(headers, route.params), options)
        elif route.kind in self.routes:
            token_role = self.routes[route.kind][0]
            if token_role not in tokens.ROLES:
                raise RouteError(f"endpoint {route.kind} declares unknown role {token_role}")
            self._authorize(route, token_role, route.key)
        else:
            raise RouteError(f"no endpoint {route.kind[:40]!r}")

    def _refusal(self, exc: ProtocolError, ip: str) -> Response:
        """The HTTP answer to a refused upgrade: counted always, logged once a minute per
        address (a misconfigured bot retries for as long as its meeting lasts)."""
        self.metrics.refused.labels(exc.metric_reason).inc()
        if self.admission.should_log(ip, time.monotonic()):
            logger.warning("refused a connection from %s with %d: %s", ip, exc.status, exc)
        body = f"{exc.reason}\n".encode()
        extra = [] if exc.retry_after is None else [("Retry-After", str(exc.retry_after))]
        return response(exc.status, "text/plain", body, extra)

    # -- WebSockets -----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        ip = remote_ip(ws)
        role = "unknown"
        try:
            assert ws.request is not None
            route = parse_route(ws.request.path)  # checked before the upgrade
            role = route.kind if route.kind in ("output", "input") else "subscriber"
            self.admission.admit(ip)  # again: connections opened since the check count
        except ProtocolError as exc:
            await self._refuse(ws, exc, role)
            return
        self.metrics.connections.labels(role).inc()
        try:
            await self._dispatch(ws, route)
        except ProtocolError as exc:
            await self._refuse(ws, exc, role)
        except Exception:
            # Never let an exception reach websockets (a bare 1011 with nothing counted).
            self.metrics.handler_errors.labels("connection").inc()
            logger.exception("unexpected error in a %s connection from %s", role, ip)
            await ws.close(1011, "internal error")
        finally:
            self.admission.release(ip)
            self.metrics.connections.labels(role).dec()
            self.metrics.connections_closed.labels(role, close_label(ws.close_code)).inc()

    async def _refuse(self, ws: ServerConnection, exc: ProtocolError, role: str) -> None:
        self.metrics.refused.labels(exc.metric_reason).inc()
        logger.warning("closing %s connection from %s: %s", role, remote_ip(ws), exc)
        if role == "unknown":
            self.metrics.connections_closed.labels(role, str(exc.close_code)).inc()
        await ws.close(exc.close_code, exc.reason)

    def _authorize(self, route: Route, role: tokens.Role, key: str | None) -> None:
        if self.settings.open:
            return
        tokens.verify(self.settings.secret, route.params.get("token"), role, key or tokens.ANY_KEY)

    async def _dispatch(self, ws: ServerConnection, route: Route) -> None:
        """Serve a connection :meth:`_check` admitted before its upgrade."""
        if route.kind == "output":
            await self._output(ws, route)
        elif route.kind == "input" and route.key is not None:
            await self._input(ws, route.key, route.params)
        elif route.kind == "listen":
            await self.listen.handle(ws, route.params)
        else:
            await self.routes[route.kind][1](ws, route.key)

    async def _output(self, ws: ServerConnection, route: Route) -> None:
        rate = url_rate(route.params)
        record = ConnectionRecord("output", remote_ip(ws), time.time())
        session: Session | None = None
        if route.key is not None:
            session = self._attach(ws, route.key, route.params, record)
        decoder = OutputDecoder()
        try:
            async for message in ws:
                try:
                    if type(message) is bytes:
                        # Audio is nearly every message: decode it without building an event.
                        samples = decoder.samples(message)
                        if samples is None:
                            self._reject(session, EMPTY_AUDIO)
                            continue
                        if session is None:
                            session = self._attach(ws, self._anonymous(), route.params, record)
                        session.receive_audio(samples, time.time())
                        continue
                    event = decoder.receive(message)
                    if type(event) is Handshake:
                        if session is None:
                            key = key_from_bot_id(event.bot_id)
                            if self.cluster is not None:
                                await self.cluster.claim(key)
                            session = self._attach(ws, key, route.params, record)
                        session.handshake(event, rate)
                    elif type(event) is Roster:
                        if session is None:
                            session = self._attach(ws, self._anonymous(), route.params, record)
                        session.roster(event, time.time())
                    elif type(event) is ProviderEvent:
                        if session is None:
                            bot = event.bot_id
                            key = key_from_bot_id(bot) if bot else self._anonymous()
                            session = self._attach(ws, key, route.params, record)
                        session.provider_event(event)
                    else:
                        assert isinstance(event, Rejected)
                        self._reject(session, event)
                except ProtocolError:
                    raise
                except Exception:
                    # A defect, not the bot's fault: skip this message, keep the meeting.
                    self._failed(session, "audio" if type(message) is bytes else "text")
        except ConnectionClosed:
            pass  # 1005 and 1006 are how bots end a meeting, not errors
        finally:
            record.closed_at = time.time()
            if session is not None:
                if decoder.pending_odd_byte:
                    session.count_bytes(1)
                self._detach(ws, session, record)

    def _anonymous(self) -> str:
        """A key for a bot that sent no handshake, never reused (also across restarts)."""
        return f"conn-{uuid.uuid4().hex[:16]}"

    def _failed(self, session: Session | None, stage: str) -> None:
        self.metrics.handler_errors.labels(stage).inc()
        log = session.log if session is not None else logger
        errors = session.handler_errors if session is not None else None
        if errors is None or stage not in errors:  # once per session and stage
            log.exception("unexpected error handling a %s message; skipped it", stage)
        if errors is not None:
            errors.add(stage)

    def _reject(self, session: Session | None, event: Rejected) -> None:
        if session is None:
            self.metrics.rejected.labels(event.reason).inc()
            logger.warning("rejected message before handshake: %s", event.detail)
            return
        first = event.reason not in session.rejected
        session.count_rejected(event.reason)
        if first:  # once per session and reason: a bad bot must not flood the log
            session.log.warning("rejected message (%s): %s", event.reason, event.detail)

    def _attach(
        self, ws: ServerConnection, key: str, params: Mapping[str, str], record: ConnectionRecord
    ) -> Session:
        session = self.sessions.open(key, params)
        replaced = session.attach_output(ws, record)
        session.log.info("bot output connected from %s", record.remote)
        if replaced is not None:
            # The bot only reconnects after it gave the old socket up.
            asyncio.get_running_loop().create_task(replaced.close(1001, "replaced"))
        return session

    def _detach(self, ws: ServerConnection, session: Session, record: ConnectionRecord) -> None:
        record.close_code = ws.close_code
        if session.detach_output(ws, record.closed_at or time.time()):
            session.log.info("bot output disconnected (code %s)", ws.close_code)
            self.sessions.linger(session)
        if session.ended_at is None and session.clock.started and not session.suspending:
            session.write_metadata()

    async def _input(self, ws: ServerConnection, key: str, params: Mapping[str, str]) -> None:
        session = self.sessions.open(key, params)
        record = ConnectionRecord("input", remote_ip(ws), time.time())
        session.connections.append(record)
        old, session.input = session.input, ws
        session.connection_changed()
        if old is not None:
            asyncio.get_running_loop().create_task(old.close(1001, "replaced"))
        session.log.info("bot input connected from %s", record.remote)
        try:
            async for _ in ws:
                # Nothing is expected from the bot here; count it and move on.
                session.count_rejected("input_message")
        except ConnectionClosed:
            pass
        finally:
            record.closed_at = time.time()
            record.close_code = ws.close_code
            if session.input is ws:
                session.input = None
                session.connection_changed()
            session.log.info("bot input disconnected (code %s)", ws.close_code)
            if session.output is None and session.ended_at is None:
                self.sessions.linger(session)
