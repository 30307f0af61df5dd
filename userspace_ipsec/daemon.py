"""``uipsec daemon``: the process that plays the kernel (and, later, the IKE daemon).

A thin asyncio adapter: it owns the run directory, serves the PF_KEY socket in front of the
sans-IO Kernel, runs the ESP datapath (TUN, UDP 4500, raw ESP) unless told not to, and wakes the
Kernel when its next lifetime deadline is due. It runs in the foreground (systemd-friendly),
stops cleanly on SIGTERM/SIGINT and removes its sockets, routes and TUN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, DaemonConfig
from .kernel import Delivery, Kernel, KernelOptions
from .pfkey.server import PfkeyServer
from .rundir import RunDir, RunDirLock

if TYPE_CHECKING:
    from datapath.engine import Datapath

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
                 datapath: bool = True) -> None:
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
        try:
            await self.pfkey.start()
            log.info("daemon: serving PF_KEY on %s", self.run_dir.pfkey_socket)
            if self.datapath is not None:
                self.datapath.start(loop)
                self.pfkey.after_dispatch = self.datapath.sync
            timer = asyncio.create_task(self._timer_loop())
            await self._stop.wait()
            timer.cancel()
            log.info("daemon: stopping")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            self.pfkey.after_dispatch = None
            if self.datapath is not None:
                self.datapath.close()
            await self.pfkey.close()
            self._lock.release()

    def _log_stats(self) -> None:
        """SIGUSR1: one log line with the datapath's counters (until ``uipsec stats`` exists)."""
        if self.datapath is not None:
            log.warning("datapath stats: %s", json.dumps(self.datapath.stats(), sort_keys=True))

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
