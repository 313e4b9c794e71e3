"""Real-time pacing of audio sent to the bot, as a schedule with no I/O.

The bot plays what it receives at real time from a queue it cannot flush, so the only
control the gateway keeps over sent audio is not to send it yet. The schedule is kept
by sample count against one monotonic anchor, as aiortc does: sample ``n`` of a stream
may leave at ``t0 + n / rate - lead``. Sleeping a fixed 20 ms per frame instead would
add every wake-up delay to the clock and drift by seconds over an hour; here a late
wake-up is made up by the next frame and the long-run rate is exact.

A *stream* is audio the bot plays back to back. It starts when the bot has nothing
left to play (``t0`` is re-anchored at "now"), and continues across utterances as long
as the next one is ready before the bot's queue runs dry. ``lead`` is how much sits in
the bot's queue at most: enough to cover its 80 ms start buffer and network jitter,
little enough that a barge-in leaves only that much playing.
"""

from __future__ import annotations


class Pacer:
    """Send times for one session's outbound audio; all times are monotonic seconds.

    The caller asks :meth:`due` when the next frame may leave, sends it at or after that
    time, and reports it with :meth:`sent`. Before a new stream or after a pause (no
    audio to send) it calls :meth:`resume`, which says whether the bot ran dry.
    """

    __slots__ = ("_lead", "_t0", "position", "rate")

    def __init__(self, rate: int, lead: float) -> None:
        self.rate = rate
        self._lead = lead
        self._t0: float | None = None
        #: Samples sent in the current stream.
        self.position = 0

    @property
    def active(self) -> bool:
        return self._t0 is not None

    def resume(self, now: float) -> bool:
        """Continue the stream at ``now`` if the bot still has audio queued.

        Returns ``True`` when a stream was running and the bot has already played all
        of it (it has been playing silence: an underrun if this is mid-utterance). Then,
        as when no stream was running, a new stream is anchored at ``now``.
        """
        if self._t0 is not None and now < self.playout_end:
            return False
        ran_dry = self._t0 is not None and self.position > 0
        self._t0, self.position = now, 0
        return ran_dry

    def due(self) -> float:
        """Earliest monotonic time the next frame may be sent."""
        if self._t0 is None:
            raise RuntimeError("resume() the pacer before asking when to send")
        return max(self._t0, self._t0 + self.position / self.rate - self._lead)

    def sent(self, samples: int) -> None:
        self.position += samples

    def playout_time(self, position: int) -> float:
        """When the bot plays sample ``position`` of the stream (monotonic seconds)."""
        if self._t0 is None:
            raise RuntimeError("no stream is running")
        return self._t0 + position / self.rate

    @property
    def playout_end(self) -> float:
        """When the bot will have played everything sent so far."""
        return self.playout_time(self.position)

    def queued(self, now: float) -> float:
        """Seconds of sent audio the bot has not played yet at ``now``."""
        return 0.0 if self._t0 is None else max(0.0, self.playout_end - now)

    def stop(self) -> None:
        """Forget the stream (the socket is gone; the bot's queue went with it)."""
        self._t0, self.position = None, 0
