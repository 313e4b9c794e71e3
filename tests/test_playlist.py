"""Playback decisions with made-up times: no event loop, no sockets, no tolerance.

The playlist is driven as the player drives it (next, due, sent, finish) with monotonic
and epoch times chosen by the test, so pacing, barge-in and own-voice onsets are checked
to the sample."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.audio.vad import SpeechEnded, SpeechStarted
from gateway.config import Settings
from gateway.ingest.speakers import Speaker, SpeakerChange
from gateway.metrics import Metrics
from gateway.speech.playlist import MAX_QUEUED, PlaybackFull, Playlist

RATE = 16000
FRAME = RATE // 50  # 20 ms
EPOCH = 1_800_000_000.0  # wall = mono + EPOCH
ORIGIN = EPOCH + 100.0  # the session clock's sample 0, in wall time


async def _nothing() -> AsyncIterator[np.ndarray]:
    yield np.zeros(0, dtype=np.int16)


class Harness:
    def __init__(self, **settings: Any) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.speaking: list[tuple[bool, float]] = []
        self.events: list[dict[str, Any]] = []
        self.playlist = Playlist(
            RATE,
            Settings(**settings),
            self.metrics,
            lambda sample: ORIGIN + sample / RATE,
            lambda on, wall: self.speaking.append((on, wall)),
            logging.getLogger("test.playlist"),
        )
        self.playlist.listeners.append(self.events.append)

    def enqueue(self, mono: float, kind: str = "say") -> str:
        return self.playlist.enqueue(_nothing(), kind, None, mono, mono + EPOCH).id

    def play(self, frames: list[np.ndarray], start: float) -> float:
        """Send ``frames`` of the next utterance, each exactly when due, from ``start``;
        returns the monotonic time after the last one."""
        utt = self.playlist.next()
        assert utt is not None
        now = start
        for frame in frames:
            due = self.playlist.due(utt, now)
            now = max(now, due)
            self.playlist.sent(utt, self.playlist.shape(frame), due, now, now + EPOCH)
        return now

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def loud(n_frames: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(-12000, 12000, FRAME, dtype=np.int16) for _ in range(n_frames)]


def quiet(n_frames: int) -> list[np.ndarray]:
    return [np.zeros(FRAME, dtype=np.int16) for _ in range(n_frames)]


def meeting_sample(wall: float) -> int:
    return round((wall - ORIGIN) * RATE)


def test_frames_are_due_by_sample_count_a_lead_ahead() -> None:
    h = Harness(playback_lead_ms=100)
    h.enqueue(0.0)
    utt = h.playlist.next()
    assert utt is not None
    dues = []
    now = 10.0
    for frame in quiet(20):
        due = h.playlist.due(utt, now)
        dues.append(due)
        h.playlist.sent(utt, frame, due, max(now, due), max(now, due) + EPOCH)
        now = max(now, due)
    # The first 100 ms go at once, then one frame every 20 ms: never drifting.
    assert dues[:6] == [10.0] * 6
    assert dues[6:] == pytest.approx([10.0 + (k * FRAME / RATE) - 0.1 for k in range(6, 20)])
    assert h.count("gateway_speech_underruns_total") == 0
    # A frame that comes after the bot played everything is an underrun.
    late = h.playlist.pacer.playout_end + 0.5
    h.playlist.due(utt, late)
    assert h.count("gateway_speech_underruns_total") == 1


def test_the_bots_own_echo_does_not_barge_in_a_person_does() -> None:
    h = Harness(barge_in="stop")
    h.enqueue(0.0)
    h.enqueue(0.0)
    start = 10.0
    h.play(quiet(10) + loud(60), start)
    # The bot's voice starts 200 ms into what it plays; its echo reaches the meeting's
    # VAD a little later: explained by the onset, no barge-in.
    onset_wall = start + EPOCH + 0.2
    echo = SpeechStarted(meeting_sample(onset_wall + 0.25))
    h.playlist.observe([echo], start + 0.5, start + 0.5 + EPOCH)
    assert h.count("gateway_speech_barge_ins_total", policy="stop") == 0
    assert h.playlist.current is not None and h.playlist.current.end_reason is None
    # Speech starting 1 s into the bot's steady voice is a person: stop, cancel the queue.
    person = SpeechStarted(meeting_sample(onset_wall + 1.0))
    h.playlist.observe([person], start + 1.3, start + 1.3 + EPOCH)
    assert h.playlist.current.end_reason == "barge_in"
    assert [e["type"] for e in h.events] == ["queued", "queued", "started", "cancelled"]
    assert h.count("gateway_speech_barge_ins_total", policy="stop") == 1


def test_a_roster_person_barges_in_the_bot_itself_does_not() -> None:
    h = Harness(barge_in="stop")
    h.enqueue(0.0)
    h.play(loud(10), 10.0)
    bot = Speaker("id:9", 9, "Notetaker", True)
    alice = Speaker("id:1", 1, "Alice", False)
    h.playlist.observe([SpeakerChange(0, EPOCH + 10.1, bot, True)], 10.1, EPOCH + 10.1)
    assert h.playlist.current is not None and h.playlist.current.end_reason is None
    h.playlist.observe([SpeakerChange(0, EPOCH + 10.15, alice, True)], 10.15, EPOCH + 10.15)
    assert h.playlist.current.end_reason == "barge_in"
    assert h.playlist.current.stop_requested == EPOCH + 10.15


def test_ducking_lowers_what_is_sent_until_the_person_stops() -> None:
    h = Harness(barge_in="duck")
    h.enqueue(0.0)
    frames = loud(40)
    h.play(frames[:20], 10.0)
    person = SpeechStarted(meeting_sample(EPOCH + 12.0))
    h.playlist.observe([person], 10.2, EPOCH + 10.2)
    assert h.playlist.gain == 0.25
    assert np.array_equal(h.playlist.shape(frames[0]), (frames[0] * 0.25).astype(np.int16))
    h.playlist.observe([SpeechEnded(person.sample + 8000, person.sample)], 10.3, EPOCH + 10.3)
    assert h.playlist.gain == 1.0
    assert h.playlist.current is not None and h.playlist.current.end_reason is None


def test_nothing_barges_in_when_nothing_is_audible() -> None:
    h = Harness(barge_in="stop")
    h.enqueue(0.0)
    end = h.play(loud(5), 10.0)
    h.playlist.observe([SpeechStarted(meeting_sample(EPOCH + end + 5))], end + 5, EPOCH + end + 5)
    assert h.count("gateway_speech_barge_ins_total", policy="stop") == 1  # still playing
    h2 = Harness(barge_in="stop")
    h2.playlist.observe([SpeechStarted(0)], 1.0, EPOCH + 1.0)  # silent bot
    assert h2.count("gateway_speech_barge_ins_total", policy="stop") == 0


def test_the_queue_is_bounded_and_a_refusal_counted() -> None:
    h = Harness()
    for _ in range(MAX_QUEUED):
        h.enqueue(0.0)
    with pytest.raises(PlaybackFull):
        h.enqueue(0.0)
    assert h.count("gateway_speech_utterances_total", outcome="refused") == 1


def test_finish_says_until_when_the_bot_plays_and_tells_the_timeline() -> None:
    h = Harness(playback_lead_ms=100)
    h.enqueue(0.0)
    end = h.play(quiet(50), 10.0)  # 1 s sent, the last 100 ms still queued at the bot
    utt = h.playlist.current
    assert utt is not None
    h.playlist.finish(utt, "finished", None, end, end + EPOCH)
    done = h.events[-1]
    assert done["type"] == "finished" and done["samples"] == 50 * FRAME
    assert done["played_until"] == pytest.approx(EPOCH + 11.0)
    assert h.speaking == [(True, EPOCH + 10.0), (False, pytest.approx(EPOCH + 11.0))]
