"""Two IKE daemons on loopback, each with its own emulated kernel (Kernel + PfkeyServer in
this process, PF_KEY over a real Unix socket) and real UDP sockets on 127.0.0.1 / 127.0.0.2."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ike.connections import loads
from ike.service import IkeService
from userspace_ipsec.kernel import Kernel
from userspace_ipsec.pfkey.client import PfkeyClient
from userspace_ipsec.pfkey.server import PfkeyServer
from userspace_ipsec.sa import Policy, SecurityAssociation

IKE_PORT = 15500
NATT_PORT = 14500
PSK = "0x" + "5e" * 32


def config_text(local: str, remote: str, *, local_ts: str, remote_ts: str,
                extra_conn: str = "", extra_child: str = "", port: int = IKE_PORT,
                natt_port: int = NATT_PORT) -> str:
    return f"""
[ike]
listen = ["{local}"]
port = {port}
natt_port = {natt_port}

[connections.site]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
local_port = {port}
remote_port = {port}
proposals = ["aes256gcm16-prfsha256-x25519"]
{extra_conn}

[connections.site.children.net]
local_ts = [{local_ts}]
remote_ts = [{remote_ts}]
esp_proposals = ["aes128gcm16", "aes256-sha256"]
{extra_child}

[secrets.psk.site]
secret = "{PSK}"
"""


@dataclass
class Gateway:
    name: str
    kernel: Kernel
    server: PfkeyServer
    service: IkeService
    sock_path: Path

    def sas(self) -> list[SecurityAssociation]:
        return list(self.kernel.sad.snapshot(0))

    def policies(self) -> list[Policy]:
        return list(self.kernel.spd.snapshot())

    def tick(self, ahead: float) -> None:
        """Run the kernel's lifetimes as if `ahead` seconds had passed."""
        self.server.dispatch(None, self.kernel.tick(time.time() + ahead))


async def start_gateway(tmp: Path, name: str, text: str) -> Gateway:
    kernel = Kernel()
    path = tmp / f"{name}.pfkey.sock"
    server = PfkeyServer(kernel, path)
    await server.start()
    conf = tmp / f"{name}.toml"
    conf.write_text(text)
    os.chmod(conf, 0o600)
    _, conns = loads(text, str(conf))
    from userspace_ipsec import config as config_mod
    config = config_mod.loads(text, str(conf), extra_tables={"ike", "connections", "secrets"})
    service = IkeService(path, config, connections=conns)
    await service.start()
    return Gateway(name, kernel, server, service, path)


async def stop_gateway(gw: Gateway) -> None:
    await gw.service.close()
    await gw.server.close()


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def dump_client(gw: Gateway) -> PfkeyClient:
    return PfkeyClient(gw.sock_path, timeout=5)
