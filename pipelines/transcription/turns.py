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
recent votes' density, accepted once ``support`` votes lie within :data:`AGREE` of it.

All times are wall seconds (epoch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

#: Votes within this many seconds of the peak support it (word times are this good).
AGREE = 0.15
#: Resolution of the search for the peak, seconds.
STEP = 0.05


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
        if len(near) >= self.support:
            self.seconds = float(np.median(near))
            self.settled = True
