"""Webhook delivery: signed JSON POSTs, retried with backoff, never blocking a session.

Every body is signed with HMAC-SHA256 under the webhook key (``webhook_secret``, else
``secret``); the receiver recomputes it over the raw body and compares in constant
time (see :func:`signature`)::

    X-Gateway-Signature: sha256=<hex HMAC-SHA256(key, body)>

Bodies carry a unique ``id`` (retries resend the same body, so receivers deduplicate on
it) and a ``sent_at`` epoch time (receivers may refuse stale bodies). Without any key
the header is omitted.

A :class:`WebhookSender` is one per process: a bounded queue and a few workers. A
failed POST (connection error, timeout, non-2xx) waits ``0.5 s * 2**n`` (capped at
30 s) off the workers and goes back in the queue; after ``attempts`` tries, or when the
queue is full, or at shutdown, the delivery is appended to the session's
``webhook_undelivered.jsonl`` (``{"url", "error", "body"}`` a line) so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.storage.offload import blocking

logger = logging.getLogger("pipelines.transcription.webhook")

SIGNATURE_HEADER = "X-Gateway-Signature"
UNDELIVERED = "webhook_undelivered.jsonl"
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
WORKERS = 4


def signature(key: str, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body`` under ``key``."""
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def verify(key: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is a valid signature of ``body``; for receivers and tests."""
    return header is not None and hmac.compare_digest(signature(key, body), header)


class DeliveryError(Exception):
    """One POST attempt failed; the message says how (never shown to a peer)."""


@dataclass(slots=True, eq=False)  # identity: queued, timed and busy sets hold it
class Delivery:
    url: str
    body: bytes
    directory: Path
    """Where ``webhook_undelivered.jsonl`` goes if this cannot be delivered."""
    attempts: int = 0
    error: str = field(default="")


@functools.cache
def default_tls() -> ssl.SSLContext:
    """The system's trusted certificates, loaded once per process."""
    return ssl.create_default_context()


async def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    limit: float,
    tls: ssl.SSLContext | None = None,
) -> int:
    """POST ``body`` over HTTP/1.1 within ``limit`` seconds; return the status code.

    ``https://`` URLs are verified against ``tls``, by default the system's trusted
    certificates. Raises :class:`DeliveryError` for anything but an HTTP status.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError(f"unsupported URL {url[:80]!r}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "User-Agent: meeting-gateway",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    # Loading the system's certificates reads files: once per process, in a thread.
    context = (tls or await blocking(default_tls)) if secure else None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
            try:
                writer.write(request)
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        raise DeliveryError("timed out") from None
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
    fields = status_line.decode("latin-1").split()
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise DeliveryError(f"bad status line {status_line[:60]!r}")
    return int(fields[1])


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.delivered = Counter(
            "gateway_webhook_deliveries", "Webhook bodies delivered (2xx)", registry=r
        )
        self.failures = Counter(
            "gateway_webhook_failures", "Webhook POST attempts that failed", registry=r
        )
        self.retries = Counter(
            "gateway_webhook_retries", "Webhook POSTs scheduled for another try", registry=r
        )
        self.undelivered = Counter(
            "gateway_webhook_undelivered",
            "Webhook bodies given up on and kept on disk, by reason",
            ["reason"],
            registry=r,
        )
        self.pending = Gauge(
            "gateway_webhook_pending", "Webhook bodies queued or waiting to retry", registry=r
        )


class WebhookSender:
    """Delivers bodies in the background; :meth:`submit` never waits."""

    def __init__(
        self,
        registry: CollectorRegistry,
        key: str,
        *,
        capacity: int,
        attempts: int,
        timeout: float = 10.0,
        backoff: float = BACKOFF_BASE,
    ) -> None:
        self.metrics = WebhookMetrics(registry)
        self._key = key
        self._capacity = capacity
        self._attempts = attempts
        self._timeout = timeout
        self._backoff = backoff
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._waiting: dict[Delivery, asyncio.TimerHandle] = {}
        self._busy: set[Delivery] = set()
        self._workers: list[asyncio.Task[None]] = []

    @property
    def pending(self) -> int:
        """Bodies not yet delivered nor given up on."""
        return self._queue.qsize() + len(self._waiting) + len(self._busy)

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhook-{n}") for n in range(WORKERS)
        ]

    def submit(self, url: str, payload: object, directory: Path) -> None:
        """Queue ``payload`` (JSON-serialisable) for ``url``; spill to disk if full."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        delivery = Delivery(url, body, directory)
        if self.pending >= self._capacity:
            self._give_up(delivery, "queue_full")
            return
        self._queue.put_nowait(delivery)
        self.metrics.pending.inc()

    async def close(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for pending bodies, then keep the rest on disk."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while self.pending:
                    # Retries waiting on a timer go now: the process is leaving.
                    for delivery, handle in list(self._waiting.items()):
                        handle.cancel()
                        self._requeue(delivery)
                    await self._queue.join()
        # Taken before cancelling: a cancelled worker forgets what it was sending.
        leftovers = [*self._busy, *self._waiting]
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for handle in self._waiting.values():
            handle.cancel()
        self._waiting.clear()
        self._busy.clear()
        for delivery in leftovers:
            self.metrics.pending.dec()
            self._give_up(delivery, "shutdown")

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            self._busy.add(delivery)
            try:
                await self._attempt(delivery)
            finally:
                self._busy.discard(delivery)
                self._queue.task_done()

    async def _attempt(self, delivery: Delivery) -> None:
        headers = {SIGNATURE_HEADER: signature(self._key, delivery.body)} if self._key else {}
        delivery.attempts += 1
        try:
            status = await post(delivery.url, delivery.body, headers, self._timeout)
            if not 200 <= status < 300:
                raise DeliveryError(f"HTTP {status}")
        except DeliveryError as exc:
            self.metrics.failures.inc()
            delivery.error = str(exc)
            if delivery.attempts >= self._attempts:
                self.metrics.pending.dec()
                self._give_up(delivery, "attempts")
                return
            self.metrics.retries.inc()
            delay = min(BACKOFF_CAP, self._backoff * 2 ** (delivery.attempts - 1))
            loop = asyncio.get_running_loop()
            self._waiting[delivery] = loop.call_later(delay, self._requeue, delivery)
            return
        self.metrics.pending.dec()
        self.metrics.delivered.inc()

    def _requeue(self, delivery: Delivery) -> None:
        if self._waiting.pop(delivery, None) is not None:
            self._queue.put_nowait(delivery)

    def _give_up(self, delivery: Delivery, reason: str) -> None:
        self.metrics.undelivered.labels(reason).inc()
        logger.warning(
            "webhook body for %s kept on disk (%s after %d attempts: %s)",
            urlsplit(delivery.url).hostname,
            reason,
            delivery.attempts,
            delivery.error or "not tried",
        )
        line = {
            "url": delivery.url,
            "reason": reason,
            "error": delivery.error,
            "body": json.loads(delivery.body),
        }
        try:
            delivery.directory.mkdir(parents=True, exist_ok=True)
            with open(delivery.directory / UNDELIVERED, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:
            logger.exception("could not keep an undelivered webhook body on disk")
