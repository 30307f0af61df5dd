"""IP helpers checked against scapy: parsing, header checksums, transport mode, ICMP errors."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.sctp import SCTP
from scapy.packet import Packet, Raw

from datapath import ippacket as ipp
from datapath.esp import EspTransform


def v4(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, a)


def v6(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, a)


def built(pkt: Packet) -> bytes:
    return bytes(pkt.__class__(bytes(pkt)))


def test_parse_ipv4_udp() -> None:
    info = ipp.parse(built(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=53, dport=9999) / b"x"))
    assert (info.version, info.src, info.dst, info.proto) == (4, v4("10.0.0.1"), v4("10.0.0.2"), 17)
    assert (info.sport, info.dport, info.ports_known, info.fragment) == (53, 9999, True, False)
    assert (info.l4_offset, info.length) == (20, 29)


def test_parse_ipv4_options_and_trailing_bytes() -> None:
    raw = built(IP(dst="10.0.0.2", options=b"\x01\x01\x01\x00") / TCP(sport=1, dport=2))
    info = ipp.parse(raw + b"ethernet padding")
    assert (info.l4_offset, info.length, info.sport, info.dport) == (24, 44, 1, 2)


def test_parse_icmp_type_code_as_ports() -> None:
    info = ipp.parse(built(IP(dst="10.0.0.2") / ICMP(type=8, code=0)))
    assert (info.proto, info.sport, info.dport, info.ports_known) == (1, 8, 0, True)


def test_parse_sctp() -> None:
    info = ipp.parse(built(IPv6(dst="fd00::2") / SCTP(sport=2905, dport=2906)))
    assert (info.proto, info.sport, info.dport) == (132, 2905, 2906)


def test_parse_ipv6_extension_chain() -> None:
    pkt = (IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
           / IPv6ExtHdrRouting(addresses=["fd00::3"]) / IPv6ExtHdrFragment(offset=0, m=1)
           / TCP(sport=4000, dport=80))
    raw = built(pkt)
    info = ipp.parse(raw)
    assert (info.proto, info.sport, info.dport, info.fragment, info.ports_known) == (
        6, 4000, 80, True, True)
    assert info.l4_offset == len(raw) - 20
    assert info.src == v6("fd00::1")


def test_parse_non_first_fragments_have_no_ports() -> None:
    info6 = ipp.parse(built(IPv6(dst="fd00::2") / IPv6ExtHdrFragment(offset=10) / (b"\x00" * 8)))
    assert (info6.ports_known, info6.fragment, info6.sport) == (False, True, 0)
    info4 = ipp.parse(built(IP(dst="10.0.0.2", frag=10, proto=17) / (b"\x00" * 8)))
    assert (info4.ports_known, info4.fragment, info4.sport) == (False, True, 0)


def test_parse_icmpv6() -> None:
    info = ipp.parse(built(IPv6(dst="fd00::2") / ICMPv6EchoRequest()))
    assert (info.proto, info.sport, info.dport) == (58, 128, 0)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x45" + bytes(10), b"\x46" + bytes(19), b"\x60" + bytes(20),
     b"\x50" + bytes(40), built(IP(dst="1.2.3.4") / b"abcd")[:22],
     built(IPv6(dst="::1") / b"abcd")[:42],
     built(IPv6(dst="::1", nh=0) / (b"\x11\x05" + bytes(6)))],
)
def test_parse_malformed(raw: bytes) -> None:
    with pytest.raises(ipp.MalformedPacket):
        ipp.parse(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"", b"\x45", b"\x60"]))
def test_parse_random_bytes_only_malformed(data: bytes, prefix: bytes) -> None:
    raw = prefix + data
    try:
        info = ipp.parse(raw)
    except ipp.MalformedPacket:
        pass
    else:
        assert info.l4_offset <= info.length <= len(raw)
    try:
        split = ipp.split_transport(raw)
    except ipp.MalformedPacket:
        pass
    else:
        assert split.header[split.proto_at] == split.next_header
        assert len(split.header) + len(split.payload) <= len(raw)


@pytest.mark.parametrize("length", [0, 1, 100, 1480, 65515])
@pytest.mark.parametrize("tos", [0, 0xB8, 0xFF])
def test_ipv4_header_checksum_matches_scapy(length: int, tos: int) -> None:
    header = ipp.ipv4_header(v4("192.0.2.1"), v4("198.51.100.7"), 50, length, tos=tos,
                             ident=0xBEEF, df=True)
    pkt = IP(header)
    assert pkt.chksum == IP(bytes(pkt.copy().__class__(header))).chksum
    fresh = pkt.copy()
    del fresh.chksum
    assert IP(bytes(fresh)).chksum == pkt.chksum
    assert (pkt.len, pkt.tos, pkt.proto, pkt.flags.DF) == (20 + length, tos, 50, True)
    tunnel = ipp.Ipv4Header(v4("192.0.2.1"), v4("198.51.100.7"), 50, df=True)
    for _ in range(3):
        fast = IP(tunnel.build(length, tos))
        check = fast.copy()
        del check.chksum
        assert IP(bytes(check)).chksum == fast.chksum
        assert (fast.len, fast.tos, fast.src) == (20 + length, tos, "192.0.2.1")


def test_ipv4_header_id_wraps() -> None:
    tunnel = ipp.Ipv4Header(v4("192.0.2.1"), v4("192.0.2.2"))
    ids = [IP(tunnel.build(10)).id for _ in range(70000)]
    assert ids[0] == 1 and ids[65535] == 0 and len(set(ids)) == 65536


def test_ipv6_header_fields() -> None:
    header = ipp.ipv6_header(v6("2001:db8::1"), v6("2001:db8::2"), 50, 1234,
                             traffic_class=0xB8, flow_label=0x12345)
    pkt = IPv6(header + bytes(1234))
    assert (pkt.plen, pkt.nh, pkt.tc, pkt.fl, pkt.hlim) == (1234, 50, 0xB8, 0x12345, 64)
    assert ipp.traffic_class(header) == 0xB8


def test_header_argument_errors() -> None:
    with pytest.raises(ValueError):
        ipp.ipv4_header(b"\x01\x02\x03", v4("1.1.1.1"), 50, 10)
    with pytest.raises(ValueError):
        ipp.ipv4_header(v4("1.1.1.1"), v4("1.1.1.1"), 50, 65516)
    with pytest.raises(ValueError):
        ipp.ipv6_header(v6("::1"), v6("::1"), 50, 65536)


TRANSPORT_PACKETS = {
    "v4-udp": IP(src="10.0.0.1", dst="10.0.0.2", id=7) / UDP(sport=1, dport=2) / (b"data" * 5),
    "v4-options": IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / TCP(),
    "v6-tcp": IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=3, dport=4) / (b"x" * 33),
    "v6-ext": IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop()
    / IPv6ExtHdrRouting(addresses=["fd00::9"]) / IPv6ExtHdrDestOpt() / UDP() / (b"y" * 9),
}


@pytest.mark.parametrize("name", TRANSPORT_PACKETS)
def test_transport_mode_matches_scapy(name: str) -> None:
    original = built(TRANSPORT_PACKETS[name])
    key = bytes(range(20))
    ours = EspTransform.build(0x2000, "aes-gcm-16", key)
    theirs = SecurityAssociation(ESP, spi=0x2000, crypt_algo="AES-GCM", crypt_key=key,
                                 auth_algo="NULL", auth_key=None)
    split = ipp.split_transport(original)
    wire = ipp.join_transport(split.header, split.proto_at, ipp.PROTO_ESP,
                              ours.seal(split.payload, split.next_header))
    scapy_pkt = IPv6(original) if original[0] >> 4 == 6 else IP(original)
    expected = bytes(theirs.encrypt(scapy_pkt, iv=(1).to_bytes(8, "big")))
    assert wire == expected
    # and back: split the ESP packet, open it, join the plaintext
    receiver = EspTransform.build(0x2000, "aes-gcm-16", key)
    back = ipp.split_transport(wire)
    assert back.next_header == ipp.PROTO_ESP
    nh, payload = receiver.open(back.payload)
    assert ipp.join_transport(back.header, back.proto_at, nh, payload) == original


def test_transport_refuses_ipv4_fragment() -> None:
    with pytest.raises(ipp.MalformedPacket, match="fragment"):
        ipp.split_transport(built(IP(dst="10.0.0.2", flags="MF") / UDP() / b"z"))


@pytest.mark.parametrize(
    "pkt",
    [IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6) / b"abc",
     IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5, dport=6) / b"abcd",
     IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5, dport=6) / b"abcde",
     IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrDestOpt() / TCP() / b"q"],
    ids=["v4-udp", "v4-tcp", "v6-udp", "v6-ext-tcp"],
)
def test_fix_l4_checksum(pkt: Packet) -> None:
    good = built(pkt)
    info = ipp.parse(good)
    field = info.l4_offset + (16 if info.proto == 6 else 6)
    broken = bytearray(good)
    broken[field] ^= 0x5A
    assert ipp.fix_l4_checksum(bytes(broken)) == good


def test_fix_l4_checksum_keeps_zero_udp_v4() -> None:
    raw = built(IP(dst="10.0.0.2") / UDP(chksum=0) / b"abc")
    assert ipp.fix_l4_checksum(raw) == raw


def test_icmp_frag_needed_parsed_by_scapy() -> None:
    original = built(IP(src="10.1.1.1", dst="10.2.2.2") / TCP(sport=1000, dport=22) / (b"p" * 1400))
    message = ipp.icmp_frag_needed(original, 1380, v4("10.0.0.254"))
    pkt = IP(message)
    assert (pkt.src, pkt.dst, pkt.proto) == ("10.0.0.254", "10.1.1.1", 1)
    assert (pkt[ICMP].type, pkt[ICMP].code, pkt[ICMP].nexthopmtu) == (3, 4, 1380)
    assert len(message) <= 576
    assert pkt[IPerror].src == "10.1.1.1" and pkt[IPerror].dst == "10.2.2.2"
    fresh = IP(message)
    del fresh.chksum
    del fresh[ICMP].chksum
    rebuilt = IP(bytes(fresh))
    assert (rebuilt.chksum, rebuilt[ICMP].chksum) == (pkt.chksum, pkt[ICMP].chksum)


def test_icmpv6_packet_too_big_parsed_by_scapy() -> None:
    original = built(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=7, dport=8) / (b"u" * 1452))
    message = ipp.icmpv6_packet_too_big(original, 1400, v6("fd00::fe"))
    pkt = IPv6(message)
    assert len(message) == 1280
    assert (pkt.src, pkt.dst, pkt.nh) == ("fd00::fe", "fd00::1", 58)
    assert isinstance(pkt.payload, ICMPv6PacketTooBig)
    assert (pkt[ICMPv6PacketTooBig].mtu, pkt[ICMPv6PacketTooBig].code) == (1400, 0)
    fresh = IPv6(message)
    del fresh[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(fresh))[ICMPv6PacketTooBig].cksum == pkt[ICMPv6PacketTooBig].cksum
    assert bytes(pkt[ICMPv6PacketTooBig].payload) == original[:1280 - 48]


def test_icmp_builders_reject_wrong_version() -> None:
    with pytest.raises(ValueError):
        ipp.icmp_frag_needed(built(IPv6(dst="::1")), 1280)
    with pytest.raises(ValueError):
        ipp.icmpv6_packet_too_big(built(IP(dst="1.1.1.1")), 1280)


@pytest.mark.parametrize(
    ("pkt", "allowed"),
    [(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(), True),
     (IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8), True),
     (IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=3, code=4), False),
     (IP(src="10.0.0.1", dst="224.0.0.5") / UDP(), False),
     (IP(src="0.0.0.0", dst="10.0.0.2") / UDP(), False),
     (IP(src="10.0.0.1", dst="10.0.0.2", frag=100, proto=17) / Raw(b"12345678"), False),
     (IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(), True),
     (IPv6(src="fd00::1", dst="fd00::2") / ICMPv6PacketTooBig(), False),
     (IPv6(src="::", dst="fd00::2") / UDP(), False)],
)
def test_icmp_error_allowed(pkt: Packet, allowed: bool) -> None:
    assert ipp.icmp_error_allowed(built(pkt)) is allowed
