"""The last guard before a final goes out: what is already final is never sent again.

Sans-I/O and shared by the pipeline and the replay benchmark, so both publish exactly
the same words. The streaming policy decides which words become final; this keeps the
published finals from repeating or overlapping each other where re-heard audio, splits
and progressive finals meet.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from typing import Protocol, TypeVar

#: A final starting with this many or more of the last final words, on audio those
#: already covered, repeats them; fewer may be a person repeating themselves.
REPEAT_GUARD = 3
#: The most words a repeat of the previous finals is looked for over.
REPEAT_SPAN = 8


class TimedWord(Protocol):
    @property
    def word(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...


W = TypeVar("W", bound=TimedWord)


#: Word times of re-heard audio drift by up to about this much: a repeat starting this
#: soon after the last final's end is the same audio heard again.
DRIFT = 1.0


def reheard(said: Sequence[str], words: Sequence[TimedWord], covered_until: float) -> int:
    """How many of a final's leading ``words`` repeat the last words already final
    (``said``, normalized) on audio those already covered: re-heard audio joined to
    confirmed words a second time. At least :data:`REPEAT_GUARD` words must repeat, and
    the first must start before ``covered_until`` (the last final's end) plus
    :data:`DRIFT`; a person repeating a phrase later does so on new audio and is kept.
    (One saying three or more words twice without a pause loses the second time: live
    captions with a stutter dropped read better than ones that double what was said.)"""
    if not words or words[0].start >= covered_until + DRIFT:
        return 0
    said = list(said)
    for k in range(min(len(words), len(said)), REPEAT_GUARD - 1, -1):
        if [w.word for w in words[:k]] == said[-k:]:
            return k
    return 0


def once(words: Sequence[W]) -> list[W]:
    """``words`` without a phrase of :data:`REPEAT_GUARD` to :data:`REPEAT_SPAN` words
    said again right after itself: Whisper sometimes hears a phrase twice in one window
    ("I don't hear that New Jersey now. I don't hear that New Jersey now.")."""
    kept: list[W] = []
    i = 0
    while i < len(words):
        for n in range(min(REPEAT_SPAN, len(kept), len(words) - i), REPEAT_GUARD - 1, -1):
            if [w.word for w in words[i : i + n]] == [w.word for w in kept[-n:]]:
                i += n
                break
        else:
            kept.append(words[i])
            i += 1
    return kept


class FinalWords:
    """The words of one session already sent as finals (the newest ones), and where the
    last of them ended. :meth:`admit` turns a final's words into what may be sent."""

    def __init__(self) -> None:
        self.said: deque[str] = deque(maxlen=REPEAT_SPAN)
        self.end = 0.0

    def admit(self, words: Sequence[W]) -> tuple[W, ...]:
        """``words`` without a re-heard repeat of the last finals or a phrase doubled
        within them, with times clamped so that finals never overlap (each word starts
        where the one before ended)."""
        out = []
        floor = self.end
        for w in once(words[reheard(self.said, words, self.end) :]):
            start = max(w.start, floor)
            end = max(w.end, start)
            if (start, end) != (w.start, w.end):
                w = dataclasses.replace(w, start=start, end=end)  # type: ignore[type-var]
            out.append(w)
            floor = end
        self.end = floor
        self.said.extend(w.word for w in out)
        return tuple(out)
