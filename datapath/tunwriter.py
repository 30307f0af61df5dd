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
from itertools import repeat, takewhile
from operator import and_, eq, truth

from datapath.ippacket import internet_checksum

_VNET = struct.Struct("<BBHHHH")  # virtio_net_hdr (little-endian: legacy virtio on x86/arm)
_ZERO_VNET = bytes(_VNET.size)
_NEEDS_CSUM = 1
_GSO_TCPV4 = 1
_GSO_TCPV6 = 4
_GSO_UDP_L4 = 5  # VIRTIO_NET_HDR_GSO_UDP_L4 (Linux 6.2+ takes it from a TUN writer)
_ADDRS = struct.Struct("!HHHH")
_U16 = struct.Struct("!H")
MAX_SEGMENTS = 64  # the kernel's GRO bound (MAX_GSO_SEGS is larger; keep to GRO's)
MAX_GSO_BYTES = 65535
_MAX_HLEN = 100  # a run's headers: IPv4 without options or IPv6 (40), TCP up to 60
_TRANSIENT = (errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO)
_PSH = 0x08
_ACK = 0x10
_ACK_PSH = 0x18  # a run's flags: ACK, and PSH on its last segment

Buffer = bytes | bytearray | memoryview


def _run_header(ip_len: int, hlen: int) -> struct.Struct:
    """The IP + TCP header fields (``hlen`` bytes, the IP header ``ip_len``) that must be
    equal across a run: all but the IP length, IPv4 id and checksum, sequence number, flags
    (the run's variable struct) and TCP checksum. IPv6: version, traffic class and flow
    label, next header, hop limit and addresses."""
    # Equal bytes next to each other are read as one field: each field read is a new object.
    # IPv4: version to TOS; fragment, TTL and protocol; addresses and ports. IPv6: version,
    # traffic class and flow label; next header to ports. Then ACK number and data offset;
    # window; urgent pointer and options.
    ip = "!2s4x4s2x12s" if ip_len == 20 else "!4s2x38s"
    return struct.Struct(f"{ip}4x5sx2s2x{hlen - ip_len - 18}s")


# TCP data offset 5-15 behind an IPv4 (IHL 5) or IPv6 (no extension headers) header.
_RUN_HEADERS = {(ip_len, ip_len + tcp): _run_header(ip_len, ip_len + tcp)
                for ip_len in (20, 40) for tcp in range(20, 61, 4)}
# The IP length field (IPv4: total length, IPv6: payload length), sequence number, flags.
_VARIABLE = struct.Struct("!2xH20xI5xB")
_VARIABLE6 = struct.Struct("!4xH38xI5xB")
# UDP: the IP header as for TCP, and the ports must repeat.
_UDP_RUN = struct.Struct("!H4xI2xQI")
_UDP_RUN6 = struct.Struct("!I2xBB32sI")
_UDP_VARIABLE = struct.Struct("!2xH20xH")  # IP length field, UDP length
_UDP_VARIABLE6 = struct.Struct("!4xH38xH")
_ADDRS6 = struct.Struct("!16H")


class TunWriter:
    """Packet writer for one TUN fd (``vnet``: the device has IFF_VNET_HDR)."""

    __slots__ = ("fd", "vnet", "write_one", "errors", "merged", "gso_writes", "udp_gso",
                 "_head", "_first", "_parts", "_count", "_size", "_ip_len", "_hlen", "_mss",
                 "_next_seq", "_psh", "_udp", "_header", "_template", "_variable", "_lead")

    def __init__(self, fd: int, write_one: Callable[[Buffer], bool], *, vnet: bool) -> None:
        self.fd = fd
        self.vnet = vnet
        self.write_one = write_one  # one packet as it is (TunDevice.write)
        self.errors = 0  # segments of GSO packets the kernel refused
        self.merged = 0  # segments written as part of a GSO packet
        self.gso_writes = 0
        self.udp_gso = vnet  # False once the kernel refused a UDP GSO write (before 6.2)
        self._head = memoryview(bytearray(_MAX_HLEN))  # the GSO packet's headers, patched
        # The pending run: its first packet and every segment's payload (UDP: every whole
        # datagram), referenced (the caller keeps them unchanged until flush) and written
        # with one writev.
        self._first: Buffer = b""
        self._parts: list[Buffer] = []
        self._count = 0  # segments pending
        self._size = 0  # bytes of the GSO packet so far
        self._ip_len = 20  # the run's IP header: 20 (IPv4) or 40 (IPv6)
        self._hlen = 0  # IP and transport headers
        self._mss = 0
        self._next_seq = 0  # TCP: the next sequence number; -1: the run takes no more
        self._psh = 0
        self._udp = False
        # The fields of the run's header that a packet must repeat to join it, and the
        # struct that reads them (None: no run); the struct that reads the fields that vary,
        # and what the IP length field counts beyond the payload (the headers, but IPv6's own).
        self._header = _RUN_HEADERS[20, 40]
        self._template: tuple[object, ...] | None = None
        self._variable = _VARIABLE
        self._lead = 0

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
        length, seq, flags = self._variable.unpack_from(buf, at)
        # (Each arithmetic result here is a new int object: the fewer, the faster.)
        plen = length - self._lead
        start = at + self._hlen
        stop = start + plen
        size = self._size + plen
        # (_next_seq is -1 once the run takes no more: after a short segment, or when full)
        if (seq != self._next_seq or flags | _PSH != _ACK_PSH or not 0 < plen <= self._mss
                or stop > end or size > MAX_GSO_BYTES):
            return False
        self._parts.append(buf[start:stop])
        self._size = size
        count = self._count = self._count + 1
        if plen == self._mss and count < MAX_SEGMENTS:
            seq += plen
            self._next_seq = seq if seq <= 0xFFFFFFFF else seq - 0x100000000
        else:
            self._next_seq = -1
        if flags & _PSH:
            self._psh = _PSH
            self.flush()
        return True

    def append_stream(self, buf: Buffer, at: int, stride: int, n: int, size: int) -> int:
        """``append_at`` of up to ``n`` packets of ``size`` bytes at ``at``, ``at + stride``,
        ...: returns how many of them, from the first, continue the pending run.

        Full-size segments of the run's TCP stream are checked and added in C-level loops
        (map and takewhile over the same struct reads as append_at's), not one interpreted
        append_at each: the receiving gateway's path for a GRO batch of one stream. Anything
        else (a short or PSH segment, UDP, the sequence number wrap) is left to append_at,
        one packet at a time."""
        mss = self._mss
        next_seq = self._next_seq
        # (A pending TCP run's mss is never 0: its first segment had payload.)
        if (self._template is None or self._udp or next_seq < 0 or size - self._hlen != mss
                or n < 2):
            return 1 if n and self.append_at(buf, at, at + size) else 0
        # Segments that fit the run, up to the last sequence number before the wrap.
        room = min(n, MAX_SEGMENTS - self._count, (MAX_GSO_BYTES - self._size) // mss,
                   (0xFFFFFFFF - next_seq) // mss + 1)
        if room < 2:
            return 1 if self.append_at(buf, at, at + size) else 0
        stop = at + room * stride
        starts = range(at, stop, stride)
        same = map(eq, map(self._header.unpack_from, repeat(buf), starts),
                   repeat(self._template))
        follows = map(eq, map(self._variable.unpack_from, repeat(buf), starts),
                      zip(repeat(mss + self._lead), range(next_seq, next_seq + room * mss, mss),
                          repeat(_ACK)))
        try:
            k = len(list(takewhile(truth, map(and_, same, follows))))
        except struct.error:  # buf ends inside a packet's headers
            k = 0
        if not k:
            return 1 if self.append_at(buf, at, at + size) else 0
        stop = at + k * stride
        self._parts.extend(map(buf.__getitem__, map(
            slice, range(at + self._hlen, stop, stride), range(at + size, stop + size, stride))))
        self._size += k * mss
        count = self._count = self._count + k
        seq = next_seq + k * mss
        if count < MAX_SEGMENTS:
            self._next_seq = seq if seq <= 0xFFFFFFFF else seq - 0x100000000
        else:
            self._next_seq = -1
        return k

    def _append_udp(self, buf: Buffer, at: int, end: int) -> bool:
        # Datagrams of the run's size, the last one possibly shorter (it closes the run),
        # as UDP GRO forwarding merges them: GSO cuts them apart again the same way.
        length, udp_length = self._variable.unpack_from(buf, at)
        plen = length - self._lead
        stop = at + self._hlen + plen
        size = self._size + plen
        if (self._next_seq or udp_length != plen + 8 or not 0 < plen <= self._mss
                or stop > end or size > MAX_GSO_BYTES):
            return False
        self._parts.append(buf[at:stop])
        self._size = size
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
        if not (self.vnet and self._start(pkt)):
            self.write_one(pkt)

    def _start(self, pkt: Buffer) -> bool:
        """Make ``pkt`` the first of a run if it can have followers: IPv4 without options
        or fragmentation, or IPv6 without extension headers, carrying TCP (ACK, maybe PSH,
        with payload) or UDP (with payload, the UDP length consistent)."""
        n = len(pkt)
        if n > 28 and pkt[0] == 0x45 and not (pkt[6] & 0x3F or pkt[7]):
            ip_len, proto, total = 20, pkt[9], (pkt[2] << 8) | pkt[3]
            variable = _UDP_VARIABLE if proto == 17 else _VARIABLE
        elif n > 48 and pkt[0] >> 4 == 6:
            ip_len, proto, total = 40, pkt[6], 40 + ((pkt[4] << 8) | pkt[5])
            variable = _UDP_VARIABLE6 if proto == 17 else _VARIABLE6
        else:
            return False
        if total > n:
            return False
        if proto == 6 and n >= ip_len + 20:
            hlen = ip_len + (pkt[ip_len + 12] >> 4) * 4
            flags = pkt[ip_len + 13]
            if not (flags == 0x10 or flags == 0x18) or not ip_len + 20 <= hlen < total:
                return False
            seq = int.from_bytes(pkt[ip_len + 4:ip_len + 8], "big")
            self._next_seq = (seq + total - hlen) & 0xFFFFFFFF
            self._psh = flags & _PSH
            header = _RUN_HEADERS[ip_len, hlen]
            udp = False
        elif proto == 17 and self.udp_gso:
            hlen = ip_len + 8
            if not (hlen < total and (pkt[ip_len + 4] << 8) | pkt[ip_len + 5] == total - ip_len):
                return False
            self._next_seq = 0
            self._psh = 0
            header = _UDP_RUN if ip_len == 20 else _UDP_RUN6
            udp = True
        else:
            return False
        self._first = pkt
        self._parts = [pkt[:total] if udp else pkt[hlen:total]]
        self._count = 1
        self._size = total
        self._ip_len = ip_len
        self._hlen = hlen
        self._mss = total - hlen
        self._udp = udp
        self._variable = variable
        self._lead = hlen - (0 if ip_len == 20 else 40)  # (IPv6's length omits its header)
        if self._psh:
            self.flush()
            return True
        self._header = header
        self._template = header.unpack_from(pkt)
        return True

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
            self._parts = []
            self.write_one(first if len(first) == size else first[:size])
            return
        head, ip_len, hlen, udp = self._head, self._ip_len, self._hlen, self._udp
        head[:hlen] = first[:hlen]
        payload = size - ip_len  # what the transport checksum covers
        if ip_len == 20:
            head[2:4] = _U16.pack(size)
            head[10:12] = b"\0\0"
            head[10:12] = _U16.pack(internet_checksum(head[:20]))
            pseudo = sum(_ADDRS.unpack_from(head, 12))
            gso_type = _GSO_UDP_L4 if udp else _GSO_TCPV4
        else:
            head[4:6] = _U16.pack(payload)
            pseudo = sum(_ADDRS6.unpack_from(head, 8))
            gso_type = _GSO_UDP_L4 if udp else _GSO_TCPV6
        # CHECKSUM_PARTIAL: the TCP or UDP checksum field holds the pseudo-header sum,
        # uncomplemented; the kernel completes each segment's.
        pseudo += (17 if udp else 6) + payload
        while pseudo >> 16:
            pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        parts, self._parts = self._parts, []
        if udp:
            head[ip_len + 4:ip_len + 6] = _U16.pack(payload)
            head[ip_len + 6:ip_len + 8] = _U16.pack(pseudo)
            vnet = _VNET.pack(_NEEDS_CSUM, gso_type, hlen, self._mss, ip_len, 6)
            iov = [vnet, head[:hlen], *[p[hlen:] for p in parts]]
        else:
            head[ip_len + 13] |= self._psh
            head[ip_len + 16:ip_len + 18] = _U16.pack(pseudo)
            vnet = _VNET.pack(_NEEDS_CSUM, gso_type, hlen, self._mss, ip_len, 16)
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
