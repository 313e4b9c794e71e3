"""How far the roster trails the voice, learnt from the meeting itself. Sans-I/O.

Meeting platforms mark a person speaking some time after their voice is heard, up to a
second or two, and some mark it a little early. Words are attributed to the roster as
it was that much later (:meth:`gateway.ingest.speakers.SpeakerTimeline.attribute`), so the lag
must be known, and it differs per platform and per meeting.

Evidence: a roster start (someone marked speaking) follows the start of a voice by the
lag, and a roster end its end. Voice edges are what the audio shows: the VAD's speech
starts and ends where people pause, and, where they answer each other with no pause the
VAD could hear (a real conversation), the words on either side of a sentence end or a
gap. Each roster edge is paired with every voice edge of its kind within
``[-early, late]`` of it, and each pair votes for its offset. Most pairs are
coincidences spread over that range; the true lag is the offset on which the votes of
many turns agree. The estimate is the peak of the recent votes' density, accepted once
``support`` votes lie within :data:`AGREE` of it and no other offset has nearly as many
(:data:`DOMINANCE`).

Only a third to a half of a conversation's turns show a voice edge where the roster
has one (Whisper leaves a turn change unpunctuated; overlaps hide a start), and in the
first minute coincidences can outvote them: two stray pairs used to set a 0.5 s early
roster to 2.1 s late for a third of a meeting. Ends double the evidence, and an
estimate waits until its peak dominates.

All times are wall seconds (epoch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

#: Votes within this many seconds of the peak support it: Whisper's word times, and
#: where a platform puts a turn's edge, spread the true votes over about this much.
AGREE = 0.25
#: The peak must have this many times the votes' density of any other offset to be
#: believed: with a few turns heard, coincidences make peaks as tall as the true one.
#: Until one does, the last estimate stands.
DOMINANCE = 1.5
#: Resolution of the search for the peak, seconds.
STEP = 0.05


class RosterLag:
    def __init__(
        self,
        early: float = 1.0,
        late: float = 2.5,
        horizon: float = 90.0,
        votes: int = 240,
        support: int = 3,
    ) -> None:
        self.early = early
        self.late = late
        self.horizon = horizon
        self.support = support
        # Voice and roster edges by kind: starts pair with starts, ends with ends.
        self._voices: dict[str, deque[float]] = {"start": deque(), "end": deque()}
        self._rosters: dict[str, deque[float]] = {"start": deque(), "end": deque()}
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
        self._voice("start", wall)

    def voice_ended(self, wall: float) -> None:
        """A voice ended at ``wall``: a VAD speech end, or a word that ends a sentence."""
        self._voice("end", wall)

    def roster_started(self, wall: float) -> None:
        """Somebody was marked speaking at ``wall``."""
        self._roster("start", wall)

    def roster_ended(self, wall: float) -> None:
        """Somebody was marked no longer speaking at ``wall``."""
        self._roster("end", wall)

    def _voice(self, kind: str, wall: float) -> None:
        voices = self._voices[kind]
        self._prune(voices, wall)
        if voices and abs(voices[-1] - wall) < AGREE / 3:
            return  # the VAD and the words saw the same edge
        voices.append(wall)
        self._vote(r - wall for r in self._rosters[kind])

    def _roster(self, kind: str, wall: float) -> None:
        rosters = self._rosters[kind]
        self._prune(rosters, wall)
        rosters.append(wall)
        self._vote(wall - v for v in self._voices[kind])

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
        best = int(np.argmax(density))
        peak = grid[best]
        near = votes[np.abs(votes - peak) <= AGREE]
        rivals = density[np.abs(grid - peak) > 2 * AGREE]
        rival = float(rivals.max()) if rivals.size else 0.0
        if len(near) >= self.support and density[best] >= DOMINANCE * rival:
            self.seconds = float(np.median(near))
            self.settled = True
