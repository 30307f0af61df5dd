"""Outer sockets of the datapath: UDP encapsulation (RFC 3948, port 4500) and raw ESP (proto 50).

Both receive into a DatagramBatch of preallocated slots, draining every ready datagram per
wake-up. The UDP socket uses UDP GSO to send a run of equal-sized datagrams in one syscall and
UDP GRO to receive several in one; both are probed when the socket opens and dropped cleanly
(counted in stats) when the kernel or the egress device refuses them. Every socket carries the
SO_MARK that policy routing (datapath.netconf) uses to keep ESP packets out of the TUN.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IPPROTO_ESP = 50
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
# The kernel refuses a GSO send of more segments (64 before Linux 6.x raised it to 128), and a
# GRO'd receive carries at most 64; a split slot is bounded by the larger figure.
GSO_MAX_SEGMENTS = 64
_SPLIT_MAX = 128
MAX_DATAGRAM = 65535
_MAX_UDP_PAYLOAD: dict[int, int] = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
_GSO_CMSG = struct.Struct("=H")
IP_PKTINFO = 8  # <netinet/in.h>; not exported by Python's socket module
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16si")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_TRANSIENT = (errno.EAGAIN, errno.ENOBUFS, errno.EHOSTUNREACH, errno.ENETUNREACH,
              errno.ECONNREFUSED, errno.EMSGSIZE, errno.EPERM, errno.EACCES)

Address = tuple[Any, ...]
Buffer = bytes | bytearray | memoryview


class DatagramBatch:
    """Preallocated receive slots and the datagrams the last recv_batch put in them.

    Receive k filled slot k (k < ``used``): ``got[k]`` bytes from ``addr[k]`` starting at
    ``offset[k]`` (raw IPv4: past the IP header), cut into datagrams of ``seg[k]`` bytes, the
    last possibly shorter (GRO coalesced them; a plain receive is one datagram). ``count`` is
    the number of datagrams; ``all_views()`` lists them in order, ``view(i)`` and ``source(i)``
    find one (slow path). Nothing per datagram is stored: a receive costs the same whether GRO
    put 1 or 45 datagrams in it.
    """

    __slots__ = ("size", "buffers", "views", "got", "seg", "offset", "addr", "used", "count",
                 "_iovs")

    def __init__(self, slots: int, size: int = MAX_DATAGRAM) -> None:
        if slots < 1 or size < 1:
            raise ValueError("DatagramBatch needs slots >= 1 and size >= 1")
        self.size = size
        self.buffers = [bytearray(size) for _ in range(slots)]
        self.views = [memoryview(b) for b in self.buffers]
        self._iovs = [[v] for v in self.views]
        self.got = [0] * slots
        self.seg = [0] * slots
        self.offset = [0] * slots
        self.addr: list[Address] = [()] * slots
        self.used = 0
        self.count = 0

    @classmethod
    def holding(cls, datagrams: Sequence[Buffer]) -> DatagramBatch:
        """A new batch with these datagrams in it, one per slot, copied (tests, slow paths)."""
        batch = cls(max(len(datagrams), 1), max((len(d) for d in datagrams), default=1) or 1)
        for k, datagram in enumerate(datagrams):
            n = len(datagram)
            batch.views[k][:n] = datagram
            batch.got[k] = batch.seg[k] = n
        batch.used = batch.count = len(datagrams)
        return batch

    def all_views(self) -> list[memoryview]:
        out: list[memoryview] = []
        for k in range(self.used):
            off = self.offset[k]
            end = off + self.got[k]
            seg = self.seg[k]
            view = self.views[k][:end]
            if seg >= end - off:
                out.append(view[off:])
            else:
                out += [view[at:at + seg] for at in range(off, end, seg)]
        return out

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.count:
            raise IndexError(f"datagram {i} of {self.count}")
        for k in range(self.used):
            seg = self.seg[k]
            n = -(-self.got[k] // seg) if seg else 1
            if i < n:
                return k, i
            i -= n
        raise IndexError(i)

    def view(self, i: int) -> memoryview:
        k, j = self._locate(i)
        start = self.offset[k] + j * self.seg[k]
        return self.views[k][start:min(start + self.seg[k], self.offset[k] + self.got[k])]

    def source(self, i: int) -> Address:
        return self.addr[self._locate(i)[0]]

    def datagrams(self) -> list[bytes]:
        """Copies of this batch's datagrams (for tests and slow paths, not the hot loop)."""
        return [bytes(v) for v in self.all_views()]


@dataclass(slots=True)
class SocketStats:
    rx_datagrams: int = 0
    rx_gro_buffers: int = 0  # receives that carried more than one datagram
    rx_dropped: int = 0  # truncated or malformed
    tx_datagrams: int = 0
    tx_gso_sends: int = 0
    tx_dropped: int = 0  # refused by the kernel (full queue, unreachable ...)
    gso_fallbacks: int = 0  # GSO send refused, switched to one datagram per syscall


def _setup(sock: socket.socket, mark: int | None, bufsize: int) -> None:
    sock.setblocking(False)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:  # FORCE passes rmem_max/wmem_max when we may (CAP_NET_ADMIN)
            sock.setsockopt(socket.SOL_SOCKET, force, bufsize)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, bufsize)


def probe_udp_gso(sock: socket.socket) -> bool:
    """True if the kernel knows UDP_SEGMENT (Linux >= 4.18)."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def enable_udp_gro(sock: socket.socket) -> bool:
    """Turn UDP_GRO on; False if the kernel does not know it (Linux < 5.0)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class _OuterSocket:
    """What both outer sockets share: the socket, counters, a counted-drop send, closing."""

    __slots__ = ("sock", "family", "stats")

    def __init__(self, sock: socket.socket, family: int) -> None:
        self.sock = sock
        self.family = family
        self.stats = SocketStats()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _sendto(self, data: Buffer, addr: Address) -> bool:
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                self.stats.tx_dropped += 1
                return False
            raise
        self.stats.tx_datagrams += 1
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpSocket(_OuterSocket):
    """Non-blocking UDP socket (default port 4500) with GSO send and GRO receive when possible."""

    __slots__ = ("gso", "gro", "_max_payload")

    def __init__(self, family: int = socket.AF_INET, host: str | None = None, port: int = 4500,
                 *, mark: int | None = None, bufsize: int = 8 << 20, gso: bool = True,
                 gro: bool = True) -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _setup(sock, mark, bufsize)
            sock.bind((host if host is not None else ("::" if family == socket.AF_INET6
                                                       else "0.0.0.0"), port))
            self.gso = gso and probe_udp_gso(sock)
            self.gro = gro and enable_udp_gro(sock)
        except BaseException:
            sock.close()
            raise
        super().__init__(sock, family)
        self._max_payload = _MAX_UDP_PAYLOAD[family]

    @property
    def address(self) -> Address:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    # -- receive -------------------------------------------------------------------------
    def recv_batch(self, batch: DatagramBatch, limit: int | None = None) -> int:
        """Drain up to limit receive calls into batch; returns batch.count (datagrams)."""
        if self.gro:
            return self._recv_gro(batch, limit)
        slots = len(batch.buffers) if limit is None else min(limit, len(batch.buffers))
        recv = self.sock.recvfrom_into
        views, size, got_of, seg_of, addrs, offset = (
            batch.views, batch.size, batch.got, batch.seg, batch.addr, batch.offset)
        n = 0
        while n < slots:
            try:
                got, addr = recv(views[n], 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP: not fatal
                if exc.errno in _TRANSIENT:
                    continue
                raise
            if got > size:
                self.stats.rx_dropped += 1
                continue
            got_of[n] = seg_of[n] = got
            offset[n] = 0
            addrs[n] = addr
            n += 1
        batch.used = batch.count = n
        self.stats.rx_datagrams += n
        return n

    def _recv_gro(self, batch: DatagramBatch, limit: int | None) -> int:
        slots = len(batch.buffers) if limit is None else min(limit, len(batch.buffers))
        recvmsg = self.sock.recvmsg_into
        iovs, got_of, seg_of, addrs, offset = (
            batch._iovs, batch.got, batch.seg, batch.addr, batch.offset)
        n = 0
        s = 0
        while s < slots:
            try:
                got, anc, flags, addr = recvmsg(iovs[s], _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                raise
            if flags & socket.MSG_TRUNC:
                self.stats.rx_dropped += 1
                continue
            seg = got
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    seg = int.from_bytes(data[:4], sys.byteorder) or got
            if seg >= got:
                seg = got
                n += 1
            else:
                if got > seg * _SPLIT_MAX:  # cannot come from the kernel; refuse to split
                    self.stats.rx_dropped += 1
                    continue
                self.stats.rx_gro_buffers += 1
                n += -(-got // seg)
            got_of[s], seg_of[s], offset[s], addrs[s] = got, seg, 0, addr
            s += 1
        batch.used = s
        batch.count = n
        self.stats.rx_datagrams += n
        return n

    # -- send ----------------------------------------------------------------------------
    def send(self, datagram: Buffer, addr: Address, source: str | None = None) -> bool:
        """Send one datagram, from the local address ``source`` if given (a wildcard-bound
        socket would otherwise take the route's preferred source); False (counted) if the
        kernel refused it for now."""
        try:
            packed = socket.inet_pton(self.family, source) if source else b""
        except OSError:
            packed = b""  # another family's address: let the route choose
        if not packed:
            return self._sendto(datagram, addr)
        if self.family == socket.AF_INET:
            anc = [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, packed, bytes(4)))]
        else:
            anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(packed, 0))]
        try:
            self.sock.sendmsg([datagram], anc, 0, addr)
        except OSError as exc:
            if exc.errno in _TRANSIENT or exc.errno == errno.EINVAL:  # EINVAL: not ours
                self.stats.tx_dropped += 1
                return False
            raise
        self.stats.tx_datagrams += 1
        return True

    def send_batch(self, datagrams: Sequence[Buffer], addr: Address) -> int:
        """Send datagrams to addr in order, one GSO syscall per run of equal sizes.

        A run is datagrams of one size, optionally closed by one shorter datagram (the shape
        UDP_SEGMENT accepts). Returns how many were handed to the kernel; the rest are counted
        as dropped.
        """
        sent = 0
        i = 0
        total = len(datagrams)
        lens = list(map(len, datagrams))  # (byte buffers: len is the size)
        seg = lens[0] if total else 0
        if (self.gso and 1 < total <= GSO_MAX_SEGMENTS and lens[-1] <= seg
                and lens.count(seg) >= total - 1 and sum(lens) <= self._max_payload):
            # The common case, a stream's batch: one run, found without a loop.
            if self._send_gso(datagrams, seg, addr):
                return total
            return sum(self.send(d, addr) for d in datagrams)
        while i < total:
            seg = lens[i]
            j = i + 1
            if self.gso:
                run_bytes = seg
                while (j < total and j - i < GSO_MAX_SEGMENTS and lens[j] <= seg
                       and run_bytes + lens[j] <= self._max_payload):
                    run_bytes += lens[j]
                    j += 1
                    if lens[j - 1] < seg:
                        break
            if j - i > 1 and self._send_gso(datagrams[i:j], seg, addr):
                sent += j - i
            else:
                for k in range(i, j):
                    sent += self.send(datagrams[k], addr)
            i = j
        return sent

    def _send_gso(self, run: Sequence[Buffer], seg: int, addr: Address) -> bool:
        """One sendmsg of a whole run; False means 'send them singly' (GSO now off or EAGAIN)."""
        try:
            self.sock.sendmsg(run, [(SOL_UDP, UDP_SEGMENT, _GSO_CMSG.pack(seg))], 0, addr)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                # Segment larger than the path MTU allows: this run goes out singly (and may
                # be fragmented there), GSO stays on for the next.
                self.stats.gso_fallbacks += 1
                return False
            if exc.errno in (errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                # Egress device cannot checksum-offload (older kernels) or no GSO: stop trying.
                self.gso = False
                self.stats.gso_fallbacks += 1
                return False
            if exc.errno in _TRANSIENT:
                self.stats.tx_dropped += len(run)
                return True  # counted as dropped; do not retry singly into a full queue
            raise
        self.stats.tx_gso_sends += 1
        self.stats.tx_datagrams += len(run)
        return True


class RawEspSocket(_OuterSocket):
    """Raw IP protocol 50 socket. IPv4 receives include the IP header, IPv6 ones do not:
    recv_batch points every datagram at the ESP header in both cases."""

    __slots__ = ()

    def __init__(self, family: int = socket.AF_INET, bind_addr: str | None = None, *,
                 mark: int | None = None, bufsize: int = 8 << 20) -> None:
        sock = socket.socket(family, socket.SOCK_RAW, IPPROTO_ESP)
        try:
            _setup(sock, mark, bufsize)
            if bind_addr is not None:
                sock.bind((bind_addr, 0))
        except BaseException:
            sock.close()
            raise
        super().__init__(sock, family)

    def recv_batch(self, batch: DatagramBatch, limit: int | None = None) -> int:
        """Drain ready ESP packets into batch; returns batch.count. addr[i] is (peer, 0...)."""
        slots = len(batch.buffers) if limit is None else min(limit, len(batch.buffers))
        recv = self.sock.recvfrom_into
        v4 = self.family == socket.AF_INET
        views, buffers, size = batch.views, batch.buffers, batch.size
        n = 0
        while n < slots:
            try:
                got, addr = recv(views[n], 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                raise
            if got > size:
                self.stats.rx_dropped += 1
                continue
            off = 0
            if v4:
                first = buffers[n][0] if got else 0
                off = (first & 0x0F) * 4
                if first >> 4 != 4 or off < 20 or off > got:
                    self.stats.rx_dropped += 1
                    continue
            batch.offset[n] = off
            batch.got[n] = batch.seg[n] = got - off
            batch.addr[n] = addr
            n += 1
        batch.used = batch.count = n
        self.stats.rx_datagrams += n
        return n

    def send(self, esp: Buffer, peer: str) -> bool:
        """Send an ESP packet (SPI onwards); the kernel adds the IP header."""
        return self._sendto(esp, (peer, 0))

    def send_batch(self, packets: Sequence[Buffer], peer: str) -> int:
        """Send ESP packets to one peer in order, one sendto each (a raw socket has no GSO);
        returns how many the kernel took, the rest counted as dropped."""
        sendto = self.sock.sendto
        addr = (peer, 0)
        sent = 0
        for esp in packets:
            try:
                sendto(esp, addr)
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
                continue
            sent += 1
        self.stats.tx_datagrams += sent
        self.stats.tx_dropped += len(packets) - sent
        return sent
