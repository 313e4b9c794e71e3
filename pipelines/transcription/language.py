"""Which language each recognition asks for, per session. Sans-I/O.

A session speaks the language it was given (``GATEWAY_LANGUAGE``, or ``?language=`` on
the bot's URL), or, with ``auto``, the one Whisper detects. Detection on a second or
two of audio is a guess (German read by espeak-ng was heard as English at 72 % from
2.5 s, as Thai from 1.5 s), so ``auto`` keeps detecting until two recognitions in a row,
each of at least :data:`SETTLE_SECONDS` of audio, name the same language with
probability :data:`SETTLE_PROBABILITY` or more, then asks for that language (faster and
steadier than detecting on every partial). Until then, words decoded in a guessed language are
shown in partials but not made final, and finals wait a while for the language to
settle. People in one meeting do not always share a language: a speaker the roster has
not marked before starts detection again, so each new speaker's first turn is heard for
what it is.
"""

from __future__ import annotations

from typing import Any

from gateway.config import language_code_ok
from gateway.errors import ConfigError

#: A detection counts from this much audio...
SETTLE_SECONDS = 3.0
#: ...at this probability or more, and settles the language when the next one agrees.
SETTLE_PROBABILITY = 0.6


class LanguageChoice:
    def __init__(self, asked: str) -> None:
        self.auto = asked == "auto"
        self._settled: str | None = None if self.auto else asked
        self.current = "en" if self.auto else asked
        """The language of the latest words: the one asked for, or last detected."""
        self._speakers: set[str] = set()
        self._candidate: str | None = None

    @classmethod
    def checked(cls, asked: str, engine: Any) -> LanguageChoice:
        """The choice for a session that asked for ``asked``, checked against the model
        (see :func:`session_language`)."""
        multilingual, known = engine.multilingual, engine.supported_languages()
        return cls(session_language(asked, multilingual, known))

    @property
    def settled(self) -> bool:
        """Whether recognitions ask for a language (given, or detected surely)."""
        return self._settled is not None

    def trusts(self, language: str) -> bool:
        """Whether words decoded in ``language`` may become final: it is the session's
        language (a guess from a detection that has not settled may be wrong)."""
        return self._settled == language

    def for_request(self) -> str | None:
        """The language to ask the model for; None: detect it."""
        return self._settled

    def heard(self, language: str, probability: float, seconds: float) -> None:
        """A recognition of ``seconds`` of audio came back in ``language``."""
        self.current = language
        if self.auto and self._settled is None and seconds >= SETTLE_SECONDS:
            sure = probability >= SETTLE_PROBABILITY
            if sure and language == self._candidate:
                self._settled = language
            # An unsure detection, or another language, starts the count again.
            self._candidate = language if sure else None

    def speaker(self, key: str) -> None:
        """The roster marked ``key`` speaking: a new speaker's first turn is detected anew."""
        if key not in self._speakers:
            self._speakers.add(key)
            if self.auto:
                self._settled = self._candidate = None


def session_language(asked: str, multilingual: bool, known: list[str]) -> str:
    """``asked`` (``?language=`` on the session's URL, else the setting), refused with
    :class:`~gateway.errors.ConfigError` when the model cannot hear it: never silently
    English. ``known``: the model's languages."""
    asked = asked.strip().lower()
    if not language_code_ok(asked):
        raise ConfigError(f"language {asked[:16]!r}: an ISO 639-1 code such as es, or auto")
    if asked != "en" and not multilingual:
        raise ConfigError(
            f"this session asks for language {asked!r} but the model knows only English:"
            " run the gateway with --model base"
        )
    if asked != "auto" and asked not in known:
        raise ConfigError(f"the model does not know language {asked!r}")
    return asked
