"""The ring buffer against a plain bytearray model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.audio.ring import Overrun, RingBuffer


def test_views_are_read_only() -> None:
    ring = RingBuffer(8)
    ring.write(np.arange(5, dtype=np.int16))
    (view,) = ring.read(0, 5)
    assert not view.flags.writeable
    assert view.tolist() == [0, 1, 2, 3, 4]


def test_wrapping_read_gives_two_views() -> None:
    ring = RingBuffer(8)
    ring.write(np.arange(6, dtype=np.int16))
    ring.write(np.arange(6, 10, dtype=np.int16))
    views = ring.read(4, 10)
    assert len(views) == 2
    assert np.concatenate(views).tolist() == [4, 5, 6, 7, 8, 9]


def test_overrun_is_detected_not_corrupted() -> None:
    ring = RingBuffer(8)
    ring.write(np.arange(12, dtype=np.int16))
    with pytest.raises(Overrun) as info:
        ring.read(2, 6)
    assert info.value.oldest == 4
    assert info.value.lost == 2


def test_write_larger_than_capacity_keeps_newest() -> None:
    ring = RingBuffer(4)
    ring.write(np.arange(10, dtype=np.int16))
    assert ring.written == 10
    assert np.concatenate(ring.read(6, 10)).tolist() == [6, 7, 8, 9]


def test_advance_skips_a_gap() -> None:
    ring = RingBuffer(4)
    ring.write(np.ones(2, dtype=np.int16))
    ring.advance(100)
    ring.write(np.full(2, 7, dtype=np.int16))
    assert ring.written == 104
    assert np.concatenate(ring.read(102, 104)).tolist() == [7, 7]


@given(
    capacity=st.integers(min_value=1, max_value=64),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(min_value=0, max_value=100)),
            st.tuples(st.just("read"), st.integers(min_value=0, max_value=200)),
        ),
        max_size=60,
    ),
)
def test_matches_bytearray_model(capacity: int, ops: list[tuple[str, int]]) -> None:
    ring = RingBuffer(capacity)
    model: list[int] = []  # every sample ever written
    counter = 0
    for op, n in ops:
        if op == "write":
            samples = np.arange(counter, counter + n, dtype=np.int64).astype(np.int16)
            counter += n
            ring.write(samples)
            model.extend(samples.tolist())
            continue
        start = max(0, len(model) - n)
        stop = len(model)
        if start < len(model) - capacity:
            with pytest.raises(Overrun):
                ring.read(start, stop)
        else:
            got = [x for view in ring.read(start, stop) for x in view.tolist()]
            assert got == model[start:stop]
    assert ring.written == len(model)
