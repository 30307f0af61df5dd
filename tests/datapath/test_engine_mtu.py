"""The TUN MTU follows the overhead of the SAs in use (no root: the netlink worker is replaced
by a recorder of the link changes the engine asks for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datapath.engine import WORST_OVERHEAD
from tests.datapath.engine_helpers import LEFT, RIGHT, make_side, tunnel_scripts


class LinkRecorder:
    """Stands in for the engine's netlink worker: records setup_link(name, addrs, mtu)."""

    def __init__(self) -> None:
        self.mtus: list[int] = []
        self.netconf = self

    def setup_link(self, name: str, addresses: tuple[str, ...], mtu: int) -> None:
        self.mtus.append(mtu)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def test_mtu_grows_to_what_the_sas_need() -> None:
    left, right = make_side(LEFT), make_side(RIGHT)
    links = LinkRecorder()
    left.dp.netlink = links  # type: ignore[assignment]
    assert left.dp.mtu == 1500 - WORST_OVERHEAD
    script, _ = tunnel_scripts(left, right)
    left.setkey(script)
    # AES-GCM-16 in UDP over IPv4: 20 + 8 + 8 (SPI, seq) + 8 (IV) + 3 (pad) + 2 + 16 (ICV).
    assert links.mtus == [1500 - 65] and left.dp.mtu == 1435
    left.setkey("spdflush;")  # no SAD change, no new MTU
    assert links.mtus == [1435]
    left.setkey("flush;")  # no SAs left: keep what we have
    assert links.mtus == [1435] and left.dp.mtu == 1435



def test_a_configured_tun_mtu_wins_over_the_sas() -> None:
    left, right = make_side(LEFT, tun_mtu=1400), make_side(RIGHT)
    links = LinkRecorder()
    left.dp.netlink = links  # type: ignore[assignment]
    assert left.dp.mtu == 1400
    script, _ = tunnel_scripts(left, right)
    left.setkey(script)
    assert links.mtus == [] and left.dp.mtu == 1400
