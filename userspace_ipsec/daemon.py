"""``uipsec daemon``: the process that plays the kernel, and the IKE daemon when configured.

A thin asyncio adapter: it owns the run directory, serves the PF_KEY socket in front of the
sans-IO Kernel, runs the ESP datapath (TUN, UDP 4500, raw ESP) unless told not to, wakes the
Kernel when its next lifetime deadline is due, and answers the control socket. When the
configuration has IKE connections it runs the IKE service too, which keys the Kernel through
PF_KEY like any other client (racoon's way). It runs in the foreground (systemd-friendly), stops
cleanly on SIGTERM/SIGINT (removing its sockets, routes and TUN) and reloads on SIGHUP.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import pickle
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, DaemonConfig
from .control import ControlError, ControlServer
from .ike_process import FORWARDED, IkeProcess
from .kernel import Delivery, Kernel, KernelOptions
from .pfkey.server import PfkeyServer
from .rundir import RunDir, RunDirLock

if TYPE_CHECKING:
    from datapath.engine import Datapath
    from ike.connections import Connections
    from ike.service import IkeService

log = logging.getLogger(__name__)

# Upper bound on how long the timer sleeps: a deadline that moves closer (a new SA with a short
# lifetime) or a clock step is noticed within this.
MAX_TIMER_SLEEP = 1.0


class _Server(PfkeyServer):
    """The PF_KEY server, telling the datapath after each request that the SAD/SPD may have
    changed (it compares generations, so this is cheap)."""

    after_dispatch: Callable[[], None] | None = None

    def dispatch(self, sender: int | None, deliveries: Iterable[Delivery]) -> None:
        super().dispatch(sender, deliveries)
        if self.after_dispatch is not None:
            self.after_dispatch()


class Daemon:
    def __init__(self, run_dir: Path, config: Config | None = None, *,
                 datapath: bool = True, connections: Connections | None = None) -> None:
        self.run_dir = RunDir(run_dir)
        self.config = config or Config(daemon=DaemonConfig())
        daemon_config = self.config.daemon
        self.kernel = Kernel(
            KernelOptions(
                allow_weak=daemon_config.allow_weak_algorithms,
                larval_timeout=daemon_config.larval_timeout,
                acquire_interval=daemon_config.acquire_interval,
            )
        )
        self.pfkey = _Server(
            self.kernel, self.run_dir.pfkey_socket, group=daemon_config.pfkey_group
        )
        self.datapath: Datapath | None = None
        if datapath and self.config.datapath.enabled:
            from datapath.engine import Datapath

            self.datapath = Datapath(self.kernel, self.config.datapath,
                                     lambda d: self.pfkey.dispatch(None, d))
        self.control = ControlServer(self.run_dir.control_socket)
        self.control.register("stats", lambda _args: self.stats())
        self.ike: IkeService | None = None
        self.ike_process: IkeProcess | None = None
        self.failure: str | None = None  # why the daemon stopped, if it had to
        self._ike_connections = 0
        config_file = Path(self.config.source)
        if connections is not None and connections.connections:
            self._ike_connections = len(connections.connections)
            if daemon_config.ike_process and config_file.is_file():
                self.ike_process = IkeProcess(self.run_dir, config_file.resolve(),
                                              self.datapath, self._ike_process_exited)
            else:
                from ike.service import IkeService

                # Without a datapath the service binds UDP 4500 itself.
                dp = self.datapath
                self.ike = IkeService(
                    self.run_dir.pfkey_socket, self.config, connections=connections,
                    natt_send=dp.send_ike if dp is not None else None,
                    natt_register=dp.set_ike_handler if dp is not None else None,
                )
        self.control.register("reload", lambda _args: self.reload())  # refuses without IKE
        self._lock = RunDirLock(self.run_dir)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT. Raises RunDirError before serving if the run directory
        cannot be had."""
        self._lock.acquire()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._log_stats)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        timer: asyncio.Task[None] | None = None
        try:
            await self.pfkey.start()
            log.info("daemon: serving PF_KEY on %s", self.run_dir.pfkey_socket)
            if self.datapath is not None:
                self.datapath.start(loop)
                self.pfkey.after_dispatch = self.datapath.sync
            timer = asyncio.create_task(self._timer_loop())
            if self.ike_process is not None:
                await self.ike_process.start()
                for command in FORWARDED:
                    self.control.register(command, self._forwarder(command))
                log.info("daemon: IKE service running (%d connections) in process %d",
                         self._ike_connections, self.ike_process.pid)
            if self.ike is not None:
                from ike.control_cmds import register

                await self.ike.start()
                register(self.control, self.ike)
                # One reload path for SIGHUP and `uipsec reload`, with the daemon's log line.
                self.control.register("reload", lambda _args: self.reload())
                log.info("daemon: IKE service running (%d connections)",
                         len(self.ike.connections.connections))
            # Last: a client that finds the control socket finds every command behind it.
            await self.control.start()
            gc.freeze()  # what start-up made lives as long as we do: out of every GC scan
            await self._stop.wait()
            log.info("daemon: stopping")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.control.close()
            if self.ike_process is not None:
                await self.ike_process.close()  # its deletes need our PF_KEY and UDP 4500
            if self.ike is not None:
                await self.ike.close()  # deletes towards peers, removes its SAs and policies
            if timer is not None:
                timer.cancel()
            self.pfkey.after_dispatch = None
            if self.datapath is not None:
                self.datapath.close()
            await self.pfkey.close()
            self._lock.release()

    async def stats(self) -> dict[str, object]:
        """The ``stats`` control command: every part's global counters."""
        result = self._local_stats()
        if self.ike_process is not None:
            result["ike"] = {**await self.ike_process.forward("stats", {}),
                             **self.ike_process.stats()}
        return result

    def _local_stats(self) -> dict[str, object]:
        result: dict[str, object] = {
            "pfkey": {
                "sas": len(self.kernel.sad),
                "policies": len(self.kernel.spd),
                **{k: getattr(self.pfkey.stats, k) for k in self.pfkey.stats.__slots__},
            },
        }
        if self.datapath is not None:
            result["datapath"] = self.datapath.stats()
        if self.ike is not None:
            result["ike"] = self.ike.stats()
        return result

    async def reload(self) -> dict[str, list[str]]:
        """SIGHUP / ``uipsec reload``: re-read the configuration; unchanged tunnels stay up."""
        if self.ike is None and self.ike_process is None:
            raise ControlError("no IKE connections were configured at start: nothing to reload")
        try:
            if self.ike_process is not None:
                result: dict[str, list[str]] = await self.ike_process.forward(
                    "reload", self._handed_over_config())
            else:
                from ike.control_cmds import reload

                assert self.ike is not None
                result = await reload(self.ike, {})
        except ControlError as exc:
            log.error("daemon: %s", exc)
            raise
        log.info("daemon: reloaded %s", self.config.source)
        return result

    def _handed_over_config(self) -> dict[str, str]:
        """An unprivileged IKE process cannot read the configuration (root's, 0600): it gets
        it parsed from us, as racoon's privsep child asks its parent for what it may not
        read. Empty when it reads the file itself."""
        if self.ike_process is None or self.config.daemon.ike_user is None:
            return {}
        from ike import connections as ike_connections

        try:
            _, connections = ike_connections.load(self.ike_process.config_path)
        except ConfigError as exc:
            raise ControlError(f"configuration refused, nothing changed: {exc}") from None
        return {"connections": base64.b64encode(pickle.dumps(connections)).decode()}

    def _reload_in_background(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _log_stats(self) -> None:
        """SIGUSR1: one log line with every part's counters."""
        async def write() -> None:
            try:
                stats = await self.stats()
            except ControlError as exc:
                stats = {**self._local_stats(), "ike": str(exc)}
            log.warning("daemon stats: %s", json.dumps(stats, sort_keys=True))

        task = asyncio.get_running_loop().create_task(write())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _forwarder(self, command: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
        def forward(args: dict[str, Any]) -> Awaitable[Any]:
            assert self.ike_process is not None
            return self.ike_process.forward(command, args)
        return forward

    def _ike_process_exited(self, reason: str) -> None:
        log.error("daemon: %s; stopping", reason)
        self.failure = reason
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()

    async def _timer_loop(self) -> None:
        """Drive the Kernel's lifetimes: soft/hard expiry and larval timeouts."""
        while True:
            now = time.time()
            self.pfkey.dispatch(None, self.kernel.tick(now))
            if self.datapath is not None:
                self.datapath.tick(now)
            deadline = self.kernel.next_deadline()
            delay = MAX_TIMER_SLEEP if deadline is None else max(0.0, deadline - now)
            await asyncio.sleep(min(delay, MAX_TIMER_SLEEP))
