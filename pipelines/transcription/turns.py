"""How far the roster trails the voice, learnt from the meeting itself. Sans-I/O.

Meeting platforms mark a person speaking some time after their voice is heard, up to a
second or two, and some mark it a little early. Words are attributed to the roster as
it was that much later (:meth:`gateway.ingest.speakers.SpeakerTimeline.attribute`), so the lag
must be known, and it differs per platform and per meeting.

Evidence: a roster start (someone marked speaking) follows the start of a voice by the
lag. Voice starts are what the audio shows: the VAD's speech starts where people pause,
and, where they answer each other with no pause the VAD could hear (a real
conversation), the first word of a sentence or the word after a gap. Each roster start
is paired with every voice start within ``[-early, late]`` of it, and each pair votes
for its offset. Most pairs are coincidences spread over that range; the true lag is
the offset on which the votes of many turns agree. The estimate is the peak of the
recent votes' density, accepted once ``support`` votes lie within :data:`AGREE` of it
and more than near any other offset (in a conversation two coincidences agree by chance
within seconds; the replay benchmark, ``benchmarks/replay.py --lags``, showed a meeting
with a roster 0.5 s early attributed by a lag of 2.1 s for 11 s that way).

All times are wall seconds (epoch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np

from .sequences import SENTENCE_END

T = TypeVar("T")

#: Votes within this many seconds of the peak support it (word times are this good).
AGREE = 0.15
#: Resolution of the search for the peak, seconds.
STEP = 0.05
#: A word after a gap this long (or after a sentence end) may start a turn, seconds.
TURN_GAP = 0.15
#: A word is looked up in the roster as it was the measured lag later; one nobody was
#: marked speaking for then is looked up with no lag, then this much later, then twice.
ROSTER_LAG = 0.75
#: A final waits until the roster has had the measured lag, and this much more, to mark
#: who said its last word; with a late roster, publishing earlier would name the speaker
#: before the roster knew.
ROSTER_SLACK = 0.1


class RosterLag:
    def __init__(
        self,
        early: float = 1.0,
        late: float = 2.5,
        horizon: float = 90.0,
        votes: int = 240,
        support: int = 2,
    ) -> None:
        self.early = early
        self.late = late
        self.horizon = horizon
        self.support = support
        self._voices: deque[float] = deque()
        self._rosters: deque[float] = deque()
        self._votes: deque[float] = deque(maxlen=votes)
        self.seconds = 0.0
        """The estimate (negative: the roster is early); 0 until votes agree."""
        self.settled = False
        """Whether the estimate rests on agreeing votes (not the default)."""

    @property
    def observations(self) -> int:
        return len(self._votes)

    def voice_started(self, wall: float) -> None:
        """A voice started at ``wall``: a VAD speech start, or a word that starts a turn."""
        self._prune(self._voices, wall)
        if self._voices and abs(self._voices[-1] - wall) < AGREE / 3:
            return  # the VAD and the words saw the same start
        self._voices.append(wall)
        self._vote(r - wall for r in self._rosters)

    def roster_started(self, wall: float) -> None:
        """Somebody was marked speaking at ``wall``."""
        self._prune(self._rosters, wall)
        self._rosters.append(wall)
        self._vote(wall - v for v in self._voices)

    def _prune(self, times: deque[float], now: float) -> None:
        while times and times[0] < now - self.horizon:
            times.popleft()

    def _vote(self, offsets: Iterable[float]) -> None:
        votes = [o for o in offsets if -self.early <= o <= self.late]
        if votes:
            self._votes.extend(votes)
            self._estimate()

    def _estimate(self) -> None:
        votes = np.fromiter(self._votes, dtype=np.float64)
        grid = np.arange(-self.early, self.late + STEP / 2, STEP)
        density = np.exp(-(((votes[None, :] - grid[:, None]) / (AGREE / 2)) ** 2) / 2).sum(axis=1)
        peak = grid[int(np.argmax(density))]
        near = votes[np.abs(votes - peak) <= AGREE]
        # The best offset elsewhere: coincidences agree by chance too, a few at a time,
        # so a peak counts only once it has more votes than any other.
        away = np.abs(grid - peak) > 2 * AGREE
        rival = 0
        if away.any():
            other = grid[away][int(np.argmax(density[away]))]
            rival = int(np.count_nonzero(np.abs(votes - other) <= AGREE))
        if len(near) >= self.support and len(near) > rival:
            self.seconds = float(np.median(near))
            self.settled = True


class Turns:
    """What a session's transcripts tell of its turns, and how words meet the roster.

    The pipeline (and the replay benchmark) drive it: the VAD's speech starts and the
    roster's starts go to :attr:`lag`; every final's words go to :meth:`finalized`,
    whose turn-starting words are voice starts too. Sans-I/O: times in, seconds out.
    """

    def __init__(self) -> None:
        self.lag = RosterLag()
        self._last: tuple[str, float] | None = None  # text and end of the last final word

    def finalized(
        self, words: Iterable[tuple[str, float, float]], wall: Callable[[float], float | None]
    ) -> None:
        """A final's words as ``(text, start, end)`` on the session clock, in order;
        ``wall`` converts session seconds to wall time."""
        for text, start, end in words:
            last, self._last = self._last, (text, end)
            if last is None or last[0].endswith(SENTENCE_END) or start - last[1] >= TURN_GAP:
                when = wall(start)
                if when is not None:
                    self.lag.voice_started(when)

    def speaker(self, lookup: Callable[[float], T | None]) -> T | None:
        """Who said a word: ``lookup(lag)`` asks the roster as it was ``lag`` seconds
        after the word, at the measured lag, then no lag, then later, until one answers."""
        for lag in dict.fromkeys((self.lag.seconds, 0.0, ROSTER_LAG, 2 * ROSTER_LAG)):
            found = lookup(lag)
            if found is not None:
                return found
        return None

    def hold(self, last_word_end: float | None, now: float) -> float:
        """Seconds a final whose last word ended at wall ``last_word_end`` waits for
        the roster to have marked who said it."""
        if last_word_end is None or self.lag.seconds <= 0:
            return 0.0
        return last_word_end + self.lag.seconds + ROSTER_SLACK - now
