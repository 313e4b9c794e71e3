"""Speech out of a session: what pipelines and the control endpoint queue for the meeting,
and where it goes. A mixin of :class:`gateway.session.Session` (the session's speech
half; the player itself is :mod:`gateway.speech.playback`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..ingest.speakers import Speaker, SpeakerChange
from .playback import Player
from .voice import resample, tts

if TYPE_CHECKING:
    from ..config import Settings
    from ..ingest.clock import AudioClock
    from ..ingest.runner import PipelineRunner
    from ..ingest.speakers import SpeakerTimeline
    from ..reports import ConnectionRecord

Samples = npt.NDArray[np.int16]


class SpeechOut:
    """Requires the session's ``player``, ``sample_rate``, ``input``, ``output``,
    ``connections``, ``settings``, ``speakers``, ``clock`` and ``runners``."""

    player: Player | None

    @property
    def sample_rate(self) -> int:
        raise NotImplementedError

    input: Any
    output: Any
    connections: list[ConnectionRecord]
    settings: Settings
    speakers: SpeakerTimeline
    clock: AudioClock
    runners: list[PipelineRunner]

    def speak(self, samples: Samples, rate: int) -> str:
        """Queue int16 mono ``samples`` at ``rate`` for the meeting; returns the utterance id.

        Raises :class:`~gateway.speech.playback.PlaybackFull` when too much is queued and
        ``RuntimeError`` before the session has a rate (pipelines never see that).
        """
        return self._player().enqueue(resample(samples, rate, self.sample_rate), "pipeline")

    def say(self, text: str, kind: str = "say") -> str:
        """Queue ``text`` as speech (synthesized sentence by sentence while it plays)."""
        return self._player().enqueue(tts(text, self.sample_rate), kind, text)

    def _player(self) -> Player:
        if self.player is None:
            raise RuntimeError("the session has no sample rate yet")
        return self.player

    def playback_target(self) -> Any:
        """Where speech goes: the separate input socket once the bot opened one, else the
        output (dual) socket. A bot with a separate input never plays the output socket.
        """
        if self.input is not None or any(c.role == "input" for c in self.connections):
            return self.input
        return self.output

    def connection_changed(self) -> None:
        """An output or input socket attached or detached: the player may go on."""
        if self.player is not None:
            self.player.connection_changed()

    def _bot_speaking(self, speaking: bool, wall: float) -> None:
        # The timeline only knows what rosters say; the gateway knows exactly when the bot
        # plays what it sent, so pipelines hear it as a bot speaker change.
        name = self.settings.bot_name or "bot"
        bot = self.speakers.bot or Speaker("gateway:voice", None, name, True)
        event = SpeakerChange(self.clock.at_wall(wall), wall, bot, speaking)
        for runner in self.runners:
            runner.post(event.sample, event)
