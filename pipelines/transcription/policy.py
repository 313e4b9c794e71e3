"""The streaming policy: when to ask for recognition, and what each answer means.

Sans-I/O: it sees speech boundaries and hypotheses, in seconds on the session clock,
and answers with :class:`Request` objects (recognize this span of audio) and
:class:`Draft` results. It never touches audio, threads or the event loop.

The rules:

- Speech is gated by the ingest VAD. An utterance's audio runs from ``PAD`` before the
  VAD's start to ``PAD`` after its end (never reaching back over the previous one).
- While a person speaks, a partial is requested every ``partial_interval`` seconds of
  audio (the first once ``first_partial`` seconds are in). Each partial re-recognizes the
  open segment from its start, or, once words are confirmed, at least ``PARTIAL_SPAN``
  seconds back from its end.
- Words are *confirmed* by agreement: the longest common prefix of the last two
  hypotheses (after the words already confirmed) is confirmed, and a confirmed word is
  never changed or dropped afterwards (LocalAgreement-2). Words within
  ``CONFIRM_MARGIN`` of the end of the audio heard wait for more context, and
  hypotheses of less than ``CONFIRM_CONTEXT`` seconds of audio confirm nothing.
- The utterance's end brings a final: the confirmed words followed by the final
  hypothesis' words after them, matched by word sequence, else by time. The final
  recognizes only the audio from shortly before the last confirmed words
  (``RECHECK_CONTEXT``), not the whole segment again.
- A segment reaching ``max_utterance`` is split after its last confirmed word, at the
  pause before the next word: the confirmed words become a final at once and the rest is
  recognized again with the following audio, so nothing is duplicated or lost. With no
  confirmed word to split at, the whole segment is finalized as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from .engine import HypWord

#: Audio kept before the VAD's start and after its end: soft onsets and trailing
#: consonants fall just outside what webrtcvad calls voiced.
PAD = 0.2
#: Shorter speech is not worth a recognition (webrtcvad blips, clicks).
MIN_SPEECH = 0.2
#: Sequence matching trusts a match only if it lies within this many seconds of the
#: confirmed word's own time; otherwise the split falls back to timestamps.
MATCH_SLACK = 1.0
#: Words ending this close to the end of the audio heard are not confirmed yet: with
#: little right context Whisper still revises them, even twice in a row.
CONFIRM_MARGIN = 1.0
#: A final re-hears at least this much already-confirmed speech before the words still
#: open, instead of the whole segment: Whisper needs some left context, and the
#: re-heard words anchor the new ones to the confirmed (:func:`tail_after`).
RECHECK_CONTEXT = 1.0
#: A partial hears at least this much audio (or the whole segment, if shorter), and
#: starts where a final would when that leaves more.
PARTIAL_SPAN = 4.0
#: Hypotheses of less audio than this are shown but take no part in agreement: on a
#: second or two, tiny.en agrees with itself on wrong words ("How do you marry" for
#: "Had he married") and only more context corrects them.
CONFIRM_CONTEXT = 2.5


@dataclass(frozen=True, slots=True)
class Request:
    """Recognize session audio ``[start, end)`` seconds."""

    id: int
    kind: str
    """``"partial"`` or ``"final"``."""
    utterance: int
    segment: int
    start: float
    end: float
    confirmed: tuple[HypWord, ...]
    """Words already confirmed in this segment: a final keeps them as they are."""
    speech_final: bool
    speech_start: float
    speech_end: float | None
    """The VAD's end of speech, for finals that close an utterance."""
    first: bool
    """No partial of this segment has shown words yet."""


@dataclass(frozen=True, slots=True)
class Draft:
    """A result before speaker attribution."""

    words: tuple[HypWord, ...]
    is_final: bool
    speech_final: bool
    request: Request | None


def tail_after(confirmed: Sequence[HypWord], hypothesis: Sequence[HypWord]) -> list[HypWord]:
    """The words of ``hypothesis`` that come after the ``confirmed`` ones.

    The confirmed words are found in the hypothesis by word sequence; when the
    hypothesis no longer ends them the same way, by time (words centred after the last
    confirmed word's end).
    """
    if not confirmed:
        return list(hypothesis)
    last = confirmed[-1]
    c = [w.norm for w in confirmed]
    h = [w.norm for w in hypothesis]
    blocks = [
        b for b in SequenceMatcher(None, c, h, autojunk=False).get_matching_blocks() if b.size
    ]
    if blocks:
        b = blocks[-1]
        if b.a + b.size == len(c):
            matched = hypothesis[b.b + b.size - 1]
            if abs(matched.end - last.end) <= MATCH_SLACK:
                return list(hypothesis[b.b + b.size :])
    return [w for w in hypothesis if (w.start + w.end) / 2 > last.end]


def agreement(a: Sequence[HypWord], b: Sequence[HypWord]) -> int:
    """Length of the common prefix of two word sequences, compared normalized."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x.norm != y.norm:
            break
        n += 1
    return n


class StreamingPolicy:
    """One session's streaming state. Feed it in clock order; act on what it returns.

    After :meth:`speech_started`, call :meth:`advance` whenever more audio is available
    and submit each returned request. Report every request's outcome exactly once, with
    :meth:`recognized` or :meth:`skipped`; finals must be reported in request order.
    """

    def __init__(
        self, partial_interval: float, max_utterance: float, first_partial: float = 0.5
    ) -> None:
        self.partial_interval = partial_interval
        self.max_utterance = max_utterance
        self.first_partial = min(first_partial, partial_interval)
        self._ids = 0
        self.utterance = 0
        self.segment = 0
        self.speaking = False
        self._speech_start = 0.0
        self._seg_start = 0.0
        self._floor = 0.0  # no request reaches back before this (the last final's end)
        self._confirmed: list[HypWord] = []
        self._previous: list[HypWord] = []  # last partial's words after the confirmed
        self._partial_pending = False
        self._shown = False
        self._last_partial_end = 0.0
        self.emitted_words = 0

    def _request(
        self, kind: str, end: float, *, speech_final: bool, speech_end: float | None = None
    ) -> Request:
        self._ids += 1
        return Request(
            self._ids,
            kind,
            self.utterance,
            self.segment,
            self._resume_at() if kind == "final" else self._partial_start(end),
            end,
            tuple(self._confirmed),
            speech_final,
            self._speech_start,
            speech_end,
            not self._shown,
        )

    def _new_segment(self, start: float) -> None:
        self.segment += 1
        self._seg_start = max(start, self._floor)
        self._confirmed = []
        self._previous = []
        self._partial_pending = False
        self._shown = False
        self._last_partial_end = self._seg_start

    def _resume_at(self) -> float:
        """Where a final's audio starts: at a word boundary ``RECHECK_CONTEXT`` seconds
        or more before the end of the confirmed words (the segment's start if none)."""
        words = self._confirmed
        i = len(words) - 1
        while i > 0 and words[i].start > words[-1].end - RECHECK_CONTEXT:
            i -= 1
        if i <= 0:
            return self._seg_start
        return max(self._seg_start, (words[i - 1].end + words[i].start) / 2)

    def _partial_start(self, end: float) -> float:
        """Where a partial ending at ``end`` starts (see ``PARTIAL_SPAN``)."""
        return max(self._seg_start, min(self._resume_at(), end - PARTIAL_SPAN))

    def speech_started(self, t: float) -> None:
        """The VAD heard speech begin at ``t``."""
        if self.speaking:
            return
        self.speaking = True
        self.utterance += 1
        self._speech_start = t
        self._new_segment(t - PAD)
        self._last_partial_end = t  # the first partial waits for speech, not the pad

    def speech_ended(self, t: float) -> list[Request | Draft]:
        """The VAD heard speech end at ``t``; returns the final request, if any."""
        if not self.speaking:
            return []
        self.speaking = False
        end = t + PAD
        out: list[Request | Draft] = []
        if t - self._speech_start >= MIN_SPEECH or self._confirmed:
            out.append(self._request("final", end, speech_final=True, speech_end=t))
        self._floor = max(self._floor, end)
        self._partial_pending = False
        return out

    def advance(self, t: float) -> list[Request | Draft]:
        """Audio is available up to ``t``: partials due, or a split at the maximum length."""
        if not self.speaking:
            return []
        out: list[Request | Draft] = []
        if t - self._seg_start >= self.max_utterance:
            out.extend(self._split(t))
        # Until a partial has shown words, ask again at the short first interval.
        interval = self.partial_interval if self._shown else self.first_partial
        if not self._partial_pending and t - self._last_partial_end >= interval:
            self._partial_pending = True
            self._last_partial_end = t
            out.append(self._request("partial", t, speech_final=False))
        return out

    def _split(self, t: float) -> list[Request | Draft]:
        if self._confirmed:
            words = tuple(self._confirmed)
            after = tail_after(words, self._previous)
            boundary = words[-1].end
            if after:
                boundary = (boundary + max(boundary, after[0].start)) / 2
            draft = Draft(words, is_final=True, speech_final=False, request=None)
            self.emitted_words += len(words)
            self._floor = boundary
            self._new_segment(boundary)
            return [draft]
        request = self._request("final", t, speech_final=False)
        self._floor = t
        self._new_segment(t)
        return [request]

    def skipped(self, request: Request) -> None:
        """The scheduler dropped a partial request (finals are never skipped)."""
        if request.kind == "partial" and self._current(request):
            self._partial_pending = False

    def _current(self, request: Request) -> bool:
        return (
            self.speaking
            and request.utterance == self.utterance
            and request.segment == self.segment
        )

    def recognized(self, request: Request, words: Sequence[HypWord]) -> list[Draft]:
        """The words recognized for ``request``; returns what to publish."""
        if request.kind == "final":
            tail = tail_after(request.confirmed, words)
            final = (*request.confirmed, *tail)
            self.emitted_words += len(final)
            return [Draft(final, is_final=True, speech_final=request.speech_final, request=request)]
        if not self._current(request):
            return []  # the segment it belonged to was finalized meanwhile
        self._partial_pending = False
        tail = tail_after(self._confirmed, words)
        if request.end - self._seg_start < CONFIRM_CONTEXT:
            shown = (*self._confirmed, *tail)
            self._shown = self._shown or bool(shown)
            return [Draft(shown, False, False, request)] if shown else []
        agreed = agreement(self._previous, tail)
        while agreed and tail[agreed - 1].end > request.end - CONFIRM_MARGIN:
            agreed -= 1
        self._confirmed.extend(tail[:agreed])
        self._previous = tail[agreed:]
        shown = (*self._confirmed, *self._previous)
        if not shown:
            return []
        self._shown = True
        return [Draft(shown, is_final=False, speech_final=False, request=request)]

    @property
    def segment_start(self) -> float:
        """Where the open segment's audio begins; earlier audio is no longer needed."""
        return self._seg_start

    @property
    def confirmed(self) -> tuple[HypWord, ...]:
        return tuple(self._confirmed)
