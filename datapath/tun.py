"""TUN device I/O: create or attach a layer-3 TUN, drain ready packets into preallocated slots.

The kernel hands out one packet per read(2) on a TUN fd, so a batch is a loop of ``readinto``
calls into fixed buffers until EAGAIN or the bound; no per-packet buffer allocation.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
from dataclasses import dataclass

import pytun

IFF_TUN = pytun.IFF_TUN
IFF_NO_PI = pytun.IFF_NO_PI
IFF_MULTI_QUEUE = pytun.IFF_MULTI_QUEUE
IFF_VNET_HDR = pytun.IFF_VNET_HDR

# struct virtio_net_hdr without TUNSETVNETHDRSZ. Until TUNSETOFFLOAD the kernel checksums and
# segments before handing packets over and the header it gives is zero; with offloads on it
# describes partial checksums and TSO super-packets (datapath.segment).
VNET_HDR_LEN = 10
_ZERO_VNET_HDR = bytes(VNET_HDR_LEN)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

MAX_PACKET = 65535


class PacketSlots:
    """count preallocated buffers for packets of up to size bytes; lengths[i] is the packet
    now at the start of views[i] and, on a TUN with a vnet header, vnet[i] its
    virtio_net_hdr. ``head`` bytes before the packet (the vnet header's among them) and
    ``tail`` bytes after ``size`` are never read into: room the consumer may write around a
    packet (the outbound datapath's ESP header and trailer, datapath.esp.SealSlot).

    Each buffer is laid out head (ending with the vnet header) | packet | tail, so one read(2)
    fills a slot (the header lands just in front of the packet); ``whole[i]`` is all of it."""

    __slots__ = ("size", "head", "buffers", "whole", "views", "lengths", "vnet", "_reads",
                 "_vnet_reads")

    def __init__(self, count: int, size: int = MAX_PACKET, tail: int = 0,
                 head: int = VNET_HDR_LEN) -> None:
        if count < 1 or size < 1 or tail < 0 or head < VNET_HDR_LEN:
            raise ValueError("PacketSlots needs count >= 1, size >= 1, tail >= 0 and "
                             f"head >= {VNET_HDR_LEN}")
        self.size = size
        self.head = head
        self.buffers = [bytearray(head + size + tail) for _ in range(count)]
        self.whole = whole = [memoryview(b) for b in self.buffers]
        self.views = [w[head:] for w in whole]  # packet and tail
        self.lengths = [0] * count
        self.vnet = [w[head - VNET_HDR_LEN:head] for w in whole]
        # What each read(2) fills, made once so the read loop allocates nothing of its own.
        self._reads = [v[:size] for v in self.views]
        self._vnet_reads = [w[head - VNET_HDR_LEN:head + size] for w in whole]

    def __len__(self) -> int:
        return len(self.buffers)

    def packet(self, i: int) -> memoryview:
        return self.views[i][: self.lengths[i]]


@dataclass(slots=True)
class TunStats:
    rx_packets: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0  # write refused with EAGAIN/ENOBUFS (queue full) or a bad packet
    rx_truncated: int = 0  # a packet larger than the slot size


class TunDevice:
    """A non-blocking TUN queue (IFF_TUN | IFF_NO_PI), created or attached by name.

    Attaching works for a persistent TUN made beforehand with ``ip tuntap add ... user U`` by a
    process running as U (no privileges needed). With multi_queue=True every TunDevice opened
    on the same name is one more queue of that device.
    """

    __slots__ = ("_dev", "_file", "fd", "name", "vnet_hdr", "offload", "stats")

    def __init__(self, name: str = "", *, multi_queue: bool = False, vnet_hdr: bool = False,
                 dev_path: str = "/dev/net/tun") -> None:
        flags = IFF_TUN | IFF_NO_PI
        if multi_queue:
            flags |= IFF_MULTI_QUEUE
        if vnet_hdr:
            flags |= IFF_VNET_HDR
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=flags, dev=dev_path)
        except pytun.Error as exc:
            raise OSError(f"cannot open TUN {name or '(new)'} via {dev_path}: {exc}") from exc
        self.fd: int = self._dev.fileno()
        self._file = io.FileIO(self.fd, "rb", closefd=False)
        self.name: str = self._dev.name
        self.vnet_hdr = vnet_hdr
        self.offload = 0  # TUN_F_* flags in force (set_offload)
        self.stats = TunStats()
        os.set_blocking(self.fd, False)

    def set_offload(self, flags: int) -> bool:
        """Let the kernel hand over packets with partial checksums (TUN_F_CSUM) and TCP
        super-packets (TUN_F_TSO4/6) described by the vnet header. Needs vnet_hdr; False if
        the kernel refuses the flags (then nothing changed)."""
        if not self.vnet_hdr:
            return False
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError:
            return False
        self.offload = flags
        return True

    def fileno(self) -> int:
        return self.fd

    def read_batch(self, slots: PacketSlots, limit: int | None = None) -> int:
        """Read ready packets into slots[0..n); returns n (0 when nothing is ready)."""
        n_max = len(slots.buffers) if limit is None else min(limit, len(slots.buffers))
        reads = slots._vnet_reads if self.vnet_hdr else slots._reads
        skip = VNET_HDR_LEN if self.vnet_hdr else 0
        lengths = slots.lengths
        readinto = self._file.readinto  # (one buffer: cheaper to call than os.readv)
        size = slots.size
        n = 0
        while n < n_max:
            got = readinto(reads[n])
            if not got:  # None: nothing ready (the fd is non-blocking)
                break
            got -= skip
            if got > size or got < 0:  # the kernel cut the packet at the slot end
                self.stats.rx_truncated += 1
                continue
            lengths[n] = got
            n += 1
        self.stats.rx_packets += n
        return n

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Inject one IP packet into the kernel; False (counted) if it was refused."""
        try:
            if self.vnet_hdr:
                os.writev(self.fd, (_ZERO_VNET_HDR, packet))
            else:
                os.write(self.fd, packet)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO):
                self.stats.tx_dropped += 1
                return False
            raise
        self.stats.tx_packets += 1
        return True

    def close(self) -> None:
        self._file.close()  # (closefd=False: the device closes the fd)
        self._dev.close()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TunDevice(name={self.name!r}, fd={self.fd})"
