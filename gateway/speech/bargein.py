"""Barge-in: is speech heard in the meeting a person talking over the bot?

The VAD runs on the meeting mix, and the bot's own voice comes back in that mix a
fraction of a second after the gateway sends it. So "speech started while the bot is
speaking" is not enough. The rule, using what the gateway knows exactly (what it sent
and when the bot plays it) and what the roster says:

1. A VAD speech start is the bot's own voice if it begins within ``echo_window``
   seconds after an *onset* of the bot's speech and the roster marks no other
   participant speaking. Onsets come from the same VAD run over the audio the gateway
   sends, placed at the time the bot plays them, so the two detectors agree on where
   speech starts. Echo can only start where the bot's voice starts; a person who starts
   talking while the bot's voice is steady is not explained by it.
2. Any other VAD speech start while the bot's audio is playing is a person: barge in.
3. A roster that marks a participant other than the bot (``isSelf`` or the configured
   bot name) speaking while the bot plays is a person too. Rosters trail the audio by up
   to a second or two, but they still work when the bot's echo keeps the VAD in speech
   the whole time, so a person's start never shows up as a VAD event.

All times are wall-clock epoch seconds, the session clock's time base.
"""

from __future__ import annotations

from collections import deque

#: Onsets older than this are forgotten.
_HISTORY = 10.0


class BargeIn:
    __slots__ = ("_echo_window", "_onsets", "humans_speaking")

    def __init__(self, echo_window: float = 1.0) -> None:
        self._echo_window = echo_window
        self._onsets: deque[float] = deque()
        #: Roster keys of participants other than the bot marked speaking now.
        self.humans_speaking: set[str] = set()

    def onset(self, at: float) -> None:
        """The bot's speech starts playing at ``at``; call in time order."""
        self._onsets.append(at)
        while self._onsets and self._onsets[0] < at - _HISTORY:
            self._onsets.popleft()

    def own_voice(self, speech_start: float) -> bool:
        """Whether a VAD speech start at ``speech_start`` is explained by the bot's voice."""
        if self.humans_speaking:
            return False
        return any(o - 0.05 <= speech_start <= o + self._echo_window for o in self._onsets)

    def roster_change(self, key: str, is_bot: bool, speaking: bool) -> bool:
        """Apply a roster change; ``True`` if a person just started speaking."""
        if is_bot:
            return False
        if speaking:
            started = key not in self.humans_speaking
            self.humans_speaking.add(key)
            return started
        self.humans_speaking.discard(key)
        return False
