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
(``key:value``) is echoed in each result's ``metadata.extra``, ``keywords`` and
``keyterm`` are terms the transcript should expect (:mod:`gateway.keywords`); the others
(model, language, punctuate, smart_format, diarize ...) are ignored: the gateway's model,
punctuation and roster speakers apply. Speaker names: every result carries the
gateway's ``speaker_name`` fields, and, for SDKs that drop fields they do not know
(deepgram-sdk 3.x and 4.x), ``metadata.extra["speaker_name"]`` (the result's speaker)
and ``metadata.extra["speaker_names"]`` (``id=name`` pairs for its words).

Credentials: the deployment's secret, or a token from ``bot-config``, as
``Authorization: Token <key>`` or ``Bearer <key>``, the browser form
``Sec-WebSocket-Protocol: token, <key>``, or ``?token=<key>``.
"""

from ..errors import BadRequest
from .endpoint import ListenEndpoint, Outlet
from .messages import (
    LISTEN_RATES,
    ListenOptions,
    ResultsFilter,
    authorize,
    model_uuid,
)

__all__ = [
    "LISTEN_RATES",
    "BadRequest",
    "ListenEndpoint",
    "ListenOptions",
    "Outlet",
    "ResultsFilter",
    "authorize",
    "model_uuid",
]
