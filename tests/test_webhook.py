"""Webhook delivery against a real HTTP receiver on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pipelines.transcription.webhook import (
    SIGNATURE_HEADER,
    UNDELIVERED,
    DeliveryError,
    WebhookSender,
    post,
    signature,
    verify,
)

from .conftest import wait_for
from .timing import scaled

KEY = "webhook-key"


@dataclass
class Request:
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP/1.1 endpoint that records requests and answers with scripted statuses.

    ``statuses`` are used in turn (the last one repeats); ``None`` hangs up without
    answering, ``"hang"`` never answers.
    """

    statuses: list[int | str | None] = field(default_factory=lambda: [200])
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hook?x=1"

    @property
    def delivered(self) -> list[Request]:
        """Requests that were answered with a 2xx."""
        out = []
        for n, r in enumerate(self.requests):
            status = self.statuses[min(n, len(self.statuses) - 1)]
            if isinstance(status, int) and 200 <= status < 300:
                out.append(r)
        return out

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        self.scheme = "https" if tls else "http"

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = self.statuses[min(len(self.requests), len(self.statuses) - 1)]
            self.requests.append(Request(lines[0].split()[1], headers, body))
            if status == "hang":
                await self._release.wait()
            elif isinstance(status, int):
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_post_returns_status_and_sends_headers(receiver: Receiver) -> None:
    receiver.statuses = [204]
    status = await post(receiver.url, b'{"a":1}', {"X-Test": "yes"}, scaled(5.0))
    assert status == 204
    (request,) = receiver.requests
    assert request.target == "/hook?x=1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-test"] == "yes"
    assert request.body == b'{"a":1}'


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_post_over_tls_verifies_the_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    r = Receiver(statuses=[200])
    await r.start(server_tls)
    try:
        assert r.url.startswith("https://")
        # Not signed by a trusted authority: refused by default.
        with pytest.raises(DeliveryError, match="SSL"):
            await post(r.url, b"{}", {}, scaled(5.0))
        trusted = ssl.create_default_context(cafile=cert)
        assert await post(r.url, b'{"a":1}', {}, scaled(5.0), trusted) == 200
        assert r.requests[-1].body == b'{"a":1}'
    finally:
        await r.stop()


async def test_post_reports_a_peer_that_hangs_up(receiver: Receiver) -> None:
    receiver.statuses = [None]
    with pytest.raises(DeliveryError, match="bad status line"):
        await post(receiver.url, b"{}", {}, scaled(5.0))


async def test_post_refuses_other_schemes() -> None:
    with pytest.raises(DeliveryError, match="unsupported URL"):
        await post("ftp://example.org/x", b"{}", {}, scaled(1.0))


def test_signature_verifies_only_the_same_body_and_key() -> None:
    body = b'{"event":"transcript.final"}'
    header = signature(KEY, body)
    assert header.startswith("sha256=")
    assert verify(KEY, body, header)
    assert not verify(KEY, body + b" ", header)
    assert not verify("other", body, header)
    assert not verify(KEY, body, None)


async def test_retries_with_backoff_until_delivered(receiver: Receiver, tmp_path: Path) -> None:
    receiver.statuses = [503, None, 200]
    registry = CollectorRegistry()
    sender = WebhookSender(registry, KEY, capacity=10, attempts=5, backoff=0.05)
    sender.start()
    sender.submit(receiver.url, {"event": "transcript.final", "n": 1}, tmp_path)
    await wait_for(lambda: len(receiver.requests) == 3 and sender.pending == 0)
    await sender.close(scaled(1.0))
    bodies = {r.body for r in receiver.requests}
    assert len(bodies) == 1  # every retry resends the same body
    delivered = receiver.requests[-1]
    assert delivered.json() == {"event": "transcript.final", "n": 1}
    assert verify(KEY, delivered.body, delivered.headers[SIGNATURE_HEADER.lower()])
    assert sample(registry, "gateway_webhook_deliveries_total") == 1
    assert sample(registry, "gateway_webhook_failures_total") == 2
    assert sample(registry, "gateway_webhook_retries_total") == 2
    assert sample(registry, "gateway_webhook_pending") == 0
    assert not (tmp_path / UNDELIVERED).exists()


async def test_a_webhook_that_stays_down_leaves_the_body_on_disk(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [500]
    registry = CollectorRegistry()
    sender = WebhookSender(registry, KEY, capacity=10, attempts=3, backoff=0.01)
    sender.start()
    sender.submit(receiver.url, {"n": 7}, tmp_path)
    await wait_for(lambda: (tmp_path / UNDELIVERED).exists())
    await sender.close(scaled(1.0))
    (line,) = (tmp_path / UNDELIVERED).read_text().splitlines()
    kept = json.loads(line)
    assert kept["body"] == {"n": 7}
    assert kept["url"] == receiver.url
    assert kept["reason"] == "attempts"
    assert kept["error"] == "HTTP 500"
    assert len(receiver.requests) == 3
    assert sample(registry, "gateway_webhook_undelivered_total", reason="attempts") == 1
    assert sample(registry, "gateway_webhook_failures_total") == 3


async def test_unsigned_without_a_key(receiver: Receiver, tmp_path: Path) -> None:
    sender = WebhookSender(CollectorRegistry(), "", capacity=10, attempts=1)
    sender.start()
    sender.submit(receiver.url, {"n": 1}, tmp_path)
    await wait_for(lambda: sender.pending == 0 and len(receiver.requests) == 1)
    await sender.close(scaled(1.0))
    assert SIGNATURE_HEADER.lower() not in receiver.requests[0].headers


async def test_full_queue_and_shutdown_spill_to_disk(receiver: Receiver, tmp_path: Path) -> None:
    receiver.statuses = ["hang"]
    registry = CollectorRegistry()
    sender = WebhookSender(registry, KEY, capacity=2, attempts=3)
    sender.start()
    for n in range(5):
        sender.submit(receiver.url, {"n": n}, tmp_path)  # returns at once, receiver or not
    assert sample(registry, "gateway_webhook_undelivered_total", reason="queue_full") == 3
    await wait_for(lambda: len(receiver.requests) == 2)
    await sender.close(0.2)
    kept = [json.loads(line) for line in (tmp_path / UNDELIVERED).read_text().splitlines()]
    assert sorted(k["body"]["n"] for k in kept) == [0, 1, 2, 3, 4]
    assert sorted(k["reason"] for k in kept) == ["queue_full"] * 3 + ["shutdown"] * 2
    assert sample(registry, "gateway_webhook_pending") == 0
