"""Minimal IPv4/IPv6 helpers for the ESP datapath: parse, build, transport-mode split and join,
ICMP "fragmentation needed" and ICMPv6 "packet too big".

Conventions:
- Packets are ``bytes``-like (``bytes``, ``bytearray``, ``memoryview``); addresses are packed
  (4 or 16 bytes), which is what the header carries and what SPD prefix matching needs.
- Malformed input raises ``MalformedPacket`` (a ``ValueError``) with the reason; the datapath
  counts it and drops the packet. Nothing else is raised for bad bytes.
- ``parse`` reports selectors the way RFC 4301 4.4.1.1 defines them: TCP/UDP/SCTP ports, and
  for ICMP/ICMPv6 the message type as the "source port" and the code as the "destination
  port" (as Linux XFRM does). Non-first fragments have no ports (``ports_known`` False).
- Transport mode (RFC 4303 3.1.1): ``split_transport`` finds where ESP goes (after the IPv4
  header; after IPv6 Hop-by-Hop, Routing and Destination Options that precede a Routing
  header, as Linux and scapy do) and ``join_transport`` puts header and new payload back
  together with the protocol byte, lengths and the IPv4 checksum fixed. The same pair serves
  both directions.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_SCTP = 132

_HOPOPT, _ROUTING, _FRAGMENT, _DSTOPTS = 0, 43, 44, 60
# Extension headers in the generic "next header, length in 8-octet units - 1" format.
_GENERIC_EXT = frozenset({_HOPOPT, _ROUTING, _DSTOPTS, 135, 139, 140})
_PORT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_LITTLE = sys.byteorder == "little"

IPV4_MIN_MTU = 68
IPV6_MIN_MTU = 1280
_ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})  # never answer these with an ICMP error
ICMP4_ERROR_MAX = 576  # RFC 1812 4.3.2.3: the whole ICMP error datagram


class MalformedPacket(ValueError):
    """The bytes are not a well-formed IPv4/IPv6 packet (the message says why)."""


@dataclass(frozen=True, slots=True)
class PacketInfo:
    version: int
    src: bytes  # packed address
    dst: bytes
    proto: int  # upper-layer protocol (IPv6: after the extension headers)
    l4_offset: int  # where the upper-layer header starts
    sport: int  # TCP/UDP/SCTP source port; ICMP type
    dport: int  # TCP/UDP/SCTP destination port; ICMP code
    ports_known: bool  # False for non-first fragments and truncated upper-layer headers
    fragment: bool  # part of a fragmented datagram (first or later)
    length: int  # total length the IP header claims


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum (already complemented), as the 16-bit value to store big-endian."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    # Ones' complement sums do not care about byte order (RFC 1071 2(B)): sum native words.
    total = sum(array("H", bytes(data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    if _LITTLE:
        total = ((total & 0xFF) << 8) | (total >> 8)
    return total


def _v4_header_checksum(header: bytearray) -> None:
    header[10:12] = b"\x00\x00"
    header[10:12] = _U16.pack(internet_checksum(header))


def _v6_pseudo_header(src: bytes, dst: bytes, length: int, proto: int) -> bytes:
    return src + dst + struct.pack("!IxxxB", length, proto)


def _ip_version(packet: bytes | bytearray | memoryview) -> int:
    """4 or 6, once the packet is known to hold that version's fixed header."""
    if not len(packet):
        raise MalformedPacket("empty packet")
    version = packet[0] >> 4
    if version not in (4, 6):
        raise MalformedPacket(f"IP version {version}")
    if len(packet) < (20 if version == 4 else 40):
        raise MalformedPacket(f"IPv{version} packet shorter than its header")
    return version


def parse(packet: bytes | bytearray | memoryview) -> PacketInfo:
    """Selectors and layout of an IPv4 or IPv6 packet."""
    n = len(packet)
    version = _ip_version(packet)
    if version == 4:
        vihl, _tos, length, _ident, frag, _ttl, proto, _csum, src, dst = _V4.unpack_from(packet)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or ihl > n or length < ihl or length > n:
            raise MalformedPacket("IPv4 header or total length inconsistent")
        offset = frag & 0x1FFF
        fragment = bool(frag & 0x2000) or offset != 0
        return _with_ports(version, src, dst, proto, ihl, length, packet, fragment, offset == 0)
    _vtf, plen, nh, _hop, src, dst = _V6.unpack_from(packet)
    length = 40 + plen
    if length > n:
        raise MalformedPacket("IPv6 payload length beyond the packet")
    at = 40
    first = True
    fragment = False
    for _ in range(16):  # bounded walk over extension headers
        if nh in _GENERIC_EXT:
            if at + 8 > length:
                raise MalformedPacket("truncated IPv6 extension header")
            nxt, size = packet[at], (packet[at + 1] + 1) * 8
        elif nh == _FRAGMENT:
            if at + 8 > length:
                raise MalformedPacket("truncated IPv6 fragment header")
            fragment = True
            first = (_U16.unpack_from(packet, at + 2)[0] >> 3) == 0
            nxt, size = packet[at], 8
        elif nh == PROTO_AH:
            if at + 8 > length:
                raise MalformedPacket("truncated AH header")
            nxt, size = packet[at], (packet[at + 1] + 2) * 4
        else:
            break
        nh = nxt
        at += size
        if at > length:
            raise MalformedPacket("IPv6 extension header beyond the packet")
    else:
        raise MalformedPacket("too many IPv6 extension headers")
    return _with_ports(version, src, dst, nh, at, length, packet, fragment, first)


def _with_ports(
    version: int, src: bytes, dst: bytes, proto: int, at: int, length: int,
    packet: bytes | bytearray | memoryview, fragment: bool, first: bool,
) -> PacketInfo:
    sport = dport = 0
    known = False
    if first:
        if proto in _PORT_PROTOS and at + 4 <= length:
            sport, dport = _PORTS.unpack_from(packet, at)
            known = True
        elif proto in (PROTO_ICMP, PROTO_ICMPV6) and at + 2 <= length:
            sport, dport = packet[at], packet[at + 1]
            known = True
        elif proto not in _PORT_PROTOS and proto not in (PROTO_ICMP, PROTO_ICMPV6):
            known = True  # no ports to know
    return PacketInfo(version, bytes(src), bytes(dst), proto, at, sport, dport, known, fragment,
                      length)


# -- building headers ---------------------------------------------------------------------


class Ipv4Header:
    """Outer IPv4 header for one tunnel: constant fields summed once, per packet only the
    length, TOS and ID go into the checksum."""

    __slots__ = ("src", "dst", "proto", "ttl", "df", "_ident", "_base_sum")

    def __init__(self, src: bytes, dst: bytes, proto: int = PROTO_ESP, *, ttl: int = 64,
                 df: bool = False) -> None:
        if len(src) != 4 or len(dst) != 4:
            raise ValueError("IPv4 addresses must be 4 packed bytes")
        self.src, self.dst, self.proto, self.ttl, self.df = src, dst, proto, ttl, df
        self._ident = 0
        words = array("H", _V4.pack(0x45, 0, 0, 0, 0x4000 if df else 0, ttl, proto, 0, src, dst))
        if _LITTLE:
            words.byteswap()
        self._base_sum = sum(words)

    def build(self, payload_len: int, tos: int = 0) -> bytes:
        """The 20-byte header for a payload of ``payload_len`` bytes."""
        length = 20 + payload_len
        if length > 0xFFFF:
            raise ValueError("IPv4 packet longer than 65535 bytes")
        ident = self._ident = (self._ident + 1) & 0xFFFF
        total = self._base_sum + length + (tos & 0xFF) + ident
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return _V4.pack(0x45, tos & 0xFF, length, ident, 0x4000 if self.df else 0, self.ttl,
                        self.proto, ~total & 0xFFFF, self.src, self.dst)


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ttl: int = 64,
                tos: int = 0, ident: int = 0, df: bool = False) -> bytes:
    """A 20-byte IPv4 header with its checksum."""
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses must be 4 packed bytes")
    if 20 + payload_len > 0xFFFF:
        raise ValueError("IPv4 packet longer than 65535 bytes")
    header = bytearray(_V4.pack(0x45, tos, 20 + payload_len, ident, 0x4000 if df else 0, ttl,
                                proto, 0, src, dst))
    _v4_header_checksum(header)
    return bytes(header)


def ipv6_header(src: bytes, dst: bytes, next_header: int, payload_len: int, *,
                hop_limit: int = 64, traffic_class: int = 0, flow_label: int = 0) -> bytes:
    """A 40-byte IPv6 header."""
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses must be 16 packed bytes")
    if payload_len > 0xFFFF:
        raise ValueError("IPv6 payload longer than 65535 bytes (no jumbograms)")
    first = (6 << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF)
    return _V6.pack(first, payload_len, next_header, hop_limit, src, dst)


def ip_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ttl: int = 64,
              tos: int = 0) -> bytes:
    """An IPv4 or IPv6 header, chosen by the address length."""
    if len(src) == 4:
        return ipv4_header(src, dst, proto, payload_len, ttl=ttl, tos=tos)
    return ipv6_header(src, dst, proto, payload_len, hop_limit=ttl, traffic_class=tos)


def traffic_class(packet: bytes | bytearray | memoryview) -> int:
    """DSCP+ECN byte of an IPv4 or IPv6 packet (for copying to the outer header)."""
    if packet[0] >> 4 == 4:
        return packet[1]
    return ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)


# -- transport mode -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransportSplit:
    header: bytes  # the IP header and the extension headers that stay before ESP
    proto_at: int  # offset in ``header`` of the protocol / next-header byte naming the payload
    next_header: int  # that byte's value: what the payload is
    payload: memoryview  # everything after ``header`` up to the IP length


def split_transport(packet: bytes | bytearray | memoryview) -> TransportSplit:
    """Split an IP packet where transport-mode ESP goes (or is)."""
    data = memoryview(packet)
    n = len(data)
    if _ip_version(data) == 4:
        ihl = (data[0] & 0x0F) * 4
        length = _U16.unpack_from(data, 2)[0]
        if ihl < 20 or length < ihl or length > n:
            raise MalformedPacket("IPv4 header or total length inconsistent")
        if _U16.unpack_from(data, 6)[0] & 0x3FFF:
            raise MalformedPacket("IPv4 fragment: transport mode needs the whole datagram")
        return TransportSplit(bytes(data[:ihl]), 9, data[9], data[ihl:length])
    length = 40 + _U16.unpack_from(data, 4)[0]
    if length > n:
        raise MalformedPacket("IPv6 payload length beyond the packet")
    proto_at, at, nh = 6, 40, data[6]
    seen_routing = False
    for _ in range(16):
        if nh not in (_HOPOPT, _ROUTING, _DSTOPTS) or (nh == _DSTOPTS and seen_routing):
            break
        if at + 8 > length:
            raise MalformedPacket("truncated IPv6 extension header")
        seen_routing = seen_routing or nh == _ROUTING
        proto_at, nh = at, data[at]
        at += (data[at + 1] + 1) * 8
        if at > length:
            raise MalformedPacket("IPv6 extension header beyond the packet")
    else:
        raise MalformedPacket("too many IPv6 extension headers")
    return TransportSplit(bytes(data[:at]), proto_at, nh, data[at:length])


def join_transport(header: bytes, proto_at: int, proto: int,
                   payload: bytes | bytearray | memoryview) -> bytes:
    """``header`` + ``payload`` with the protocol byte set to ``proto`` and lengths fixed."""
    head = bytearray(header)
    head[proto_at] = proto
    if head[0] >> 4 == 4:
        total = len(head) + len(payload)
        if total > 0xFFFF:
            raise ValueError("IPv4 packet longer than 65535 bytes")
        head[2:4] = _U16.pack(total)
        _v4_header_checksum(head)
    else:
        plen = len(head) - 40 + len(payload)
        if plen > 0xFFFF:
            raise ValueError("IPv6 payload longer than 65535 bytes")
        head[4:6] = _U16.pack(plen)
    return bytes(head) + bytes(payload)


def fix_l4_checksum(packet: bytes | bytearray | memoryview) -> bytes:
    """The packet with its TCP/UDP checksum recomputed (RFC 3948 3.1.2: transport mode behind
    a NAT, whose address rewriting the inner checksum does not know about). Other packets and
    fragments come back unchanged; an IPv4 UDP checksum of zero stays zero."""
    info = parse(packet)
    out = bytearray(packet[:info.length])
    if info.fragment or info.proto not in (PROTO_TCP, PROTO_UDP):
        return bytes(out)
    at = info.l4_offset
    field = at + (16 if info.proto == PROTO_TCP else 6)
    if field + 2 > len(out):
        return bytes(out)
    if info.proto == PROTO_UDP and info.version == 4 and out[field:field + 2] == b"\x00\x00":
        return bytes(out)
    out[field:field + 2] = b"\x00\x00"
    segment = out[at:]
    if info.version == 4:
        pseudo = info.src + info.dst + struct.pack("!xBH", info.proto, len(segment))
    else:
        pseudo = _v6_pseudo_header(info.src, info.dst, len(segment), info.proto)
    csum = internet_checksum(pseudo + segment)
    if csum == 0 and info.proto == PROTO_UDP:
        csum = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    out[field:field + 2] = _U16.pack(csum)
    return bytes(out)


# -- ICMP errors for path MTU discovery -------------------------------------------------------


def icmp_error_allowed(packet: bytes | bytearray | memoryview) -> bool:
    """Whether RFC 1122 3.2.2 / RFC 4443 2.4(e) let us answer ``packet`` with an ICMP error:
    not for ICMP errors, non-first fragments, or multicast/broadcast/unspecified sources."""
    try:
        info = parse(packet)
    except MalformedPacket:
        return False
    if not info.ports_known and info.fragment:
        return False
    if info.version == 4:
        if info.src[0] >= 224 or info.src == b"\x00\x00\x00\x00" or info.dst[0] >= 224:
            return False
        return not (info.proto == PROTO_ICMP and info.sport in _ICMP4_ERRORS)
    if info.src[0] == 0xFF or info.src == bytes(16):
        return False
    return not (info.proto == PROTO_ICMPV6 and info.sport < 128)


def icmp_frag_needed(original: bytes | bytearray | memoryview, mtu: int,
                     src: bytes | None = None) -> bytes:
    """IPv4 ICMP type 3 code 4 (RFC 792, RFC 1191) telling ``original``'s sender to use
    ``mtu``; from ``src`` (default: the original destination)."""
    info = parse(original)
    if info.version != 4:
        raise ValueError("fragmentation needed is an IPv4 message")
    quoted = bytes(original[:min(info.length, ICMP4_ERROR_MAX - 20 - 8)])
    body = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, max(0, min(mtu, 0xFFFF)))) + quoted
    body[2:4] = _U16.pack(internet_checksum(body))
    return ipv4_header(src or info.dst, info.src, PROTO_ICMP, len(body)) + bytes(body)


def icmpv6_packet_too_big(original: bytes | bytearray | memoryview, mtu: int,
                          src: bytes | None = None) -> bytes:
    """ICMPv6 Packet Too Big (RFC 4443 3.2) telling ``original``'s sender to use ``mtu``; from
    ``src`` (default: the original destination), quoting as much as fits in 1280 bytes."""
    info = parse(original)
    if info.version != 6:
        raise ValueError("packet too big is an ICMPv6 message")
    source = src or info.dst
    quoted = bytes(original[:min(info.length, IPV6_MIN_MTU - 40 - 8)])
    body = bytearray(struct.pack("!BBHI", 2, 0, 0, max(0, min(mtu, 0xFFFFFFFF)))) + quoted
    pseudo = _v6_pseudo_header(source, info.src, len(body), PROTO_ICMPV6)
    body[2:4] = _U16.pack(internet_checksum(pseudo + body))
    return ipv6_header(source, info.src, PROTO_ICMPV6, len(body), hop_limit=255) + bytes(body)
