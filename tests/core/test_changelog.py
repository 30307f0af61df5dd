"""ChangeLog: readers see what was touched since their cursor, or None when they must rescan."""

from __future__ import annotations

from userspace_ipsec.changelog import ChangeLog


def test_readers_see_changes_since_their_cursor() -> None:
    log: ChangeLog[str] = ChangeLog()
    assert log.since(-1) is None  # a reader that never looked rescans
    start = log.cursor
    log.record("a")
    log.record("b")
    middle = log.cursor
    log.record("a")
    assert log.since(start) == ["a", "b", "a"]
    assert log.since(middle) == ["a"]
    assert log.since(log.cursor) == []


def test_reset_and_the_bound_send_readers_back_to_a_rescan() -> None:
    log: ChangeLog[int] = ChangeLog(limit=8)
    start = log.cursor
    for i in range(9):
        log.record(i)
    assert log.since(start) is None  # the oldest half was forgotten
    recent = log.cursor - 2
    assert log.since(recent) == [7, 8]
    log.reset()
    assert log.since(recent) is None
    after = log.cursor
    log.record(99)
    assert log.since(after) == [99]

