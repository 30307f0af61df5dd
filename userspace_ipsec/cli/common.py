"""What every ``uipsec`` command shares: exit codes, one-line failures, the daemon's sockets."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from .. import rundir
from ..pfkey.client import DaemonNotRunning, PfkeyClient, PfkeyReplyError

EXIT_RUNTIME = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    click.echo(f"uipsec: {message}", err=True)
    sys.exit(code)


class Context:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = rundir.RunDir(run_dir)

    def client(self, **kwargs: Any) -> PfkeyClient:
        try:
            return PfkeyClient(self.run_dir.pfkey_socket, **kwargs)
        except DaemonNotRunning as exc:
            fail(f"{exc} (is `uipsec daemon` running with --run-dir {self.run_dir.path}?)")
        except PermissionError:
            fail(f"permission denied on {self.run_dir.pfkey_socket}")


def runtime_errors(func: Callable[..., None]) -> Callable[..., None]:
    """Turn the expected runtime failures into one line and exit status 1."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except DaemonNotRunning as exc:
            fail(str(exc))
        except PfkeyReplyError as exc:
            fail(str(exc))
        except BrokenPipeError:
            sys.exit(0)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper
