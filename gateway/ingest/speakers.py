"""Who is speaking when: rosters diffed into per-speaker intervals on the session clock.

The bot sends the full roster on every change. :class:`SpeakerTimeline` compares each
roster with the last one and emits :class:`SpeakerChange` events for every speaker who
started or stopped speaking (or left while speaking). Intervals are kept in wall time
(the roster's own clock) and converted to session-clock positions through the
:class:`~gateway.ingest.clock.AudioClock`, so rosters that arrive before the first audio
sample are placed correctly once audio starts.

A roster timestamp is trusted when it is within ``max_skew`` seconds of the roster's
arrival or of the newest audio on the session clock; otherwise the bot's clock is off and
the arrival time is used. Audio sent faster than real time (a simulator at speed, a test)
runs ahead of the wall clock, and the rosters sent with it describe the meeting at that
audio, not at their arrival: they are placed where the audio is.

Only people who speak matter for attribution, so the timeline remembers those who have
spoken (and the bot), not everyone listed: a 10,000-person webinar roster costs one pass
per message and no memory. At most ``max_speakers`` are remembered; past that the one
silent the longest is forgotten with their intervals, and :attr:`forgotten` counts them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .clock import AudioClock
from .protocol import Roster, RosterEntry

#: Roster timestamps further than this from the arrival time are not trusted.
MAX_SKEW = 5.0
#: Speakers whose marks overlap a word within this many seconds of each other tie.
TIE = 0.001
#: Speakers remembered per session by default.
MAX_SPEAKERS = 1000


@dataclass(frozen=True, slots=True)
class Speaker:
    key: str
    """Stable identity within the meeting: ``"id:3"`` or, without an id, ``"name:Alice"``."""
    id: int | None
    name: str
    is_bot: bool


@dataclass(frozen=True, slots=True)
class SpeakerChange:
    sample: int
    """Session-clock position of the change (0 if it happened before any audio)."""
    time: float
    """Wall time of the change, epoch seconds."""
    speaker: Speaker
    speaking: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "time": round(self.time, 3),
            "speaker": self.speaker.name,
            "speaker_id": self.speaker.id,
            "speaker_key": self.speaker.key,
            "is_bot": self.speaker.is_bot,
            "speaking": self.speaking,
        }


def speaker_json(speaker: Speaker) -> dict[str, Any]:
    return {"key": speaker.key, "id": speaker.id, "name": speaker.name, "is_bot": speaker.is_bot}


def _end(interval: tuple[float, float]) -> float:
    return interval[1]


def _identity(entry: RosterEntry) -> str:
    return f"id:{entry.id}" if entry.id else f"name:{entry.name}"


class SpeakerTimeline:
    def __init__(
        self,
        clock: AudioClock,
        bot_name: str = "",
        max_skew: float = MAX_SKEW,
        max_speakers: int = MAX_SPEAKERS,
    ) -> None:
        self.clock = clock
        self._bot_name = bot_name.casefold()
        self._max_skew = max_skew
        self._max_speakers = max(1, max_speakers)
        # Least recently started speaking first, so the one to forget is at the front.
        self._speakers: OrderedDict[str, Speaker] = OrderedDict()
        #: Speakers forgotten to keep within ``max_speakers``.
        self.forgotten = 0
        #: Entries in the latest roster: the meeting's size as the bot last saw it.
        self.roster_size = 0
        self._first: dict[str, int] = {}  # key -> order of first appearance
        self._seen = 0
        # Resolved names of roster entries, speaking or not (a name resolves late, maybe
        # while its owner only listens); bounded, oldest first.
        self._names: dict[str, str] = {}
        self._speaking: dict[str, float] = {}  # key -> wall start of the open interval
        self._learnt: list[Speaker] = []  # new or renamed since take_learnt()
        self._intervals: dict[str, list[tuple[float, float]]] = {}

    @property
    def speakers(self) -> list[Speaker]:
        """Everyone remembered (who spoke, and the bot), in order of first appearance."""
        return sorted(self._speakers.values(), key=lambda s: self._first[s.key])

    def speaker(self, key: str) -> Speaker | None:
        return self._speakers.get(key)

    @property
    def names(self) -> list[str]:
        """The resolved names of everyone the rosters listed, listening or not, but the
        bot's; oldest first (bounded as the names kept are)."""
        bot = self.bot
        return [
            name
            for key, name in self._names.items()
            if (bot is None or key != bot.key) and name.casefold() != self._bot_name
        ]

    @property
    def speaking_now(self) -> list[Speaker]:
        """Who the roster marks speaking now."""
        return [self._speakers[k] for k in self._speaking if k in self._speakers]

    @property
    def bot(self) -> Speaker | None:
        return next((s for s in self._speakers.values() if s.is_bot), None)

    def _learn(self, entry: RosterEntry, key: str, is_bot: bool) -> Speaker:
        old = self._speakers.get(key)
        name = entry.name
        if name == "Unknown":  # names resolve late; never regress to the placeholder
            name = self._names.get(key, name)
        if old is not None:
            is_bot = is_bot or old.is_bot
            if old.name == name and old.is_bot == is_bot:
                return old
        speaker = Speaker(key, entry.id, name, is_bot)
        self._speakers[key] = speaker
        if len(self._learnt) < self._max_speakers:
            self._learnt.append(speaker)
        if old is None:
            self._seen += 1
            self._first[key] = self._seen
            if len(self._speakers) > self._max_speakers:
                self._forget(keep=key)
        return speaker

    def take_learnt(self) -> list[Speaker]:
        """Speakers new or renamed since the last call (what a journal keeps)."""
        learnt, self._learnt = self._learnt, []
        return learnt

    def restore(self, speakers: list[dict[str, Any]]) -> None:
        """Know ``speakers`` again (as :func:`speaker_json` wrote them, in order), none
        speaking: a session resumed by a new process."""
        for row in speakers:
            speaker = Speaker(str(row["key"]), row.get("id"), str(row["name"]), bool(row["is_bot"]))
            if speaker.key not in self._first:
                self._seen += 1
                self._first[speaker.key] = self._seen
            self._speakers[speaker.key] = speaker
            self._names[speaker.key] = speaker.name
        while len(self._speakers) > self._max_speakers:
            self._forget(keep="")

    def _forget(self, keep: str) -> None:
        """Forget the speaker silent the longest (never one speaking now, the bot, or ``keep``)."""
        for key in self._speakers:
            if key != keep and key not in self._speaking and not self._speakers[key].is_bot:
                del self._speakers[key]
                del self._first[key]
                self._intervals.pop(key, None)
                self.forgotten += 1
                return

    def _when(self, entry: RosterEntry | None, arrival: float, heard: float | None) -> float:
        """Wall time of ``entry``'s change: its timestamp if the bot's clock agrees with
        the arrival or with the audio, else the arrival, or the audio where it runs ahead
        of real time."""
        skew = self._max_skew
        ts = entry.timestamp if entry is not None else None
        if ts is not None and (
            abs(ts - arrival) <= skew or (heard is not None and abs(ts - heard) <= skew)
        ):
            return ts
        return heard if heard is not None and heard - arrival > skew else arrival

    def update(
        self, roster: Roster, arrival: float, heard: float | None = None
    ) -> list[SpeakerChange]:
        """Apply a full roster received at wall time ``arrival``; return what changed.

        ``heard`` is the session clock's wall time of the newest audio sample received
        (``None`` before audio): the meeting as the bot sent it when it sent this roster.
        """
        changes: list[SpeakerChange] = []
        present = set()
        self.roster_size = len(roster.entries)
        names = self._names
        for entry in roster.entries:
            key = _identity(entry)
            present.add(key)
            if entry.name != "Unknown" and names.get(key) != entry.name:
                names[key] = entry.name
                if len(names) > 4 * self._max_speakers + len(roster.entries):
                    del names[next(iter(names))]
            was = key in self._speaking
            is_bot = entry.is_self or (
                bool(self._bot_name) and entry.name.casefold() == self._bot_name
            )
            if not (entry.is_speaking or was or is_bot or key in self._speakers):
                continue  # a listener: nothing to remember
            speaker = self._learn(entry, key, is_bot)
            if entry.is_speaking and not was:
                self._speakers.move_to_end(key)
                changes.append(self._start(speaker, self._when(entry, arrival, heard)))
            elif was and not entry.is_speaking:
                changes.append(self._stop(speaker, self._when(entry, arrival, heard)))
        gone = [k for k in self._speaking if k not in present]
        left = self._when(None, arrival, heard)
        changes.extend(self._stop(self._speakers[key], left) for key in gone)
        return changes

    def _start(self, speaker: Speaker, when: float) -> SpeakerChange:
        self._speaking[speaker.key] = when
        return SpeakerChange(self.clock.at_wall(when), when, speaker, True)

    def _stop(self, speaker: Speaker, when: float) -> SpeakerChange:
        began = self._speaking.pop(speaker.key)
        done = self._intervals.setdefault(speaker.key, [])
        end = max(began, when)
        if done and began <= done[-1][1]:  # out-of-order timestamps: keep intervals disjoint
            began, end = min(began, done[-1][0]), max(end, done[-1][1])
            done.pop()
        done.append((began, end))
        return SpeakerChange(self.clock.at_wall(when), when, speaker, False)

    def close(self, when: float) -> list[SpeakerChange]:
        """End every open interval at ``when`` (the session is ending)."""
        return [self._stop(self._speakers[key], when) for key in list(self._speaking)]

    def intervals(self, key: str) -> list[tuple[float, float | None]]:
        """Wall-time intervals of one speaker; the open one ends in ``None``."""
        done: list[tuple[float, float | None]] = list(self._intervals.get(key, []))
        if key in self._speaking:
            done.append((self._speaking[key], None))
        return done

    def _overlap(self, key: str, t0: float, t1: float) -> tuple[float, float]:
        """Seconds ``key`` spoke within wall ``[t0, t1)``, and the latest such start.

        A speaker's intervals follow one another, so their ends are ordered: a binary
        search finds the first one that matters, and a long meeting costs no more per
        word than a short one.
        """
        overlap, latest = 0.0, float("-inf")
        done = self._intervals.get(key, [])
        for i in range(bisect_right(done, t0, key=_end), len(done)):
            a, b = done[i]
            if a >= t1:
                break
            o = min(t1, b) - max(t0, a)
            if o > 0:
                overlap += o
                latest = max(latest, a)
        a = self._speaking.get(key, t1)
        if a < t1:
            overlap += t1 - max(t0, a)
            latest = max(latest, a)
        return overlap, latest

    def attribute(
        self, start: int, end: int, lag: float = 0.0, prefer: Speaker | None = None
    ) -> Speaker | None:
        """The speaker whose speaking overlaps session-clock ``[start, end)`` the most.

        ``lag`` shifts the window later: rosters trail the audio by up to a second or
        two, so the roster's view of audio at ``t`` is the roster at ``t + lag``.
        Between speakers who overlap it as much, ``prefer`` (who said the word before,
        in the same breath) keeps it, else the one who started last: a backchannel's
        or an interruption's mark covers the words still said around it.
        Returns ``None`` when nobody was marked speaking then.
        """
        t0 = self.clock.wall(start)
        t1 = self.clock.wall(end)
        if t0 is None or t1 is None:
            return None
        t0, t1 = t0 + lag, max(t1, t0 + 1e-3) + lag
        best: tuple[float, float] | None = None
        best_key = None
        preferred = 0.0  # how much of the window ``prefer`` spoke
        for key in self._first:  # ties go to who appeared first, whatever spoke last
            overlap, latest = self._overlap(key, t0, t1)
            if overlap > 0 and (best is None or (overlap, latest) > best):
                best, best_key = (overlap, latest), key
            if prefer is not None and key == prefer.key:
                preferred = overlap
        if best is None or best_key is None:
            return None
        if preferred > 0 and preferred >= best[0] - TIE and prefer is not None:
            return self._speakers[prefer.key]
        return self._speakers[best_key]
