"""Fixtures: a running daemon (subprocess, private run directory), always stopped by SIGTERM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.daemon_proc import RunningDaemon, StartDaemon, start_daemon


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start daemons with extra arguments (``start("--config", path)``); all stopped at the end."""
    started: list[RunningDaemon] = []

    def _start(*extra: str, run_dir: Path | None = None) -> RunningDaemon:
        n = len(started)
        rd = run_dir or tmp_path / f"run{n}"
        daemon = start_daemon(rd, tmp_path / f"daemon{n}.log", *extra)
        started.append(daemon)
        return daemon

    yield _start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(start: StartDaemon) -> RunningDaemon:
    return start()
