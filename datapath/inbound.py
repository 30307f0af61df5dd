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

An AEAD packet of a tunnel-mode SA is opened where it was received: the plaintext goes over
its own ciphertext in the socket's receive buffer, through views that are made once per
receive slot and datagram size and then kept (a GRO receive of a stream brings the same
sizes every time), and the TUN writer refers to it there until the batch's flush. Anything
else (CBC or NULL, transport mode, a GRO receive's shorter last datagram) is decrypted into
an arena with room in front for a rebuilt header.

A GRO receive whose first datagram is of such an SA is first offered to that SA as a run
(``_open_run``): its leading datagrams that carry the SA's next sequence numbers in order are
opened in one pass (``EspTransform.open_run``) and, when their trailers agree, their segments
join the writer's run in bulk (``TunWriter.append_stream``). There the per-packet steps run in
C-level loops (map, takewhile), not in the interpreter. A forgery ends the run; the
datagrams after it, and any receive that is no such run, take the per-packet path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from datapath.esp import AEAD_HEAD, AEAD_ICV, HEAD_IV, DropReason, EspDrop
from datapath.flowkey import flow
from datapath.ippacket import MalformedPacket, fix_l4_checksum, ip_header
from datapath.satable import SaContext, SaTable
from datapath.sockets import DatagramBatch
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
_SPI = struct.Struct("!I")
_MIN_IN_PLACE = AEAD_HEAD + 4 + AEAD_ICV  # the shortest AEAD packet: 4 bytes of ciphertext


class _SlotViews:
    """For one receive slot: where its first ``count`` datagrams of ``seg`` bytes (from
    ``off``) start, their ciphertext and tag (``sealed``), their ciphertext (``plain``, where
    the plaintext goes), their IVs and their first 8 bytes (the AAD without ESN), and all of
    them (``region``) with the struct that reads each one's SPI and sequence number. Made
    when a slot's datagram size changes, kept while the size repeats, as a stream's does."""

    __slots__ = ("off", "seg", "count", "starts", "sealed", "plain", "ivs", "aads", "region",
                 "headers")

    def __init__(self, buf: memoryview, off: int, seg: int, count: int) -> None:
        self.off = off
        self.seg = seg
        self.count = count
        self.starts = starts = list(range(off, off + count * seg, seg))
        self.sealed = [buf[s + AEAD_HEAD:s + seg] for s in starts]
        self.plain = [buf[s + AEAD_HEAD:s + seg - AEAD_ICV] for s in starts]
        # For a run (Inbound._open_run), which needs two datagrams or more: a raw ESP
        # receive, one datagram of any size, makes none of them.
        self.ivs = [buf[s + 8:s + AEAD_HEAD] for s in starts] if count > 1 else []
        self.aads = [buf[s:s + 8] for s in starts] if count > 1 else []
        self.region = buf[off:off + count * seg]
        self.headers = struct.Struct(f"!II{seg - 8}x") if count > 1 else _HDR


_NO_VIEWS = _SlotViews(memoryview(b""), -1, 1, 0)


class Inbound:
    __slots__ = ("kernel", "table", "stats", "writer", "deliver", "_arena", "_at", "_allowed",
                 "_spd_generation", "_slot_views", "_views_of")

    def __init__(self, kernel: Kernel, table: SaTable, stats: DatapathStats, tun: TunDevice,
                 deliver: Callable[[list[Delivery]], None]) -> None:
        self.kernel = kernel
        self.table = table
        self.stats = stats
        self.writer = TunWriter(tun.fd, tun.write, vnet=getattr(tun, "vnet_hdr", False))
        self.deliver = deliver
        # A packet that is not opened where it was received (see the module doc) is
        # decrypted to its own place here, after the one before it: the TUN writer's pending
        # run refers to them until the batch's flush.
        self._arena = memoryview(bytearray(ARENA_SIZE))
        self._at = _HEADROOM  # where the next one goes
        # (SA, selectors) -> may pass: one lookup per flow, not per packet.
        self._allowed: dict[tuple[SecurityAssociation, bytes, bytes, int, int, int], bool] = {}
        self._spd_generation = -1
        # Per receive slot of the batch they were made for: views for opening in place.
        self._slot_views: list[_SlotViews] = []
        self._views_of: DatagramBatch | None = None

    def process(self, packets: Sequence[Buffer], now: float,
                other: list[int] | None = None) -> None:
        """``process_batch`` of a list of ESP packets (copied first: tests, slow paths);
        ``other`` gets indices into ``packets``."""
        self.process_batch(DatagramBatch.holding(packets), now, other)

    def process_batch(self, batch: DatagramBatch, now: float,
                      other: list[int] | None = None) -> None:
        """Open every datagram of ``batch`` (each from the SPI on, as a socket's recv_batch
        left them) and write the inner packets to the TUN. With ``other`` (UDP 4500), the
        indices of datagrams that are not ESP (shorter than 8 bytes or SPI 0: the RFC 3948
        non-ESP marker) are appended to it, not opened. The batch's bytes are decrypted in
        place: only those ``other`` names are left as they came."""
        table = self.table
        spd_generation = self.kernel.spd.generation
        if table.refresh() or spd_generation != self._spd_generation:
            self._allowed.clear()  # the SAD or SPD changed
            self._spd_generation = spd_generation
        by_spi = table.by_spi
        arena = self._arena
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
        self._at = _HEADROOM
        if batch is not self._views_of:
            self._slot_views = [_NO_VIEWS] * len(batch.views)
            self._views_of = batch
        slot_views = self._slot_views
        index = 0  # of the slot's first datagram in the batch
        offsets, gots, segs, views = batch.offset, batch.got, batch.seg, batch.views
        for k in range(batch.used):
            off, got, seg, buf = offsets[k], gots[k], segs[k], views[k]
            first = 0  # the first datagram the per-packet loop below opens
            if seg >= _MIN_IN_PLACE:
                full = got // seg  # datagrams that can open in place
                count = full if full * seg == got else full + 1
                slot = slot_views[k]
                if slot.seg != seg or slot.off != off or slot.count < full:
                    slot = slot_views[k] = _SlotViews(buf, off, seg, full)
                starts, sealed, plain = slot.starts, slot.sealed, slot.plain
                ctlen = seg - AEAD_HEAD - AEAD_ICV
                if full > 1:
                    ctx = by_spi.get(_SPI.unpack_from(buf, off)[0])
                    if ctx is not None and ctx.in_place:  # maybe a GRO receive of one stream
                        first, run_sa, run_tunnel, run_packets, run_bytes, counted = \
                            self._open_run(ctx, buf, slot, full, marked, run_sa, run_tunnel,
                                           run_packets, run_bytes)
                        delivered += counted
            else:
                full = 0
                count = -(-got // seg) if seg else 1
            for j in range(first, count):
                ctx = None
                if j < full:
                    s = starts[j]
                    spi, low, iv = HEAD_IV.unpack_from(buf, s)
                    ctx = by_spi.get(spi)
                if ctx is not None and ctx.in_place:
                    sa = ctx.sa
                    try:
                        nh, size = ctx.transform.open_in_place(low, iv, sealed[j], plain[j],
                                                               ctlen)
                    except EspDrop as drop:
                        self._dropped(sa, drop.reason)
                        continue
                    data = buf
                    start = s + AEAD_HEAD
                    end = start + size
                else:
                    s = off + j * seg
                    opened_copy = self._open_copy(buf[s:min(s + seg, off + got)], index + j,
                                                  other)
                    if opened_copy is None:
                        continue
                    ctx, nh, start, end = opened_copy
                    sa = ctx.sa
                    data = arena
                if (sa is run_sa and (nh == 4 or nh == 41) and run_tunnel
                        and append_at(data, start, end)):
                    run_packets += 1
                    run_bytes += end - start
                    continue
                verdict = self._inner(ctx, data, nh, start, end)
                if verdict is None:
                    continue
                if run_sa is not None:
                    delivered += self._count(run_sa, run_packets, run_bytes, marked)
                run_sa, run_packets, run_bytes = sa, 1, end - start
                inner, run_tunnel = verdict
                push(inner)
            index += count
        if run_sa is not None:
            delivered += self._count(run_sa, run_packets, run_bytes, marked)
        writer.flush()
        self.stats.opened += delivered
        if marked:
            for sa in set(marked):
                self.deliver(self.kernel.note_traffic(sa, now))

    def _open_run(self, ctx: SaContext, buf: memoryview, slot: _SlotViews, full: int,
                  marked: list[SecurityAssociation], run_sa: SecurityAssociation | None,
                  run_tunnel: bool, run_packets: int, run_bytes: int,
                  ) -> tuple[int, SecurityAssociation | None, bool, int, int, int]:
        """The receiving gateway's path for a GRO receive of one stream, whose first datagram
        is of ``ctx``'s SA: its leading datagrams that continue the SA's sequence in order are
        opened in one pass (EspTransform.open_run) and their segments join the writer's run
        in bulk (TunWriter.append_stream). Takes and returns process_batch's run state;
        returns first how many datagrams it took (the rest are the per-packet loop's), and
        last the packets it counted to SAs."""
        tr, sa = ctx.transform, ctx.sa
        seg = slot.seg
        ctlen = seg - AEAD_HEAD - AEAD_ICV
        starts, plain = slot.starts, slot.plain
        opened, failed = tr.open_run(slot.headers.iter_unpack(slot.region[:full * seg]),
                                     slot.ivs, slot.sealed, slot.aads, plain, ctlen)
        trailer = tr.run_trailer(plain, ctlen, opened) if opened else None
        append_stream, append_at = self.writer.append_stream, self.writer.append_at
        counted = 0
        j = 0
        while j < opened:
            if trailer is not None:
                nh, size = trailer
            else:
                try:
                    nh, size = tr.trailer(plain[j], ctlen)
                except EspDrop as drop:
                    self._dropped(sa, drop.reason)
                    j += 1
                    continue
            start = starts[j] + AEAD_HEAD
            if sa is run_sa and (nh == 4 or nh == 41) and run_tunnel:
                n = (append_stream(buf, start, seg, opened - j, size) if trailer is not None
                     else int(append_at(buf, start, start + size)))
                if n:
                    run_packets += n
                    run_bytes += n * size
                    j += n
                    continue
            j += 1
            verdict = self._inner(ctx, buf, nh, start, start + size)
            if verdict is None:
                continue
            if run_sa is not None:
                counted += self._count(run_sa, run_packets, run_bytes, marked)
            run_sa, run_packets, run_bytes = sa, 1, size
            inner, run_tunnel = verdict
            self.writer.push(inner)
        if failed:  # the datagram after those opened
            self._dropped(sa, DropReason.AUTH)
            opened += 1
        return opened, run_sa, run_tunnel, run_packets, run_bytes, counted

    def _open_copy(self, esp: memoryview, index: int, other: list[int] | None
                   ) -> tuple[SaContext, int, int, int] | None:
        """Open one datagram into the arena (one that cannot open in place, or is no ESP of
        ours); returns (context, next header, start, end) of the payload in the arena, or
        None when it was dropped and counted or put in ``other``."""
        stats = self.stats
        by_spi = self.table.by_spi
        try:
            spi, low, iv = HEAD_IV.unpack_from(esp)
        except struct.error:  # too short for any ESP packet; maybe a marker or keepalive
            spi = _HDR.unpack_from(esp)[0] if len(esp) >= 8 else 0
            if spi and spi in by_spi:
                stats.malformed += 1
                return None
            low, iv = 0, b""
        if not spi:
            if other is not None:
                other.append(index)
            else:
                stats.no_sa += 1
            return None
        ctx = by_spi.get(spi)
        if ctx is None:
            stats.no_sa += 1
            return None
        at = self._at
        if at > _LAST_START:
            self.writer.flush()  # nothing refers to the arena any more
            at = _HEADROOM
        try:
            nh, end = ctx.transform.open_known(esp, low, iv, self._arena, at)
        except EspDrop as drop:
            self._dropped(ctx.sa, drop.reason)
            return None
        self._at = end + _HEADROOM
        return ctx, nh, at, end

    def _inner(self, ctx: SaContext, data: memoryview, nh: int, start: int, end: int
               ) -> tuple[Buffer, bool] | None:
        """The inner packet opened at ``data[start:end]`` (tunnel mode: as it is; transport
        mode: rebuilt with the SA's addresses) and whether it came whole (tunnel mode), if
        the SA's policy allows it; None when it was dropped and counted."""
        stats = self.stats
        sa = ctx.sa
        if (nh == 4 or nh == 41) and sa.mode != _TRANSPORT:
            inner: Buffer = data[start:end]
            tunnel = True
        else:
            if data is not self._arena:  # rebuilding needs the arena's room in front
                at = self._at
                if at > _LAST_START:
                    self.writer.flush()
                    at = _HEADROOM
                self._arena[at:at + end - start] = data[start:end]
                start, end = at, at + end - start
                self._at = end + _HEADROOM
            try:
                inner = self._rebuild(ctx.src_packed, ctx.dst_packed, nh, start, end - start,
                                      ctx.natt)
            except (MalformedPacket, ValueError):
                stats.malformed += 1
                return None
            tunnel = False
        try:
            _, src, dst, proto, sport, dport, _ = flow(inner)
        except MalformedPacket:
            stats.malformed += 1
            return None
        allowed = self._allowed
        key = (sa, src, dst, proto, sport, dport)
        ok = allowed.get(key)
        if ok is None:
            if len(allowed) > 4096:
                allowed.clear()
            ok = allowed[key] = self._allowed_by_policy(sa, src, dst, proto, sport, dport)
        if not ok:
            stats.policy_mismatch += 1
            return None
        return inner, tunnel

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
        buf = self._arena
        buf[start:at] = header
        packet = buf[start:at + size]
        # RFC 3948 3.1.2: behind a NAT the peer's checksum used addresses we never saw.
        return fix_l4_checksum(packet) if natt else packet
