"""The conversation test set (benchmarks/conversations.py) is what it says it is.

Recipes are deterministic, turn times match the audio, the dialogue's turn-taking has
the promised gaps and overlaps, the monologue no long pause, the roster script marks
the right speaker, and Whisper recognizes the speech. Conversations are built once per
run into a temporary cache (a few seconds each, piper on up to two cores).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webrtcvad

from benchmarks.conversations import (
    RECIPES,
    Conversation,
    Turn,
    build,
    floats,
    frame_db,
    recipe,
    recipe_hash,
    recognize,
    windows,
)
from benchmarks.noise import NOISES, mix, speech_rms
from gateway.simulator import stamped
from pipelines.transcription.scoring import wer
from tests.conftest import LIBRIVOX

Build = Callable[[str], Conversation]

#: Digital silence between turns; anything voiced is far above this.
SILENT_DBFS = -60.0
#: Energy silence for pause lengths: the clips' voiced threshold is about -53 dBFS.
PAUSE_DBFS = -50.0


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (LIBRIVOX / "transcription").exists():
        pytest.fail(f"{LIBRIVOX} is missing: install Debian's pocketsphinx-testdata")
    return tmp_path_factory.mktemp("conversations")


@pytest.fixture(scope="session")
def built(cache: Path) -> Build:
    """Build a recipe once per test run; later calls come from the cache."""
    seen: dict[str, Conversation] = {}

    def get(name: str) -> Conversation:
        if name not in seen:
            began = time.perf_counter()
            seen[name] = build(name, cache)
            took = time.perf_counter() - began
            print(f"built {name}: {seen[name].duration:.1f} s of audio in {took:.2f} s")
        return seen[name]

    return get


def rms_db(samples: np.ndarray[Any, Any]) -> float:
    x = samples.astype(np.float64) / 32768
    return 20 * math.log10(max(1e-6, float(np.sqrt((x**2).mean())) if len(x) else 0.0))


def span(c: Conversation, a: float, b: float) -> np.ndarray[Any, Any]:
    return c.samples[max(0, round(a * c.rate)) : max(0, round(b * c.rate))]


def covered(c: Conversation) -> list[tuple[float, float]]:
    """The union of the turns' intervals."""
    out: list[tuple[float, float]] = []
    for t in sorted(c.turns, key=lambda t: t.start):
        if out and t.start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], t.end))
        else:
            out.append((t.start, t.end))
    return out


def gaps(c: Conversation) -> list[float]:
    """Silences between turns, from the turn times."""
    return [b[0] - a[1] for a, b in itertools.pairwise(covered(c))]


def longest_quiet(c: Conversation, below: float = PAUSE_DBFS) -> float:
    """Longest run of 10 ms frames below ``below`` dBFS between first and last voice."""
    db = frame_db(floats(c.samples), c.rate)
    loud = np.flatnonzero(db >= below)
    quiet = np.concatenate([[0], (db[loud[0] : loud[-1]] < below).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(quiet))
    runs = edges[1::2] - edges[::2]
    return 0.01 * int(runs.max(initial=0))


def longest_vad_pause(c: Conversation) -> float:
    """Longest run of non-speech 30 ms frames (webrtcvad, mode 2) between speech."""
    vad = webrtcvad.Vad(2)
    pcm = c.at_rate(16000).astype("<i2").tobytes()
    n = 2 * 480
    speech = [vad.is_speech(pcm[i : i + n], 16000) for i in range(0, len(pcm) - n + 1, n)]
    voiced = [i for i, s in enumerate(speech) if s]
    best = run = 0
    for s in speech[voiced[0] : voiced[-1]]:
        run = 0 if s else run + 1
        best = max(best, run)
    return 0.03 * best


def overlaps(c: Conversation, at_least: float = 0.0) -> list[tuple[Turn, Turn, float]]:
    """Pairs of turns by different speakers that sound together, and for how long."""
    out = []
    for i, a in enumerate(c.turns):
        for b in c.turns[i + 1 :]:
            both = min(a.end, b.end) - max(a.start, b.start)
            if a.speaker != b.speaker and both > at_least:
                out.append((a, b, both))
    return out


def speaking_at(script: list[dict[str, Any]], t: float) -> set[str]:
    current: list[dict[str, Any]] = []
    for event in script:
        if event["at"] <= t:
            current = event["roster"]
    return {e["name"] for e in current if e["isSpeaking"]}


# -- recipes are deterministic ------------------------------------------------------


def test_recipe_hashes_are_stable_and_distinct() -> None:
    hashes = {name: recipe_hash(name) for name in RECIPES}
    assert {name: recipe_hash(name) for name in RECIPES} == hashes
    assert len(set(hashes.values())) == len(RECIPES)
    assert recipe_hash("dialogue", 16000) != hashes["dialogue"]
    assert recipe("meeting") == recipe("meeting")
    with pytest.raises(ValueError, match="unknown conversation"):
        recipe("podcast")


def test_read_builds_identically_twice(tmp_path: Path, built: Build) -> None:
    first = built("read")
    again = build("read", tmp_path)
    assert again.digest == first.digest
    assert again.turns == first.turns
    assert again.recipe == first.recipe == recipe_hash("read")
    cached = build("read", tmp_path)  # from the cache now
    assert cached.digest == first.digest and cached.turns == first.turns


@pytest.mark.tts
def test_dialogue_builds_identically_twice(tmp_path: Path, built: Build) -> None:
    first = built("dialogue")
    began = time.perf_counter()
    again = build("dialogue", tmp_path)
    print(f"dialogue rebuilt in {time.perf_counter() - began:.2f} s")
    assert again.digest == first.digest
    assert again.turns == first.turns
    assert list(tmp_path.glob("dialogue-*.wav")) and list(tmp_path.glob("dialogue-*.json"))


# -- turn timings match the audio ---------------------------------------------------


def check_timings(c: Conversation) -> None:
    assert c.samples.dtype == np.int16 and c.samples.ndim == 1
    assert np.count_nonzero(np.abs(c.samples.astype(np.int32)) >= 32767) < 10  # no clipping
    for t in c.turns:
        assert 0 < t.start < t.end <= c.duration
        assert rms_db(span(c, t.start, t.end)) > -30, t
        # Trimmed tight: voice right at both edges.
        assert rms_db(span(c, t.start, t.start + 0.01)) > SILENT_DBFS, t
        assert rms_db(span(c, t.end - 0.01, t.end)) > SILENT_DBFS, t
        assert t.words and all(w == w.lower() and w.strip(".,?!") == w for w in t.words)
    # Gaps that are gaps are silent, lead-in and tail included.
    edges = [0.0, *[x for iv in covered(c) for x in iv], c.duration]
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if b - a >= 0.01:
            assert rms_db(span(c, a, b)) < SILENT_DBFS, (a, b)
    # Speakers are comparably loud: median turn levels within 6 dB.
    levels = {
        who: float(
            np.median([rms_db(span(c, t.start, t.end)) for t in c.turns if t.speaker == who])
        )
        for who, _ in c.speakers
    }
    assert max(levels.values()) - min(levels.values()) < 6, levels


def test_read_timings_match_the_audio(built: Build) -> None:
    c = built("read")
    check_timings(c)
    assert [s for s, _ in c.speakers] == ["Morgan"]
    assert len(c.turns) == 5
    pauses = [b.start - a.end for a, b in itertools.pairwise(c.turns)]
    assert pauses == pytest.approx([0.8] * 4, abs=0.001)
    assert c.text()[:4] == ["and", "mister", "john", "dashwood"]


@pytest.mark.tts
@pytest.mark.parametrize("name", ["dialogue", "monologue", "meeting", "standup"])
def test_timings_match_the_audio(built: Build, name: str) -> None:
    check_timings(built(name))


# -- turn-taking shape --------------------------------------------------------------


@pytest.mark.tts
def test_dialogue_gaps_overlaps_and_backchannels(built: Build) -> None:
    c = built("dialogue")
    assert 50 <= c.duration <= 75
    assert [s for s, _ in c.speakers] == ["Joe", "Sarah"]
    kinds = {t.voice.split(":")[0] for t in c.turns}
    assert kinds == {"piper", "espeak"}
    assert max(gaps(c)) <= 0.2 + 1e-6, gaps(c)
    # Overlaps where the next speaker starts early (0.3-1.0 s), not only backchannels.
    taken = [
        (a, b, both) for a, b, both in overlaps(c, 0.25) if len(a.words) > 2 and len(b.words) > 2
    ]
    assert len(taken) >= 2, taken
    assert all(0.3 - 0.011 <= both <= 1.0 + 0.011 for _, _, both in taken)
    # Short backchannels inside the other speaker's turn, and just after one.
    short = [t for t in c.turns if len(t.words) <= 2]
    inside = [t for t in short if any(o.start < t.start and t.end < o.end for o in c.turns)]
    assert len(inside) >= 2 and len(short) > len(inside)
    # On the audio itself: no pause longer than 300 ms anywhere in the talk.
    assert longest_quiet(c) <= 0.3
    assert longest_vad_pause(c) <= 0.3


@pytest.mark.tts
def test_monologue_has_no_long_pause(built: Build) -> None:
    c = built("monologue")
    assert 35 <= c.duration <= 45
    assert len(c.speakers) == 1
    assert min(gaps(c)) >= 0.05 - 1e-6 and max(gaps(c)) <= 0.25 + 1e-6, gaps(c)
    quiet, vad = longest_quiet(c), longest_vad_pause(c)
    print(f"monologue: longest quiet {quiet:.2f} s, longest VAD pause {vad:.2f} s")
    assert quiet <= 0.3
    assert vad <= 0.3


@pytest.mark.tts
def test_meeting_mixes_voices(built: Build) -> None:
    c = built("meeting")
    assert 60 <= c.duration <= 90
    assert len(c.speakers) >= 3
    voices = {t.voice for t in c.turns}
    assert {v.split(":")[0] for v in voices} == {"piper", "espeak", "librivox"}
    assert len([v for v in voices if v.startswith("espeak:")]) >= 2
    assert max(gaps(c)) <= 0.2 + 1e-6
    assert len(overlaps(c, 0.25)) >= 3
    assert longest_quiet(c) <= 0.3


@pytest.mark.tts
def test_standup_has_four_voices_answering_each_other(built: Build) -> None:
    c = built("standup")
    assert 90 <= c.duration <= 130
    assert [s for s, _ in c.speakers] == ["Joe", "Priya", "Tom", "Lena"]
    voices = {t.voice for t in c.turns}
    assert len([v for v in voices if v.startswith("espeak:")]) == 3
    # Back to back (0-200 ms) but for five hand-off pauses of 1.0-1.8 s, where the next
    # person unmutes: the conversation's endpoints in mid-meeting.
    pauses = [g for g in gaps(c) if g > 0.2 + 1e-6]
    assert len(pauses) == 5 and all(1.0 - 1e-6 <= g <= 1.8 + 1e-6 for g in pauses), gaps(c)
    assert 1.0 <= longest_quiet(c) <= 1.8
    assert len(overlaps(c, 0.25)) >= 5
    assert len(c.text()) >= 350
    # Between the pauses, webrtcvad hears no pause over 300 ms.
    stretches = [list(covered(c)[0])]
    for a, b in covered(c)[1:]:
        if a - stretches[-1][1] > 0.2 + 1e-6:
            stretches.append([a, b])
        stretches[-1][1] = b
    assert len(stretches) == 6
    for a, b in stretches:
        assert longest_vad_pause(Conversation(c.name, c.rate, span(c, a, b), ())) <= 0.3, (a, b)


# -- speakers and rosters -----------------------------------------------------------


def _toy() -> Conversation:
    """Alice talks, Bob cuts in 0.5 s before she ends, Alice says "yeah" inside his turn."""
    turns = (
        Turn("Alice", 1, "So here is the plan.", 1.0, 3.0, ("so", "here", "is", "the", "plan")),
        Turn("Bob", 2, "Sounds right to me.", 2.5, 5.0, ("sounds", "right", "to", "me")),
        Turn("Alice", 1, "Yeah.", 3.5, 3.9, ("yeah",)),
        Turn("Carol", 3, "Okay.", 5.1, 5.6, ("okay",)),
    )
    return Conversation("toy", 16000, np.zeros(16000 * 6, np.int16), turns)


def test_speaker_at_prefers_the_later_start() -> None:
    c = _toy()
    assert c.speaker_at(0.5) is None
    assert c.speaker_at(2.0) == "Alice"
    assert c.speaker_at(2.7) == "Bob"  # both talk; Bob started later
    assert c.speaker_at(3.7) == "Alice"  # the backchannel inside Bob's turn
    assert c.speaker_at(4.5) == "Bob"
    assert c.speaker_at(5.05) is None
    assert c.text() == [
        *["so", "here", "is", "the", "plan"],
        "sounds",
        "right",
        "to",
        "me",
        "yeah",
        "okay",
    ]
    assert c.speakers == (("Alice", 1), ("Bob", 2), ("Carol", 3))


@pytest.mark.parametrize("lag", [0.0, 1.0, -0.3])
def test_roster_script_lists_everyone_and_marks_speakers(lag: float) -> None:
    c = _toy()
    script = c.roster_script(lag)
    assert script[0]["at"] == 0.0
    assert [e["at"] for e in script] == sorted(e["at"] for e in script)
    for event in script:
        assert [(e["name"], e["id"]) for e in event["roster"]] == list(c.speakers)
        sent = stamped(event["roster"], 1_795_479_000.25)  # what the simulator sends
        assert all(e["timestamp"] == 1_795_479_000_250 and "isSpeaking" in e for e in sent)
    # Sent on change only.
    states = [speaking_at(script, e["at"]) for e in script]
    assert all(a != b for a, b in itertools.pairwise(states))
    assert speaking_at(script, 2.7 + lag) == {"Alice", "Bob"}
    assert speaking_at(script, 3.7 + lag) == {"Alice", "Bob"}
    assert speaking_at(script, 4.5 + lag) == {"Bob"}
    assert speaking_at(script, 5.05 + lag) == set()


def check_roster(c: Conversation, lag: float) -> None:
    script = c.roster_script(lag)
    for t in c.turns:
        mid = (t.start + t.end) / 2
        marked = speaking_at(script, mid + lag)
        assert t.speaker in marked, (t, marked)
        alone = not any(o is not t and o.start <= mid < o.end for o in c.turns)
        if alone:
            assert marked == {t.speaker}, (t, marked)


def test_roster_script_of_read_speech(built: Build) -> None:
    check_roster(built("read"), 1.0)


@pytest.mark.tts
@pytest.mark.parametrize("name", ["dialogue", "meeting", "standup"])
def test_roster_script_with_lag(built: Build, name: str) -> None:
    c = built(name)
    check_roster(c, 1.0)
    check_roster(c, -0.2)
    assert max(len(speaking_at(c.roster_script(1.0), t.start + 1.2)) for t in c.turns) >= 2


# -- recognition --------------------------------------------------------------------


def _voice_with_gaps(rate: int, gaps_at: dict[float, float], total: float) -> np.ndarray[Any, Any]:
    """Loud noise for ``total`` s with digital silence of ``gaps_at[start]`` s at each start."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(round(total * rate)) * 3000).astype(np.int16)
    for at, length in gaps_at.items():
        x[round(at * rate) : round((at + length) * rate)] = 0
    return x


def test_offline_windows_cut_halfway_through_a_long_pause() -> None:
    rate = 16000
    # Short gaps between turns, and a hand-off pause of 1.5 s in the last quarter of the
    # first 28 s: the cut goes halfway through the pause, not where it starts.
    x = _voice_with_gaps(rate, {21.5: 0.1, 23.0: 1.5, 26.0: 0.15}, 50.0)
    cuts = windows(x, rate)
    assert cuts[0] == (0, cuts[1][0]) and cuts[-1][1] == len(x)
    assert cuts[0][1] / rate == pytest.approx(23.75, abs=0.02)
    # Without a pause of CUT_PAUSE, the cut is at the first quiet frame of the last quarter.
    x = _voice_with_gaps(rate, {20.0: 0.1, 22.0: 0.12, 26.0: 0.15}, 50.0)
    assert windows(x, rate)[0][1] / rate == pytest.approx(22.0, abs=0.011)
    assert all(b - a <= 28 * rate for a, b in windows(x, rate))


def _wer(c: Conversation, whisper_model: Any) -> float:
    began = time.perf_counter()
    said = recognize(c, whisper_model)
    score = wer(c.text(), said)
    took = time.perf_counter() - began
    print(f"{c.name}: WER {score:.3f} (tiny.en offline, {c.duration:.0f} s in {took:.1f} s)")
    return score


@pytest.mark.model
def test_whisper_hears_read_speech(built: Build, whisper_model: Any) -> None:
    assert _wer(built("read"), whisper_model) <= 0.1


@pytest.mark.model
@pytest.mark.tts
def test_whisper_hears_the_dialogue(built: Build, whisper_model: Any) -> None:
    # Measured 0.12: the espeak voice and words spoken under the other speaker.
    assert _wer(built("dialogue"), whisper_model) <= 0.25


@pytest.mark.model
@pytest.mark.tts
def test_whisper_hears_the_standup_across_its_pauses(built: Build, whisper_model: Any) -> None:
    # Measured 0.158. Cut where a hand-off pause starts, a window opens with "Great. Tom,
    # how about you?" and the pause, and tiny.en drops the 20 s after it: 0.313.
    assert _wer(built("standup"), whisper_model) <= 0.22


@pytest.mark.parametrize("kind", NOISES)
def test_noise_lies_under_the_conversation_at_its_level(built: Build, kind: str) -> None:
    conv = built("dialogue")
    noisy = mix(conv, kind, 20.0)
    assert np.array_equal(noisy.samples, mix(conv, kind, 20.0).samples)  # reproducible
    assert noisy.turns == conv.turns and noisy.recipe != conv.recipe
    noise = noisy.samples.astype(np.float64) - conv.samples
    level = 20 * np.log10(speech_rms(conv.samples, conv.rate) / np.sqrt((noise**2).mean()))
    assert level == pytest.approx(20.0, abs=0.2)
    # All through it, pauses included: every second has some.
    per_second = noise[: len(noise) // conv.rate * conv.rate].reshape(-1, conv.rate)
    assert (np.abs(per_second).max(axis=1) > 100).all()
