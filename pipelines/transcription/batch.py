"""Several sessions' recognitions decoded together: one encoder call, one decoder call.

On the CPU a decoder step costs about the same for three sequences as for one: the
step is bound by reading the model's weights, not by arithmetic, while the encoder
grows with the batch. On 4 s excerpts of the conversations a lane spent 116-133 ms per
job in batches of three against 193-198 ms one at a time (``benchmarks/batching.py``,
AMD EPYC, one thread, int8). Under load the scheduler hands a busy lane the jobs of
several sessions at once (:class:`~.scheduler.Scheduler`), and
:meth:`~.engine.Engine.transcribe_many` decodes their first window here.

:func:`first_windows` is the first pass of faster-whisper's own loop
(``WhisperModel.generate_segments``) for each audio, at temperature 0, with the same
options the engine's single decodes use: the same prompt, suppressed tokens, initial
timestamp limit, no-speech skip, segment split and word alignment. Every audio is
padded to the longest one's compact window, which only widens its margin. Where that
loop would go on (the text did not end at a timestamp before the end of the audio), the
rest of the audio is left to the caller: :attr:`Window.seek` says where it starts, and
:attr:`Window.untimed` whether the text ended with no timestamp at all.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ctranslate2
import numpy as np
import numpy.typing as npt
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import (
    Segment,
    WhisperModel,
    Word,
    get_compression_ratio,
    get_end,
    get_suppressed_tokens,
)

from .compact import FULL_WINDOW

# faster-whisper's defaults, which the engine's single decodes keep.
_DEFAULTS = {
    name: p.default for name, p in inspect.signature(WhisperModel.transcribe).parameters.items()
}
NO_SPEECH_THRESHOLD: float = _DEFAULTS["no_speech_threshold"]
LOG_PROB_THRESHOLD: float = _DEFAULTS["log_prob_threshold"]
MAX_INITIAL_TIMESTAMP: float = _DEFAULTS["max_initial_timestamp"]
PREPEND: str = _DEFAULTS["prepend_punctuations"]
APPEND: str = _DEFAULTS["append_punctuations"]


@dataclass(frozen=True, slots=True)
class Window:
    """One audio's first window: the segments faster-whisper's loop would yield for it."""

    segments: list[Segment]
    seek: int
    """Where the loop would go on, in frames (10 ms); at or past the audio's end: done."""
    frames: int
    untimed: bool = False
    """The text ended with no timestamp after its first, as Whisper mostly ends a
    prompted one: the loop goes on from its last word whatever follows."""


def first_windows(
    model: Any,
    audios: Sequence[npt.NDArray[np.float32]],
    language: str,
    margin: int,
    max_new_tokens: int,
    initial_prompt: str | None = None,
) -> list[Window]:
    """The first window of each of ``audios`` (16 kHz, each at most 30 s), as a batch,
    each prompted with ``initial_prompt`` as faster-whisper's option of that name does."""
    tokenizer = Tokenizer(
        model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language
    )
    features = [model.feature_extractor(audio) for audio in audios]
    frames = [min(f.shape[-1] - 1, FULL_WINDOW) for f in features]
    window = min(FULL_WINDOW, -(-(max(frames) + margin) // 100) * 100)
    batch = np.stack([pad_or_trim(f[:, :n], window) for f, n in zip(features, frames, strict=True)])
    encoded = model.encode(batch)
    previous = tokenizer.encode(" " + initial_prompt.strip()) if initial_prompt else []
    prompt = model.get_prompt(tokenizer, previous, without_timestamps=False)
    results = model.model.generate(
        encoded,
        [prompt] * len(audios),
        beam_size=1,
        patience=1,
        length_penalty=1,
        repetition_penalty=1,
        no_repeat_ngram_size=0,
        max_length=len(prompt) + max_new_tokens,
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=True,
        suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP / model.time_precision),
    )
    rows = np.asarray(encoded)
    return [
        _window(model, tokenizer, result, rows[i : i + 1], frames[i])
        for i, result in enumerate(results)
    ]


def _window(model: Any, tokenizer: Tokenizer, result: Any, row: Any, frames: int) -> Window:
    tokens = result.sequences_ids[0]
    avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
    compression = get_compression_ratio(tokenizer.decode(tokens).strip())
    if result.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob <= LOG_PROB_THRESHOLD:
        return Window([], frames, frames)  # silence: the loop moves past the window
    duration = frames * model.feature_extractor.time_per_frame
    parts, seek, single_ending = model._split_segments_by_timestamps(
        tokenizer=tokenizer,
        tokens=tokens,
        time_offset=0.0,
        segment_size=frames,
        segment_duration=duration,
        seek=0,
    )
    model.add_word_timestamps(
        [parts],
        tokenizer,
        ctranslate2.StorageView.from_array(np.ascontiguousarray(row)),
        frames,
        PREPEND,
        APPEND,
        last_speech_timestamp=0.0,
    )
    untimed = sum(t >= tokenizer.timestamp_begin for t in tokens) < 2
    if not single_ending:
        last = get_end(parts)
        if last is not None and last > 0.0:
            seek = round(last * model.frames_per_second)
    segments: list[Segment] = []
    for part in parts:
        text = tokenizer.decode(part["tokens"])
        if part["start"] == part["end"] or not text.strip():
            continue
        segments.append(
            Segment(
                id=len(segments) + 1,
                seek=0,
                start=part["start"],
                end=part["end"],
                text=text,
                tokens=part["tokens"],
                avg_logprob=avg_logprob,
                compression_ratio=compression,
                no_speech_prob=result.no_speech_prob,
                words=[Word(**word) for word in part["words"]],
                temperature=0.0,
            )
        )
    return Window(segments, seek, frames, untimed)
