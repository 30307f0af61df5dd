"""``uipsec daemon``: the process that plays the kernel (and, later, the IKE daemon).

A thin asyncio adapter: it owns the run directory, serves the PF_KEY socket in front of the
sans-IO Kernel, and wakes the Kernel when its next lifetime deadline is due. It runs in the
foreground (systemd-friendly), stops cleanly on SIGTERM/SIGINT and removes its sockets.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from .config import Config, DaemonConfig
from .kernel import Kernel, KernelOptions
from .pfkey.server import PfkeyServer
from .rundir import RunDir, RunDirLock

log = logging.getLogger(__name__)

# Upper bound on how long the timer sleeps: a deadline that moves closer (a new SA with a short
# lifetime) or a clock step is noticed within this.
MAX_TIMER_SLEEP = 1.0


class Daemon:
    def __init__(self, run_dir: Path, config: Config | None = None) -> None:
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
        self.pfkey = PfkeyServer(
            self.kernel, self.run_dir.pfkey_socket, group=daemon_config.pfkey_group
        )
        self._lock = RunDirLock(self.run_dir)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT. Raises RunDirError before serving if the run directory
        cannot be had."""
        self._lock.acquire()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.pfkey.start()
            log.info("daemon: serving PF_KEY on %s", self.run_dir.pfkey_socket)
            timer = asyncio.create_task(self._timer_loop())
            await self._stop.wait()
            timer.cancel()
            log.info("daemon: stopping")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.pfkey.close()
            self._lock.release()

    def stop(self) -> None:
        self._stop.set()

    async def _timer_loop(self) -> None:
        """Drive the Kernel's lifetimes: soft/hard expiry and larval timeouts."""
        while True:
            now = time.time()
            self.pfkey.dispatch(None, self.kernel.tick(now))
            deadline = self.kernel.next_deadline()
            delay = MAX_TIMER_SLEEP if deadline is None else max(0.0, deadline - now)
            await asyncio.sleep(min(delay, MAX_TIMER_SLEEP))
