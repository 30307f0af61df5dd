"""The services against real `uipsec daemon --no-datapath` processes (their PF_KEY sockets),
one of them listening on the wildcard address (source and destination via IP_PKTINFO), the
other initiating; the SAD and SPD read back with a PF_KEY DUMP."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ike.connections import loads
from ike.service import IkeService
from tests.daemon.daemon_proc import start_daemon
from tests.ike_daemon.gateways import config_text, run, until
from userspace_ipsec import config as config_mod
from userspace_ipsec.pfkey.client import PfkeyClient


def _service(tmp: Path, name: str, text: str, sock: Path) -> IkeService:
    conf = tmp / f"{name}.toml"
    conf.write_text(text)
    os.chmod(conf, 0o600)
    config = config_mod.loads(text, str(conf), extra_tables={"ike", "connections", "secrets"})
    return IkeService(sock, config, connections=loads(text, str(conf))[1])


def _dump(sock: Path) -> tuple[list[str], list[str]]:
    with PfkeyClient(sock, timeout=5) as client:
        sas = [f"{m.sa.spi:08x}" for m in client.dump() if m.sa is not None]
        pols = [f"{m.src.address}/{m.src.prefixlen}>{m.dst.address}/{m.dst.prefixlen}"
                for m in client.spddump() if m.src is not None and m.dst is not None]
    return sas, pols


def test_wildcard_responder_with_subprocess_kernels(tmp_path: Path) -> None:
    kernels = [start_daemon(tmp_path / f"run{i}", tmp_path / f"d{i}.log") for i in range(2)]
    try:
        left_text = config_text("127.0.0.1", "127.0.0.2", local_ts='"10.1.0.0/16"',
                                remote_ts='"10.2.0.0/16"', port=15600).replace(
            'listen = ["127.0.0.1"]', 'listen = ["0.0.0.0"]').replace(
            "remote_port = 15600", "remote_port = 15601")
        right_text = config_text("127.0.0.2", "127.0.0.1", local_ts='"10.2.0.0/16"',
                                 remote_ts='"10.1.0.0/16"', port=15601).replace(
            "remote_port = 15601", "remote_port = 15600")

        async def scenario() -> None:
            left = _service(tmp_path, "left", left_text, kernels[0].socket_path)
            right = _service(tmp_path, "right", right_text, kernels[1].socket_path)
            await left.start()
            await right.start()
            try:
                rec = await right.initiate("site")
                assert await right.wait_established(rec, 20)
                await until(lambda: bool(left.records and left.records[0].children))
                (lrec,) = left.records
                assert lrec.local_ip == "127.0.0.1"  # learned from IP_PKTINFO
                lsas, lpols = await asyncio.to_thread(_dump, kernels[0].socket_path)
                rsas, rpols = await asyncio.to_thread(_dump, kernels[1].socket_path)
                assert sorted(lsas) == sorted(rsas) and len(lsas) == 2
                assert sorted(lpols) == ["10.1.0.0/16>10.2.0.0/16", "10.2.0.0/16>10.1.0.0/16",
                                         "10.2.0.0/16>10.1.0.0/16"]
                assert len(rpols) == 3
            finally:
                await right.close()
                await left.close()
            assert await asyncio.to_thread(_dump, kernels[0].socket_path) == ([], [])
            assert await asyncio.to_thread(_dump, kernels[1].socket_path) == ([], [])

        run(scenario())
    finally:
        for k in kernels:
            assert k.stop() == 0
