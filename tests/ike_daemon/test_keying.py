"""Keying over a real PF_KEY socket: pipelined installs stay all-or-nothing."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ike.constants import EncrId
from ike.events import ChildSaEstablished
from ike.keying import Keying, KeyingError, PolicySelector, SaParams
from ike.pfkey_async import AsyncPfkey
from ike.transforms import TransformSet
from tests.ike_daemon.gateways import run
from userspace_ipsec.kernel import Kernel
from userspace_ipsec.pfkey.constants import IpsecMode
from userspace_ipsec.pfkey.server import PfkeyServer

LOCAL, REMOTE = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
GCM = TransformSet(EncrId.AES_GCM_16, 128)


def child(spi_in: int, spi_out: int) -> ChildSaEstablished:
    return ChildSaEstablished(spi_in.to_bytes(4, "big"), spi_out.to_bytes(4, "big"), GCM, [],
                              [], False, b"\x01" * 20, b"", b"\x02" * 20, b"")


PARAMS = SaParams(LOCAL, REMOTE, IpsecMode.TUNNEL, 7)
SELECTOR = PolicySelector(ipaddress.ip_network("10.1.0.0/24"),
                          ipaddress.ip_network("10.2.0.0/24"))


async def scenario(tmp: Path) -> None:
    kernel = Kernel()
    server = PfkeyServer(kernel, tmp / "pfkey.sock")
    await server.start()
    pfkey = AsyncPfkey(tmp / "pfkey.sock", lambda msg: None)
    await pfkey.open()
    keying = Keying(pfkey)
    try:
        spis = lambda: sorted(sa.spi for sa in kernel.sad)  # noqa: E731
        # A larval SA that is gone (timed out) by the time of the install: UPDATE fails with
        # ESRCH, ADD takes the SPI; the outbound SA went in the same round trip.
        await keying.install_child(child(0x1000, 0x2000), PARAMS, larval=True)
        assert spis() == [0x1000, 0x2000]
        # The outbound SPI is taken: the inbound SA installed with it is removed again.
        with pytest.raises(KeyingError, match="outbound SA"):
            await keying.install_child(child(0x1001, 0x2000), PARAMS, larval=False)
        assert spis() == [0x1000, 0x2000]
        # The inbound SPI is taken: the outbound SA of the same request is removed again.
        with pytest.raises(KeyingError, match="inbound SA"):
            await keying.install_child(child(0x1000, 0x2001), PARAMS, larval=False)
        assert spis() == [0x1000, 0x2000]

        ids = await keying.add_policies([SELECTOR], LOCAL, REMOTE, IpsecMode.TUNNEL, 7)
        assert len(ids) == 3 and len(kernel.spd) == 3
        # The same selectors again: refused as a whole, nothing of it left behind.
        with pytest.raises(KeyingError, match="policy for 10.1.0.0/24<->10.2.0.0/24"):
            await keying.add_policies([SELECTOR], LOCAL, REMOTE, IpsecMode.TUNNEL, 7)
        assert sorted(p.id for p in kernel.spd) == sorted(ids)
        await keying.delete_policies(ids + [ids[0]])  # one of them twice: ENOENT is quiet
        assert len(kernel.spd) == 0
    finally:
        pfkey.close()
        await server.close()


def test_pipelined_installs_are_all_or_nothing(tmp_path: Path) -> None:
    run(scenario(tmp_path))
