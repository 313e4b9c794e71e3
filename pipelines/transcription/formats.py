"""Transcript output formats, as pure functions.

Live messages follow Deepgram's streaming API, so existing Deepgram clients can read
them: ``Results`` (``is_final``, ``speech_final``, ``start``, ``duration``,
``channel.alternatives[0]``), ``SpeechStarted`` and ``UtteranceEnd``. The gateway adds
the roster speaker where Deepgram puts its diarization index: ``speaker`` is the roster
id (an integer; ``0`` when the roster gave none or nobody was marked speaking) and
``speaker_name`` is the display name (``null`` when unknown), on each word and on the
result. ``Results`` also carry the ``metadata`` object (a per-session ``request_id``
UUID and the model's name) that typed Deepgram clients insist on.

``transcript.jsonl`` holds the final ``Results`` messages exactly as subscribers
receive them, one a line, so the file can be replayed to a subscriber verbatim and
rebuilt into the Meeting BaaS ``complete`` shape by :func:`meeting_baas`::

    {"transcript": [{"speaker": "Alice", "offset": 1.5, "start_time": 1.5,
                     "end_time": 2.4, "words": [{"start": 1.5, "end": 1.9,
                                                 "word": "Hello"}]}],
     "speakers": ["Alice", "Bob"]}

Times are seconds on the session audio clock, rounded to milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.ingest.speakers import Speaker
from gateway.listen import model_uuid

from .results import Result, SpeechStarted, TranscriptEvent, UtteranceEnd, Word

__all__ = [
    "UNKNOWN_SPEAKER",
    "deepgram",
    "meeting_baas",
    "metadata",
    "speaker_fields",
]

#: The name a segment gets in ``transcript.json`` when no roster speaker was found.
UNKNOWN_SPEAKER = "Unknown"

Message = dict[str, Any]


def _t(seconds: float) -> float:
    return round(seconds, 3)


def speaker_fields(speaker: Speaker | None) -> tuple[int, str | None]:
    """``(speaker, speaker_name)`` as they appear in live messages."""
    if speaker is None:
        return 0, None
    return (speaker.id or 0), speaker.name


def _word(w: Word) -> Message:
    sid, name = speaker_fields(w.speaker)
    return {
        "word": w.word,
        "start": _t(w.start),
        "end": _t(w.end),
        "confidence": round(w.confidence, 4),
        "punctuated_word": w.punctuated,
        "speaker": sid,
        "speaker_name": name,
        "language": w.language,
    }


def _results(r: Result, metadata: Mapping[str, Any] | None) -> Message:
    sid, name = speaker_fields(r.speaker)
    message: Message = {
        "type": "Results",
        "channel_index": [0, 1],
        "start": _t(r.start),
        "duration": _t(max(0.0, r.end - r.start)),
        "is_final": r.is_final,
        "speech_final": r.speech_final,
        "speaker": sid,
        "speaker_name": name,
        "channel": {
            "alternatives": [
                {
                    "transcript": r.transcript,
                    "confidence": round(r.confidence, 4),
                    "words": [_word(w) for w in r.words],
                    "languages": [r.language],
                }
            ]
        },
        "from_finalize": False,
    }
    if metadata is not None:
        message["metadata"] = dict(metadata)
    return message


def metadata(request_id: str, model: str) -> Message:
    """The ``metadata`` of every ``Results`` of one session.

    Typed Deepgram clients require it: ``request_id`` must be a UUID (one per session),
    ``model_uuid`` is derived from the model's name so it is stable across restarts.
    """
    return {
        "request_id": request_id,
        "model_info": {"name": model, "version": "", "arch": "whisper"},
        "model_uuid": model_uuid(model),
    }


def deepgram(event: TranscriptEvent, meta: Mapping[str, Any] | None = None) -> Message:
    """The Deepgram-style live message for one transcription event.

    ``meta`` (see :func:`metadata`) goes into ``Results`` messages when given.
    """
    if isinstance(event, Result):
        return _results(event, meta)
    if isinstance(event, SpeechStarted):
        return {"type": "SpeechStarted", "channel": [0, 1], "timestamp": _t(event.timestamp)}
    if isinstance(event, UtteranceEnd):
        return {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": _t(event.last_word_end)}
    raise TypeError(f"not a transcript event: {event!r}")


def _speaker_label(word: Message) -> str:
    name = word.get("speaker_name")
    return str(name) if name else UNKNOWN_SPEAKER


def meeting_baas(finals: Iterable[Message], speakers: Sequence[str] = ()) -> Message:
    """The Meeting BaaS ``complete`` transcript from final ``Results`` messages.

    ``finals`` are the messages :func:`deepgram` made of final results, in the order
    they were published (as read back from ``transcript.jsonl``); anything else in it
    (partials, other message types) is ignored. A segment runs while the speaker stays
    the same and breaks where it changes. ``speakers`` is the roster's names in order
    of appearance; names met only in the words are appended after them.
    """
    segments: list[Message] = []
    current: Message | None = None
    current_key: tuple[int, str] | None = None
    names: list[str] = list(dict.fromkeys(speakers))
    for message in finals:
        if message.get("type") != "Results" or not message.get("is_final"):
            continue
        for word in message["channel"]["alternatives"][0]["words"]:
            label = _speaker_label(word)
            key = (int(word.get("speaker") or 0), label)
            entry = {
                "start": word["start"],
                "end": word["end"],
                "word": word.get("punctuated_word") or word["word"],
            }
            if current is None or key != current_key:
                current = {
                    "speaker": label,
                    "offset": word["start"],
                    "start_time": word["start"],
                    "end_time": word["end"],
                    "language": word.get("language", "en"),
                    "words": [],
                }
                current_key = key
                segments.append(current)
                if label != UNKNOWN_SPEAKER and label not in names:
                    names.append(label)
            current["words"].append(entry)
            current["end_time"] = max(current["end_time"], word["end"])
    return {"transcript": segments, "speakers": names}


#: A caption (a WebVTT cue) ends after a sentence once it has this many words, after
#: ``CUE_WORDS`` otherwise (up to ``CUE_TAIL`` more to end with its sentence rather than
#: leave a scrap of it for the next cue), and where the speaker paused ``CUE_PAUSE``
#: seconds: two lines of a player's captions, read in the time they are shown.
CUE_SENTENCE_WORDS = 4
CUE_WORDS = 14
CUE_TAIL = 3
CUE_PAUSE = 1.0


def _cue_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    return f"{hours:02d}:{minutes:02d}:{ms // 1000:02d}.{ms % 1000:03d}"


def _vtt_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _ends_sentence(word: Message) -> bool:
    return str(word["word"]).endswith((".", "?", "!"))


def _cue_ends(words: Sequence[Message], i: int, length: int) -> bool:
    """Whether a cue of ``length`` words ends at ``words[i]``, a segment's words."""
    if i + 1 == len(words) or words[i + 1]["start"] - words[i]["end"] >= CUE_PAUSE:
        return True
    if _ends_sentence(words[i]):
        return length >= CUE_SENTENCE_WORDS
    if length < CUE_WORDS:
        return False
    # At the length: on to the sentence's end if it comes within CUE_TAIL words.
    ends_soon = any(_ends_sentence(w) for w in words[i + 1 : i + 1 + CUE_TAIL])
    return not ends_soon or length >= CUE_WORDS + CUE_TAIL


def webvtt(segments: Iterable[Message]) -> str:
    """Captions for the recording (``transcript.vtt``) from :func:`meeting_baas` segments:
    each speaker's words in cues of a sentence or so (``CUE_*``), timed by the words, the
    speaker named in a voice tag (``<v Alice>``), so that a player shows them with
    ``audio.wav``."""
    cues: list[str] = []
    for segment in segments:
        voice = _vtt_text(str(segment["speaker"]))
        words: list[Message] = segment["words"]
        first = 0
        for i in range(len(words)):
            if _cue_ends(words, i, i + 1 - first):
                cue = words[first : i + 1]
                start, end = cue[0]["start"], max(w["end"] for w in cue)
                text = _vtt_text(" ".join(str(w["word"]) for w in cue))
                timing = f"{_cue_time(start)} --> {_cue_time(max(end, start + 0.1))}"
                cues.append(f"{timing}\n<v {voice}>{text}")
                first = i + 1
    return "WEBVTT\n\n" + "".join(f"{cue}\n\n" for cue in cues)
