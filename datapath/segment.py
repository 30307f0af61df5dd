"""Packets read from a TUN with offloads on (TUNSETOFFLOAD): finish their checksums and cut TCP
super-packets (TSO) into segments, as a NIC would.

With TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 the kernel hands a forwarded or local TCP burst
over as one packet of up to 64 KB behind a virtio_net_hdr, with the checksum left "partial"
(only the pseudo-header sum in the field). Reading one such packet replaces dozens of reads,
and the kernel no longer segments and checksums each packet before queueing it. The price is
ours: every segment must leave with a valid checksum, because the peer (strongSwan, a kernel)
hands the inner packet on as it is.

- ``complete_checksum(packet, start, offset)``: a NEEDS_CSUM packet that is not GSO.
- ``TcpSegmenter.load(packet, gso_size, gso_type, out)`` then ``write(i)`` for i < ``count``:
  segment i at the start of ``out``, a whole IP packet with lengths, IPv4 id and checksum,
  sequence number, flags (FIN and PSH on the last segment only, CWR on the first only) and
  TCP checksum set.

Checksums: the RFC 1071 sum of 16-bit words is, but for its zero, the data as one big-endian
integer modulo 0xFFFF (2^16 is 1 modulo 0xFFFF), so ``int.from_bytes`` and one ``%`` do in C
what would otherwise be a Python loop over words.
"""

from __future__ import annotations

import struct

from datapath.ippacket import MalformedPacket

VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET.size
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80
MAX_SEGMENTS = 1024  # a gso_size this small is not a real TSO packet; refused

_U16 = struct.Struct("!H")
_TCP_VAR = struct.Struct("!IIBBH")  # seq, ack, data offset, flags, window (TCP offset 4)
_TCP_VAR_CSUM = struct.Struct("!IIBBHH")  # ... and the checksum
_FRAG_TTL = struct.Struct("!HH")  # IPv4 fragment field, TTL and protocol (offset 6)
_IP4_VAR = struct.Struct("!HHHHH")  # total length, id, fragment, TTL/protocol, checksum

Buffer = bytes | bytearray | memoryview

def ones_sum(data: Buffer) -> int:
    """The ones' complement sum of ``data`` as big-endian 16-bit words (odd length padded with
    a zero byte), folded to 16 bits, not complemented; 0 only for all-zero data."""
    x = int.from_bytes(data, "big")
    if len(data) & 1:
        x <<= 8
    r = x % 0xFFFF
    return r if r or not x else 0xFFFF


_HALVES: dict[int, tuple[int, int, int, int]] = {}


def _halves(nbytes: int) -> tuple[int, int, int, int]:
    """Two fold steps (shift, mask) for an integer of ``nbytes`` bytes: x = (x >> s) + (x & m)
    keeps x modulo 0xFFFF (s is a multiple of 16 bits) and quarters its size, which makes the
    final ``%`` cheaper by more than the folds cost."""
    found = _HALVES.get(nbytes)
    if found is None:
        low = 16 * ((nbytes + 3) >> 2)  # half of the 16-bit words, rounded up
        second = 16 * ((low // 16 + 2) >> 1)
        found = _HALVES[nbytes] = (low, (1 << low) - 1, second, (1 << second) - 1)
    return found


def complete_checksum(packet: bytearray | memoryview, start: int, offset: int) -> None:
    """Finish a CHECKSUM_PARTIAL packet: the field at start + offset holds the pseudo-header
    sum; the checksum covers everything from ``start`` on. Raises MalformedPacket if the
    field lies outside the packet."""
    at = start + offset
    if start < 20 or at + 2 > len(packet):
        raise MalformedPacket("partial checksum outside the packet")
    csum = ~ones_sum(packet[start:]) & 0xFFFF
    packet[at:at + 2] = _U16.pack(csum or (0xFFFF if offset == 6 else 0))  # UDP: 0 -> FFFF


class TcpSegmenter:
    """Cuts one TCP super-packet (IPv4 or IPv6 without extension headers) into ``out``.

    ``load`` reads the headers once and writes them to ``out``; ``write(i)`` then only copies
    segment i's payload and patches the fields that differ (lengths, IPv4 id and checksum,
    sequence number, flags, TCP checksum). The checksums are sums of constants known from
    ``load`` plus the payload's, reduced modulo 0xFFFF (the ones' complement sum is that
    residue), so each segment's bytes are summed once, in C.
    """

    __slots__ = ("count", "mss", "ihl", "largest", "_out", "_src", "_head", "_v4", "_hlen",
                 "_payload", "_seq", "_ip_id", "_flags", "_ip_const", "_tcp_const", "_ack",
                 "_doff", "_window", "_frag_ttl")

    def __init__(self) -> None:
        self.count = 0  # segments
        self.mss = 0
        self.ihl = 20  # IP header length
        self.largest = 0  # length of the first (largest) segment
        self._out: bytearray | memoryview = bytearray()
        self._src = b""
        self._head = b""  # the super-packet's IP and TCP headers
        self._v4 = True
        self._hlen = 40
        self._payload = 0
        self._seq = 0
        self._ip_id = 0
        self._flags = 0
        self._ip_const = 0
        self._tcp_const = 0
        self._ack = 0
        self._doff = 0
        self._window = 0
        self._frag_ttl = (0, 0)

    @property
    def packet(self) -> bytes:
        """The loaded super-packet."""
        return self._src

    def load(self, packet: Buffer, gso_size: int, gso_type: int,
             out: bytearray | memoryview) -> int:
        """Take a super-packet of ``gso_type`` (GSO_TCPV4/6, ECN bit ignored) to be cut into
        ``out``; returns how many segments it makes. MalformedPacket if it is not a TCP
        packet we can cut."""
        n = len(packet)
        if n < 40 or gso_size < 1:
            raise MalformedPacket("GSO packet too short or no segment size")
        version = packet[0] >> 4
        if (gso_type & 0x7F, version) not in ((GSO_TCPV4, 4), (GSO_TCPV6, 6)):
            raise MalformedPacket(f"GSO type {gso_type} for an IPv{version} packet")
        if version == 4:
            ihl = (packet[0] & 0x0F) * 4
            if ihl < 20 or packet[9] != 6 or packet[6] & 0x3F or packet[7]:
                raise MalformedPacket("GSO TCPv4 packet is not unfragmented TCP")
            total = (packet[2] << 8) | packet[3]
            end = total if 0 < total <= n else n
        else:
            ihl = 40
            if n < 60 or packet[6] != 6:
                raise MalformedPacket("GSO TCPv6 packet with extension headers")
            plen = (packet[4] << 8) | packet[5]
            end = 40 + plen if 0 < plen <= n - 40 else n
        if ihl + 20 > end:
            raise MalformedPacket("GSO packet shorter than its headers")
        hlen = ihl + (packet[ihl + 12] >> 4) * 4
        if hlen < ihl + 20 or hlen > end:
            raise MalformedPacket("bad TCP header length in GSO packet")
        payload = end - hlen
        count = -(-payload // gso_size) if payload else 1
        if count > MAX_SEGMENTS:
            raise MalformedPacket("GSO segment size too small")
        src = self._src = bytes(packet[:end])
        self._head = src[:hlen]
        self._out = out
        self.count = count
        self.mss = gso_size
        self._v4 = version == 4
        self.ihl = ihl
        self.largest = hlen + min(gso_size, payload)
        self._hlen = hlen
        self._payload = payload
        self._seq, self._ack, self._doff, self._flags, self._window = _TCP_VAR.unpack_from(
            src, ihl + 4)
        # Constant parts of the sums: the headers with the fields write() sets zeroed.
        tcp = bytearray(src[ihl:hlen])
        tcp[4:8] = b"\0\0\0\0"
        tcp[13] = 0
        tcp[16:18] = b"\0\0"
        if version == 4:
            self._ip_id = (src[4] << 8) | src[5]
            self._frag_ttl = _FRAG_TTL.unpack_from(src, 6)
            self._ip_const = ones_sum(src[:2]) + ones_sum(src[6:10]) + ones_sum(src[12:ihl])
            pseudo = ones_sum(src[12:20]) + 6
        else:
            pseudo = ones_sum(src[8:40]) + 6
        self._tcp_const = pseudo + ones_sum(tcp)
        return count

    def write(self, i: int) -> int:
        """Write segment i (a whole IP packet) at the start of ``out``; returns its length."""
        out, ihl, hlen, mss = self._out, self.ihl, self._hlen, self.mss
        first = i * mss
        plen = min(mss, self._payload - first)
        size = hlen + plen
        chunk = self._src[hlen + first:hlen + first + plen]
        out[:hlen] = self._head  # (whole: sealing in place may have overwritten it since)
        out[hlen:size] = chunk
        tcp_len = size - ihl
        if self._v4:
            ip_id = (self._ip_id + i) & 0xFFFF
            frag, ttl_proto = self._frag_ttl
            _IP4_VAR.pack_into(out, 2, size, ip_id, frag, ttl_proto,
                               -(self._ip_const + size + ip_id) % 0xFFFF)
        else:
            _U16.pack_into(out, 4, tcp_len)
        flags = self._flags
        if i:
            flags &= ~0x80  # CWR on the first segment only
        if i + 1 < self.count:
            flags &= ~0x09  # FIN and PSH on the last only
        seq = (self._seq + first) & 0xFFFFFFFF
        body = int.from_bytes(chunk, "big")
        if plen & 1:
            body <<= 8
        s1, m1, s2, m2 = _halves(plen + (plen & 1))
        body = (body >> s1) + (body & m1)
        body = (body >> s2) + (body & m2)
        csum = -(self._tcp_const + tcp_len + (seq >> 16) + (seq & 0xFFFF) + flags + body) % 0xFFFF
        _TCP_VAR_CSUM.pack_into(out, ihl + 4, seq, self._ack, self._doff, flags, self._window,
                                csum)
        return size
