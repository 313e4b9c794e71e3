"""What Deepgram's live API says and asks: the request's options and credentials, the
gateway's transcript messages as a Deepgram client asked for them, and ``Metadata``.
Sans-I/O: :mod:`.endpoint` serves the sockets."""

from __future__ import annotations

import datetime
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import tokens
from ..errors import AuthError, BadRequest
from ..keys import valid_key

#: Rates accepted from Deepgram clients; those a session cannot run at are resampled.
LISTEN_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
#: The session rate for audio at a rate sessions do not take.
RESAMPLED_RATE = 16000


def model_uuid(model: str) -> str:
    """The ``model_uuid`` Deepgram messages carry: derived from the model's name, so it
    is stable across restarts and the same in ``Results`` and ``Metadata``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"meeting-gateway:model:{model}"))


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


def control_type(message: str) -> str | None:
    """The ``type`` of a Deepgram control message, or None."""
    try:
        data = json.loads(message)
    except ValueError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None
