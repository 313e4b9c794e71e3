"""An utterance's end recognized at a pause, before the VAD is sure it is the end.

The VAD ends speech after ``GATEWAY_VAD_HANGOVER_MS`` of quiet (300 ms), and the
``speech_final`` then waits for one more recognition. At a shorter pause
(:class:`~gateway.audio.vad.SpeechPaused`) the audio that final will hear is already in:
the pipeline asks for it at once, as :meth:`~.policy.StreamingPolicy.ending` would have
it, and keeps the recognition here. If the pause becomes the end, the final takes it
over, sooner by the rest of the hangover and by whatever it would have waited for
behind; if speech goes on, it is cancelled, or run for nothing when already started
(counted as ``wasted``).

The pause is told 240 ms after the voice stopped, and the final hears 200 ms past it
(``PAD``), but the resampler to 16 kHz may hold back the last few milliseconds when the
pause is told (up to 58 ms from 32 kHz): the early recognition then stops short of the
final's end by at most ``QUIET_SLACK``, in audio the VAD called quiet.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .drafts import Request
from .engine import Hypothesis

if TYPE_CHECKING:
    from prometheus_client import Counter

#: How much of the quiet after the voice an early recognition may lack (see above).
QUIET_SLACK = 0.06


def serves(early: Request, final: Request) -> bool:
    """Whether what was recognized for ``early`` (an :meth:`~.policy.StreamingPolicy.ending`)
    is the final's audio: the same end, give or take the quiet the resampler held back, and
    the same start or one further back (words confirmed since moved the final's start; the
    confirmed words it re-heard anchor the rest, as in a partial)."""
    return final.end - QUIET_SLACK <= early.end <= final.end and early.start <= final.start


@dataclass(frozen=True, slots=True)
class _Early:
    request: Request
    language: str | None
    future: asyncio.Future[Hypothesis | None]


class EarlyFinal:
    """At most one recognition started at a pause, for the final of the same audio."""

    def __init__(self, outcomes: Counter) -> None:
        self._outcomes = outcomes
        self._early: _Early | None = None

    def started(
        self, request: Request, language: str | None, future: asyncio.Future[Hypothesis | None]
    ) -> None:
        """``future`` recognizes ``request`` (an :meth:`~.policy.StreamingPolicy.ending`)
        in ``language``; one started before is of no use any more."""
        self.drop()
        self._early = _Early(request, language, future)

    def take(
        self, request: Request, language: str | None
    ) -> asyncio.Future[Hypothesis | None] | None:
        """The recognition of ``request``'s audio in ``language``, if one was started at
        the pause (:func:`serves`); None if the final must be recognized itself."""
        early = self._early
        if early is not None and early.language == language and serves(early.request, request):
            self._early = None
            self._outcomes.labels("used").inc()
            return early.future
        self.drop()
        return None

    def drop(self) -> None:
        """Speech went on (or the session ends): the recognition started is not needed."""
        if self._early is not None:
            self._early.future.cancel()
            self._outcomes.labels("wasted").inc()
            self._early = None
