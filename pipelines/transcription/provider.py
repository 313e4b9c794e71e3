"""The vendor's own live transcripts, and the vendor's live and stored shapes. Sans-I/O.

In the vendor's v2 transcription mode the bot sends no audio: the vendor transcribes
with a cloud provider and posts ``transcript.segment`` events to the output URL
(``{"event", "bot_id", "data": {text, isFinal, utteranceStart, utteranceEnd,
confidence, words[{text, start, end, confidence?, speaker?}], speaker {name, id} |
null}}``). :func:`segment_result` turns one into a :class:`~.results.Result`, so such a
session gets every output a transcribed one does (subscribers in either format,
``transcript.jsonl``/``.json``, webhooks, the live page).

The other way round, a subscriber that asks for ``?format=meetingbaas`` gets that same
``transcript.segment`` shape (:func:`segment_event`), and ``transcript.v2.json`` holds
the vendor's stored shape, ``{"result": {"utterances": [{"start", "end", "text",
"speaker", "language"}]}}`` (:func:`v2_transcript`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.ingest.speakers import Speaker

from . import results
from .words import normalize

#: Longest text taken from one provider word or segment.
MAX_TEXT = 10_000


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 <= value < 366 * 86400 else None


def _speaker(value: Any) -> Speaker | None:
    if not isinstance(value, Mapping):
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None
    raw_id = value.get("id")
    sid = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
    return Speaker(f"id:{sid}" if sid else f"name:{name[:256]}", sid, name[:256], False)


def segment_result(data: Mapping[str, Any], language: str = "en") -> results.Result | None:
    """A provider's ``transcript.segment`` data as a result; None if it has no words
    or times the gateway can use."""
    start = _seconds(data.get("utteranceStart"))
    end = _seconds(data.get("utteranceEnd"))
    speaker = _speaker(data.get("speaker"))
    words: list[results.Word] = []
    for w in data.get("words") or ():
        if not isinstance(w, Mapping) or not isinstance(w.get("text"), str):
            continue
        text = w["text"].strip()[:MAX_TEXT]
        ws, we = _seconds(w.get("start")), _seconds(w.get("end"))
        if not text or ws is None or we is None:
            continue
        confidence = _seconds(w.get("confidence"))
        who = _speaker({"name": w["speaker"]}) if isinstance(w.get("speaker"), str) else None
        words.append(
            results.Word(
                normalize(text),
                text,
                round(ws, 3),
                round(max(ws, we), 3),
                min(1.0, confidence if confidence is not None else 1.0),
                who or speaker,
                language,
            )
        )
    if not words and isinstance(data.get("text"), str) and start is not None and end is not None:
        text = data["text"].strip()[:MAX_TEXT]
        words = [
            results.Word(normalize(t), t, round(start, 3), round(end, 3), 1.0, speaker, language)
            for t in text.split()
        ]
    if not words:
        return None
    final = bool(data.get("isFinal"))
    first = start if start is not None else words[0].start
    last = end if end is not None else words[-1].end
    return results.Result(first, max(first, last), tuple(words), final, final, language)


def segment_event(message: Mapping[str, Any], bot_id: str | None) -> dict[str, Any] | None:
    """A live ``Results`` message as the vendor's ``transcript.segment`` event; None for
    other messages (the vendor's stream has no speech-started or utterance-end events)."""
    if message.get("type") != "Results":
        return None
    alternative = message["channel"]["alternatives"][0]
    words = alternative.get("words") or []
    if not words:
        return None
    name = message.get("speaker_name")
    speaker = {"name": name, "id": message.get("speaker") or None} if name else None
    start = float(message.get("start", 0.0))
    return {
        "event": "transcript.segment",
        "bot_id": bot_id,
        "data": {
            "text": alternative.get("transcript", ""),
            "isFinal": bool(message.get("is_final")),
            "utteranceStart": round(start, 3),
            "utteranceEnd": round(start + float(message.get("duration", 0.0)), 3),
            "confidence": alternative.get("confidence", 0.0),
            "words": [
                {
                    "text": w.get("punctuated_word") or w["word"],
                    "start": w["start"],
                    "end": w["end"],
                    "confidence": w.get("confidence"),
                    "speaker": w.get("speaker_name"),
                }
                for w in words
            ],
            "speaker": speaker,
        },
    }


def segment_text(text: str) -> str | None:
    """A live message's text in the vendor's shape, for ``?format=meetingbaas``."""
    message = json.loads(text)
    event = segment_event(message, message.get("bot_id"))
    return None if event is None else json.dumps(event, ensure_ascii=False)


def v2_transcript(segments: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The vendor's stored transcript from ``transcript.json``'s segments."""
    return {
        "result": {
            "utterances": [
                {
                    "start": s["start_time"],
                    "end": s["end_time"],
                    "text": " ".join(w["word"] for w in s["words"]),
                    "speaker": s["speaker"],
                    "language": s.get("language", "en"),
                }
                for s in segments
            ]
        }
    }
