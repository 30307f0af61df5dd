"""flowkey.flow agrees with ippacket.parse on every packet, fast path or not."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Raw

from datapath.flowkey import flow
from datapath.ippacket import MalformedPacket, parse

PACKETS = [
    IP(src="10.1.0.2", dst="10.4.0.2") / TCP(sport=40000, dport=5201) / Raw(b"x" * 50),
    IP(src="10.1.0.2", dst="10.4.0.2") / UDP(sport=53, dport=9) / Raw(b"y"),
    IP(src="10.1.0.2", dst="10.4.0.2") / ICMP(type=8, code=0) / Raw(b"ping"),
    IP(src="10.1.0.2", dst="10.4.0.2", flags="MF") / UDP(sport=1, dport=2) / Raw(b"z" * 30),
    IP(src="10.1.0.2", dst="10.4.0.2", frag=20) / Raw(b"z" * 30),
    IP(src="10.1.0.2", dst="10.4.0.2", options=b"\x01\x01\x01\x00") / UDP(sport=1, dport=2),
    IP(src="10.1.0.2", dst="10.4.0.2", proto=47) / Raw(b"gre" * 10),
    IPv6(src="fd00:1::2", dst="fd00:4::2") / TCP(sport=1234, dport=22),
    IPv6(src="fd00:1::2", dst="fd00:4::2") / ICMPv6EchoRequest(),
    IPv6(src="fd00:1::2", dst="fd00:4::2") / IPv6ExtHdrHopByHop() / UDP(sport=7, dport=8),
    IPv6(src="fd00:1::2", dst="fd00:4::2") / IPv6ExtHdrFragment() / UDP(sport=7, dport=8),
    IPv6(src="fd00:1::2", dst="fd00:4::2", nh=59),
]


def expected(packet: bytes) -> tuple[int, bytes, bytes, int, int, int, int]:
    info = parse(packet)
    return info.version, info.src, info.dst, info.proto, info.sport, info.dport, info.length


def test_flow_matches_parse_on_real_packets() -> None:
    for pkt in PACKETS:
        raw = bytes(pkt)
        assert flow(raw) == expected(raw), pkt.summary()
        assert flow(memoryview(raw + b"trailing junk")) == expected(raw + b"trailing junk")


@settings(max_examples=400)
@given(st.sampled_from(PACKETS), st.binary(max_size=8), st.integers(0, 60))
def test_flow_matches_parse_on_damaged_packets(pkt: object, junk: bytes, cut: int) -> None:
    raw = bytes(pkt)[:cut] + junk if cut else junk + bytes(pkt)  # type: ignore[call-overload]
    try:
        want = expected(raw)
    except MalformedPacket:
        want = None
    try:
        got = flow(raw)
    except MalformedPacket:
        got = None
    assert got == want
