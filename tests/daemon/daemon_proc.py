"""A real ``uipsec daemon`` in a subprocess, each in its own run directory, for socket tests.

Started with ``--no-datapath`` when the daemon has that flag (the PF_KEY kernel alone), stopped
with SIGTERM by PID; its stderr goes to a log file the tests read.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from userspace_ipsec.pfkey.client import PfkeyClient
from userspace_ipsec.pfkey.messages import Message

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


def uipsec_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "userspace_ipsec.cli", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@functools.cache
def daemon_flags() -> tuple[str, ...]:
    """``--no-datapath`` if this daemon has it (the datapath is not what these tests test)."""
    out = subprocess.run(uipsec_cmd("daemon", "--help"), capture_output=True, text=True,
                         env=subprocess_env(), timeout=30, check=False).stdout
    return ("--no-datapath",) if "--no-datapath" in out else ()


@dataclass
class RunningDaemon:
    run_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    clients: list[PfkeyClient] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "pfkey.sock"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "uipsec.pid"

    def client(self, **kwargs: Any) -> PfkeyClient:
        """A PfkeyClient closed at teardown."""
        kwargs.setdefault("timeout", 20.0)
        client = PfkeyClient(self.socket_path, **kwargs)
        self.clients.append(client)
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s; log:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM by PID; the exit status."""
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        return self.proc.returncode


def _listening(path: Path) -> bool:
    """The file appears at bind(), before listen(): only a connect says the daemon is ready."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


StartDaemon = Callable[..., RunningDaemon]  # the ``start`` fixture


def start_daemon(run_dir: Path, log_path: Path, *extra: str,
                 env: dict[str, str] | None = None) -> RunningDaemon:
    """Start a daemon on ``run_dir`` and wait for its PF_KEY socket; fails if it exits first."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps it; closed below
    try:
        proc = subprocess.Popen(
            uipsec_cmd("--run-dir", str(run_dir), "daemon", *daemon_flags(), *extra),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env or subprocess_env(),
        )
    finally:
        log.close()
    daemon = RunningDaemon(run_dir, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while not _listening(daemon.socket_path):
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{daemon.log()}")
        if time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"daemon did not listen within {START_TIMEOUT} s")
        time.sleep(0.02)
    return daemon


def pipeline(client: PfkeyClient, messages: Iterable[Message], window: int = 64) -> list[Message]:
    """Send ``messages`` with up to ``window`` awaiting replies; the replies, in order.

    Only for a client that is the sole actor: every message it receives is a reply.
    """
    replies: list[Message] = []
    in_flight = 0
    for msg in messages:
        client.send(msg)
        in_flight += 1
        if in_flight >= window:
            replies.append(client.receive())
            in_flight -= 1
    for _ in range(in_flight):
        replies.append(client.receive())
    return replies
