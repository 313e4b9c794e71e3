"""Rosters diffed into speaker events and intervals on the session clock."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingest.clock import AudioClock
from gateway.ingest.protocol import Roster, RosterEntry
from gateway.ingest.speakers import SpeakerTimeline

T0 = 1_795_479_000.0
RATE = 16000


def entry(
    name: str, id_: int | None, speaking: bool, ts: float | None = None, **kw: bool
) -> RosterEntry:
    return RosterEntry(name, id_, ts, speaking, None, kw.get("is_self", False))


def timeline(bot_name: str = "") -> SpeakerTimeline:
    clock = AudioClock(RATE)
    clock.start(T0, 0)
    return SpeakerTimeline(clock, bot_name)


def test_start_stop_and_leave() -> None:
    tl = timeline()
    a = tl.update(Roster((entry("Alice", 1, True, T0 + 1),)), T0 + 1.2)
    assert [(c.speaker.name, c.speaking, c.sample) for c in a] == [("Alice", True, RATE)]
    b = tl.update(
        Roster((entry("Alice", 1, False, T0 + 3), entry("Bob", 2, True, T0 + 3))), T0 + 3.1
    )
    assert [(c.speaker.name, c.speaking) for c in b] == [("Alice", False), ("Bob", True)]
    c = tl.update(Roster(()), T0 + 5)  # Bob left while speaking
    assert [(c_.speaker.name, c_.speaking, c_.sample) for c_ in c] == [("Bob", False, 5 * RATE)]
    assert tl.intervals("id:1") == [(T0 + 1, T0 + 3)]


def test_unchanged_roster_emits_nothing() -> None:
    tl = timeline()
    r = Roster((entry("Alice", 1, True, T0),))
    tl.update(r, T0)
    assert tl.update(r, T0 + 1) == []


def test_skewed_clock_falls_back_to_arrival() -> None:
    tl = timeline()
    (c,) = tl.update(Roster((entry("Alice", 1, True, T0 - 3600),)), T0 + 2)
    assert c.time == T0 + 2


def test_a_skewed_clock_agreeing_with_neither_arrival_nor_audio_is_not_trusted() -> None:
    tl = timeline()
    (c,) = tl.update(Roster((entry("Alice", 1, True, T0 - 3600),)), T0 + 2, heard=T0 + 2)
    assert c.time == T0 + 2


def test_rosters_sent_with_audio_faster_than_real_time_are_placed_with_it() -> None:
    # 30 s of meeting sent in the first 10 s of wall time: the newest audio is at T0 + 30
    # on the session clock, and the rosters sent with it describe the meeting there.
    tl = timeline()
    (a,) = tl.update(Roster((entry("Alice", 1, True, T0 + 29.5),)), T0 + 10, heard=T0 + 30)
    assert (a.time, a.sample) == (T0 + 29.5, int(29.5 * RATE))
    # Without a timestamp, and for someone who left, the newest audio is the best guess.
    b, c = tl.update(
        Roster((entry("Alice", 1, False), entry("Bob", 2, True))), T0 + 11, heard=T0 + 33
    )
    assert [(x.speaker.name, x.speaking, x.time) for x in (b, c)] == [
        ("Alice", False, T0 + 33),
        ("Bob", True, T0 + 33),
    ]
    (d,) = tl.update(Roster(()), T0 + 12, heard=T0 + 36)
    assert (d.speaker.name, d.speaking, d.sample) == ("Bob", False, 36 * RATE)
    assert tl.intervals("id:1") == [(T0 + 29.5, T0 + 33)]
    assert tl.attribute(30 * RATE, 32 * RATE).name == "Alice"  # type: ignore[union-attr]
    assert tl.attribute(34 * RATE, 35 * RATE).name == "Bob"  # type: ignore[union-attr]
    # At real time the audio agrees with the arrival, and the arrival is used as before.
    (e,) = tl.update(Roster((entry("Carol", 3, True),)), T0 + 40.2, heard=T0 + 40)
    assert e.time == T0 + 40.2


def test_name_resolves_late_and_never_regresses() -> None:
    tl = timeline()
    tl.update(Roster((entry("Unknown", 4, False),)), T0)
    tl.update(Roster((entry("Dana", 4, False),)), T0 + 1)
    tl.update(Roster((entry("Unknown", 4, True),)), T0 + 2)
    (speaker,) = tl.speakers
    assert speaker.name == "Dana"


def test_bot_by_is_self_or_name() -> None:
    tl = timeline(bot_name="Notetaker")
    tl.update(
        Roster(
            (
                entry("Me", 1, False, is_self=True),
                entry("notetaker", 2, False),
                entry("Eve", 3, False),
            )
        ),
        T0,
    )
    # Eve only listens: she is not remembered until she speaks.
    assert [(s.name, s.is_bot) for s in tl.speakers] == [("Me", True), ("notetaker", True)]
    tl.update(Roster((entry("Eve", 3, True),)), T0 + 1)
    assert [s.is_bot for s in tl.speakers] == [True, True, False]


def test_attribution_by_overlap_not_first_match() -> None:
    tl = timeline()
    tl.update(Roster((entry("Alice", 1, True, T0),)), T0)
    tl.update(Roster((entry("Alice", 1, True, T0), entry("Bob", 2, True, T0 + 1.8))), T0 + 1.8)
    tl.update(Roster((entry("Alice", 1, False, T0 + 2), entry("Bob", 2, True))), T0 + 2)
    tl.update(Roster((entry("Alice", 1, False), entry("Bob", 2, False, T0 + 6))), T0 + 6)
    # 1.5..4.0 s: Alice 0.5 s, Bob 2.2 s.
    speaker = tl.attribute(int(1.5 * RATE), 4 * RATE)
    assert speaker is not None
    assert speaker.name == "Bob"
    first = tl.attribute(0, RATE)
    assert first is not None
    assert first.name == "Alice"
    assert tl.attribute(7 * RATE, 8 * RATE) is None


def test_lag_shifts_the_window() -> None:
    tl = timeline()
    tl.update(Roster((entry("Alice", 1, True, T0 + 1.5),)), T0 + 1.5)
    tl.update(Roster((entry("Alice", 1, False, T0 + 4),)), T0 + 4)
    assert tl.attribute(0, RATE) is None
    speaker = tl.attribute(0, RATE, lag=1.5)
    assert speaker is not None
    assert speaker.name == "Alice"


def test_rosters_before_audio_are_placed_once_audio_starts() -> None:
    clock = AudioClock(RATE)
    tl = SpeakerTimeline(clock)
    (c,) = tl.update(Roster((entry("Alice", 1, True, T0 + 10),)), T0 + 10)
    assert c.sample == 0  # no audio yet
    clock.start(T0 + 11, RATE)  # first second of audio arrived at T0 + 11
    speaker = tl.attribute(0, RATE)
    assert speaker is not None
    assert speaker.name == "Alice"
    assert clock.at_wall(T0 + 12) == 2 * RATE
    assert clock.wall(RATE) == pytest.approx(T0 + 11)


def brute_force(tl: SpeakerTimeline, t0: float, t1: float) -> str | None:
    """The attribution rule written out over every interval, as the reference."""
    best, best_key = None, None
    for s in tl.speakers:
        overlap, latest = 0.0, float("-inf")
        for a, b in tl.intervals(s.key):
            o = min(t1, t1 if b is None else b) - max(t0, a)
            if o > 0:
                overlap, latest = overlap + o, max(latest, a)
        if overlap > 0 and (best is None or (overlap, latest) > best):
            best, best_key = (overlap, latest), s.key
    return best_key


@settings(max_examples=200, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.integers(1, 3), st.booleans(), st.floats(-0.5, 3.0)), max_size=40
    ),
    queries=st.lists(st.tuples(st.floats(0, 60), st.floats(0.01, 3.0)), min_size=1),
)
def test_attribution_matches_the_rule_over_long_timelines(
    changes: list[tuple[int, bool, float]], queries: list[tuple[float, float]]
) -> None:
    tl = timeline()
    now = T0
    speaking: dict[int, bool] = {}
    for who, on, step in changes:
        now += max(step, 0.0)
        speaking[who] = on
        # Timestamps a little out of order at times, as rosters can be.
        ts = now + min(step, 0.0)
        roster = tuple(entry(f"P{k}", k, v, ts) for k, v in speaking.items())
        tl.update(Roster(roster), now)
    for s in tl.speakers:  # what the binary search relies on
        closed = [(x, y) for x, y in tl.intervals(s.key) if y is not None]
        assert all(x[1] < y[0] for x, y in itertools.pairwise(closed))
    for start, length in queries:
        a, b = round(start * RATE), round((start + length) * RATE)
        got = tl.attribute(a, b)
        assert (got.key if got else None) == brute_force(tl, T0 + a / RATE, T0 + b / RATE)


def test_a_word_under_a_backchannel_stays_with_who_said_the_word_before() -> None:
    tl = timeline()
    tl.update(Roster((entry("Alice", 1, True, T0),)), T0)
    tl.update(Roster((entry("Alice", 1, True), entry("Bob", 2, True, T0 + 2))), T0 + 2)
    tl.update(Roster((entry("Alice", 1, True), entry("Bob", 2, False, T0 + 2.5))), T0 + 2.5)
    tl.update(Roster((entry("Alice", 1, False, T0 + 5), entry("Bob", 2, False))), T0 + 5)
    alice = tl.attribute(0, RATE)
    assert alice is not None and alice.name == "Alice"
    # Bob's "mm-hmm" mark covers the word as much as Alice's: the later start takes it
    # unless the word goes on from Alice's.
    word = (int(2.1 * RATE), int(2.4 * RATE))
    bob = tl.attribute(*word)
    assert bob is not None and bob.name == "Bob"
    assert tl.attribute(*word, prefer=alice) == alice
    assert tl.attribute(*word, prefer=bob) == bob
    # Where the preferred speaker covers less of the word, or none of it, it does not.
    assert tl.attribute(int(2.3 * RATE), int(2.7 * RATE), prefer=bob) == alice
    assert tl.attribute(int(6 * RATE), int(7 * RATE), prefer=alice) is None
