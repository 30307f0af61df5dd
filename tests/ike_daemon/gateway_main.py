"""`python -m tests.ike_daemon.gateway_main RUNDIR CONFIG`: an emulated kernel (PF_KEY socket
RUNDIR/pfkey.sock), the IKE service and its control socket (RUNDIR/control.sock) in one
process, until SIGTERM. For interop tests inside a network namespace, where the daemon that
the lead integrates is not available yet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from ike import control_cmds
from ike.connections import load
from ike.service import IkeService
from userspace_ipsec.control import ControlServer
from userspace_ipsec.kernel import Kernel
from userspace_ipsec.pfkey.server import PfkeyServer


async def main(run_dir: Path, config_path: Path) -> None:
    config, conns = load(config_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    kernel = Kernel()
    server = PfkeyServer(kernel, run_dir / "pfkey.sock")
    await server.start()
    service = IkeService(run_dir / "pfkey.sock", config, connections=conns)
    await service.start()
    control = ControlServer(run_dir / "control.sock")
    control_cmds.register(control, service)
    await control.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        server.dispatch(None, kernel.tick(time.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    await control.close()
    await service.close()
    await server.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
