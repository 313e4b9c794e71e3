"""The gateway's exception tree.

.. code-block:: text

    GatewayError
    ├── ConfigError             a setting has a value the gateway cannot use
    ├── ModelError              a model or voice is missing or fails its checksum
    └── ProtocolError           a peer broke the streaming protocol; closes the socket
        ├── AuthError           missing, forged, expired or misbound token   401/403  1008
        ├── OverloadError       a connection limit was reached               429/503  1013
        ├── UnsupportedRate     a handshake asked for a rate we cannot take           1003
        ├── BadRequest          a query parameter the gateway cannot use     400      1003
        └── RouteError          no such endpoint                             404      1008

Every :class:`ProtocolError` carries the HTTP status that refuses it before the
WebSocket upgrade (when the request alone decides it) and the one WebSocket close code
it maps to after, so the server refuses in one place. The ``reason`` is a short, fixed
string safe to send to the peer; details go to the log only.

Recoverable problems in a single message (malformed JSON, a roster with wrong types)
are not exceptions: :mod:`gateway.ingest.protocol` returns a
:class:`~gateway.ingest.protocol.Rejected` event that is counted and logged, and the
connection goes on.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError, ValueError):
    """A setting has a value the gateway cannot use. The message names it."""


class ModelError(GatewayError):
    """A model or voice file is missing or does not match its known checksum."""


class ProtocolError(GatewayError):
    """A peer broke the protocol badly enough that its connection must close."""

    close_code: ClassVar[int] = 1008
    reason: ClassVar[str] = "policy violation"
    metric_reason: ClassVar[str] = "protocol"
    status: int = 400
    """The HTTP status that refuses the request before the upgrade."""
    retry_after: int | None = None
    """Seconds for a ``Retry-After`` header, where waiting helps."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if retry_after is not None:
            self.retry_after = retry_after


class AuthError(ProtocolError):
    close_code = 1008
    reason = "unauthorized"
    metric_reason = "auth"
    status = 401


class OverloadError(ProtocolError):
    close_code = 1013
    reason = "try again later"
    metric_reason = "overload"
    status = 503
    retry_after = 5


class UnsupportedRate(ProtocolError):
    close_code = 1003
    reason = "unsupported sample rate"
    metric_reason = "unsupported_rate"


class BadRequest(ProtocolError):
    close_code = 1003
    reason = "bad request"
    metric_reason = "bad_request"
    status = 400


class RouteError(ProtocolError):
    close_code = 1008
    reason = "no such endpoint"
    metric_reason = "route"
    status = 404
