"""Inbound: ESP from UDP 4500 or raw sockets -> SA by SPI -> replay, open -> policy -> TUN.

The SA is found by SPI in an index of the SAD (``SaTable.by_spi``) where an SPI shared by two
SAs goes to the one whose destination is a local address. After decryption the inner packet
(tunnel mode: as is; transport mode: rebuilt with the SA's addresses) must match an ``in`` or
``fwd`` ipsec policy whose ESP template this SA satisfies (RFC 4301 5.2), else it is dropped
and counted as a policy mismatch.

A TCP stream's packets take a shortcut: a packet of the same SA that continues the TUN
writer's pending run (``TunWriter.append_at``: same addresses, ports and headers, next sequence
number) has that run's policy verdict, so it is neither parsed nor looked up, and its counts
are added to the SA once per run. Every step costs hundreds of interpreter instructions here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from datapath.esp import HEAD_IV, DropReason, EspDrop
from datapath.flowkey import flow
from datapath.ippacket import MalformedPacket, fix_l4_checksum, ip_header
from datapath.satable import SaTable
from datapath.stats import DatapathStats
from datapath.tun import TunDevice
from datapath.tunwriter import TunWriter
from userspace_ipsec.kernel import Delivery, Kernel
from userspace_ipsec.pfkey.constants import IpsecMode, PolicyDir, PolicyType
from userspace_ipsec.sa import SecurityAssociation

Buffer = bytes | bytearray | memoryview
_IN = int(PolicyDir.INBOUND)
_FWD = int(PolicyDir.FWD)
_IPSEC = PolicyType.IPSEC
_TRANSPORT = IpsecMode.TRANSPORT
_HEADROOM = 64  # room before the payload for a rebuilt transport-mode IP header
ARENA_SIZE = 4 << 20  # decrypted packets of one batch; when full, the writer flushes first
_LAST_START = ARENA_SIZE - _HEADROOM - 65536  # past it a packet may not fit: start over
_HDR = struct.Struct("!II")  # SPI, sequence number: 8 bytes or it is not ESP


class Inbound:
    __slots__ = ("kernel", "table", "stats", "writer", "deliver", "_buf", "_allowed",
                 "_spd_generation")

    def __init__(self, kernel: Kernel, table: SaTable, stats: DatapathStats, tun: TunDevice,
                 deliver: Callable[[list[Delivery]], None]) -> None:
        self.kernel = kernel
        self.table = table
        self.stats = stats
        self.writer = TunWriter(tun.fd, tun.write, vnet=getattr(tun, "vnet_hdr", False))
        self.deliver = deliver
        # Each packet of a batch is decrypted to its own place here, after the one before
        # it: the TUN writer's pending run refers to them until the batch's flush.
        self._buf = memoryview(bytearray(ARENA_SIZE))
        # (SA, selectors) -> may pass: one lookup per flow, not per packet.
        self._allowed: dict[tuple[SecurityAssociation, bytes, bytes, int, int, int], bool] = {}
        self._spd_generation = -1

    def process(self, packets: Sequence[Buffer], now: float,
                other: list[int] | None = None) -> None:
        """Open a batch of ESP packets (each from the SPI on) and write them to the TUN.
        With ``other`` (UDP 4500), the indices of datagrams that are not ESP (shorter than 8
        bytes or SPI 0: the RFC 3948 non-ESP marker) are appended to it, not opened."""
        table = self.table
        spd_generation = self.kernel.spd.generation
        if table.refresh() or spd_generation != self._spd_generation:
            self._allowed.clear()  # the SAD or SPD changed
            self._spd_generation = spd_generation
        by_spi = table.by_spi
        stats = self.stats
        buf = self._buf
        allowed = self._allowed
        writer = self.writer
        push, append_at = writer.push, writer.append_at
        marked: list[SecurityAssociation] = []
        delivered = 0
        # The SA whose packet the writer's pending run started with: a packet of that SA
        # which continues the run (writer.append_at) has the run's addresses, protocol and
        # ports, so the policy verdict is the run's. Its counts are kept here until it ends.
        run_sa: SecurityAssociation | None = None
        run_tunnel = False
        run_packets = run_bytes = 0
        at = _HEADROOM  # where the next packet is decrypted to
        for i, esp in enumerate(packets):
            try:
                spi, low, iv = HEAD_IV.unpack_from(esp)
            except struct.error:  # too short for any ESP packet; maybe a marker or keepalive
                spi = _HDR.unpack_from(esp)[0] if len(esp) >= 8 else 0
                if spi and spi in by_spi:
                    stats.malformed += 1
                    continue
                low, iv = 0, b""
            if not spi:
                if other is not None:
                    other.append(i)
                else:
                    stats.no_sa += 1
                continue
            ctx = by_spi.get(spi)
            if ctx is None:
                stats.no_sa += 1
                continue
            sa = ctx.sa
            if at > _LAST_START:
                writer.flush()  # nothing refers to the arena any more
                at = _HEADROOM
            try:
                nh, end = ctx.transform.open_known(esp, low, iv, buf, at)
            except EspDrop as drop:
                self._dropped(sa, drop.reason)
                continue
            start, at = at, end + _HEADROOM
            if (sa is run_sa and (nh == 4 or nh == 41) and run_tunnel
                    and append_at(buf, start, end)):
                run_packets += 1
                run_bytes += end - start
                continue
            if (nh == 4 or nh == 41) and sa.mode != _TRANSPORT:
                inner: Buffer = buf[start:end]
                tunnel = True
            else:
                try:
                    inner = self._rebuild(ctx.src_packed, ctx.dst_packed, nh, start, end - start,
                                          ctx.natt)
                except (MalformedPacket, ValueError):
                    stats.malformed += 1
                    continue
                tunnel = False
            try:
                _, src, dst, proto, sport, dport, _ = flow(inner)
            except MalformedPacket:
                stats.malformed += 1
                continue
            key = (sa, src, dst, proto, sport, dport)
            ok = allowed.get(key)
            if ok is None:
                if len(allowed) > 4096:
                    allowed.clear()
                ok = allowed[key] = self._allowed_by_policy(sa, src, dst, proto, sport, dport)
            if not ok:
                stats.policy_mismatch += 1
                continue
            if run_sa is not None:
                delivered += self._count(run_sa, run_packets, run_bytes, marked)
            run_sa, run_tunnel, run_packets, run_bytes = sa, tunnel, 1, end - start
            push(inner)
        if run_sa is not None:
            delivered += self._count(run_sa, run_packets, run_bytes, marked)
        writer.flush()
        stats.opened += delivered
        if marked:
            for sa in set(marked):
                self.deliver(self.kernel.note_traffic(sa, now))

    @staticmethod
    def _count(sa: SecurityAssociation, packets: int, octets: int,
               marked: list[SecurityAssociation]) -> int:
        sa.packets_in += packets
        sa.bytes_in += octets
        if (sa.packets_in + sa.packets_out >= sa.packet_mark
                or sa.bytes_in + sa.bytes_out >= sa.byte_mark):
            marked.append(sa)
        return packets

    def _allowed_by_policy(self, sa: SecurityAssociation, src: bytes, dst: bytes, proto: int,
                           sport: int, dport: int) -> bool:
        """RFC 4301 5.2: an in or fwd ipsec policy matches and its template takes this SA."""
        lookup, satisfies = self.kernel.spd.lookup_packed, self.table.satisfies
        for direction in (_IN, _FWD):
            policy = lookup(direction, src, dst, proto, sport, dport)
            if policy is not None and policy.action == _IPSEC and satisfies(sa, policy):
                return True
        return False

    def _dropped(self, sa: SecurityAssociation, reason: DropReason) -> None:
        stats = self.stats
        if reason == DropReason.REPLAY:
            sa.replay_drops += 1
            stats.replay += 1
        elif reason == DropReason.AUTH:
            sa.auth_failures += 1
            stats.auth_failures += 1
        elif reason == DropReason.DUMMY:
            stats.dummy += 1
        else:
            stats.malformed += 1

    def _rebuild(self, src: bytes, dst: bytes, proto: int, at: int, size: int,
                 natt: bool) -> Buffer:
        """Transport mode: the SA's addresses around the payload now at buf[at:] (there is
        _HEADROOM before it)."""
        header = ip_header(src, dst, proto, size)
        start = at - len(header)
        buf = self._buf
        buf[start:at] = header
        packet = buf[start:at + size]
        # RFC 3948 3.1.2: behind a NAT the peer's checksum used addresses we never saw.
        return fix_l4_checksum(packet) if natt else packet
