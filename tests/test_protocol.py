"""The output-socket decoder: every message becomes one typed event or a rejection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import UnsupportedRate
from gateway.ingest.protocol import (
    REJECT_REASONS,
    Audio,
    Handshake,
    OutputDecoder,
    Rejected,
    Roster,
    epoch_seconds,
)


def decode(message: bytes | str) -> object:
    return OutputDecoder().receive(message)


class TestHandshake:
    def test_newest_bot(self) -> None:
        msg = '{"protocol_version": 1, "bot_id": "b-1", "offset": 0.0, "sample_rate": 24000}'
        assert decode(msg) == Handshake("b-1", 1, 24000, 0.0, None)

    def test_older_bot_without_rate(self) -> None:
        event = decode('{"protocol_version": 1, "bot_id": "b-1", "offset": 0.0}')
        assert isinstance(event, Handshake)
        assert event.sample_rate is None

    def test_version_2_start_time_and_unknown_keys(self) -> None:
        msg = json.dumps(
            {
                "protocol_version": 2,
                "bot_id": "b",
                "offset": 1.5,
                "sample_rate": 48000,
                "start_time": 1795479323835,
                "colour": "blue",
            }
        )
        assert decode(msg) == Handshake("b", 2, 48000, 1.5, 1795479323.835)

    def test_null_start_time(self) -> None:
        event = decode('{"bot_id": "b", "start_time": null}')
        assert isinstance(event, Handshake)
        assert event.start_time is None
        assert event.protocol_version == 1

    @pytest.mark.parametrize("rate", [16000, 24000, 32000, 48000])
    def test_supported_rates(self, rate: int) -> None:
        event = decode(json.dumps({"bot_id": "b", "sample_rate": rate}))
        assert isinstance(event, Handshake)
        assert event.sample_rate == rate

    @pytest.mark.parametrize("rate", [11025, 8000, 44100, 96000])
    def test_unsupported_rate_closes(self, rate: int) -> None:
        with pytest.raises(UnsupportedRate) as info:
            decode(json.dumps({"bot_id": "b", "sample_rate": rate}))
        assert info.value.close_code == 1003

    @pytest.mark.parametrize(
        "obj",
        [
            {"protocol_version": 1},
            {"bot_id": 42},
            {"bot_id": ""},
            {"bot_id": "b", "protocol_version": "1"},
            {"bot_id": "b", "sample_rate": "24000"},
            {"bot_id": "b", "sample_rate": 24000.5},
        ],
    )
    def test_malformed(self, obj: dict[str, object]) -> None:
        event = decode(json.dumps(obj))
        assert isinstance(event, Rejected)
        assert event.reason == "bad_handshake"


class TestRoster:
    def test_full_entry_ms_timestamp(self) -> None:
        msg = json.dumps(
            [
                {
                    "name": "Alice",
                    "id": 1,
                    "timestamp": 1795479323835,
                    "isSpeaking": True,
                    "deviceId": "d-1",
                    "isSelf": False,
                }
            ]
        )
        event = decode(msg)
        assert isinstance(event, Roster)
        (entry,) = event.entries
        assert (entry.name, entry.id, entry.is_speaking, entry.device_id) == (
            "Alice",
            1,
            True,
            "d-1",
        )
        assert entry.timestamp == pytest.approx(1795479323.835)
        assert not entry.is_self

    def test_seconds_timestamp_null_and_zero_id(self) -> None:
        msg = '[{"name": "A", "id": null, "timestamp": 1795479323, "isSpeaking": false},'
        msg += ' {"name": "B", "id": 0, "isSpeaking": true, "isSelf": true}]'
        event = decode(msg)
        assert isinstance(event, Roster)
        a, b = event.entries
        assert a.id is None
        assert a.timestamp == 1795479323.0
        assert b.id is None
        assert b.is_self
        assert b.timestamp is None

    def test_empty_roster(self) -> None:
        assert decode("[]") == Roster(())

    @pytest.mark.parametrize(
        "entry",
        [
            "Alice",
            {"name": 3, "isSpeaking": True},
            {"name": "A", "isSpeaking": "yes"},
            {"name": "A", "id": "1"},
            {"name": "A", "timestamp": "now"},
        ],
    )
    def test_wrong_types_rejected(self, entry: object) -> None:
        event = decode(json.dumps([entry]))
        assert isinstance(event, Rejected)
        assert event.reason == "bad_roster"


class TestAudio:
    def test_view_without_copy(self) -> None:
        data = np.arange(-240, 240, dtype="<i2").tobytes()
        event = decode(data)
        assert isinstance(event, Audio)
        assert event.samples.tobytes() == data
        assert not event.samples.flags.writeable

    def test_binary_is_never_parsed_as_json(self) -> None:
        data = b'{"bot_id": "x", "sample_rate": 11025}'
        data += b" " * (len(data) % 2)
        event = decode(data)
        assert isinstance(event, Audio)
        assert event.samples.tobytes() == data

    def test_odd_byte_carried_to_next_message(self) -> None:
        pcm = np.arange(1000, dtype="<i2").tobytes()
        decoder = OutputDecoder()
        first = decoder.receive(pcm[:301])
        second = decoder.receive(pcm[301:])
        assert isinstance(first, Audio)
        assert isinstance(second, Audio)
        assert first.samples.tobytes() + second.samples.tobytes() == pcm

    def test_single_byte_then_rest(self) -> None:
        decoder = OutputDecoder()
        first = decoder.receive(b"\x01")
        assert isinstance(first, Audio)
        assert len(first.samples) == 0
        assert decoder.pending_odd_byte
        second = decoder.receive(b"\x02")
        assert isinstance(second, Audio)
        assert second.samples.tolist() == [0x0201]

    def test_empty_binary_rejected(self) -> None:
        event = decode(b"")
        assert isinstance(event, Rejected)
        assert event.reason == "empty_audio"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "malformed_json"),
        ("42", "not_json_object_or_array"),
        ('"hi"', "not_json_object_or_array"),
    ],
)
def test_text_that_is_not_a_message(text: str, reason: str) -> None:
    event = decode(text)
    assert isinstance(event, Rejected)
    assert event.reason == reason


def test_epoch_units() -> None:
    assert epoch_seconds(1795479323835) == pytest.approx(1795479323.835)
    assert epoch_seconds(1795479323) == 1795479323


@given(st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=64)), max_size=30))
def test_every_message_is_an_event_or_documented_rejection(messages: list[bytes | str]) -> None:
    decoder = OutputDecoder()
    audio = bytearray()
    sent = bytearray()
    for message in messages:
        try:
            event = decoder.receive(message)
        except UnsupportedRate:
            continue
        assert isinstance(event, Audio | Handshake | Roster | Rejected)
        if isinstance(event, Rejected):
            assert event.reason in REJECT_REASONS
        if isinstance(message, bytes):
            sent += message
            assert isinstance(event, Audio | Rejected)
        if isinstance(event, Audio):
            audio += event.samples.tobytes()
    # No byte of audio is lost or invented: only a trailing odd byte is held back.
    assert bytes(audio) == bytes(sent[: len(sent) & ~1])


@given(st.lists(st.integers(min_value=1, max_value=999), min_size=1, max_size=40))
def test_any_chunking_reassembles_exactly(sizes: list[int]) -> None:
    data = np.random.default_rng(7).bytes(sum(sizes))
    decoder, out, pos = OutputDecoder(), bytearray(), 0
    for size in sizes:
        event = decoder.receive(data[pos : pos + size])
        pos += size
        if isinstance(event, Audio):
            out += event.samples.tobytes()
    assert bytes(out) == data[: len(data) & ~1]


# -- hostile text: nesting, huge numbers, wrong types ------------------------------------

HUGE = 10**400


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        "[" * 33 + "]" * 33,
    ],
)
def test_deep_nesting_is_refused_before_decoding(text: str) -> None:
    event = decode(text)
    assert isinstance(event, Rejected)
    assert event.reason == "too_deep"


def test_nesting_within_the_limit_and_brackets_in_strings_are_fine() -> None:
    assert isinstance(decode("[" * 32 + "]" * 32), Rejected | Roster)
    name = "[" * 500
    event = decode(json.dumps([{"name": name, "id": 1, "isSpeaking": True}]))
    assert isinstance(event, Roster)
    assert event.entries[0].name == name[:256]  # long names are cut, not refused


@pytest.mark.parametrize("field", ["start_time", "offset"])
def test_a_huge_informational_number_is_ignored(field: str) -> None:
    event = decode(json.dumps({"bot_id": "b", "sample_rate": 16000, field: HUGE}))
    assert isinstance(event, Handshake)
    assert event.start_time is None
    assert event.offset == 0.0


@pytest.mark.parametrize(
    "handshake",
    [
        {"bot_id": "b", "sample_rate": HUGE},
        {"bot_id": "b", "protocol_version": HUGE},
        {"bot_id": "b", "sample_rate": 1e308},
    ],
)
def test_a_huge_required_number_rejects_the_handshake(handshake: dict[str, object]) -> None:
    event = decode(json.dumps(handshake))
    assert isinstance(event, Rejected)
    assert event.reason == "bad_handshake"
    assert len(event.detail) < 200  # the value is not echoed whole


def test_roster_numbers_out_of_range() -> None:
    timestamps = [HUGE, -5, 1e300]
    rosters = [[{"name": "A", "id": 1, "isSpeaking": True, "timestamp": t}] for t in timestamps]
    for roster in rosters:
        event = decode(json.dumps(roster))
        assert isinstance(event, Roster)
        assert event.entries[0].timestamp is None  # arrival time will stand in
    event = decode(json.dumps([{"name": "A", "id": HUGE}]))
    assert isinstance(event, Rejected)
    assert event.reason == "bad_roster"


def test_an_integer_too_long_for_python_is_malformed() -> None:
    event = decode('{"bot_id": "b", "offset": ' + "9" * 5000 + "}")
    assert isinstance(event, Rejected)
    assert event.reason == "malformed_json"


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([HUGE, -HUGE, 2**63, 2**53 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
entry_keys = st.sampled_from(["name", "id", "timestamp", "isSpeaking", "deviceId", "isSelf"])
hs_keys = st.sampled_from(["bot_id", "protocol_version", "sample_rate", "offset", "start_time"])
hostile_text = st.one_of(
    json_values.map(json.dumps),
    st.dictionaries(hs_keys, json_values).map(json.dumps),
    st.lists(st.dictionaries(entry_keys, json_values), max_size=5).map(json.dumps),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
)


@given(st.lists(st.one_of(st.binary(max_size=64), hostile_text), max_size=20))
def test_hostile_text_is_an_event_or_documented_rejection(messages: list[bytes | str]) -> None:
    decoder = OutputDecoder()
    audio, sent = bytearray(), bytearray()
    for message in messages:
        try:
            event = decoder.receive(message)
        except UnsupportedRate:
            continue
        if isinstance(event, Rejected):
            assert event.reason in REJECT_REASONS
        elif isinstance(event, Handshake):
            assert event.start_time is None or 0 < event.start_time < 1e12
            assert abs(event.offset) < 1e8
        elif isinstance(event, Roster):
            for e in event.entries:
                assert e.id is None or 0 < e.id <= 2**53
                assert e.timestamp is None or 0 < e.timestamp < 1e12
        if isinstance(message, bytes):
            sent += message
        if isinstance(event, Audio):
            audio += event.samples.tobytes()
    assert bytes(audio) == bytes(sent[: len(sent) & ~1])
