"""The session core without an event loop, sockets or files: made-up times, a recording
sink, and Hypothesis driving connections, audio and rosters in any order."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.audio.vad import SpeechEnded, SpeechStarted
from gateway.config import Settings
from gateway.core import SessionCore
from gateway.ingest.protocol import Roster, RosterEntry
from gateway.ingest.speakers import SpeakerChange
from gateway.metrics import Metrics
from gateway.pipeline import Disconnected, Gap
from gateway.storage import journal

RATE = 16000
T0 = 1_800_000_000.0


class Recorder:
    """A sink that keeps everything the core decides."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.records: list[str] = []
        self.pokes = 0
        self.ticks: list[float] = []

    def post(self, events: Sequence[Any], *, roster: bool) -> None:
        self.events.extend(events)

    def poke(self) -> None:
        self.pokes += 1

    def tick(self, now: float) -> None:
        self.ticks.append(now)

    def persist(self, kind: str, fields: dict[str, Any]) -> None:
        self.records.append(json.dumps({"t": kind, **fields}))


def make_core() -> tuple[SessionCore, Recorder]:
    sink = Recorder()
    core = SessionCore(
        Settings(), Metrics(CollectorRegistry()), sink, logging.getLogger("test.core")
    )
    return core, sink


def entry(name: str, id: int, speaking: bool) -> RosterEntry:
    return RosterEntry(name, id, None, speaking, None, False)


def voice(n: int, seed: int) -> np.ndarray:
    """Loud noise (voiced for webrtcvad) or silence, by seed."""
    if seed % 3 == 0:
        return np.zeros(n, dtype=np.int16)
    return np.random.default_rng(seed).integers(-12000, 12000, n, dtype=np.int16)


# One step of a meeting: audio for some milliseconds, or the bot leaving for a while.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("audio"), st.integers(1, 400), st.integers(0, 1000)),
        st.tuples(st.just("away"), st.integers(50, 5000), st.integers(0, 0)),
        st.tuples(st.just("roster"), st.integers(1, 3), st.booleans()),
    ),
    min_size=1,
    max_size=60,
)


def play(core: SessionCore, script: list[tuple[str, int, Any]]) -> tuple[float, int, int]:
    """Run ``script`` in real time on a made-up clock; returns the time it ended, the
    samples received and the milliseconds the bot was away after audio had started."""
    core.start(RATE)
    core.attached(replacing=False)
    now, received, away = T0, 0, 0
    for kind, n, arg in script:
        if kind == "audio":
            samples = voice(RATE * n // 1000, arg)
            now += n / 1000
            core.receive_audio(samples, now)
            received += len(samples)
        elif kind == "away":
            core.detached(now)
            now += n / 1000
            away += n if received else 0
            core.attached(replacing=False)
        else:
            core.roster(Roster((entry(f"P{n}", n, bool(arg)),)), now)
    return now, received, away


@settings(max_examples=60, deadline=None)
@given(script=steps)
def test_the_clock_counts_every_sample_and_every_absence(
    script: list[tuple[str, int, Any]],
) -> None:
    core, sink = make_core()
    _, received, _ = play(core, script)
    assert core.ring is not None
    gap_samples = sum(round(g.seconds * RATE) for g in core.gaps)
    assert core.ring.written == received + gap_samples
    assert core.totals.samples + core._unflushed.samples == received
    # Gaps are where the bot was away, each after the audio before it.
    gaps = [e for e in sink.events if isinstance(e, Gap)]
    assert [(g.sample, g.length) for g in gaps] == [
        (r.sample, round(r.seconds * RATE)) for r in core.gaps
    ]


@settings(max_examples=60, deadline=None)
@given(script=steps)
def test_events_come_in_clock_order_and_speech_alternates(
    script: list[tuple[str, int, Any]],
) -> None:
    core, sink = make_core()
    play(core, script)
    core.end(T0 + 10_000)
    timed = [e for e in sink.events if not isinstance(e, SpeakerChange)]
    assert [e.sample for e in timed] == sorted(e.sample for e in timed)
    speech = [type(e) for e in sink.events if isinstance(e, SpeechStarted | SpeechEnded)]
    assert speech[::2] == [SpeechStarted] * len(speech[::2])
    assert speech[1::2] == [SpeechEnded] * len(speech[1::2])
    # Every drop of the socket is announced, after what was heard before it.
    assert sum(isinstance(e, Disconnected) for e in sink.events) == sum(
        kind == "away" for kind, _, _ in script
    )


@settings(max_examples=40, deadline=None)
@given(script=steps, later=st.integers(0, 120_000))
def test_what_is_persisted_resumes_the_same_clock(
    script: list[tuple[str, int, Any]], later: int
) -> None:
    """A core rebuilt from its journal records alone (another process) puts audio
    arriving ``later`` ms after the bot left exactly where the original core would."""
    core, sink = make_core()
    now, _, _ = play(core, script)
    core.detached(now)
    state = journal.fold("k", Path("."), sink.records)
    assert core.ring is not None
    assert state.samples == core.ring.written
    assert state.origin == core.clock.origin
    assert [g["sample"] for g in state.gaps] == [g.sample for g in core.gaps]
    again, _ = make_core()
    again.start(RATE, state.samples)
    gaps = [journal_gap(g) for g in state.gaps]
    again.resume(state.origin, gaps, state.last_seen)
    back = now + later / 1000
    chunk = voice(160, 1)
    core.attached(replacing=False)
    again.attached(replacing=False)
    core.receive_audio(chunk, back)
    again.receive_audio(chunk, back)
    assert again.ring is not None
    assert again.ring.written == core.ring.written
    assert [g.sample for g in again.gaps] == [g.sample for g in core.gaps]


def journal_gap(g: dict[str, Any]) -> Any:
    from gateway.reports import GapRecord

    return GapRecord(g["sample"], g["seconds"], g["wall_start"], g["wall_end"])


def test_a_reconnect_at_another_rate_is_resampled_a_first_connection_is_not() -> None:
    core, _ = make_core()
    core.start(RATE)
    core.attached(replacing=False)
    assert not core.connection_rate(24000)  # the first connection set the rate
    core.receive_audio(voice(1600, 1), T0 + 0.1)
    core.detached(T0 + 0.1)
    core.attached(replacing=False)
    assert core.connection_rate(24000)
    core.receive_audio(voice(2400, 2), T0 + 1.1)  # 100 ms at 24 kHz, 1 s later
    core.detached(T0 + 1.1)  # flushes the filter's tail
    assert core.ring is not None
    [gap] = core.gaps
    resumed_at = gap.sample + round(gap.seconds * RATE)
    assert core.ring.written - resumed_at == 1600  # 100 ms at the session's 16 kHz


def test_a_speaker_still_speaking_ends_with_the_audio_not_at_the_end_call() -> None:
    core, sink = make_core()
    core.start(RATE)
    core.attached(replacing=False)
    core.roster(Roster((entry("Alice", 1, True),)), T0)
    core.receive_audio(voice(RATE * 5, 3), T0 + 5)
    core.end(T0 + 95)  # finalized 90 s after the bot went away
    [stop] = [e for e in sink.events if isinstance(e, SpeakerChange) and not e.speaking]
    assert stop.time == T0 + 5
    assert stop.sample == RATE * 5


def test_sessions_that_start_together_tick_apart() -> None:
    """The once-a-second work (counters, the ingest lag, the position record, the shell's
    periodic writes) falls where each session's phase puts it in the second, so meetings
    whose audio started in the same instant do not all do it in one loop iteration."""
    cores = []
    for phase in (0.0, 0.25, 0.5, 0.75):
        sink = Recorder()
        core = SessionCore(
            Settings(), Metrics(CollectorRegistry()), sink, logging.getLogger("test"), phase
        )
        core.start(RATE)
        core.attached(replacing=False)
        cores.append((core, sink))
    frame = RATE // 100
    for i in range(1, 501):  # 5 s of 10 ms frames, every session's at the same moment
        for core, _ in cores:
            core.receive_audio(np.zeros(frame, dtype=np.int16), T0 + i / 100)
    for phase, (_, sink) in zip((0.0, 0.25, 0.5, 0.75), cores, strict=True):
        # Once a second, at the first 100 ms block that reaches the session's phase.
        offsets = [round(t - T0, 2) for t in sink.ticks]
        blocks = [max(0.1, math.ceil(10 * (phase + k)) / 10) for k in range(6)]
        blocks = [b for b in blocks if b <= 5.0]  # the audio ends at 5 s
        assert offsets == [round(b, 2) for b in blocks], offsets
    assert len({sink.ticks[1] for _, sink in cores}) == 4


def test_the_pipelines_notes_are_folded_back_from_the_journal() -> None:
    notes = [("language", "en"), ("roster_lag", "1.0"), ("roster_lag", "1.1"), ("language", None)]
    lines = [json.dumps({"t": "annotation", "name": n, "value": v}) for n, v in notes]
    assert journal.fold("k", Path("."), lines).annotations == {"roster_lag": "1.1"}
