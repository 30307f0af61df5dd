"""Writes into the TUN, coalescing consecutive TCP segments of one flow (software GRO).

Every write(2) into a TUN runs the kernel's whole receive path for that packet (forwarding, the
next hop's TCP stack) in our process: per packet, that cost more than decryption. With the TUN
opened with IFF_VNET_HDR, a run of in-order IPv4 TCP segments of one flow that Linux's own GRO
would merge (same addresses, ports, ACK, window, options, TOS and TTL; flags ACK or ACK+PSH;
all but the last of full size) is written as one GSO packet: the virtio_net_hdr says "TCPv4,
segment size MSS, checksum partial", and the kernel forwards it as one skb (and segments it
only where a device needs that).

Without a vnet header (or for anything else) packets are written one by one, unchanged, by
``write_one`` (``TunDevice.write``, which counts its own refusals).
``push`` queues or writes; ``flush`` must end every batch.
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
_ADDRS = struct.Struct("!HHHH")
# IPv4 + TCP fields GRO compares: version/IHL, TOS, total length, (id), fragment, TTL, protocol,
# (checksum), addresses and ports, sequence, ack, data offset, flags, window.
_TCP4 = struct.Struct("!BBH2xHBB2x12sIIBBH")
_U16 = struct.Struct("!H")
MAX_SEGMENTS = 64  # the kernel's GRO bound (MAX_GSO_SEGS is larger; keep to GRO's)
MAX_GSO_BYTES = 65535
_TRANSIENT = (errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO)

Buffer = bytes | bytearray | memoryview


class TunWriter:
    """Packet writer for one TUN fd (``vnet``: the device has IFF_VNET_HDR)."""

    __slots__ = ("fd", "vnet", "write_one", "errors", "merged", "gso_writes", "_buf", "_view",
                 "_count", "_size", "_hlen", "_mss", "_next_seq", "_short", "_key", "_same",
                 "_psh")

    def __init__(self, fd: int, write_one: Callable[[Buffer], bool], *, vnet: bool) -> None:
        self.fd = fd
        self.vnet = vnet
        self.write_one = write_one  # one packet as it is (TunDevice.write)
        self.errors = 0  # segments of GSO packets the kernel refused
        self.merged = 0  # segments written as part of a GSO packet
        self.gso_writes = 0
        self._buf = bytearray(MAX_GSO_BYTES)
        self._view = memoryview(self._buf)
        self._count = 0  # segments pending in _buf
        self._size = 0
        self._hlen = 0
        self._mss = 0
        self._next_seq = 0
        self._short = False  # the last pending segment was shorter than the MSS
        self._key = b""  # addresses and ports
        self._same: tuple[int, int, int, int, bytes] = (0, 0, 0, 0, b"")  # TOS, TTL, ack,
        # window, options: must match to merge
        self._psh = 0

    def push(self, pkt: Buffer) -> None:
        """Write ``pkt`` (an IP packet), or keep it to merge with the next ones."""
        n = len(pkt)
        if self.vnet and n > 40:
            vihl, tos, total, frag, ttl, proto, key, seq, ack, doff, flags, window = \
                _TCP4.unpack_from(pkt)
            if vihl == 0x45 and proto == 6 and not frag & 0x3FFF and (
                    flags == 0x10 or flags == 0x18):
                hlen = 20 + (doff >> 4) * 4
                plen = total - hlen
                if hlen >= 40 and plen > 0 and total <= n:
                    same = (tos, ttl, ack, window, bytes(pkt[40:hlen]) if hlen > 40 else b"")
                    size = self._size
                    if (self._count and seq == self._next_seq and not self._short
                            and plen <= self._mss and hlen == self._hlen
                            and size + plen <= MAX_GSO_BYTES
                            and self._count < MAX_SEGMENTS and key == self._key
                            and same == self._same):
                        self._buf[size:size + plen] = pkt[hlen:total]
                        self._size = size + plen
                        self._count += 1
                        self._next_seq = (seq + plen) & 0xFFFFFFFF
                        self._short = plen < self._mss
                        if flags & 0x08:
                            self._psh = 0x08
                            self.flush()
                        return
                    if self._count:
                        self.flush()
                    self._buf[:total] = pkt[:total]
                    self._count = 1
                    self._size = total
                    self._hlen = hlen
                    self._mss = plen
                    self._next_seq = (seq + plen) & 0xFFFFFFFF
                    self._short = False
                    self._key = key
                    self._same = same
                    self._psh = flags & 0x08
                    if self._psh:
                        self.flush()
                    return
        if self._count:
            self.flush()
        self.write_one(pkt)

    def flush(self) -> None:
        """Write what is pending: one packet as it came, several as one GSO packet."""
        count = self._count
        if not count:
            return
        self._count = 0
        size = self._size
        view = self._view
        if count == 1:
            self.write_one(view[:size])
            return
        buf, hlen = self._buf, self._hlen
        buf[2:4] = _U16.pack(size)
        buf[10:12] = b"\0\0"
        buf[10:12] = _U16.pack(internet_checksum(view[:20]))
        buf[33] |= self._psh
        # CHECKSUM_PARTIAL: the TCP checksum field holds the pseudo-header sum, uncomplemented.
        a, b, c, d = _ADDRS.unpack_from(buf, 12)
        pseudo = a + b + c + d + 6 + size - 20
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        buf[36:38] = _U16.pack(pseudo)
        header = _VNET.pack(_NEEDS_CSUM, _GSO_TCPV4, hlen, self._mss, 20, 16)
        try:
            os.writev(self.fd, (header, view[:size]))
        except OSError as exc:
            if exc.errno not in _TRANSIENT:
                raise
            self.errors += count
            return
        self.gso_writes += 1
        self.merged += count
