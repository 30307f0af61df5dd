"""Anti-replay window (RFC 4303 3.4.3, Appendix A) against a plain set-based model."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.replay import ReplayWindow


def deliver(window: ReplayWindow, seq_low: int) -> int | None:
    seq = window.check(seq_low)
    if seq is not None:
        window.accept(seq)
    return seq


def test_duplicate_dropped() -> None:
    w = ReplayWindow()
    assert deliver(w, 5) == 5
    assert w.check(5) is None
    assert deliver(w, 3) == 3
    assert w.check(3) is None
    assert w.check(4) == 4


def test_sequence_zero_never_valid_with_window() -> None:
    assert ReplayWindow().check(0) is None


def test_older_than_window_dropped() -> None:
    w = ReplayWindow(64)
    deliver(w, 100)
    assert w.check(36) is None  # 100 - 64
    assert w.check(37) == 37  # last one inside the window


def test_check_alone_does_not_move_window() -> None:
    w = ReplayWindow(64)
    deliver(w, 10)
    assert w.check(1000) == 1000
    assert w.highest == 10
    assert w.check(9) == 9


def test_large_jump_clears_window() -> None:
    w = ReplayWindow(64)
    for s in range(1, 60):
        deliver(w, s)
    deliver(w, 10_000)
    assert w.check(10_000 - 63) == 10_000 - 63
    assert not w.seen(59)


def test_window_4096_every_slot() -> None:
    w = ReplayWindow(4096)
    deliver(w, 100_000)
    order = list(range(100_000 - 4095, 100_000))
    random.Random(1).shuffle(order)
    for s in order:
        assert deliver(w, s) == s
    for s in order:
        assert w.check(s) is None
    assert w.check(100_000 - 4096) is None
    assert w.highest == 100_000


def test_window_zero_disables_check_but_tracks_highest() -> None:
    w = ReplayWindow(0)
    assert deliver(w, 7) == 7
    assert deliver(w, 7) == 7
    assert deliver(w, 3) == 3
    assert w.highest == 7


def test_negative_size_refused() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(-1)


def test_esn_infers_next_subspace() -> None:
    w = ReplayWindow(64, esn=True)
    w.accept(0xFFFFFFF0)  # the SA has run up to just below the boundary
    assert deliver(w, 0xFFFFFFF6) == 0xFFFFFFF6
    assert deliver(w, 5) == (1 << 32) | 5  # wrapped low bits: next 2^32 subspace
    # A late packet from before the boundary keeps its old high bits (window straddles it).
    assert deliver(w, 0xFFFFFFF8) == 0xFFFFFFF8
    assert w.check(0xFFFFFFF8) is None
    assert w.check(0xFFFFFFF6) is None
    assert w.highest == (1 << 32) | 5


def test_esn_inside_one_subspace() -> None:
    w = ReplayWindow(64, esn=True)
    deliver(w, 1)
    deliver(w, 1000)
    top = (3 << 32) | 1000
    w.accept(top)
    assert w.check(1000 - 63) == (3 << 32) | (1000 - 63)
    # Below the window's bottom: RFC 4303 A2.2 assumes the next subspace (auth decides).
    assert w.check(1000 - 64) == (4 << 32) | (1000 - 64)
    assert w.check(2000) == (3 << 32) | 2000


def test_esn_start_refuses_negative_subspace() -> None:
    w = ReplayWindow(64, esn=True)
    assert w.check(0xFFFFFFF0) is None  # would be subspace -1
    assert w.check(1) == 1


def test_esn_top_of_space() -> None:
    w = ReplayWindow(64, esn=True)
    w.accept((1 << 64) - 2)
    assert w.check(0xFFFFFFFF) == (1 << 64) - 1
    assert w.check(3) is None  # would need 65 bits


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([1, 2, 32, 64, 65, 1024]),
    events=st.lists(st.integers(min_value=0, max_value=3000), max_size=200),
)
def test_matches_set_model(size: int, events: list[int]) -> None:
    w = ReplayWindow(size)
    accepted: set[int] = set()
    highest = 0
    for seq in events:
        fresh = seq != 0 and seq not in accepted and seq > highest - size
        assert (w.check(seq) is not None) == fresh
        if fresh:
            w.accept(seq)
            accepted.add(seq)
            highest = max(highest, seq)
    assert w.highest == highest


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(min_value=1, max_value=(1 << 40)),
    steps=st.lists(st.integers(min_value=-63, max_value=500), max_size=60),
)
def test_esn_inference_recovers_full_numbers(start: int, steps: list[int]) -> None:
    w = ReplayWindow(64, esn=True)
    w.accept(start)
    for step in steps:
        seq = w.highest + step
        if seq <= 0 or w.seen(seq):
            continue
        assert w.check(seq & 0xFFFFFFFF) == seq
        w.accept(seq)


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([0, 1, 2, 32, 64, 65, 1024]),
    events=st.lists(st.one_of(st.integers(min_value=0, max_value=3000),
                              st.integers(min_value=1, max_value=80).map(lambda n: -n)),
                    max_size=200),
    direct=st.booleans(),
)
def test_in_order_runs_match_set_model(size: int, events: list[int], direct: bool) -> None:
    """Runs of in-order packets (a negative event: that many), accepted as the ESP transform
    does (``highest`` raised directly) or through ``accept``, mixed with arbitrary numbers:
    the window answers as a set of everything accepted would (size 0: no check at all)."""
    w = ReplayWindow(size)
    accepted: set[int] = set()
    highest = 0
    for event in events:
        for seq in range(highest + 1, highest + 1 - event) if event < 0 else (event,):
            fresh = size == 0 or (seq != 0 and seq not in accepted and seq > highest - size)
            assert (w.check(seq) is not None) == fresh
            if not fresh:
                continue
            if direct and seq == w.highest + 1:
                w.highest = seq
            else:
                w.accept(seq)
            accepted.add(seq)
            highest = max(highest, seq)
        assert w.highest == highest
    for seq in range(max(1, highest - size - 2), highest + 3):
        assert w.seen(seq) == (seq in accepted and highest - seq < size)
