"""The benchmarks run end to end: real gateway and floor processes, real sockets.

Tiny N and a short window: this checks the script works and what it reports is
consistent, not how fast anything is (speed lives in the benchmark's own output).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.loadgen import BINARY, TEXT, audio_frames, encode_frame
from tests.conftest import LIBRIVOX
from tests.timing import scaled

ROOT = Path(__file__).resolve().parent.parent

POINT_FIELDS = {
    "cpu_ms_per_stream_s",
    "cpu_core_pct",
    "runqueue_wait_pct",
    "rss_idle_per_session_mib",
    "rss_live_per_session_mib",
    "ring_mib_per_session",
    "loop_lag_ms",
    "frames_sent",
    "frames_received",
    "frames_lost",
    "sessions_disagreeing",
    "generator",
    "notes",
}


def _unmask(frame: bytes) -> tuple[int, bytes]:
    """Decode one client frame the way a server must (RFC 6455 section 5.3)."""
    assert frame[0] & 0x80, "FIN set"
    assert frame[1] & 0x80, "client frames are masked"
    n, at = frame[1] & 0x7F, 2
    if n == 126:
        n, at = int.from_bytes(frame[2:4], "big"), 4
    mask = frame[at : at + 4]
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(frame[at + 4 :]))
    assert len(payload) == n
    return frame[0] & 0x0F, payload


def test_frames_are_masked_and_decode_to_their_payload() -> None:
    text = b'{"protocol_version": 1}' * 10  # over 125 bytes: the 16-bit length form
    assert _unmask(encode_frame(TEXT, text)) == (TEXT, text)
    samples = np.arange(1000, dtype=np.int16)
    frames = audio_frames(samples, 240)
    assert len(frames) == 4  # the trailing partial frame is left out
    decoded = b"".join(_unmask(f)[1] for f in frames)
    assert decoded == samples[:960].tobytes()
    assert all(_unmask(f)[0] == BINARY for f in frames)


@pytest.mark.skipif(not LIBRIVOX.exists(), reason="LibriVox test speech not installed")
def test_ingest_benchmark_reports_a_consistent_point(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--n", "4"]
    argv += ["--warmup", "1", "--window", "2", "--roster-every", "0.5"]
    argv += ["--out", str(out), "--workdir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(90), check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, done.stdout
    point, summary = lines
    assert point["n"] == 4
    gateway = point["gateway"]
    assert gateway.keys() >= POINT_FIELDS
    # Every frame the bots sent reached the gateway and its session files.
    assert gateway["frames_sent"] >= 4 * 250  # about 3 s of 10 ms frames per bot
    assert gateway["frames_lost"] == 0
    assert gateway["sessions_disagreeing"] == 0
    assert gateway["rosters_sent"] >= 4 * 3
    assert gateway["messages_rejected"] == 0
    assert gateway["cpu_ms_per_stream_s"] > 0
    assert gateway["loop_lag_ms"]["observations"] > 0
    lag = gateway["ingest_lag_ms"] or gateway["ingest_lag_ms_unattributed"]
    assert lag["observations"] > 0
    assert point["floor"]["cpu_ms_per_stream_s"] > 0
    assert point["cpu_vs_floor"] > 0
    assert isinstance(point["valid"], bool)
    assert gateway["rss_idle_method"] == "slope 2..4"

    assert summary["summary"] is True
    assert [p["n"] for p in summary["points"]] == [4]
    assert set(summary["targets"]) == {
        "p99_lag_50ms_zero_loss_at_300",
        "cpu_within_1_5x_floor",
        "idle_session_1mib",
    }
    assert json.loads(out.read_text()) == summary
    # The row for N=4 is there, marked "*" when a busy machine disturbed the point.
    table = (tmp_path / "ingest.json.md").read_text()
    assert re.search(r"^\| 4( \*)? \|", table, re.M), table
    # Recordings and logs go under the work directory and are removed afterwards.
    assert not list(tmp_path.glob("ingest-4-*"))


@pytest.mark.skipif(not LIBRIVOX.exists(), reason="LibriVox test speech not installed")
def test_soak_benchmark_reports_both_phases(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "soak.py")]
    argv += ["--meeting-minutes", "1", "--speed", "20", "--warmup-minutes", "0.25"]
    argv += ["--churn-sessions", "20", "--concurrency", "10", "--churn-speed", "4"]
    argv += ["--settle", "1", "--churn-pipelines", "recording", "--roster-every", "2"]
    argv += ["--churn-warmup", "2"]
    argv += ["--out", str(out), "--workdir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(120), check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(done.stdout.splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "soak"
    meeting, churn = result["meeting"], result["churn"]
    # The meeting went in at 20x real time, and the recording is exactly what was sent.
    assert meeting["frames_sent"] == 3000
    assert meeting["bit_identical"] is True
    assert meeting["wav_bytes"] == meeting["bytes_sent"] == 3000 * 960
    assert meeting["first_bad_frame"] is None
    assert meeting["session"]["gaps"] == []
    assert meeting["rosters_sent"] == 30
    for name in ("rss_warmup_mib", "rss_end_mib", "gateway_cpu_seconds"):
        assert meeting[name] > 0
    assert meeting["rss_growth_mib_per_audio_hour"] is not None
    for phase in (meeting, churn):
        for name in ("pipeline_dropped_events", "ring_overruns", "messages_rejected"):
            assert phase["metrics"][f"gateway_{name}"] == 0
        assert phase["log"]["errors"] == 0, phase["log"]
    # Every churn session was recorded in full and finalized.
    assert churn["sessions"] == 20
    assert churn["failed"] == 0
    assert churn["recordings_complete"] == 20
    assert churn["warmup_sessions"] == 2
    assert churn["metrics"]["gateway_audio_frames_received"] == (20 + 2) * 50
    assert churn["settled_vs_warm"] > 0
    for name in ("rss_before_mib", "rss_peak_mib", "rss_after_mib", "rss_settled_mib"):
        assert churn[name] > 0
    assert churn["settled_vs_start"] > 0
    assert isinstance(churn["target_settled_within_10pct"], bool)
    assert result["targets"]["meeting_wav_bit_identical"] is True
    # Recordings and logs go under the work directory and are removed afterwards.
    assert not list(tmp_path.glob("soak-*"))


@pytest.mark.model
@pytest.mark.skipif(not LIBRIVOX.exists(), reason="LibriVox test speech not installed")
def test_soak_reads_the_long_meetings_transcript_pass_by_pass(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--phase", "meeting"]
    argv += ["--meeting-minutes", "1.5", "--speed", "2", "--bucket-minutes", "0.5"]
    argv += ["--meeting-pipelines", "recording,transcription", "--warmup-minutes", "0.25"]
    argv += ["--out", str(out), "--workdir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(240), check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    transcript = json.loads(out.read_text())["meeting"]["transcript"]
    # 90 s of a 27.7 s loop: three whole passes, each scored on its own.
    assert transcript["loop_seconds"] == pytest.approx(27.74, abs=0.05)
    assert [b["passes"] for b in transcript["buckets"]] == [1, 1, 1]
    assert transcript["duplicates"] == 0
    for bucket in transcript["buckets"]:
        assert 60 <= bucket["words"] <= 85, bucket  # 71 words a pass
        assert bucket["wer"] < 0.35, bucket
        # Each pass's finals come while the meeting goes on. Played at 2x, the clock put
        # the second pass's words ever further ahead of the wall clock, and finals
        # waited for it: 20 s late at p50.
        assert bucket["word_final_p95"] < 10, bucket


@pytest.mark.model
@pytest.mark.tts
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_soak_loops_a_conversation_with_its_roster(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--phase", "meeting"]
    argv += ["--speech", "dialogue", "--cache", str(tmp_path / "conversations")]
    argv += ["--meeting-minutes", "2.2", "--speed", "3", "--bucket-minutes", "1"]
    argv += ["--meeting-pipelines", "recording,transcription", "--warmup-minutes", "0.25"]
    argv += ["--out", str(out), "--workdir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(300), check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    meeting = json.loads(out.read_text())["meeting"]
    transcript = meeting["transcript"]
    # 132 s of the 64 s dialogue: two whole passes, each with its roster script.
    assert transcript["loop_seconds"] == pytest.approx(64, abs=1)
    assert [b["passes"] for b in transcript["buckets"]] == [1, 1]
    # The rosters went with the audio, three times faster than the meeting: their
    # speaker changes lie all along the recording, not in its first third.
    assert meeting["last_speaker_change_seconds"] > 120
    assert transcript["duplicates"] == 0
    for bucket in transcript["buckets"]:
        assert bucket["wer"] < 0.35, bucket
        # Words meet the roster that was sent with them: 33 % before rosters were
        # placed with audio sent faster than real time.
        assert bucket["attribution"] > 0.9, bucket


@pytest.mark.model
@pytest.mark.tts
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_transcription_benchmark_scores_a_conversation(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    argv = [sys.executable, str(ROOT / "benchmarks" / "transcription.py")]
    argv += ["--workload", "conversation", "--conversations", "dialogue", "--excerpt", "12"]
    argv += ["--lags", "0,1", "--sessions", "2", "--duration", "12"]
    argv += ["--cache", str(tmp_path / "conversations"), "--summary", str(summary)]
    argv += ["--noise", "typing:20", "--vad", "silero"]  # both options reach the meetings
    done = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(300), check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(done.stdout)
    assert result["workloads"] == ["conversation"]
    assert (result["noise"], result["vad"]) == ("typing:20", "silero")
    assert "read" not in result
    conv = result["conversation"]
    assert conv["conversations"] == ["dialogue"]
    assert conv["rate"] == 24000
    # One meeting at a time: its reference words were aligned and timed.
    one = conv["single_session"]
    assert 0 < one["words_matched"] <= one["words_expected"]
    assert 0 <= one["words_lost"] <= one["words_expected"] - one["words_matched"]
    assert 0 < one["word_final_p50"] <= one["word_final_p95"]
    assert one["speech_finals"] >= 1 and one["speech_final_p50"] is not None
    assert one["turns_timed"] >= 1 and one["first_partial_p95"] > 0
    assert one["per_conversation"]["dialogue"]["words_expected"] == one["words_expected"]
    accuracy = conv["accuracy"]
    assert 0 <= accuracy["offline_wer"] < 1 and 0 <= accuracy["streaming_wer"] < 1
    assert 0 <= accuracy["offline_whole_wer"] < 1
    for ratio in ("wer_ratio", "wer_ratio_whole"):
        assert accuracy[ratio] is None or accuracy[ratio] >= 0
    # Attribution at every roster timing asked for.
    assert [row["lag"] for row in conv["attribution"]] == [0.0, 1.0]
    for row in conv["attribution"]:
        assert 0 <= row["attribution"] <= 1
        assert row["duplicates"] >= 0 and row["repeats"] >= 0
    # The load sweep: two staggered meetings, each its own excerpt of the dialogue.
    [point] = conv["load"]
    assert point["sessions"] == 2
    assert point["words_expected"] > one["words_expected"]
    assert point["word_final_p95"] is not None and point["loop_lag_p99_ms"] is not None
    assert point["partials_run"] > 0 and point["finals_skipped"] >= 0
    assert 0 <= point["words_without_final"] <= point["words_lost"]
    assert point["subscribers_dropped"] == 0  # two subscribers keep up with two meetings
    assert isinstance(point["ok"], bool)
    assert conv["max_sessions"] in (0, 2)
    assert set(conv["targets"]) == {
        "word_final_p50",
        "word_final_p95",
        "speech_final_p50",
        "attribution_min",
        "wer_ratio",
        "max_sessions",
    }
    assert all(isinstance(t["met"], bool) for t in conv["targets"].values())
    table = summary.read_text()
    assert "vad=silero, noise=typing:20" in table
    assert re.search(r"^\| \+1 \|", table, re.M), table
    assert re.search(r"^\| 2 \|", table, re.M), table


@pytest.mark.skipif(not LIBRIVOX.exists(), reason="LibriVox test speech not installed")
@pytest.mark.parametrize(
    ("pin", "split"), [(False, False), (True, False), (True, True)], ids=["free", "pinned", "split"]
)
def test_cluster_benchmark_reports_one_and_two_processes(
    tmp_path: Path, pin: bool, split: bool
) -> None:
    if pin and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--pin needs two cores")
    out = tmp_path / "cluster.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "cluster.py"), "--quick"]
    argv += ["--procs", "1,2", "--out", str(out), *(["--pin"] if pin else [])]
    argv += ["--split-generator"] if split else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(120), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [(p["procs"], p["frames_lost"]) for p in summary["points"]] == [(1, 0), (2, 0)]
    for point in summary["points"]:
        # A real Redis was used: heartbeats, leases and journals cost commands.
        assert point["redis_commands_per_meeting_s"] > 0
        assert point["redis_bytes_per_meeting_s"] > 0
        assert len(point["gateway_core_pct"]) == point["procs"]
    assert set(summary["targets"]) == {"two_procs_1_8x_bots_at_p99_50ms_zero_loss"}
    if pin:
        # One core per gateway process: P=1 on core 0, P=2 on cores 0 and 1.
        runs = [json.loads(line) for line in done.stdout.splitlines() if '"procs"' in line]
        placed = [[p["cores"] for p in r["gateway"]["processes"]] for r in runs if "gateway" in r]
        assert placed == [[[0]], [[0], [1]]], placed
        if split:
            # A generator process beside each gateway process, on its core, for its bots.
            shards = [r["gateway"]["generator"]["processes"] for r in runs if "gateway" in r]
            assert [[(g["cores"], g["bots"]) for g in gs] for gs in shards] == [
                [([0], 4)],
                [([0], 2), ([1], 2)],
            ], shards
            assert all(p["generator_core_pct"] > 0 for p in summary["points"])
