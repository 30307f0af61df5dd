"""The IKE daemon in a process of its own, started by ``uipsec daemon`` (racoon's layout).

    python -m ike.process --run-dir DIR --config FILE --relay-fd N --parent PID [--own-natt]

It keys the daemon's kernel through the run directory's PF_KEY socket like any other client,
gets and sends its UDP 4500 datagrams through the relay stream on fd N (the datapath owns that
port; ``--own-natt`` when the daemon runs without one: then it binds UDP 4500 itself), and
answers ``up``, ``down``, ``status``, ``reload`` and ``stats`` on ``ike-control.sock``, which
the daemon's control socket forwards to. Once serving it sends READY on the relay.

Negotiating, hashing and the PF_KEY client's work run here, the kernel's side of PF_KEY and the
datapath in the daemon: on a machine with two cores, setting up many IKE SAs uses both.

It stops (deleting its IKE SAs towards the peers and what it installed) on SIGTERM from the
daemon; if the daemon dies it dies too (PR_SET_PDEATHSIG), without deletes: the kernel it keyed
is gone.

With ``[daemon] ike_user`` it is racoon's privsep child: once its sockets, its PF_KEY connection
and its control socket are open, it becomes that user for good (no capabilities, no new
privileges). It can no longer read the configuration (root's, 0600), so the daemon parses it on
reload and hands the result over on the control socket, which only root can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import gc
import importlib
import logging
import os
import pickle
import pkgutil
import pwd
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from ike import connections as ike_connections
from ike.control_cmds import register
from ike.service import IkeService, NattHandler
from userspace_ipsec.config import ConfigError
from userspace_ipsec.control import ControlError, ControlServer
from userspace_ipsec.ike_relay import Datagram, Relay
from userspace_ipsec.rundir import RunDir

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
EXIT_PARENT_GONE = 3


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _die_with_parent(parent: int) -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the daemon died before the line above took effect
        sys.exit(EXIT_PARENT_GONE)


# Imported on first use by the libraries (cryptography's backends, name resolution in a worker
# thread): as another user we may not be able to read them any more (an interpreter under
# /root), so they are all loaded while we still can.
_PRELOAD_PACKAGES = ("cryptography.hazmat", "ike")
_PRELOAD_MODULES = ("concurrent.futures.thread", "encodings.idna")


def _preload() -> None:
    for name in _PRELOAD_MODULES:
        importlib.import_module(name)
    for package in _PRELOAD_PACKAGES:
        for module in pkgutil.walk_packages(importlib.import_module(package).__path__,
                                            package + "."):
            importlib.import_module(module.name)


def _drop_privileges(user: str, parent: int) -> None:
    """Become ``user`` for good (racoon's privsep): every socket is open by now, and the
    daemon reads the configuration for us on reload. No capability survives the change of
    user, and nothing we could exec may gain privileges again."""
    _preload()
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _die_with_parent(parent)  # a change of credentials clears the parent-death signal
    log.info("ike process: running as user %s (uid %d)", user, entry.pw_uid)


async def _reload_handed_over(service: IkeService, args: dict[str, Any]) -> dict[str, Any]:
    """``reload`` without access to the configuration: the daemon parsed it and hands the
    result over on this socket, which only root can connect to."""
    blob = args.get("connections")
    if not isinstance(blob, str):
        raise ControlError("the IKE process runs unprivileged: reload through the daemon")
    connections = pickle.loads(base64.b64decode(blob))  # noqa: S301 - from root, see above
    return await service.reload(connections)


async def serve(run_dir: RunDir, config_path: Path, relay_fd: int, own_natt: bool,
                parent: int) -> None:
    config, connections = ike_connections.load(config_path)
    logging.getLogger().setLevel(config.daemon.log_level.upper())
    relay = Relay(socket.socket(fileno=relay_fd), _ignore)  # until the service registers

    def natt_send(message: bytes, peer: tuple[str, int], source: str | None) -> bool:
        return relay.send(message, peer, (source, 0))

    def natt_register(handler: NattHandler | None) -> None:
        relay.on_datagram = _ignore if handler is None else \
            (lambda d: handler(d.message, d.peer, d.local))

    await relay.start()
    service = IkeService(run_dir.pfkey_socket, config, connections=connections,
                         natt_send=None if own_natt else natt_send,
                         natt_register=None if own_natt else natt_register)
    control = ControlServer(run_dir.ike_control_socket)
    register(control, service)
    control.register("stats", lambda _args: service.stats())
    user = config.daemon.ike_user
    if user is not None:
        control.register("reload", lambda args: _reload_handed_over(service, args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        await control.start()
        if user is not None:
            _drop_privileges(user, parent)
        relay.send_ready()
        gc.freeze()  # what start-up made lives as long as we do: out of every GC scan
        await asyncio.wait(
            [asyncio.create_task(stop.wait()), asyncio.create_task(relay.closed.wait())],
            return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():  # the daemon closed the relay without asking us to stop
            log.error("ike process: the daemon went away; exiting without deletes")
            os._exit(EXIT_PARENT_GONE)
    finally:
        await control.close()
        await service.close()
        await relay.close()


def _ignore(_datagram: Datagram) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ike.process")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--relay-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--own-natt", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the daemon
    _die_with_parent(args.parent)
    try:
        asyncio.run(serve(RunDir(args.run_dir), args.config, args.relay_fd, args.own_natt,
                          args.parent))
    except ConfigError as exc:
        log.error("ike process: %s", exc)
        sys.exit(2)
    except OSError as exc:
        log.error("ike process: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
