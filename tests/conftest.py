"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns import HarnessError, NetnsHarness, check_prerequisites, sweep_stale


@pytest.fixture
def netns_harness() -> Iterator[NetnsHarness]:
    """A NetnsHarness torn down after the test, pass or fail; fails (never skips) if unusable."""
    try:
        check_prerequisites()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    sweep_stale()
    with NetnsHarness() as harness:
        yield harness
