"""Output formats and the subscriber queue policy, tested synchronously."""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ingest.speakers import Speaker
from pipelines.transcription.backpressure import MessageQueue, Offer
from pipelines.transcription.formats import (
    UNKNOWN_SPEAKER,
    deepgram,
    meeting_baas,
    metadata,
    webvtt,
)
from pipelines.transcription.results import Result, SpeechStarted, UtteranceEnd, Word

ALICE = Speaker("id:1", 1, "Alice", is_bot=False)
BOB = Speaker("id:2", 2, "Bob", is_bot=False)
NAMELESS = Speaker("name:Carol", None, "Carol", is_bot=False)


def word(text: str, start: float, speaker: Speaker | None = ALICE, conf: float = 0.9) -> Word:
    return Word(text.lower().strip(".,?!"), text, start, start + 0.3, conf, speaker)


def result(*words: Word, final: bool = True, speech_final: bool = False) -> Result:
    return Result(words[0].start, words[-1].end, words, final, speech_final)


# -- Deepgram live messages ------------------------------------------------------------


def test_results_message_has_deepgram_fields_and_speakers() -> None:
    r = result(word("Hello", 1.0), word("there.", 1.4, conf=0.7), speech_final=True)
    m = deepgram(r)
    assert m["type"] == "Results"
    assert m["is_final"] is True
    assert m["speech_final"] is True
    assert m["start"] == 1.0
    assert m["duration"] == pytest.approx(0.7)
    assert (m["speaker"], m["speaker_name"]) == (1, "Alice")
    alt = m["channel"]["alternatives"][0]
    assert alt["transcript"] == "Hello there."
    assert alt["confidence"] == pytest.approx(0.8)
    assert alt["words"][1] == {
        "word": "there",
        "start": 1.4,
        "end": 1.7,
        "confidence": 0.7,
        "punctuated_word": "there.",
        "speaker": 1,
        "speaker_name": "Alice",
        "language": "en",
    }
    assert alt["languages"] == ["en"]
    json.dumps(m)  # serialisable as is


def test_results_carry_metadata_typed_clients_require() -> None:
    meta = metadata(str(uuid.uuid4()), "tiny.en")
    m = deepgram(result(word("hi", 0.0)), meta)
    assert m["metadata"] == meta
    assert uuid.UUID(m["metadata"]["request_id"])
    assert m["metadata"]["model_uuid"] == metadata(str(uuid.uuid4()), "tiny.en")["model_uuid"]
    assert m["metadata"]["model_info"]["name"] == "tiny.en"
    assert m["from_finalize"] is False
    assert "metadata" not in deepgram(result(word("hi", 0.0)))


def test_partial_and_unknown_speaker() -> None:
    m = deepgram(result(word("um", 0.0, speaker=None), final=False))
    assert m["is_final"] is False
    assert m["speech_final"] is False
    assert (m["speaker"], m["speaker_name"]) == (0, None)
    assert m["channel"]["alternatives"][0]["words"][0]["speaker"] == 0


def test_speaker_without_roster_id_is_zero_with_name() -> None:
    m = deepgram(result(word("hi", 0.0, speaker=NAMELESS)))
    assert (m["speaker"], m["speaker_name"]) == (0, "Carol")


def test_result_speaker_is_the_majority_of_words() -> None:
    m = deepgram(result(word("a", 0.0, BOB), word("b", 0.3, ALICE), word("c", 0.6, BOB)))
    assert (m["speaker"], m["speaker_name"]) == (2, "Bob")


def test_event_messages() -> None:
    assert deepgram(SpeechStarted(2.5)) == {
        "type": "SpeechStarted",
        "channel": [0, 1],
        "timestamp": 2.5,
    }
    assert deepgram(UtteranceEnd(3.25)) == {
        "type": "UtteranceEnd",
        "channel": [0, 1],
        "last_word_end": 3.25,
    }


def test_times_are_rounded_to_milliseconds() -> None:
    m = deepgram(result(Word("x", "x", 1.23456, 1.98765, 0.5, None)))
    assert m["start"] == 1.235
    assert m["channel"]["alternatives"][0]["words"][0]["end"] == 1.988


# -- Meeting BaaS transcript -----------------------------------------------------------


def test_segments_break_where_the_speaker_changes() -> None:
    finals = [
        deepgram(result(word("Hi", 0.0), word("Bob.", 0.4))),
        deepgram(result(word("Hello", 1.0, BOB))),
        deepgram(result(word("how", 1.5, BOB), word("are", 1.9, ALICE))),
    ]
    t = meeting_baas(finals, ["Alice", "Bob", "Dave"])
    assert t["speakers"] == ["Alice", "Bob", "Dave"]
    assert [(s["speaker"], [w["word"] for w in s["words"]]) for s in t["transcript"]] == [
        ("Alice", ["Hi", "Bob."]),
        ("Bob", ["Hello", "how"]),
        ("Alice", ["are"]),
    ]
    first = t["transcript"][0]
    assert first["offset"] == first["start_time"] == 0.0
    assert first["end_time"] == 0.7
    assert first["words"][0] == {"start": 0.0, "end": 0.3, "word": "Hi"}


def test_partials_and_events_are_ignored_and_unknown_named() -> None:
    finals = [
        deepgram(result(word("draft", 0.0), final=False)),
        deepgram(SpeechStarted(0.0)),
        deepgram(result(word("Yes.", 0.5, speaker=None))),
    ]
    t = meeting_baas(finals)
    assert t == {
        "transcript": [
            {
                "speaker": UNKNOWN_SPEAKER,
                "offset": 0.5,
                "start_time": 0.5,
                "end_time": 0.8,
                "language": "en",
                "words": [{"start": 0.5, "end": 0.8, "word": "Yes."}],
            }
        ],
        "speakers": [],
    }


def test_speakers_heard_but_not_in_the_roster_are_listed() -> None:
    t = meeting_baas([deepgram(result(word("hey", 0.0, BOB)))], ["Alice"])
    assert t["speakers"] == ["Alice", "Bob"]


def test_empty_transcript() -> None:
    assert meeting_baas([], ["Alice"]) == {"transcript": [], "speakers": ["Alice"]}


speakers = st.sampled_from([ALICE, BOB, NAMELESS, None])


def conversation(
    shape: list[list[Speaker | None]], mark: str = ""
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Finals of words 0.5 s apart, one final per list of speakers in ``shape``, as read
    back from JSON, and each word with its speaker's name. Every third word ends in
    ``mark``."""
    finals, t0, spoken = [], 0.0, []
    for who in shape:
        words = []
        for s in who:
            text = f"w{len(spoken)}{mark if len(spoken) % 3 == 2 else ''}"
            words.append(word(text, t0, s))
            spoken.append((text, s.name if s else UNKNOWN_SPEAKER))
            t0 += 0.5
        finals.append(json.loads(json.dumps(deepgram(result(*words)))))
    return finals, spoken


def cue_lengths(captions: str) -> list[int]:
    """How many words each cue of WebVTT ``captions`` has."""
    cues = captions.split("\n\n")[1:-1]
    return [len(c.split("\n")[1].partition(">")[2].split()) for c in cues]


@given(st.lists(st.lists(speakers, min_size=1, max_size=6), max_size=12))
def test_every_word_lands_once_in_order(shape: list[list[Speaker | None]]) -> None:
    finals, spoken = conversation(shape)
    segments = meeting_baas(finals)["transcript"]
    flat = [(w["word"], s["speaker"]) for s in segments for w in s["words"]]
    assert flat == spoken
    for a, b in itertools.pairwise(segments):
        assert a["speaker"] != b["speaker"]
    for s in segments:
        assert s["start_time"] == s["words"][0]["start"]
        assert s["end_time"] == s["words"][-1]["end"]


def test_captions_are_sentences_in_cues_named_by_speaker() -> None:
    # A cue ends at a sentence of 4 words or more (shorter ones join the next), where the
    # speaker changes or pauses a second, and at 14 words.
    said = [
        result(word("Good", 0.5), word("morning,", 0.9), word("Sarah.", 1.3)),
        result(word("Thanks", 1.8), word("for", 2.2), word("joining.", 2.6)),
        result(word("No", 3.4, BOB), word("problem", 3.8, BOB), word("<at> & all.", 4.2, BOB)),
        result(word("So,", 6.0, BOB)),  # after a pause of 1.5 s
    ]
    segments = meeting_baas([deepgram(r) for r in said])["transcript"]
    assert webvtt(segments) == (
        "WEBVTT\n\n"
        "00:00:00.500 --> 00:00:02.900\n<v Alice>Good morning, Sarah. Thanks for joining.\n\n"
        "00:00:03.400 --> 00:00:04.500\n<v Bob>No problem &lt;at&gt; &amp; all.\n\n"
        "00:00:06.000 --> 00:00:06.300\n<v Bob>So,\n\n"
    )
    # An hour in, and a long run without a sentence end: cues of 14 words at most.
    run = [word(f"w{i}", 3725.0 + 0.4 * i) for i in range(30)]
    captions = webvtt(meeting_baas([deepgram(result(*run))])["transcript"])
    assert cue_lengths(captions) == [14, 14, 2]
    assert captions.split("\n\n")[1].startswith("01:02:05.000 --> 01:02:10.500")
    # ... but a sentence that ends two words past them stays whole.
    run = [word(f"w{i}{'.' if i == 15 else ''}", 0.4 * i) for i in range(20)]
    assert cue_lengths(webvtt(meeting_baas([deepgram(result(*run))])["transcript"])) == [16, 4]


@given(st.lists(st.lists(speakers, min_size=1, max_size=6), max_size=12))
def test_captions_carry_every_word_once_in_order(shape: list[list[Speaker | None]]) -> None:
    finals, spoken = conversation(shape, mark=".")
    captions = webvtt(meeting_baas(finals)["transcript"])
    cues = [c.split("\n") for c in captions.split("\n\n")[1:-1]]
    heard = []
    for timing, text in cues:
        voice, _, words = text.removeprefix("<v ").partition(">")
        heard += [(w, voice) for w in words.split()]
        start, _, end = timing.partition(" --> ")
        assert start < end
    assert heard == spoken


# -- subscriber queue ------------------------------------------------------------------


def test_queue_skips_partials_when_full() -> None:
    q = MessageQueue(2)
    assert q.offer("f1", partial=False) is Offer.QUEUED
    assert q.offer("f2", partial=False) is Offer.QUEUED
    assert q.offer("p", partial=True) is Offer.SKIPPED
    assert q.skipped == 1
    assert [q.pop(), q.pop(), q.pop()] == ["f1", "f2", None]


def test_final_evicts_the_oldest_partial() -> None:
    q = MessageQueue(3)
    for m, partial in (("p1", True), ("f1", False), ("p2", True)):
        q.offer(m, partial)
    assert q.offer("f2", partial=False) is Offer.QUEUED
    assert q.skipped == 1
    assert [q.pop() for _ in range(3)] == ["f1", "p2", "f2"]


def test_overflow_when_only_finals_are_queued() -> None:
    q = MessageQueue(1)
    q.offer("f1", partial=False)
    assert q.offer("f2", partial=False) is Offer.OVERFLOW
    assert len(q) == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        MessageQueue(0)


ops = st.lists(st.one_of(st.booleans(), st.just(None)), max_size=80)


@given(st.integers(1, 6), ops)
def test_queue_never_loses_a_final_silently(capacity: int, script: list[bool | None]) -> None:
    """Finals come out in order and complete, up to the one the queue refused."""
    q = MessageQueue(capacity)
    finals_in: list[str] = []
    out: list[str] = []
    for n, step in enumerate(script):
        if step is None:
            popped = q.pop()
            if popped is not None:
                out.append(popped)
            continue
        partial = step
        outcome = q.offer(f"{'p' if partial else 'f'}{n}", partial)
        assert len(q) <= capacity
        if outcome is Offer.OVERFLOW:
            assert not partial
            break
        if not partial:
            finals_in.append(f"f{n}")
    while (popped := q.pop()) is not None:
        out.append(popped)
    assert [m for m in out if m.startswith("f")] == finals_in
    partials_out = [int(m[1:]) for m in out if m.startswith("p")]
    assert partials_out == sorted(partials_out)
