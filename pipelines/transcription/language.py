"""Which language each recognition asks for, per session. Sans-I/O.

A session speaks the language it was given (``GATEWAY_LANGUAGE``, or ``?language=`` on
the bot's URL), or, with ``auto``, the one Whisper detects. Detection on a second of
audio is a guess, so ``auto`` keeps detecting until a recognition of at least
:data:`SETTLE_SECONDS` of audio names a language with probability
:data:`SETTLE_PROBABILITY` or more, then asks for that language (faster and steadier
than detecting on every partial). People in one meeting do not always share a
language: a speaker the roster has not marked before starts detection again, so each
new speaker's first turn is heard for what it is.
"""

from __future__ import annotations

from typing import Any

from gateway.config import language_code_ok
from gateway.errors import ConfigError

#: A detection is trusted from this much audio...
SETTLE_SECONDS = 2.0
#: ...at this probability or more.
SETTLE_PROBABILITY = 0.6


class LanguageChoice:
    def __init__(self, asked: str) -> None:
        self.auto = asked == "auto"
        self._settled: str | None = None if self.auto else asked
        self.current = "en" if self.auto else asked
        """The language of the latest words: the one asked for, or last detected."""
        self._speakers: set[str] = set()

    @classmethod
    def checked(cls, asked: str, engine: Any) -> LanguageChoice:
        """The choice for a session that asked for ``asked``, checked against the model
        (see :func:`session_language`)."""
        multilingual, known = engine.multilingual, engine.supported_languages()
        return cls(session_language(asked, multilingual, known))

    def for_request(self) -> str | None:
        """The language to ask the model for; None: detect it."""
        return self._settled

    def heard(self, language: str, probability: float, seconds: float) -> bool:
        """A recognition of ``seconds`` of audio came back in ``language``; True if that
        is another language than the last one."""
        changed = language != self.current
        self.current = language
        settles = seconds >= SETTLE_SECONDS and probability >= SETTLE_PROBABILITY
        if self.auto and self._settled is None and settles:
            self._settled = language
        return changed

    def speaker(self, key: str) -> None:
        """The roster marked ``key`` speaking: a new speaker's first turn is detected anew."""
        if key not in self._speakers:
            self._speakers.add(key)
            if self.auto:
                self._settled = None


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
