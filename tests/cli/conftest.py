"""The running-daemon fixtures of tests/daemon, for the CLI tests."""

from tests.daemon.conftest import daemon, start  # noqa: F401 - fixtures, found by name
