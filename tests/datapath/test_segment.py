"""TSO segmentation and partial-checksum completion (datapath.segment), checked against scapy."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from datapath.ippacket import MalformedPacket
from datapath.segment import (
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    TcpSegmenter,
    complete_checksum,
    ones_sum,
)


def reference_sum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_ones_sum_is_rfc1071(data: bytes) -> None:
    assert ones_sum(data) == reference_sum(data)


def test_ones_sum_of_all_ones_and_zeros() -> None:
    assert ones_sum(b"\xff" * 100) == 0xFFFF
    assert ones_sum(b"\0" * 100) == 0
    assert ones_sum(b"") == 0


def checksums_valid(pkt: Packet) -> bool:
    """Recompute every checksum scapy knows in pkt and compare with what it carries."""
    fresh = pkt.__class__(bytes(pkt))
    for layer in (IP, TCP, UDP):
        if fresh.haslayer(layer):
            del fresh[layer].chksum
    again = pkt.__class__(bytes(fresh))
    return all(again[layer].chksum == pkt[layer].chksum
               for layer in (IP, TCP, UDP) if pkt.haslayer(layer))


def super_packet(version: int, payload: bytes, flags: str = "PA") -> bytes:
    tcp = TCP(sport=40000, dport=5201, seq=0xFFFFFF00, ack=77, flags=flags, window=501,
              options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    if version == 4:
        return bytes(IP(src="10.1.0.2", dst="10.4.0.2", id=0xFFFE, flags="DF") / tcp
                     / Raw(payload))
    return bytes(IPv6(src="fd01::2", dst="fd04::2") / tcp / Raw(payload))


def cut(packet: bytes, mss: int, gso_type: int) -> list[Packet]:
    seg = TcpSegmenter()
    out = bytearray(65535)
    count = seg.load(memoryview(bytearray(packet)), mss, gso_type, out)
    layer = IP if packet[0] >> 4 == 4 else IPv6
    segments = []
    for i in range(count):
        n = seg.write(i)
        segments.append(layer(bytes(out[:n])))
        out[:n] = b"\xa5" * n  # sealed in place: the next write must not need what was there
    return segments


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [1, 1387, 1388, 1389, 4001, 40000])
def test_segments_carry_the_payload_with_valid_headers(version: int, size: int) -> None:
    payload = os.urandom(size)
    mss = 1388
    gso = GSO_TCPV4 if version == 4 else GSO_TCPV6 | GSO_ECN
    segments = cut(super_packet(version, payload, "FPAC"), mss, gso)
    assert len(segments) == -(-size // mss)
    assert b"".join(bytes(s[TCP].payload) for s in segments) == payload
    for i, s in enumerate(segments):
        assert checksums_valid(s)
        tcp = s[TCP]
        assert tcp.seq == (0xFFFFFF00 + i * mss) & 0xFFFFFFFF
        assert tcp.ack == 77 and tcp.window == 501 and tcp.options == [
            ("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
        last = i == len(segments) - 1
        assert bool(tcp.flags.F) == last and bool(tcp.flags.P) == last
        assert bool(tcp.flags.C) == (i == 0) and tcp.flags.A
        if version == 4:
            assert s[IP].len == len(bytes(s)) and s[IP].id == (0xFFFE + i) & 0xFFFF
            assert s[IP].flags == "DF"
        else:
            assert s[IPv6].plen == len(bytes(s)) - 40


def test_a_super_packet_without_payload_is_one_segment() -> None:
    (only,) = cut(super_packet(4, b""), 1000, GSO_TCPV4)
    assert checksums_valid(only) and not bytes(only[TCP].payload)


@pytest.mark.parametrize("packet, mss, gso, why", [
    (super_packet(4, b"x" * 100), 1000, GSO_TCPV6, "GSO type"),
    (super_packet(6, b"x" * 100), 1000, GSO_TCPV4, "GSO type"),
    (super_packet(4, b"x" * 100), 0, GSO_TCPV4, "no segment size"),
    (super_packet(4, b"x" * 5000), 1, GSO_TCPV4, "too small"),
    (bytes(IP(src="1.1.1.1", dst="2.2.2.2") / UDP() / Raw(b"x" * 100)), 50, GSO_TCPV4,
     "not unfragmented TCP"),
    (bytes(IP(src="1.1.1.1", dst="2.2.2.2", flags="MF") / TCP() / Raw(b"x" * 100)), 50,
     GSO_TCPV4, "not unfragmented TCP"),
    (bytes(IPv6(src="::1", dst="::2") / Raw(b"\x06" + b"\0" * 7) / TCP() / Raw(b"x" * 99)), 50,
     GSO_TCPV6, "extension headers"),
    (super_packet(4, b"")[:30], 50, GSO_TCPV4, "too short"),
])
def test_what_cannot_be_cut_is_refused(packet: bytes, mss: int, gso: int, why: str) -> None:
    with pytest.raises(MalformedPacket, match=why):
        TcpSegmenter().load(memoryview(bytearray(packet)), mss, gso, bytearray(65535))


def test_bad_tcp_header_length_is_refused() -> None:
    packet = bytearray(super_packet(4, b"x" * 10))
    packet[32] = 0x30  # data offset 3 words: shorter than a TCP header
    with pytest.raises(MalformedPacket, match="TCP header length"):
        TcpSegmenter().load(memoryview(packet), 100, GSO_TCPV4, bytearray(65535))


def partial(pkt: Packet, start: int, offset: int, proto: int) -> bytearray:
    """pkt as the kernel hands it with CHECKSUM_PARTIAL: the field holds the pseudo sum."""
    raw = bytearray(bytes(pkt))
    length = len(raw) - start
    if raw[0] >> 4 == 4:
        pseudo = ones_sum(bytes(raw[12:20])) + proto + length
    else:
        pseudo = ones_sum(bytes(raw[8:40])) + proto + length
    pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    raw[start + offset:start + offset + 2] = struct.pack("!H", pseudo)
    return raw


@pytest.mark.parametrize("pkt, start, offset, proto", [
    (IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(os.urandom(333)), 20, 6,
     17),
    (IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2) / Raw(os.urandom(1000)), 20, 16,
     6),
    (IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=1, dport=2) / Raw(os.urandom(77)), 40, 16,
     6),
    (IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2) / Raw(os.urandom(8)), 40, 6, 17),
])
def test_partial_checksums_are_completed(pkt: Packet, start: int, offset: int,
                                         proto: int) -> None:
    want = bytes(pkt)
    raw = partial(pkt, start, offset, proto)
    complete_checksum(memoryview(raw), start, offset)
    assert bytes(raw) == want


def test_partial_checksum_outside_the_packet_is_refused() -> None:
    raw = bytearray(bytes(IP() / UDP()))
    with pytest.raises(MalformedPacket):
        complete_checksum(memoryview(raw), 20, 100)
    with pytest.raises(MalformedPacket):
        complete_checksum(memoryview(raw), 2, 6)
