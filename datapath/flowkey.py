"""The selectors of a packet for the SPD, fast: one ``struct`` unpack for the common shapes.

``flow(packet) -> (version, src, dst, proto, sport, dport, length)`` with packed addresses
and the RFC 4301 port conventions of ``datapath.ippacket.parse`` (ICMP type and code as the
ports). IPv4 without options or fragmentation and IPv6 without extension headers take the
fast path; everything else (and anything short or inconsistent) is handed to ``parse``, which
raises ``MalformedPacket`` for bad input. Building ``parse``'s PacketInfo cost more than the
whole fast path.
"""

from __future__ import annotations

import struct

from datapath.ippacket import parse

_V4 = struct.Struct("!xxHxxHxB2x4s4sHH")  # length, fragment, proto, src, dst, ports
_V6 = struct.Struct("!4xHBx16s16sHH")  # payload length, next header, src, dst, ports
_PORTS = frozenset({6, 17, 132})
_ICMP = frozenset({1, 58})
# IPv6 next headers parse must walk (extension headers, AH).
_V6_EXT = frozenset({0, 43, 44, 51, 60, 135, 139, 140})

Flow = tuple[int, bytes, bytes, int, int, int, int]


def flow(packet: bytes | bytearray | memoryview) -> Flow:
    n = len(packet)
    if n >= 24 and packet[0] == 0x45:
        length, frag, proto, src, dst, sport, dport = _V4.unpack_from(packet)
        if not frag & 0x3FFF and 24 <= length <= n:
            if proto in _PORTS:
                return 4, src, dst, proto, sport, dport, length
            if proto in _ICMP:
                return 4, src, dst, proto, sport >> 8, sport & 0xFF, length
            return 4, src, dst, proto, 0, 0, length
    elif n >= 44 and packet[0] >> 4 == 6:
        plen, nh, src, dst, sport, dport = _V6.unpack_from(packet)
        if 44 <= 40 + plen <= n and nh not in _V6_EXT:
            if nh in _PORTS:
                return 6, src, dst, nh, sport, dport, 40 + plen
            if nh in _ICMP:
                return 6, src, dst, nh, sport >> 8, sport & 0xFF, 40 + plen
            return 6, src, dst, nh, 0, 0, 40 + plen
    info = parse(packet)
    return (info.version, info.src, info.dst, info.proto, info.sport, info.dport, info.length)
