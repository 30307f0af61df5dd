"""netconf: TUN link setup, routes into the TUN, the fwmark rule, and exact removal."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from datapath.netconf import NetConfig, NetConfigError, RoutingPolicy, tun_mtu
from datapath.sockets import DatagramBatch, UdpSocket
from datapath.tun import PacketSlots, TunDevice
from tests.netns import Netns, NetnsHarness, collect, link

POLICY = RoutingPolicy(table=220, fwmark=0x220, priority=220)


def _state(ns: Netns) -> str:
    """Everything netconf may touch, as text: rules, all routing tables, addresses, MTUs."""
    parts = [ns.ip(f"-{v}", *cmd).stdout for v in (4, 6)
             for cmd in (("rule",), ("route", "show", "table", "all"), ("addr",))]
    return "\n".join(parts)


@pytest.fixture
def pair(netns_harness: NetnsHarness) -> tuple[Netns, Netns, TunDevice, NetConfig]:
    """Namespace a (with a TUN and a NetConfig) linked to b over veth 10.7.0.0/24, fd00:7::/64."""
    a, b = netns_harness.netns("a"), netns_harness.netns("b")
    link(netns_harness, a, b, 7)
    with a.entered():
        tun = TunDevice("uit0")
        nc = NetConfig(POLICY)
    return a, b, tun, nc


def _udp_in(ns: Netns, family: int, port: int = 0, mark: int | None = None) -> UdpSocket:
    with ns.entered():
        return UdpSocket(family, port=port, mark=mark, gro=False)


def _tun_udp(tun: TunDevice) -> list[IP | IPv6]:
    slots = PacketSlots(32)

    def poll() -> list[IP | IPv6]:
        pkts = [IP(bytes(slots.packet(i))) if slots.packet(i)[0] >> 4 == 4
                else IPv6(bytes(slots.packet(i))) for i in range(tun.read_batch(slots))]
        return [p for p in pkts if p.haslayer(UDP)]

    return collect(poll, 1, timeout=1.0)


def _received(sock: UdpSocket) -> list[tuple[bytes, str]]:
    batch = DatagramBatch(8, 2048)
    got = collect(lambda: [(bytes(batch.view(i)), batch.source(i)[0])
                           for i in range(sock.recv_batch(batch))], 1, timeout=1.0)
    return got


def test_setup_is_idempotent_and_remove_all_leaves_no_trace(pair: tuple) -> None:
    a, _b, tun, nc = pair
    before = _state(a)
    for _ in range(2):
        nc.setup_link("uit0", ["10.9.0.1/24", "fd09::1/64"], mtu=1400)
        nc.add_route("10.50.0.0/16", "uit0", src="10.9.0.1")
        nc.add_route("fd50::/48", "uit0", src="fd09::1")
        nc.install_rules()
    assert len(nc.installed) == len(set(nc.installed)) == 8
    rules4 = a.ip("-4", "rule").stdout
    assert rules4.count("not from all fwmark 0x220 lookup 220") == 1
    assert "220:" in rules4
    assert "not from all fwmark 0x220 lookup 220" in a.ip("-6", "rule").stdout
    assert "10.50.0.0/16 dev uit0 proto static src 10.9.0.1" in \
        a.ip("-4", "route", "show", "table", "220").stdout
    assert "fd50::/48 dev uit0" in a.ip("-6", "route", "show", "table", "220").stdout
    assert "mtu 1400" in a.ip("link", "show", "uit0").stdout
    assert "fd09::1/64 scope global nodad" in a.ip("-6", "addr", "show", "uit0").stdout
    nc.remove_all()
    assert nc.installed == []
    assert _state(a) == before
    nc.remove_all()  # nothing left: a no-op
    tun.close()


@pytest.mark.parametrize(("family", "peer", "tun_src"),
                         [(socket.AF_INET, "10.7.0.2", "10.9.0.1"),
                          (socket.AF_INET6, "fd00:7::2", "fd09::1")], ids=["v4", "v6"])
def test_host_to_host_marked_sockets_bypass_the_tun(pair: tuple, family: int, peer: str,
                                                    tun_src: str) -> None:
    """Transport mode: the peer itself is routed into the TUN, yet the datapath's own marked
    UDP 4500 socket still reaches the peer directly over veth."""
    a, b, tun, nc = pair
    nc.setup_link("uit0", ["10.9.0.1/24", "fd09::1/64"], mtu=1400)
    host_prefix = f"{peer}/{32 if family == socket.AF_INET else 128}"
    nc.add_route(host_prefix, "uit0", src=tun_src)
    nc.install_rules()
    listener = _udp_in(b, family, 4500)
    app = _udp_in(a, family)  # an application: no mark, must go into the TUN
    esp = _udp_in(a, family, 4500, mark=POLICY.fwmark)  # the datapath's own socket

    app.send(b"inner", (peer, 4500))
    into_tun = _tun_udp(tun)
    assert len(into_tun) == 1 and into_tun[0].src == tun_src and into_tun[0].dst == peer
    assert _received(listener) == [], "unmarked traffic leaked around the TUN"

    assert esp.send(b"outer", (peer, 4500))
    got = _received(listener)
    assert [d for d, _ in got] == [b"outer"]
    assert _tun_udp(tun) == [], "marked traffic looped into the TUN"

    nc.remove_all()  # without the route and rule the app's packet goes straight to b again
    app.send(b"direct", (peer, 4500))
    assert [d for d, _ in _received(listener)] == [b"direct"]


def test_remove_after_tun_closed_is_quiet(pair: tuple) -> None:
    a, _b, tun, nc = pair
    nc.setup_link("uit0", ["10.9.0.1/24"], mtu=1400)
    nc.add_route("10.50.0.0/16", "uit0", src="10.9.0.1")
    nc.install_rules()
    tun.close()  # the kernel drops the device with its addresses and routes
    nc.remove_all()
    assert "lookup 220" not in a.ip("-4", "rule").stdout


def test_bad_requests_fail_clearly(pair: tuple) -> None:
    _a, _b, _tun, nc = pair
    with pytest.raises(NetConfigError, match="no interface named 'nope0'"):
        nc.add_route("10.50.0.0/16", "nope0")
    with pytest.raises(ValueError, match="family"):
        nc.add_route("10.50.0.0/16", "uit0", src="fd09::1")
    nc.setup_link("uit0", [], mtu=1400)
    bad_src = r"route 10\.50\.0\.0/16 dev uit0 table 220: Invalid argument"
    with pytest.raises(NetConfigError, match=bad_src):
        nc.add_route("10.50.0.0/16", "uit0", src="10.99.99.99")  # not a local address
    nc.remove_all()


def test_routing_policy_validation() -> None:
    with pytest.raises(ValueError):
        RoutingPolicy(table=254)
    with pytest.raises(ValueError):
        RoutingPolicy(fwmark=0)
    with pytest.raises(ValueError):
        RoutingPolicy(fwmark=0x100, fwmask=0xFF)
    with pytest.raises(ValueError):
        RoutingPolicy(priority=32766)
    assert RoutingPolicy(table=1000, fwmark=0x4000, fwmask=0x4000, priority=100).table == 1000


def test_tun_mtu() -> None:
    # ESP in UDP over IPv4 with AES-GCM-16: 20 IP + 8 UDP + 8 ESP + 8 IV + 2 trailer + 16 ICV
    # + up to 3 pad bytes (4-byte alignment) = 65.
    assert tun_mtu(1500, 65) == 1435
    assert tun_mtu(1400, 100, ipv6=False) == 1300
    with pytest.raises(ValueError, match="below 1280"):
        tun_mtu(1300, 73)
    assert tun_mtu(700, 100, ipv6=False) == 600
    with pytest.raises(ValueError):
        tun_mtu(1500, -1)
