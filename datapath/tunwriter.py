"""Writes into the TUN, coalescing consecutive TCP segments or UDP datagrams of one flow
(software GRO).

Every write(2) into a TUN runs the kernel's whole receive path for that packet (forwarding, the
next hop's TCP stack) in our process: per packet, that cost more than decryption. With the TUN
opened with IFF_VNET_HDR, a run of in-order IPv4 TCP segments of one flow that Linux's own GRO
would merge (same addresses, ports, ACK, window, options, TOS and TTL; flags ACK or ACK+PSH;
all but the last of full size) is written as one GSO packet: the virtio_net_hdr says "TCPv4,
segment size MSS, checksum partial", and the kernel forwards it as one skb (and segments it
only where a device needs that).

UDP likewise, as Linux's UDP GRO forwarding does: IPv4 datagrams of one flow with equal
headers (but length, id and checksums) and one size, the last possibly shorter, become one
"UDP_L4" GSO packet whose segment size is that datagram size, so the kernel cuts it back into
the same datagrams. A kernel that refuses UDP GSO from a TUN writer (before 6.2) gets the
datagrams one by one from then on.

Without a vnet header (or for anything else) packets are written one by one, unchanged, by
``write_one`` (``TunDevice.write``, which counts its own refusals).
``push`` queues or writes; ``append``/``append_at`` only continue the pending run (the receive
path's shortcut for a stream: see datapath.inbound); ``flush`` must end every batch.

A pending run is not copied: the writer keeps views of the packets given to ``push`` and
``append_at`` (the first whole, then each segment's payload) and writes them with one
writev, the headers from its own patched copy. The caller must leave those bytes unchanged
until ``flush``; the receive path decrypts each packet of a batch to its own place for this.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from datapath.ippacket import internet_checksum

_VNET = struct.Struct("<BBHHHH")  # virtio_net_hdr (little-endian: legacy virtio on x86/arm)
_ZERO_VNET = bytes(_VNET.size)
_NEEDS_CSUM = 1
_GSO_TCPV4 = 1
_GSO_UDP_L4 = 5  # VIRTIO_NET_HDR_GSO_UDP_L4 (Linux 6.2+ takes it from a TUN writer)
_ADDRS = struct.Struct("!HHHH")
_U16 = struct.Struct("!H")
MAX_SEGMENTS = 64  # the kernel's GRO bound (MAX_GSO_SEGS is larger; keep to GRO's)
MAX_GSO_BYTES = 65535
_MAX_HLEN = 80  # a run's headers: IPv4 without options (push takes IHL 5 only), TCP up to 60
_TRANSIENT = (errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO)
_PSH = 0x08

Buffer = bytes | bytearray | memoryview


def _run_header(hlen: int) -> struct.Struct:
    """The IPv4 + TCP header fields (``hlen`` bytes) that must be equal across a run: all but
    total length, IPv4 id and checksum, sequence number, flags (_VARIABLE) and TCP checksum."""
    return struct.Struct(f"!H4xI2xQI4xIBxH2xH{hlen - 40}s")


_RUN_HEADERS = {hlen: _run_header(hlen) for hlen in range(40, 81, 4)}  # TCP data offset 5-15
_VARIABLE = struct.Struct("!2xH20xI5xB")  # total length, sequence number, TCP flags
# UDP: the IPv4 header but total length, id and checksum, and the ports must repeat.
_UDP_RUN = struct.Struct("!H4xI2xQI")
_UDP_VARIABLE = struct.Struct("!2xH20xH")  # total length, UDP length


class TunWriter:
    """Packet writer for one TUN fd (``vnet``: the device has IFF_VNET_HDR)."""

    __slots__ = ("fd", "vnet", "write_one", "errors", "merged", "gso_writes", "udp_gso",
                 "_head", "_first", "_parts", "_count", "_size", "_hlen", "_mss", "_next_seq",
                 "_psh", "_udp", "_header", "_template")

    def __init__(self, fd: int, write_one: Callable[[Buffer], bool], *, vnet: bool) -> None:
        self.fd = fd
        self.vnet = vnet
        self.write_one = write_one  # one packet as it is (TunDevice.write)
        self.errors = 0  # segments of GSO packets the kernel refused
        self.merged = 0  # segments written as part of a GSO packet
        self.gso_writes = 0
        self._head = memoryview(bytearray(_MAX_HLEN))  # the GSO packet's headers, patched
        # The pending run: its first packet and every segment's payload, referenced (the
        # caller keeps them unchanged until flush) and written with one writev.
        self._first: Buffer = b""
        self._parts: list[Buffer] = []
        self._count = 0  # segments pending
        self._size = 0  # bytes of the GSO packet so far
        self._hlen = 0
        self._mss = 0
        self._next_seq = 0  # -1: the run takes no more segments
        self._psh = 0
        self._udp = False  # the pending run is UDP datagrams (_parts: whole packets)
        self.udp_gso = vnet  # False once the kernel refused a UDP GSO write (before 6.2)
        # The fields of the run's header that a packet must repeat to join it, and the
        # struct that reads them; None: no run.
        self._header = _RUN_HEADERS[40]
        self._template: tuple[object, ...] | None = None

    def append(self, pkt: Buffer) -> bool:
        """Add ``pkt`` to the pending run if it continues it (the next in-order segment of the
        same flow with equal headers, as Linux's GRO requires); False changes nothing."""
        return self.append_at(pkt, 0, len(pkt))

    def append_at(self, buf: Buffer, at: int, end: int) -> bool:
        """``append`` of the packet at ``buf[at:end]``, without slicing it out first.

        Two struct reads and a tuple compare, not a parse: this is the per-packet path of a
        TCP stream through the receiving gateway. (The reads may run past ``end`` into other
        bytes of ``buf``; a packet shorter than the run's headers then fails the length
        check: its payload length would be zero or less, or past ``end``.)"""
        try:
            if self._header.unpack_from(buf, at) != self._template:
                return False
        except struct.error:  # buf ends inside the run's headers
            return False
        if self._udp:
            return self._append_udp(buf, at, end)
        total, seq, flags = _VARIABLE.unpack_from(buf, at)
        hlen = self._hlen
        plen = total - hlen
        size = self._size
        # (_next_seq is -1 once the run takes no more: after a short segment, or when full)
        if (seq != self._next_seq or flags & ~_PSH != 0x10 or not 0 < plen <= self._mss
                or total > end - at or size + plen > MAX_GSO_BYTES):
            return False
        self._parts.append(buf[at + hlen:at + total])
        self._size = size + plen
        count = self._count = self._count + 1
        self._next_seq = ((seq + plen) & 0xFFFFFFFF
                          if plen == self._mss and count < MAX_SEGMENTS else -1)
        if flags & _PSH:
            self._psh = _PSH
            self.flush()
        return True

    def _append_udp(self, buf: Buffer, at: int, end: int) -> bool:
        # Datagrams of the run's size, the last one possibly shorter (it closes the run),
        # as UDP GRO forwarding merges them: GSO cuts them apart again the same way.
        total, length = _UDP_VARIABLE.unpack_from(buf, at)
        plen = total - 28
        size = self._size
        if (self._next_seq or length != plen + 8 or not 0 < plen <= self._mss
                or total > end - at or size + plen > MAX_GSO_BYTES):
            return False
        self._parts.append(buf[at:at + total])
        self._size = size + plen
        count = self._count = self._count + 1
        if plen != self._mss or count >= MAX_SEGMENTS:
            self._next_seq = -1
        return True

    def push(self, pkt: Buffer) -> None:
        """Write ``pkt`` (an IP packet), or keep it to merge with the next ones."""
        if self._count and self.append(pkt):
            return
        if self._count:
            self.flush()
        n = len(pkt)
        if self.vnet and n > 40 and pkt[0] == 0x45 and pkt[9] == 6:
            total = (pkt[2] << 8) | pkt[3]
            hlen = 20 + (pkt[32] >> 4) * 4
            flags = pkt[33]
            if (not (pkt[6] & 0x3F or pkt[7]) and (flags == 0x10 or flags == 0x18)
                    and hlen >= 40 and hlen < total <= n):
                self._first = pkt
                self._parts = [pkt[hlen:total]]
                self._count = 1
                self._size = total
                self._hlen = hlen
                self._mss = total - hlen
                self._next_seq = (int.from_bytes(pkt[24:28], "big") + total - hlen) & 0xFFFFFFFF
                self._psh = flags & _PSH
                if self._psh:
                    self.flush()
                    return
                header = self._header = _RUN_HEADERS[hlen]
                self._template = header.unpack_from(pkt)
                self._udp = False
                return
        if self.udp_gso and n > 28 and pkt[0] == 0x45 and pkt[9] == 17:
            total = (pkt[2] << 8) | pkt[3]
            plen = total - 28
            if (not (pkt[6] & 0x3F or pkt[7]) and plen > 0 and total <= n
                    and ((pkt[24] << 8) | pkt[25]) == plen + 8):
                self._first = pkt
                self._parts = [pkt[:total]]
                self._count = 1
                self._size = total
                self._hlen = 28
                self._mss = plen
                self._next_seq = 0
                self._psh = 0
                self._header = _UDP_RUN
                self._template = _UDP_RUN.unpack_from(pkt)
                self._udp = True
                return
        self.write_one(pkt)

    def flush(self) -> None:
        """Write what is pending: one packet as it came, several as one GSO packet."""
        count = self._count
        if not count:
            return
        self._count = 0
        self._template = None
        first, self._first = self._first, b""
        size = self._size
        if count == 1:
            self.write_one(first if len(first) == size else first[:size])
            return
        head, hlen, udp = self._head, self._hlen, self._udp
        head[:hlen] = first[:hlen]
        head[2:4] = _U16.pack(size)
        head[10:12] = b"\0\0"
        head[10:12] = _U16.pack(internet_checksum(head[:20]))
        # CHECKSUM_PARTIAL: the TCP or UDP checksum field holds the pseudo-header sum,
        # uncomplemented; the kernel completes each segment's.
        a, b, c, d = _ADDRS.unpack_from(head, 12)
        pseudo = a + b + c + d + (17 if udp else 6) + size - 20
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        parts, self._parts = self._parts, []
        if udp:
            head[24:26] = _U16.pack(size - 20)
            head[26:28] = _U16.pack(pseudo)
            vnet = _VNET.pack(_NEEDS_CSUM, _GSO_UDP_L4, 28, self._mss, 20, 6)
            iov = [vnet, head[:28], *[p[28:] for p in parts]]
        else:
            head[33] |= self._psh
            head[36:38] = _U16.pack(pseudo)
            vnet = _VNET.pack(_NEEDS_CSUM, _GSO_TCPV4, hlen, self._mss, 20, 16)
            iov = [vnet, head[:hlen], *parts]
        try:
            os.writev(self.fd, iov)
        except OSError as exc:
            if udp and exc.errno == errno.EINVAL:
                # A kernel that takes no UDP GSO from a TUN writer: these go one by one,
                # as they came, and so do later UDP datagrams.
                self.udp_gso = False
                for packet in parts:
                    self.write_one(packet)
                return
            if exc.errno not in _TRANSIENT:
                raise
            self.errors += count
            return
        self.gso_writes += 1
        self.merged += count
