"""The outbound path with TUN offloads on: partial checksums completed, TCP super-packets cut
into segments that the far side opens, one by one, with valid checksums (no root needed)."""

from __future__ import annotations

import os
import struct

from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from datapath.segment import GSO_TCPV4, NEEDS_CSUM, VNET
from datapath.tun import PacketSlots
from tests.datapath.engine_helpers import (
    LEFT,
    RIGHT,
    MemoryTun,
    Side,
    connected_pair,
    make_side,
    tunnel_scripts,
)
from tests.datapath.test_segment import checksums_valid, partial, super_packet


class OffloadTun(MemoryTun):
    """A MemoryTun with offloads on: every packet read comes with its virtio_net_hdr."""

    offload = 0x0F

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[bytes] = []

    def read_batch(self, slots: PacketSlots, limit: int | None = None) -> int:
        n = 0
        while self.inbox and n < len(slots.buffers):
            pkt = self.inbox.pop(0)
            slots.views[n][:len(pkt)] = pkt
            slots.lengths[n] = len(pkt)
            slots.vnet[n][:] = self.headers.pop(0)
            n += 1
        return n


def with_offloads(side: Side) -> OffloadTun:
    tun = OffloadTun()
    side.tun = side.dp.tun = tun  # type: ignore[assignment]
    assert side.dp.outbound is not None
    side.dp.outbound.tun = tun  # type: ignore[assignment]
    return tun


def send(side: Side, tun: OffloadTun, packet: bytes, header: bytes) -> None:
    tun.inbox.append(packet)
    tun.headers.append(header)
    side.dp.handle_tun()


def tso_header(packet: bytes, mss: int) -> bytes:
    hlen = 20 + (packet[32] >> 4) * 4
    return VNET.pack(NEEDS_CSUM, GSO_TCPV4, hlen, mss, 20, 16)


def test_a_super_packet_crosses_as_segments_with_valid_checksums() -> None:
    left, right = connected_pair()
    tun = with_offloads(left)
    payload = os.urandom(10_000)
    packet = bytes(partial(IP(super_packet(4, payload)), 20, 16, 6))
    send(left, tun, packet, tso_header(packet, 1200))
    right.receive()
    got = [IP(p) for p in right.tun.sent]
    assert len(got) == 9
    assert all(checksums_valid(p) for p in got)
    assert b"".join(bytes(p[TCP].payload) for p in got) == payload
    stats = left.dp.stats()
    assert stats["tso_packets"] == 1 and stats["tso_segments"] == stats["sealed"] == 9
    assert right.dp.stats()["opened"] == 9
    sa = next(iter(s for s in left.kernel.sad if s.spi == 0x1001))
    assert sa.packets_out == 9
    assert sa.bytes_out == sum(len(bytes(p)) for p in got)


def test_more_segments_than_output_slots() -> None:
    left, right = connected_pair()
    tun = with_offloads(left)
    payload = os.urandom(65000)
    packet = bytes(partial(IP(super_packet(4, payload)), 20, 16, 6))
    send(left, tun, packet, tso_header(packet, 500))  # 130 segments, 64 slots
    for _ in range(5):
        right.receive()
        if len(right.tun.sent) == 130:
            break
    got = [IP(p) for p in right.tun.sent]
    assert len(got) == 130
    assert b"".join(bytes(p[TCP].payload) for p in got) == payload


def test_a_partial_udp_checksum_is_completed_before_sealing() -> None:
    left, right = connected_pair()
    tun = with_offloads(left)
    pkt = IP(src="10.1.0.2", dst="10.4.0.2") / UDP(sport=5, dport=6) / Raw(b"hello" * 50)
    send(left, tun, bytes(partial(pkt, 20, 6, 17)), VNET.pack(NEEDS_CSUM, 0, 0, 0, 20, 6))
    plain = bytes(IP(src="10.1.0.2", dst="10.4.0.2") / UDP(sport=5, dport=6) / Raw(b"x"))
    send(left, tun, plain, bytes(VNET.size))  # no offload asked: left as it is
    right.receive()
    assert right.tun.sent == [bytes(pkt), plain]


def test_bad_offload_requests_are_counted_drops() -> None:
    left, right = connected_pair()
    tun = with_offloads(left)
    pkt = bytes(IP(src="10.1.0.2", dst="10.4.0.2") / UDP(sport=5, dport=6) / Raw(b"x" * 10))
    send(left, tun, pkt, VNET.pack(NEEDS_CSUM, 0, 0, 0, 20, 200))  # field past the end
    send(left, tun, pkt, VNET.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16))  # GSO of UDP
    assert left.dp.stats()["malformed"] == 2 and left.dp.stats()["sealed"] == 0


def test_segments_too_big_for_the_sa_get_a_packet_too_big() -> None:
    left, right = connected_pair(path_mtu=1000)
    tun = with_offloads(left)
    payload = os.urandom(5000)
    packet = bytes(partial(IP(super_packet(4, payload)), 20, 16, 6))
    send(left, tun, packet, tso_header(packet, 1400))
    assert left.dp.stats()["ptb_sent"] == 1 and left.dp.stats()["sealed"] == 0
    (error,) = tun.sent
    icmp = IP(error)
    assert icmp.proto == 1 and icmp.dst == "10.1.0.2"
    mtu = struct.unpack("!H", bytes(icmp.payload)[6:8])[0]
    assert 900 < mtu < 1000


def test_a_super_packet_without_sa_is_held_as_segments() -> None:
    left, right = make_side(LEFT), make_side(RIGHT)
    l_script, _ = tunnel_scripts(left, right, with_sas=False)
    left.setkey(l_script)
    left.register()
    tun = with_offloads(left)
    packet = bytes(partial(IP(super_packet(4, os.urandom(3000))), 20, 16, 6))
    send(left, tun, packet, tso_header(packet, 1000))
    assert left.dp.outbound is not None
    (held,) = left.dp.outbound.held.values()
    assert len(held) == 3 and all(checksums_valid(IP(p)) for p in held)
