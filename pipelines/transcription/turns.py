"""How far the roster trails the voice, learnt from the meeting itself. Sans-I/O.

Meeting platforms mark a person speaking some time after their voice is heard, up to a
second or two, and some mark it a little early. Words are attributed to the roster as
it was that much later (:meth:`gateway.ingest.speakers.SpeakerTimeline.attribute`), so the lag
must be known, and it differs per platform and per meeting.

Evidence: a roster start (someone marked speaking) follows the start of a voice by the
lag. Voice starts are what the audio shows: the VAD's speech starts where people pause,
and, where they answer each other with no pause the VAD could hear (a real
conversation), the first word of a sentence. A word after a pause inside a sentence is
not one: on the replay of three conversations 13 of 82 such words started a turn,
against 34 of 46 sentence starts without a pause and every VAD speech start.

Each roster start is paired with the voice starts within ``[-early, late]`` of it; most
pairs are coincidences spread over that range, and the true lag is the offset on which
the pairs of many turns agree. How the agreement is counted matters early in a meeting.
Counting every pair within 0.15 s of the densest offset (how this worked before) was
fooled by a few exact coincidences: each roster start pairs with two or three sentence
starts, and those agree more tightly than true pairs, whose word times are 0.1-0.3 s
off. Live runs of the conversation benchmark settled on +2.1 s with the roster on time,
and on 1.3 s with it 2 s late (turns that overlap the last one pair with a voice start
the words show only once the other voice stops), for 4-20 s at a time; those runs
attributed 92.9 and 94.1 % of the words (97-99 % otherwise). :class:`RosterLag` counts
roster starts instead: one vote per roster start for each offset at which it lands
within :data:`AGREE` of a voice start, so a roster start that pairs with several
sentence starts cannot carry an offset alone, and the width matches how far word times
are off.

Onsets weigh more. A roster start after the roster marked nobody for :data:`QUIET` that
lands on a VAD speech start after as much silence counts :data:`ONSET_WEIGHT` votes:
both sides saw the same silence end, which a sentence start inside a turn cannot
imitate (the VAD's start where a stream starts or resumes in the middle of a voice, or
at a keystroke it takes for speech, comes after less). Without it, a meeting joined in
the middle of quick turns (the benchmark's four-person meeting started 85 % of the way
in) settled on -0.3 s with the roster 2 s late, on two sentence starts and on a VAD
start whose own roster start had not come yet, and kept it for 20 s (73-78 % of words
on the right speaker; 98 % with it).

A restart starts from the lag the session's previous process had learnt
(:meth:`RosterLag.resume`): the bot comes back to a new process, which hears no roster
until the next change, and learning the lag again from scratch put 8 of 52 words of a
dialogue with its roster a second late on the wrong speaker after a restart.

All times are wall seconds (epoch).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .words import ends_sentence

T = TypeVar("T")

#: A roster start shifted this close to a voice start lands on it, seconds: Whisper's
#: word times are about this good (a turn's first word is 0.1-0.3 s off, either way).
AGREE = 0.2
#: Two voice starts this close are one (the VAD and the words saw the same start), and
#: so are two roster starts (two people marked speaking at once).
SAME_START = 0.05
#: Resolution of the search for the peak, seconds.
STEP = 0.05
#: A roster start after nobody was marked speaking for this long, or a VAD speech start
#: after this much silence, is an onset, seconds.
QUIET = 0.3
#: Votes of an onset that lands on a VAD speech start.
ONSET_WEIGHT = 2
#: Where audio resumes after a gap (the bot was away), a voice seems to start from
#: silence: the bot came back mid-speech. Voice starts within this much of it say
#: nothing of when anyone started speaking, seconds.
RESUMED = 0.5
#: Words with a gap this long between them were not said in the same breath, seconds.
TURN_GAP = 0.15
#: A word is looked up in the roster as it was the measured lag later; one nobody was
#: marked speaking for then is looked up with no lag, then this much later, then twice.
ROSTER_LAG = 0.75
#: A final waits until the roster has had the measured lag, and this much more, to mark
#: who said its last word; with a late roster, publishing earlier would name the speaker
#: before the roster knew.
ROSTER_SLACK = 0.1


class RosterLag:
    """The roster's lag behind the voice, counted in roster starts.

    At each candidate offset (every :data:`STEP` in ``[-early, late]``), a roster start
    shifted back by it either lands within :data:`AGREE` of a voice start or not. The
    estimate is the offset where the most land, accepted once ``support`` do and more
    than at any offset further than ``2 * AGREE`` away, and read as the median of the
    offsets of the roster starts that land there. Evidence older than ``horizon`` is
    forgotten, so the estimate follows a platform whose delay changes.
    """

    def __init__(
        self,
        early: float = 1.0,
        late: float = 2.5,
        horizon: float = 90.0,
        support: int = 2,
        limit: int = 512,
    ) -> None:
        self.early = early
        self.late = late
        self.horizon = horizon
        self.support = support
        self._grid = np.arange(-early, late + STEP / 2, STEP)
        self._voices: deque[tuple[float, bool]] = deque(maxlen=limit)
        self._rosters: deque[tuple[float, bool]] = deque(maxlen=limit)
        self._speaking: set[str] = set()
        self._quiet_since = float("-inf")
        self.seconds = 0.0
        """The estimate (negative: the roster is early); 0 until it settles."""
        self.settled = False
        """Whether the estimate rests on the meeting's evidence (not the default)."""

    def resume(self, seconds: float) -> None:
        """Start from the estimate the session's previous process reached (a restart):
        words are looked up at it until this process's evidence settles its own. Who
        was marked speaking before is not known here, so the first roster start is no
        onset: only one after somebody stops is."""
        if math.isfinite(seconds):
            self.seconds = min(max(seconds, -self.early), self.late)
        self._quiet_since = float("inf")

    def voice_started(self, wall: float, quiet: float = 0.0) -> None:
        """A voice started at ``wall``: a VAD speech start (after ``quiet`` seconds of
        silence), or a word that starts a turn."""
        silence = quiet >= QUIET
        _prune(self._voices, wall - self.horizon)
        for i, (v, after) in enumerate(self._voices):
            if abs(v - wall) < SAME_START:  # the VAD and the words saw the same start
                self._voices[i] = (v, after or silence)
                return
        self._voices.append((wall, silence))
        self._estimate()

    def roster_started(self, wall: float, key: str | None = None) -> None:
        """Somebody (``key``) was marked speaking at ``wall``."""
        onset = key is not None and not self._speaking and wall - self._quiet_since >= QUIET
        if key is not None:
            self._speaking.add(key)
        _prune(self._rosters, wall - self.horizon)
        if self._rosters and abs(self._rosters[-1][0] - wall) < SAME_START:
            return  # two people marked at once: one start, the same voices near it
        self._rosters.append((wall, onset))
        self._estimate()

    def roster_stopped(self, wall: float, key: str) -> None:
        """``key`` is no longer marked speaking at ``wall``."""
        self._speaking.discard(key)
        if not self._speaking:
            self._quiet_since = wall

    def roster_changed(self, wall: float, key: str, speaking: bool) -> None:
        """The roster marked ``key`` speaking or not at ``wall``."""
        if speaking:
            self.roster_started(wall, key)
        else:
            self.roster_stopped(wall, key)

    def _estimate(self) -> None:
        if not self._rosters or not self._voices:
            return
        rosters = np.array([r for r, _ in self._rosters], dtype=np.float64)
        onsets = np.array([o for _, o in self._rosters], dtype=bool)
        pairs = sorted(self._voices)
        voices = np.array([v for v, _ in pairs], dtype=np.float64)
        silent = np.array([s for _, s in pairs], dtype=bool)
        # Where each roster start lands at each offset (rosters x offsets), and the
        # voice start nearest to there.
        land = rosters[:, None] - self._grid[None, :]
        near = _nearest(voices, land)
        nearest = voices[near]
        hit = np.abs(land - nearest) <= AGREE
        strong = onsets[:, None] & silent[near]
        count = np.where(hit, np.where(strong, ONSET_WEIGHT, 1), 0).sum(axis=0)
        best = int(np.argmax(count))
        away = np.abs(self._grid - self._grid[best]) > 2 * AGREE
        rival = int(count[away].max()) if away.any() else 0
        if count[best] >= self.support and count[best] > rival:
            hits = hit[:, best]
            self.seconds = float(np.median(rosters[hits] - nearest[hits, best]))
            self.settled = True


def _nearest(times: npt.NDArray[np.float64], at: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """The index of the element of sorted, non-empty ``times`` nearest to each of ``at``."""
    i = np.searchsorted(times, at)
    before, after = np.clip(i - 1, 0, len(times) - 1), np.clip(i, 0, len(times) - 1)
    return np.where(np.abs(at - times[before]) <= np.abs(times[after] - at), before, after)


def _prune(times: deque[tuple[float, bool]], before: float) -> None:
    while times and times[0][0] < before:
        times.popleft()


class Turns:
    """What a session's transcripts tell of its turns, and how words meet the roster.

    The pipeline (and the replay benchmark) drive it: the VAD's speech starts and the
    roster's starts and stops go to :attr:`lag`; every final's words go to
    :meth:`finalized`, whose sentence starts are voice starts too; :meth:`speakers`
    names who said each published word. Sans-I/O: times in, seconds out.
    """

    def __init__(self) -> None:
        self.lag = RosterLag()
        self._last: tuple[str, float] | None = None  # text and end of the last final word
        self._said: tuple[Any, str, float] | None = None  # its speaker, text and end
        self._resumed = float("-inf")  # where audio last resumed after a gap, session s

    def resumed(self, at: float) -> None:
        """Audio resumes at ``at`` (session seconds) after a gap: the bot was away."""
        self._resumed = at

    def voice_started(self, at: float, wall: float | None, quiet: float = 0.0) -> None:
        """The VAD heard speech start at ``at`` (session seconds; ``wall`` time) after
        ``quiet`` seconds of silence: a voice start, unless audio just resumed there."""
        if wall is not None and not -0.1 <= at - self._resumed <= RESUMED:
            self.lag.voice_started(wall, quiet)

    def finalized(
        self, words: Iterable[tuple[str, float, float]], wall: Callable[[float], float | None]
    ) -> None:
        """A final's words as ``(text, start, end)`` on the session clock, in order;
        ``wall`` converts session seconds to wall time."""
        for text, start, end in words:
            last, self._last = self._last, (text, end)
            if last is None or ends_sentence(last[0]):
                self.voice_started(start, wall(start))

    def speakers(
        self,
        words: Iterable[tuple[str, float, float]],
        lookup: Callable[[float, float, float, T | None], T | None],
        *,
        final: bool,
    ) -> list[T | None]:
        """Who said each of ``words`` (``(text, start, end)``, in order).

        ``lookup(start, end, lag, prefer)`` asks the roster as it was ``lag`` seconds
        after the word: at the measured lag, then no lag, then later, until one answers.
        A word said in the same breath as the one before it (no sentence end between
        them, no gap of ``TURN_GAP``) is looked up preferring that word's speaker, who
        keeps it where the roster marks both: the words said under a backchannel, or
        the last ones before an interruption, are still the speaker's. The chain runs
        on from the last final word; only a final moves it.
        """
        previous, out = self._said, []
        for text, start, end in words:
            prefer = None
            if (
                previous is not None
                and not ends_sentence(previous[1])
                and -TURN_GAP < start - previous[2] < TURN_GAP
            ):
                prefer = previous[0]  # said in the same breath
            who = None
            for lag in dict.fromkeys((self.lag.seconds, 0.0, ROSTER_LAG, 2 * ROSTER_LAG)):
                who = lookup(start, end, lag, prefer)
                if who is not None:
                    break
            out.append(who)
            previous = (who, text, end)
        if final:
            self._said = previous
        return out

    def named(
        self,
        word: tuple[str, float, float],
        lookup: Callable[[float, float, float, T | None], T | None],
    ) -> bool:
        """Whether :meth:`hold` may take ``word`` as named by the roster: once the lag is
        learnt always, before that if :meth:`speakers` finds who said it now."""
        return self.lag.settled or self.speakers([word], lookup, final=False)[0] is not None

    def hold(
        self,
        last_word_end: float | None,
        now: float,
        queued: float | None = None,
        heard: float | None = None,
        named: bool = True,
    ) -> float:
        """Seconds a final whose last word ended at wall ``last_word_end`` waits for
        the roster to have marked who said it.

        The roster comes in the same stream as the audio: once the audio the lag past the
        word is in (``heard``, the session clock's wall time of the newest audio), so is
        any roster that marks it. In real time that is when the wall clock gets there.
        The clock puts a word where a bot sending in real time would have sent it; audio
        sent faster (a sped-up simulation, a recording played in) gets there sooner, and
        its finals wait no longer than that. Without newer audio (a bot gone quiet), a
        final waits the lag from when it was queued (``queued``, all its audio in) at
        most: it once waited for the wall clock to catch up with the audio instead, 14 s
        for words 28 s into a meeting played at 2x, half an hour at the end of an hour.

        Before the lag is learnt, a final whose last word the roster names nobody for
        (``named`` False: the first words of a meeting, with the roster late) waits as
        far as words are looked up, ``2 * ROSTER_LAG``: published at once, they went
        out with no speaker."""
        lag = self.lag.seconds
        if not named and not self.lag.settled:
            lag = max(lag, 2 * ROSTER_LAG)
        if last_word_end is None or lag <= 0:
            return 0.0
        due = last_word_end + lag + ROSTER_SLACK
        if heard is not None and heard >= due:
            return 0.0
        if queued is not None:
            due = min(due, queued + lag + ROSTER_SLACK)
        return due - now
