"""A session's files over HTTP: ``GET /sessions/{key}/files[/{name}]`` on a real gateway.

The recording, the roster and the metadata a bot's meeting left on disk are fetched over
127.0.0.1 and compared with the files themselves; the token rules, the newest meeting of
a reused key, names that try to leave the directory, the size cap and the bound on reads
at once are each checked on the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from gateway import http, tokens

from .conftest import (
    GatewayFactory,
    RunningGateway,
    ended_metadata,
    refusals,
    session_dir,
    wait_for,
)

RATE = 16000
SECRET = "files-secret"


async def meeting(gw: RunningGateway, key: str, seconds: float, token: str = "") -> Path:
    """A bot's meeting of ``seconds`` of audio with one speaker, run to its end; the
    directory it was recorded in."""
    before = _ended(gw, key)
    query = f"?token={token}" if token else ""
    async with connect(gw.url(f"/bots/{key}{query}")) as ws:
        await ws.send(json.dumps({"protocol_version": 1, "bot_id": key, "sample_rate": RATE}))
        await ws.send(json.dumps([{"name": "Ada", "id": 1, "isSpeaking": True}]))
        noise = np.random.default_rng(7).normal(0, 2000, int(seconds * RATE))
        await ws.send(noise.astype("<i2").tobytes())
    (directory,) = await wait_for(lambda: _ended(gw, key) - before)
    return Path(directory)


def _ended(gw: RunningGateway, key: str) -> set[Path]:
    """The directories of ``key``'s meetings that have ended."""
    root = session_dir(gw.data_dir, key).parent
    return {
        d
        for d in root.glob(f"{key}*")
        if (meta := ended_metadata(d)) is not None and meta["key"] == key
    }


async def get(
    gw: RunningGateway, path: str, token: str | None = None, **headers: str
) -> tuple[int, bytes, str]:
    """GET from a thread (the gateway runs on this loop): status, body, content type."""
    status, body, answered = await get_with_headers(gw, path, token, **headers)
    return status, body, answered["Content-Type"]


async def get_with_headers(
    gw: RunningGateway, path: str, token: str | None = None, **headers: str
) -> tuple[int, bytes, dict[str, str]]:
    def fetch() -> tuple[int, bytes, dict[str, str]]:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(gw.http + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    return await asyncio.to_thread(fetch)


async def test_a_finished_meetings_files_come_back_byte_for_byte(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway()
    directory = await meeting(gw, "files-demo", 1.5)
    status, body, kind = await get(gw, "/sessions/files-demo/files")
    assert (status, kind) == (200, "application/json")
    listing = {row["name"]: row for row in json.loads(body)}
    assert {"audio.wav", "session.json", "speakers.jsonl"} <= set(listing)
    assert "journal.jsonl" not in listing  # the gateway's own bookkeeping
    for name, expected_type in (
        ("audio.wav", "audio/wav"),
        ("session.json", "application/json"),
        ("speakers.jsonl", "application/x-ndjson"),
    ):
        status, body, kind = await get(gw, f"/sessions/files-demo/files/{name}")
        assert (status, kind) == (200, expected_type)
        assert body == (directory / name).read_bytes()
        assert listing[name]["bytes"] == len(body)
    for bad in ("journal.jsonl", "..%2Fsession.json", "nothing.json", "%2Fetc%2Fpasswd"):
        assert (await get(gw, f"/sessions/files-demo/files/{bad}"))[0] == 404, bad
    assert (await get(gw, "/sessions/nobody/files"))[0] == 404
    assert (await get(gw, "/sessions/..%2F..%2Fetc/files"))[0] == 404


async def test_the_newest_meeting_of_a_key_is_served_never_another_keys(
    start_gateway: GatewayFactory,
) -> None:
    """``a.2`` is the directory of a second meeting of ``a`` or of the key ``a.2``."""
    gw = await start_gateway()
    await meeting(gw, "room", 0.5)
    await meeting(gw, "room.2", 1.0)  # its own key, in the directory room.2

    async def served(key: str) -> tuple[str, float]:
        status, body, _ = await get(gw, f"/sessions/{key}/files/session.json")
        assert status == 200
        meta = json.loads(body)
        return meta["key"], meta["audio_seconds"]

    assert await served("room") == ("room", pytest.approx(0.5))
    await meeting(gw, "room", 2.0)  # the second meeting of room: room.3
    assert (gw.data_dir / "sessions" / "room.3").is_dir()
    assert await served("room") == ("room", pytest.approx(2.0))
    assert await served("room.2") == ("room.2", pytest.approx(1.0))


async def test_with_a_secret_files_need_the_sessions_read_token(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(secret=SECRET)
    await meeting(gw, "private", 0.5, tokens.mint(SECRET, "output", "private", 60))
    path = "/sessions/private/files/session.json"
    assert (await get(gw, path))[0] == 401
    assert (await get(gw, path, tokens.mint(SECRET, "read", "other", 60)))[0] == 403
    assert (await get(gw, path, tokens.mint(SECRET, "control", "private", 60)))[0] == 403
    assert (await get(gw, path, tokens.mint(SECRET, "read", "private", 60)))[0] == 200
    assert (await get(gw, path, tokens.mint(SECRET, "read", "*", 60)))[0] == 200
    query = f"?token={tokens.mint(SECRET, 'read', 'private', 60)}"
    assert (await get(gw, "/sessions/private/files" + query))[0] == 200


async def test_big_files_and_too_many_reads_are_refused_with_a_reason(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await start_gateway()
    directory = await meeting(gw, "big", 1.0)
    size = (directory / "audio.wav").stat().st_size
    monkeypatch.setattr(http, "MAX_FILE_BYTES", size - 1)
    status, body, _ = await get(gw, "/sessions/big/files/audio.wav")
    assert status == 413 and f"{size} bytes".encode() in body and b"Range" in body
    assert (await get(gw, "/sessions/big/files/session.json"))[0] == 200
    monkeypatch.setattr(http, "FILE_READS", 0)
    status, _, _ = await get(gw, "/sessions/big/files")
    assert status == 503
    assert refusals(gw, "overload") == 1


async def test_a_client_that_does_not_read_holds_its_file_until_it_goes(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes being sent are bounded, and counted until the connection closes."""
    gw = await start_gateway()
    directory = await meeting(gw, "held", 1.0)
    size = (directory / "session.json").stat().st_size
    monkeypatch.setattr(http, "FILE_BYTES_IN_FLIGHT", size + 10)
    path = "/sessions/held/files/session.json"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")  # answered, but never read to the end
    assert head.startswith(b"HTTP/1.1 200")
    assert (await get(gw, path))[0] == 503  # another copy would pass the budget
    assert (await get(gw, "/sessions/held/files"))[0] == 200  # listings cost no budget
    writer.close()
    await writer.wait_closed()

    async def served() -> bool:
        return (await get(gw, path))[0] == 200

    for _ in range(50):
        if await served():
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the file was not served again after the first client went")


async def test_a_recording_too_big_for_one_answer_comes_in_ranges(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a media player or a download manager asks: from an offset to the end, in parts."""
    gw = await start_gateway()
    directory = await meeting(gw, "ranged", 2.0)
    whole = (directory / "audio.wav").read_bytes()
    monkeypatch.setattr(http, "MAX_FILE_BYTES", 20_000)
    path = "/sessions/ranged/files/audio.wav"
    parts, start = [], 0
    while start < len(whole):
        status, body, headers = await get_with_headers(gw, path, Range=f"bytes={start}-")
        assert status == 206 and headers["Content-Type"] == "audio/wav"
        assert headers["Content-Range"] == f"bytes {start}-{start + len(body) - 1}/{len(whole)}"
        assert 0 < len(body) <= 20_000
        parts.append(body)
        start += len(body)
    assert b"".join(parts) == whole and len(parts) == -(-len(whole) // 20_000)
    status, body, headers = await get_with_headers(gw, path, Range="bytes=10-19")
    assert (status, body) == (206, whole[10:20])
    status, body, _ = await get_with_headers(gw, path, Range="bytes=-4")
    assert (status, body) == (206, whole[-4:])
    status, _, headers = await get_with_headers(gw, path, Range=f"bytes={len(whole)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(whole)}"
    # A Range this server does not take is ignored, as RFC 9110 allows: the whole file,
    # which here is over the limit of one answer.
    assert (await get_with_headers(gw, path, Range="bytes=0-1,5-9"))[0] == 413
    status, body, headers = await get_with_headers(
        gw, "/sessions/ranged/files/session.json", Range="lines=1-2"
    )
    assert status == 200 and headers["Accept-Ranges"] == "bytes"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-", 100, (0, 100)),
        ("bytes=10-19", 100, (10, 20)),
        ("bytes=90-500", 100, (90, 100)),
        ("bytes=-30", 100, (70, 100)),
        ("bytes=-500", 100, (0, 100)),
        ("bytes=19-10", 100, None),  # invalid: ignored
        ("bytes=0-1,5-9", 100, None),  # several ranges: the whole file instead
        ("items=0-9", 100, None),
        ("bytes=x-9", 100, None),
        ("bytes=\u00b2-", 100, None),  # a digit to str.isdigit, not to int
        ("bytes=" + "9" * 5000 + "-", 100, None),  # too long for int(): not a crash
        ("bytes=100-", 100, "unsatisfiable"),
        ("bytes=-0", 100, "unsatisfiable"),
        ("bytes=0-", 0, "unsatisfiable"),
    ],
)
def test_range_headers(header: str | None, size: int, expected: object) -> None:
    if expected == "unsatisfiable":
        with pytest.raises(http.RangeNotSatisfiable):
            http.byte_range(header, size)
    else:
        assert http.byte_range(header, size) == expected


@given(st.text(max_size=40), st.integers(min_value=0, max_value=10**12))
def test_any_range_header_is_a_part_of_the_file_or_none(header: str, size: int) -> None:
    for text in (header, "bytes=" + header):
        try:
            wanted = http.byte_range(text, size)
        except http.RangeNotSatisfiable:
            continue
        assert wanted is None or 0 <= wanted[0] < wanted[1] <= size


async def test_the_files_command_lists_and_downloads_a_big_recording_in_parts(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``meeting-gateway files KEY [NAME]``, minting its read token from the secret."""
    gw = await start_gateway(secret=SECRET)
    directory = await meeting(gw, "cli", 2.0, tokens.mint(SECRET, "output", "cli", 60))
    monkeypatch.setattr(http, "MAX_FILE_BYTES", 20_000)  # the gateway runs in this process
    here = tmp_path / "cli"
    os.mkdir(here)

    async def files(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "files", "cli", *argv, "--url", gw.http),
            *("--secret", SECRET),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=here,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, table, _ = await files()
    assert code == 0
    header, *rows = table.splitlines()
    assert header.split() == ["NAME", "BYTES", "MODIFIED"]
    sizes = {row.split()[0]: int(row.split()[1]) for row in rows}
    assert sizes["audio.wav"] == (directory / "audio.wav").stat().st_size > 3 * 20_000
    code, _, said = await files("audio.wav")
    assert code == 0 and said.strip() == f"audio.wav: {sizes['audio.wav']} bytes"
    assert (here / "audio.wav").read_bytes() == (directory / "audio.wav").read_bytes()
    code, _, said = await files("nothing.wav", "--out", "x.wav")
    assert code != 0 and "404" in said
    assert os.listdir(here) == ["audio.wav"]  # no half file
