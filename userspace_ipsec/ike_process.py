"""The daemon's side of its IKE process (``ike.process``): start it, relay its UDP 4500
datagrams, forward its control commands, stop it.

The IKE daemon talks to the kernel only through PF_KEY, so it can live in another process, as
racoon does next to a BSD kernel. That puts negotiation on one core and the kernel and datapath
on another. ``[daemon] ike_process = false`` keeps it in the daemon's process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .control import ControlClient, ControlError
from .ike_relay import Datagram, Relay
from .rundir import RunDir

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # a cold interpreter importing cryptography, then binding and REGISTER
STOP_TIMEOUT = 30.0  # its deletes towards the peers are bounded by its own grace period
COMMAND_TIMEOUT = 600.0  # `up` waits for the peer; the IKE process bounds that itself
# answered by it as they are (`reload` and `stats` go through the daemon's own handlers)
FORWARDED = ("up", "down", "status")


class IkeProcessError(Exception):
    """The IKE process could not be started; the message says why."""


class NattPort(Protocol):
    """The datapath's UDP 4500 as IKE sees it (datapath.engine.Datapath)."""

    def send_ike(self, message: bytes, peer: tuple[Any, ...], source: str | None = None) -> bool:
        ...

    def set_ike_handler(self, handler: Callable[[bytes, tuple[Any, ...], tuple[Any, ...]], None]
                        | None) -> None:
        ...


class IkeProcess:
    def __init__(self, run_dir: RunDir, config_path: Path, natt: NattPort | None,
                 on_exit: Callable[[str], None]) -> None:
        """``natt``: the datapath whose UDP 4500 the IKE process uses (None: it binds its own).
        ``on_exit(reason)``: called if the process ends without being asked to."""
        self.run_dir = run_dir
        self.config_path = config_path
        self.natt = natt
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self._relay: Relay | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._control = ControlClient(run_dir.ike_control_socket)

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        self._relay = Relay(ours, self._from_ike, on_ready=on_ready)
        await self._relay.start()
        argv = [sys.executable, "-m", "ike.process", "--run-dir", str(self.run_dir.path),
                "--config", str(self.config_path), "--relay-fd", str(theirs.fileno()),
                "--parent", str(os.getpid())]
        if self.natt is None:
            argv.append("--own-natt")
        try:
            # Its own session: Ctrl-C reaches the daemon, which stops it in order.
            self.proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=[theirs.fileno()], start_new_session=True, env=_child_env())
        finally:
            theirs.close()
        exited = asyncio.ensure_future(self.proc.wait())
        waiting: list[asyncio.Future[Any]] = [ready, exited]
        done, _ = await asyncio.wait(waiting, timeout=START_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            exited.cancel()
            await self._kill()
            await self._relay.close()
            why = (f"exited with status {self.proc.returncode}" if self.proc.returncode
                   is not None else f"did not start within {START_TIMEOUT:g} s")
            raise IkeProcessError(f"the IKE process {why} (its log is above)")
        if self.natt is not None:
            self.natt.set_ike_handler(self._to_ike)
        self._watch = asyncio.create_task(self._watch_exit(exited))

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def close(self) -> None:
        """SIGTERM, then wait for it to delete its SAs (through our relay and PF_KEY)."""
        self._stopping = True
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("daemon: the IKE process did not stop in %g s; killed", STOP_TIMEOUT)
                await self._kill()
        self._control.close()
        if self._watch is not None:
            self._watch.cancel()
        if self.natt is not None:
            self.natt.set_ike_handler(None)
        if self._relay is not None:
            await self._relay.close()

    async def forward(self, command: str, args: dict[str, Any]) -> Any:
        """A control command answered by the IKE process."""
        try:
            return await self._control.request(command, args, COMMAND_TIMEOUT)
        except OSError as exc:
            raise ControlError(f"the IKE process does not answer: {exc}") from None

    def stats(self) -> dict[str, int]:
        return {"relay_dropped": self._relay.dropped if self._relay is not None else 0}

    # -- relay -------------------------------------------------------------------------------

    def _to_ike(self, message: bytes, peer: tuple[Any, ...], local: tuple[Any, ...]) -> None:
        assert self._relay is not None
        self._relay.send(message, peer, local)

    def _from_ike(self, datagram: Datagram) -> None:
        if self.natt is not None:
            self.natt.send_ike(datagram.message, datagram.peer, datagram.local[0])

    # -- lifetime ----------------------------------------------------------------------------

    async def _watch_exit(self, exited: asyncio.Future[int]) -> None:
        status = await exited
        if not self._stopping:
            self.on_exit(f"the IKE process exited unexpectedly (status {status})")

    async def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def _child_env() -> dict[str, str]:
    """Our environment, with the directory we were imported from first on the path, so the
    IKE process runs the same code as the daemon (a source checkout or an installed copy)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root if not path else f"{root}{os.pathsep}{path}")
