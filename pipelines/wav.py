"""``audio.wav``: a WAV file kept valid while it grows, and repaired after a crash.

Samples are written at their own offsets (``pwrite``), so what a full disk refused waits
in memory and lands exactly where it belongs once the disk takes it again; silence (gaps,
dropped audio) is a hole in the file. The header is rewritten every so many samples and
:func:`repair` (run at start-up) makes it cover every complete sample a crash left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from collections import deque
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.storage.files import (
    DiskWatch,
    FileStatus,
    create,
    no_space,
    standalone,
    write_atomically,
)
from gateway.storage.held import HeldWriter

Samples = npt.NDArray[np.int16]

logger = logging.getLogger("pipelines.recording")

HEADER_BYTES = 44


def wav_header(rate: int, data_bytes: int) -> bytes:
    """A canonical 44-byte PCM WAV header for mono s16le."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        1,  # mono
        rate,
        rate * 2,
        2,
        16,
        b"data",
        data_bytes,
    )


class WavWriter(HeldWriter):
    """Appends mono s16le samples to a WAV file whose header is kept valid.

    Every write goes at its own offset (``pwrite``), the end of what the disk has taken,
    so what a full disk refused waits in memory and lands exactly where it belongs later.
    :attr:`samples` is the position on the session clock: every sample given, written
    or waiting or dropped. ``hold_samples`` bounds what waits (None: no bound); past it
    the oldest waiting audio turns into silence.
    """

    def __init__(
        self,
        path: Path,
        rate: int,
        refresh_samples: int,
        *,
        hold_samples: int | None = None,
        status: FileStatus | None = None,
        resume: bool = False,
    ) -> None:
        """``resume``: append to an existing file of the same rate instead of replacing it."""
        super().__init__(status or standalone(path, "recording", logger))
        self.path = path
        self.rate = rate
        self.samples = 0
        self.dropped = 0
        """Audio dropped for the bound (silence in the file instead), bytes."""
        self.lost = 0
        """Audio still waiting when the file was closed (missing at its end), bytes."""
        self._metrics = self.status.watch.metrics
        self._refresh = 2 * max(1, refresh_samples)
        self._limit = None if hold_samples is None else 2 * max(0, hold_samples)
        self._fd: int | None = None
        self._header = False
        self._disk = 0  # data bytes the disk has taken
        self._refreshed = 0  # data bytes the header on disk covers
        # What waits for the disk, in file order: audio bytes, or a run of silence (int).
        self._held: deque[memoryview | int] = deque()
        self._held_audio = 0
        self._gauged = 0  # what the held-bytes gauge has of ours
        if resume:
            self._reopen()
        self._try(force=True)  # create the file and its header now

    def _reopen(self) -> None:
        """Go on from the audio an earlier process left in the file (same rate only)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no file yet: a new one is created
        try:
            header = os.pread(fd, HEADER_BYTES, 0)
            rate = struct.unpack_from("<I", header, 24)[0] if len(header) == HEADER_BYTES else 0
            if header[:4] != b"RIFF" or rate != self.rate:
                os.close(fd)
                return
        except OSError:
            os.close(fd)
            return
        data = (os.fstat(fd).st_size - HEADER_BYTES) & ~1
        self._fd, self._header = fd, True
        self._disk = self._refreshed = max(0, data)
        self.samples = self._disk // 2

    @property
    def holding(self) -> bool:
        return bool(self._held)

    @property
    def held_samples(self) -> int:
        """Audio waiting for the disk, samples (silence waiting is free)."""
        return self._held_audio // 2

    # -- input ------------------------------------------------------------------------

    def write(self, samples: Samples) -> None:
        if not len(samples) or self._closed:
            return
        self.samples += len(samples)
        view = np.ascontiguousarray(samples).data.cast("B")
        held = self._held
        held.append(view)  # borrowed: copied below if it must outlive this call
        self._held_audio += len(view)
        self._try()
        if held and isinstance(held[-1], memoryview) and held[-1].obj is view.obj:
            # Whatever of this call's audio is still waiting is the tail (the disk takes
            # from the front): copy it, the caller's buffer is about to be reused.
            held[-1] = memoryview(bytes(held[-1]))
            if self._limit is not None and self._held_audio > self._limit:
                self._drop(self._held_audio - self._limit)
        self._sync_gauge()

    def silence(self, n: int) -> None:
        """``n`` samples of silence (a hole in the file: no disk space needed)."""
        if n <= 0 or self._closed:
            return
        self.samples += n
        held = self._held
        if held and isinstance(held[-1], int):
            held[-1] += 2 * n
        else:
            held.append(2 * n)
        self._try()
        self._sync_gauge()

    def _drop(self, excess: int) -> None:
        """Turn the oldest ``excess`` bytes of waiting audio into silence."""
        held = self._held
        pos = self._disk  # data offset of held[0]
        zeros = dropped = 0
        keep: memoryview | None = None
        head = held[0] if held else None
        if pos % 2 and isinstance(head, memoryview):
            # The disk took half a sample: its other byte stays audio.
            held.popleft()
            keep = head[:1]
            pos += 1
            if len(head) > 1:
                held.appendleft(head[1:])
        while excess > 0 and held:
            seg = held.popleft()
            if isinstance(seg, int):
                zeros += seg
                pos += seg
                continue
            take = min(len(seg), excess)
            if take < len(seg) and (pos + take) % 2:
                take += 1  # never split a sample between audio and silence
            zeros += take
            pos += take
            dropped += take
            excess -= take
            if take < len(seg):
                held.appendleft(seg[take:])
        held.appendleft(zeros)
        if keep is not None:
            held.appendleft(keep)
        self._held_audio -= dropped
        if dropped:
            first = self.dropped == 0
            self.dropped += dropped
            self._metrics.dropped_audio_seconds.inc(dropped / 2 / self.rate)
            if first:
                self.status.log.error(
                    "%s: more than %g s of audio waiting for the disk; dropping the oldest"
                    " (silence in the file instead)",
                    self.path.name,
                    (self._limit or 0) / 2 / self.rate,
                )

    def _sync_gauge(self) -> None:
        # Between calls everything held is our copy; the gauge follows it.
        if self._held_audio != self._gauged:
            self._metrics.held_audio_bytes.inc(self._held_audio - self._gauged)
            self._gauged = self._held_audio

    def _on_timer(self) -> None:
        super()._on_timer()
        self._sync_gauge()

    # -- output -----------------------------------------------------------------------

    def _write_held(self) -> None:
        fd = self._fd
        if fd is None:
            fd = self._fd = create(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        if not self._header:
            self._write_header(fd)
            self._header = True
        held = self._held
        while held:
            seg = held[0]
            if isinstance(seg, int):
                os.ftruncate(fd, HEADER_BYTES + self._disk + seg)
                self._disk += seg
                held.popleft()
                continue
            n = os.pwrite(fd, seg, HEADER_BYTES + self._disk)
            if n <= 0:
                raise no_space()
            self._disk += n
            self._held_audio -= n
            if n < len(seg):
                held[0] = seg[n:]
            else:
                held.popleft()
        if self._disk - self._refreshed >= self._refresh:
            self._write_header(fd)

    def _write_header(self, fd: int) -> None:
        disk = self._disk
        if os.pwrite(fd, wav_header(self.rate, disk & ~1), 0) != HEADER_BYTES:
            raise no_space()
        self._refreshed = disk

    def _failure_detail(self) -> str:
        if self._limit is None:
            return "holding its audio in memory and retrying"
        return f"holding up to {self._limit / 2 / self.rate:g} s of audio in memory and retrying"

    def _recovery_detail(self) -> str:
        if self.dropped:
            return f"{self.dropped / 2 / self.rate:.1f} s of audio dropped so far"
        return "no audio lost"

    def refresh(self) -> None:
        """Rewrite the header for everything on disk so far."""
        if self._fd is not None and self._header and not self._held:
            try:
                self._write_header(self._fd)
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        """Write what waits if the disk takes it, finish the header, fsync, close.

        Never raises for the disk: what cannot be written is counted and logged.
        """
        if self._closed:
            return
        self._try(force=True)
        self._stop_retrying()
        if self._held:
            self.lost = self._held_audio
            self._metrics.dropped_audio_seconds.inc(self.lost / 2 / self.rate)
            self._held.clear()
            self._held_audio = 0
            self._sync_gauge()
            self.status.log.error(
                "%.1f s of audio could not be written to %s and are lost",
                self.lost / 2 / self.rate,
                self.path.name,
            )
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if self._header:
                    self._write_header(fd)
                os.fsync(fd)
            except OSError as exc:
                self.status.failed(exc, "the header is fixed at the next start")
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.status.forget()


def data_samples(path: Path) -> int:
    """Complete samples in a WAV file's data (by its size; 0 if there is none)."""
    try:
        return max(0, path.stat().st_size - HEADER_BYTES) // 2
    except OSError:
        return 0


def repair(root: Path, watch: DiskWatch | None = None) -> list[tuple[Path, int]]:
    """Fix the header of every WAV under ``root/*/`` that a crash left stale.

    Returns the files repaired with the number of samples each now covers. A file
    whose header already matches its length is left alone; one that cannot be fixed
    (the disk refuses) is logged and skipped.
    """
    repaired = []
    for path in sorted(root.glob("*/audio.wav")):
        try:
            with open(path, "r+b") as f:
                header = f.read(HEADER_BYTES)
                size = os.fstat(f.fileno()).st_size
                if len(header) < HEADER_BYTES or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
                    continue
                rate = struct.unpack_from("<I", header, 24)[0]
                recorded = struct.unpack_from("<I", header, 40)[0]
                data = (size - HEADER_BYTES) & ~1
                if data == recorded:
                    continue
                f.truncate(HEADER_BYTES + data)
                os.pwrite(f.fileno(), wav_header(rate, data), 0)
                os.fsync(f.fileno())
        except OSError as exc:
            if watch is not None:
                watch.metrics.errors.labels("recording").inc()
            logger.error("could not repair %s: %s", path, exc)
            continue
        _mark_recovered(path.parent / "session.json", watch)
        repaired.append((path, data // 2))
    return repaired


def _mark_recovered(meta: Path, watch: DiskWatch | None = None) -> None:
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return
    info["recovered"] = True
    try:
        write_atomically(meta, (json.dumps(info, indent=2) + "\n").encode())
    except OSError as exc:
        # The previous session.json stays, whole; the repaired WAV plays all the same.
        if watch is not None:
            watch.metrics.errors.labels("metadata").inc()
        logger.error("could not mark %s as recovered: %s", meta, exc)
