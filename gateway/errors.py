"""The gateway's exception tree.

.. code-block:: text

    GatewayError
    ├── ConfigError             a setting has a value the gateway cannot use
    ├── ModelError              a model or voice is missing or fails its checksum
    └── ProtocolError           a peer broke the streaming protocol; closes the socket
        ├── AuthError           missing, forged, expired or misbound token   -> 1008
        ├── OverloadError       a connection limit was reached               -> 1013
        ├── UnsupportedRate     a handshake asked for a rate we cannot take  -> 1003
        └── RouteError          no such endpoint                             -> 1008

Every :class:`ProtocolError` carries the one WebSocket close code it maps to, so the
server closes connections in one place. The ``reason`` is a short, fixed string safe to
send to the peer; details go to the log only.

Recoverable problems in a single message (malformed JSON, a roster with wrong types)
are not exceptions: :mod:`gateway.protocol` returns a :class:`~gateway.protocol.Rejected`
event that is counted and logged, and the connection goes on.
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


class AuthError(ProtocolError):
    close_code = 1008
    reason = "unauthorized"
    metric_reason = "auth"


class OverloadError(ProtocolError):
    close_code = 1013
    reason = "try again later"
    metric_reason = "overload"


class UnsupportedRate(ProtocolError):
    close_code = 1003
    reason = "unsupported sample rate"
    metric_reason = "unsupported_rate"


class RouteError(ProtocolError):
    close_code = 1008
    reason = "no such endpoint"
    metric_reason = "route"
