"""TUN device: packets written reach sockets, packets sent by sockets come out of read_batch."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from datapath.tun import PacketSlots, TunDevice
from tests.netns import Netns, NetnsHarness, collect, run_as_nobody

ADDRS = ("10.9.0.1/24", "fd09::1/64")


def _tun_in(ns: Netns, name: str = "uit0", addrs: tuple[str, ...] = ADDRS,
            multi_queue: bool = False, vnet_hdr: bool = False) -> TunDevice:
    with ns.entered():
        tun = TunDevice(name, multi_queue=multi_queue, vnet_hdr=vnet_hdr)
    ns.ip("link", "set", tun.name, "mtu", "1500", "up")
    for cidr in addrs:
        ns.add_addr(tun.name, cidr)
    return tun


def _sock(ns: Netns, family: int, port: int) -> socket.socket:
    with ns.entered():
        s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.setblocking(False)
    return s


def _udp_from_tun(tun: TunDevice, slots: PacketSlots, want: int,
                  limit: int | None = None) -> list[Packet]:
    """UDP packets read from the TUN (ignoring the kernel's own ICMPv6/MLD chatter)."""

    def poll() -> list[Packet]:
        n = tun.read_batch(slots, limit)
        out: list[Packet] = []
        for i in range(n):
            raw = bytes(slots.packet(i))
            pkt = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
            if pkt.haslayer(UDP):
                out.append(pkt)
        return out

    return collect(poll, want)


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet_hdr"])
@pytest.mark.parametrize(
    ("family", "ip_layer", "peer", "local"),
    [(socket.AF_INET, IP, "10.9.0.2", "10.9.0.1"), (socket.AF_INET6, IPv6, "fd09::2", "fd09::1")],
    ids=["v4", "v6"],
)
def test_round_trip(netns_harness: NetnsHarness, vnet_hdr: bool, family: int,
                    ip_layer: type[Packet], peer: str, local: str) -> None:
    ns = netns_harness.netns("tun")
    tun = _tun_in(ns, vnet_hdr=vnet_hdr)
    rx = _sock(ns, family, 7000)
    # Into the kernel: a packet "from the tunnel" reaches the local socket.
    pkt = ip_layer(src=peer, dst=local) / UDP(sport=1234, dport=7000) / Raw(b"in" * 300)
    assert tun.write(bytes(pkt))
    got = collect(lambda: _recv(rx), 1)
    assert got == [(b"in" * 300, peer, 1234)]
    # Out of the kernel: the socket's reply comes out of read_batch as a whole IP packet.
    rx.sendto(b"out" * 400, (peer, 1234))
    slots = PacketSlots(8)
    out = _udp_from_tun(tun, slots, 1)
    assert len(out) == 1
    assert out[0][ip_layer].src == local and out[0][ip_layer].dst == peer
    assert out[0][UDP].sport == 7000 and out[0][UDP].dport == 1234
    assert bytes(out[0][UDP].payload) == b"out" * 400
    assert tun.stats.tx_packets == 1 and tun.stats.tx_dropped == 0
    tun.close()


def test_packet_slots_leave_room_around_each_packet() -> None:
    """A read fills the vnet header and the packet; ``head`` bytes before the header and
    ``tail`` bytes after the size are the consumer's (the ESP header and trailer)."""
    slots = PacketSlots(2, 100, tail=7, head=16)
    assert [len(b) for b in slots.buffers] == [123, 123]
    for i in range(2):
        whole = slots.whole[i]
        assert whole.obj is slots.buffers[i]
        for view, start, end in ((slots.views[i], 16, 123), (slots.vnet[i], 6, 16),
                                 (slots._vnet_reads[i], 6, 116), (slots._reads[i], 16, 116)):
            view[:] = bytes([start]) * len(view)
            assert bytes(whole[start:end]) == bytes([start]) * (end - start)
            assert len(view) == end - start
    with pytest.raises(ValueError):
        PacketSlots(2, 100, head=9)  # no room for the vnet header


def _recv(sock: socket.socket) -> list[tuple[bytes, str, int]]:
    out = []
    for _ in range(64):
        try:
            data, addr = sock.recvfrom(65535)
        except BlockingIOError:
            break
        out.append((data, addr[0], addr[1]))
    return out


def test_read_batch_drains_everything_within_its_bound(netns_harness: NetnsHarness) -> None:
    ns = netns_harness.netns("tun")
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)  # no MLD/RS chatter: exact counts
    tun = _tun_in(ns, addrs=("10.9.0.1/24",))
    tx = _sock(ns, socket.AF_INET, 0)
    for i in range(20):
        tx.sendto(i.to_bytes(2, "big") * 700, ("10.9.0.2", 9))
    slots = PacketSlots(8, 2048)
    assert tun.read_batch(slots, limit=0) == 0
    counts = []
    pkts = []
    for _ in range(4):
        n = tun.read_batch(slots)
        counts.append(n)
        pkts += [IP(bytes(slots.packet(i))) for i in range(n)]
    assert counts == [8, 8, 4, 0]  # bounded by the slots, then drained, then empty: no block
    seqs = [int.from_bytes(bytes(p[UDP].payload)[:2], "big") for p in pkts]
    assert seqs == list(range(20))
    assert all(len(p) == 20 + 8 + 1400 for p in pkts)
    assert tun.stats.rx_packets == 20


def test_bad_write_is_counted_not_raised(netns_harness: NetnsHarness) -> None:
    ns = netns_harness.netns("tun")
    tun = _tun_in(ns)
    assert tun.write(b"") is False
    assert tun.write(bytes(70000)) is False
    assert tun.stats.tx_dropped == 2 and tun.stats.tx_packets == 0


def _attach_as_nobody(ns: Netns, name: str, dev_path: str) -> str:
    def attach() -> str:
        with TunDevice(name, dev_path=dev_path) as tun:
            return tun.name

    return run_as_nobody(attach, ns)


@pytest.fixture
def world_tun_node() -> Iterator[str]:
    """A 0666 node for the TUN driver (10,200): this machine's /dev/net/tun is 0600."""
    d = tempfile.mkdtemp(prefix="uit-tun-")
    try:
        os.chmod(d, 0o755)
        node = os.path.join(d, "tun")
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(10, 200))
        os.chmod(node, 0o666)
        yield node
    finally:
        shutil.rmtree(d)


def test_attach_by_name_unprivileged(netns_harness: NetnsHarness, world_tun_node: str) -> None:
    """A persistent TUN made for user nobody is attached by nobody; a root-owned one is not."""
    ns = netns_harness.netns("tun")
    ns.ip("tuntap", "add", "dev", "uitp0", "mode", "tun", "user", "65534")
    ns.ip("tuntap", "add", "dev", "uitq0", "mode", "tun", "user", "0")
    assert _attach_as_nobody(ns, "uitp0", world_tun_node) == "uitp0"
    denied = _attach_as_nobody(ns, "uitq0", world_tun_node)
    assert denied.startswith("error:") and "uitq0" in denied


def test_multi_queue_two_queues_share_one_device(netns_harness: NetnsHarness) -> None:
    ns = netns_harness.netns("tun")
    q1 = _tun_in(ns, "uitmq0", multi_queue=True)
    with ns.entered():
        q2 = TunDevice("uitmq0", multi_queue=True)
    assert q1.name == q2.name == "uitmq0"
    tx = _sock(ns, socket.AF_INET, 0)
    for port in range(5000, 5064):  # flows hash over the queues; all must come out somewhere
        tx.sendto(b"q", ("10.9.0.2", port))
    slots = PacketSlots(64, 2048)
    seen = collect(lambda: _ports(q1, slots) + _ports(q2, slots), 64)
    assert sorted(seen) == list(range(5000, 5064))


def _ports(tun: TunDevice, slots: PacketSlots) -> list[int]:
    n = tun.read_batch(slots)
    return [IP(bytes(slots.packet(i)))[UDP].dport for i in range(n)
            if slots.packet(i)[0] >> 4 == 4 and slots.packet(i)[9] == 17]


@pytest.mark.parametrize(
    ("family", "ip_layer", "peer", "local"),
    [(socket.AF_INET, IP, "10.9.0.2", "10.9.0.1"), (socket.AF_INET6, IPv6, "fd09::2", "fd09::1")],
    ids=["v4", "v6"],
)
def test_a_merged_udp_run_reaches_the_socket_as_the_datagrams_it_was(
        netns_harness: NetnsHarness, family: int, ip_layer: type[Packet], peer: str,
        local: str) -> None:
    """TunWriter's UDP GSO write into a real TUN: the kernel cuts it back into the same
    datagrams (the short last one included) and delivers each."""
    from datapath.tunwriter import TunWriter

    ns = netns_harness.netns("tun")
    tun = _tun_in(ns, vnet_hdr=True)
    rx = _sock(ns, family, 7000)
    writer = TunWriter(tun.fd, tun.write, vnet=True)
    payloads = [bytes([65 + i]) * 1200 for i in range(5)] + [b"last"]
    for payload in payloads:
        writer.push(bytes(ip_layer(src=peer, dst=local) / UDP(sport=1234, dport=7000) /
                          Raw(payload)))
    writer.flush()
    assert (writer.gso_writes, writer.merged, writer.errors) == (1, 6, 0)
    got = collect(lambda: _recv(rx), len(payloads))
    assert got == [(p, peer, 1234) for p in payloads]
    tun.close()
