"""Outbound: packets the kernel routed into the TUN -> SPD -> ESP -> UDP 4500 or raw ESP.

Only outbound ipsec policies have routes into the TUN (datapath.routes), so a packet read
here normally matches one; one that matches none, or a discard/none policy, is dropped and
counted ("none" traffic is never routed here: bypass is the kernel's plain routing).

``process_slots(slots, lengths, count, now, vnet)`` handles a batch as the TUN reader left
it: in tunnel mode each packet becomes an ESP packet in the slot it was read into
(``EspTransform.seal_slot``: an AEAD writes the ESP header in front of it and the trailer
behind it and encrypts in place, so nothing is copied) and, per destination, the batch goes
out in one GSO send where the socket can. Transport mode and TSO segments are sealed into
preallocated output slots. ``process(packets, ...)`` takes a list of packets (held ones,
tests) and copies each into a slot of its own. ``vnet`` (a TUN with offloads on) gives each
packet's virtio_net_hdr: a partial checksum is completed first, and a TCP super-packet (TSO)
is looked up once and cut into segments (datapath.segment) that are sealed one by one, so
one read feeds one GSO send.

Within a batch, an IPv4 packet with the protocol, addresses and ports of the packet before it
(which went to a tunnel SA) skips the parse and both lookups; its size is still checked. Such
a packet and the ones right after it that repeat its header fields and length (a stream's
full-size segments) are sealed in one pass (``EspTransform.seal_run``: the per-packet steps
in C-level loops over the slots, not in the interpreter).
A packet whose policy has no SA yet is held (bounded per policy, oldest dropped) while the
Kernel sends SADB_ACQUIRE; ``flush_held`` sends them when an SA appears.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from itertools import repeat, takewhile
from operator import and_, attrgetter, eq, le, truth

from datapath.esp import EspTransform, SealSlot, SequenceExhausted
from datapath.flowkey import flow
from datapath.ippacket import (
    MalformedPacket,
    icmp_error_allowed,
    icmp_frag_needed,
    icmpv6_packet_too_big,
    split_transport,
)
from datapath.satable import SaContext, SaTable, outbound_sa
from datapath.segment import NEEDS_CSUM, TcpSegmenter, complete_checksum
from datapath.stats import DatapathStats
from datapath.tun import TunDevice
from userspace_ipsec.kernel import Delivery, Flow, Kernel
from userspace_ipsec.pfkey.constants import IpsecMode, PolicyDir, PolicyType
from userspace_ipsec.sa import Policy, SecurityAssociation

Buffer = bytes | bytearray | memoryview
_OUT = int(PolicyDir.OUTBOUND)
_IPSEC = PolicyType.IPSEC
_DISCARD = PolicyType.DISCARD
_TUNNEL = IpsecMode.TUNNEL
SLOT_SIZE = 65535 + 256  # an inner packet of any size plus the ESP overhead
_CSUM_AT = struct.Struct("<HH")  # virtio_net_hdr csum_start, csum_offset (at byte 6)
_GSO_SIZE = struct.Struct("<H")  # virtio_net_hdr gso_size (at byte 4)
# IPv4: version/IHL, total length, fragment field, protocol, addresses and ports (or the
# first 4 bytes of another protocol's header: the key only says "same as the last packet").
_FAST4 = struct.Struct("!BxH2xHxB2x12s")
_BODY = attrgetter("body")


class _Route:
    """The cached answer for (policy, src, dst): context, mode, SAD generation it holds for,
    and the largest payload that surely fits the path MTU (beyond it: the exact check)."""

    __slots__ = ("generation", "ctx", "tunnel", "fits")

    def __init__(self, generation: int, ctx: SaContext | None, tunnel: bool,
                 path_mtu: int) -> None:
        self.generation = generation
        self.ctx = ctx
        self.tunnel = tunnel
        self.fits = path_mtu - ctx.outer - ctx.transform.max_overhead if ctx else 0


class Outbound:
    __slots__ = ("kernel", "table", "stats", "tun", "deliver", "path_mtu", "queue_size",
                 "held", "last_sent", "_routes", "_slots", "_sent_views", "_busy", "_segmenter",
                 "_scratch")

    def __init__(self, kernel: Kernel, table: SaTable, stats: DatapathStats, tun: TunDevice,
                 deliver: Callable[[list[Delivery]], None], *, path_mtu: int = 1500,
                 queue_size: int = 32, batch: int = 64) -> None:
        self.kernel = kernel
        self.table = table
        self.stats = stats
        self.tun = tun
        self.deliver = deliver
        self.path_mtu = path_mtu
        self.queue_size = queue_size
        self.held: dict[Policy, deque[bytes]] = {}
        self.last_sent: dict[tuple[object, ...], float] = {}  # sendto address -> time
        self._routes: dict[tuple[Policy, bytes, bytes], _Route] = {}
        # Output slots for what is not sealed where it was read: transport mode, segments.
        self._slots = [memoryview(bytearray(SLOT_SIZE)) for _ in range(batch)]
        # slot i's sealed datagram as the view handed to the socket, kept while a stream's
        # datagrams keep its size: one slice fewer per packet
        self._sent_views = [slot[:0] for slot in self._slots]
        # A delivery made mid-batch (an SA expired) can come back as flush_held, which must
        # not reuse the slots this batch still has to send.
        self._busy = False
        self._segmenter = TcpSegmenter()
        self._scratch = memoryview(bytearray(65535))  # one segment of a super-packet

    def _route(self, policy: Policy, src: bytes, dst: bytes) -> _Route:
        req = policy.requests[0] if policy.requests else None
        sa = outbound_sa(self.kernel, policy, src, dst)
        ctx = self.table.context(sa) if sa is not None else None
        route = _Route(self.kernel.sad.generation, ctx,
                       req is not None and req.mode == _TUNNEL, self.path_mtu)
        if len(self._routes) > 65536:
            self._routes.clear()
        self._routes[(policy, src, dst)] = route
        return route

    def process(self, packets: Sequence[Buffer], now: float,
                vnet: Sequence[memoryview] | None = None) -> None:
        """Seal and send a list of packets (``vnet[i]``: packet i's virtio_net_hdr when the
        TUN has offloads on). Each is copied into a slot of its own first; the TUN reader
        uses ``process_slots``, which seals where the packets were read."""
        slots = [SealSlot.holding(pkt) for pkt in packets]
        self.process_slots(slots, [len(p) for p in packets], len(slots), now, vnet)

    def process_slots(self, slots: Sequence[SealSlot], lengths: Sequence[int], count: int,
                      now: float, vnet: Sequence[memoryview] | None = None) -> None:
        """Seal and send packets 0..count: packet i is ``slots[i].body[:lengths[i]]``; the
        datagrams sealed in place are sent before this returns, so the slots may then be
        read into again."""
        self._busy = True
        try:
            self._process(slots, lengths, count, now, vnet)
        finally:
            self._busy = False

    def _process(self, inputs: Sequence[SealSlot], lengths: Sequence[int], count: int,
                 now: float, vnet: Sequence[memoryview] | None) -> None:
        stats = self.stats
        lookup = self.kernel.spd.lookup_packed
        routes = self._routes
        generation = self.kernel.sad.generation
        slots = self._slots
        sent_views = self._sent_views
        n_slots = len(slots)
        groups: dict[SaContext, list[memoryview]] = {}
        marked: list[SecurityAssociation] = []
        used = 0
        # The last IPv4 packet's protocol, addresses and ports, and where they went (a tunnel
        # SA): the packets of one stream skip the parse and both lookups. Their counts are
        # kept here and added to the SA when the run ends.
        last_key = b""
        last_proto = -1
        route: _Route | None = None
        group: list[memoryview] = []
        run_sa: SecurityAssociation | None = None
        run_packets = run_bytes = 0
        resume = 0  # packets before it were sealed as a run (below)
        for k in range(count):
            if k < resume:
                continue
            if used == n_slots:  # more packets than slots: send what we have first
                self._send(groups, now)
                groups = {}
                used = 0
                last_proto = -1
            slot = inputs[k]
            buf = slot.body
            got = lengths[k]
            gso = 0
            if vnet is None:
                head = _FAST4.unpack_from(buf)
                vihl, length, frag, proto, key = head
                if (vihl == 0x45 and key == last_key and proto == last_proto
                        and not frag & 0x3FFF and 24 <= length <= got):
                    ctx = route.ctx  # type: ignore[union-attr]
                    tr = ctx.transform  # type: ignore[union-attr]
                    if length > route.fits and (  # type: ignore[union-attr]
                            ctx.outer + tr.sealed_len(length) > self.path_mtu  # type: ignore
                            and buf[6] & 0x40):
                        self._too_big(buf[:got], 4, route.fits)  # type: ignore[union-attr]
                        continue
                    if k + 1 < count and _FAST4.unpack_from(inputs[k + 1].body) == head:
                        # This packet and those after it that repeat its header fields and
                        # length (a stream's full-size segments) are sealed in one pass.
                        run = self._seal_run(tr, head, inputs[k:count], lengths[k:count])
                        if run:
                            group.extend(run)
                            resume = k + len(run)
                            run_packets += len(run)
                            run_bytes += len(run) * length
                            continue
                    try:
                        group.append(tr.seal_slot(slot, length, 4))
                    except SequenceExhausted:
                        stats.seq_exhausted += 1
                        self.deliver(self.kernel.expire_now(ctx.sa, now))  # type: ignore
                        last_proto = -1
                        continue
                    run_packets += 1
                    run_bytes += length
                    continue
                pkt = buf[:got]
            else:
                pkt = buf[:got]
                hdr = vnet[k]
                gso = hdr[1]
                if not gso and hdr[0] & NEEDS_CSUM:
                    try:
                        complete_checksum(pkt, *_CSUM_AT.unpack_from(hdr, 6))  # type: ignore
                    except MalformedPacket:
                        stats.malformed += 1
                        continue
            try:
                version, src, dst, proto, sport, dport, length = flow(pkt)
            except MalformedPacket:
                stats.malformed += 1
                continue
            policy = lookup(_OUT, src, dst, proto, sport, dport)
            if policy is None:
                stats.no_policy += 1
                continue
            if policy.action != _IPSEC:
                if policy.action == _DISCARD:
                    stats.discard += 1
                else:
                    stats.bypass += 1
                continue
            route = routes.get((policy, src, dst))
            if route is None or route.generation != generation:
                route = self._route(policy, src, dst)
            ctx = route.ctx
            if gso:
                # Tunnel mode: the segments are built where the transform seals from.
                staged = ctx is not None and route.tunnel
                try:
                    count = self._segmenter.load(
                        pkt, _GSO_SIZE.unpack_from(hdr, 4)[0], gso,
                        ctx.transform.staging() if staged else self._scratch)  # type: ignore
                except MalformedPacket:
                    stats.malformed += 1
                    continue
                stats.tso_packets += 1
                stats.tso_segments += count
                if ctx is None:
                    for seg in self._segments():
                        self._hold(policy, seg, src, dst, proto, sport, dport, now)
                    continue
                used, groups = self._seal_segments(ctx, route, staged, version, used, groups,
                                                   now)
                last_proto = -1
                continue
            if ctx is None:
                self._hold(policy, pkt, src, dst, proto, sport, dport, now)
                continue
            if route.tunnel:
                payload: Buffer | None = None  # the whole packet, sealed where it lies
                size = length
                nh = 4 if version == 4 else 41
            else:
                try:
                    split = split_transport(pkt)
                except MalformedPacket:
                    stats.malformed += 1
                    continue
                payload, nh = split.payload, split.next_header
                size = len(payload)
            tr = ctx.transform
            if size > route.fits and ctx.outer + tr.sealed_len(size) > self.path_mtu and (
                    version == 6 or pkt[6] & 0x40):
                self._too_big(pkt, version, route.fits)
                continue
            # The key of the packets that may follow this one down the shortcut, taken
            # before sealing in place turns it into ciphertext.
            if vnet is None and version == 4 and route.tunnel and pkt[0] == 0x45:
                key, key_proto = bytes(buf[12:24]), proto
            else:
                key_proto = -1
            try:
                if payload is None:
                    view = tr.seal_slot(slot, size, nh)
                else:
                    out = slots[used]
                    end = tr.seal_into(payload, nh, out)
                    view = sent_views[used]
                    if len(view) != end:
                        view = sent_views[used] = out[:end]
                    used += 1
            except SequenceExhausted:
                stats.seq_exhausted += 1
                self.deliver(self.kernel.expire_now(ctx.sa, now))
                continue
            group = groups.get(ctx)  # type: ignore[assignment]
            if group is None:
                group = groups[ctx] = []
            group.append(view)
            if run_sa is not None:
                self._count(run_sa, run_packets, run_bytes, marked)
            run_sa, run_packets, run_bytes = ctx.sa, 1, size
            last_proto = key_proto
            if key_proto >= 0:
                last_key = key
        if run_sa is not None:
            self._count(run_sa, run_packets, run_bytes, marked)
        if groups:
            self._send(groups, now)
        if marked:
            for sa in set(marked):
                self.deliver(self.kernel.note_traffic(sa, now))

    @staticmethod
    def _seal_run(tr: EspTransform, head: tuple[int, ...], slots: Sequence[SealSlot],
                  lengths: Sequence[int]) -> list[memoryview] | None:
        """Seal with ``tr``, in one pass (EspTransform.seal_run), the leading packets of
        ``slots`` whose header fields read with _FAST4 are ``head`` (those of a packet that
        took the shortcut: IPv4 without options, not a fragment, the flow of the last
        tunnel-mode packet, and one length, so one SA and path MTU verdict) and that were
        read whole; None if fewer than two are, or ``tr`` cannot."""
        length = head[1]
        same = map(eq, map(_FAST4.unpack_from, map(_BODY, slots)), repeat(head))
        whole = map(le, repeat(length), lengths)
        m = len(list(takewhile(truth, map(and_, same, whole))))
        if m < 2:
            return None
        return tr.seal_run(slots[:m], length, 4)

    @staticmethod
    def _count(sa: SecurityAssociation, packets: int, octets: int,
               marked: list[SecurityAssociation]) -> None:
        sa.packets_out += packets
        sa.bytes_out += octets
        if (sa.packets_in + sa.packets_out >= sa.packet_mark
                or sa.bytes_in + sa.bytes_out >= sa.byte_mark):
            marked.append(sa)

    def _segments(self) -> list[bytes]:
        """The loaded super-packet's segments as packets of their own (slow path)."""
        seg, scratch = self._segmenter, self._scratch
        return [bytes(scratch[:seg.write(i)]) for i in range(seg.count)]

    def _seal_segments(self, ctx: SaContext, route: _Route, staged: bool, version: int,
                       used: int, groups: dict[SaContext, list[memoryview]], now: float
                       ) -> tuple[int, dict[SaContext, list[memoryview]]]:
        """Cut the loaded super-packet and seal each segment into the next free slot (sending
        the slots when they run out); returns the slots used and the groups to send.
        ``staged``: the segments are built in the transform's staging buffer (tunnel mode),
        else in the scratch buffer and ESP goes after their IP header (transport mode)."""
        seg, slots = self._segmenter, self._slots
        tr = ctx.transform
        start = 0 if staged else seg.ihl
        nh = (4 if version == 4 else 41) if staged else 6
        size = seg.largest - start
        packet = seg.packet
        if size > route.fits and ctx.outer + tr.sealed_len(size) > self.path_mtu and (
                version == 6 or packet[6] & 0x40):
            self._too_big(packet, version, route.fits)
            return used, groups
        group = groups.get(ctx)
        if group is None:
            group = groups[ctx] = []
        n_slots = len(slots)
        write = seg.write
        seal = tr.seal_staged
        scratch = self._scratch
        count = seg.count
        sealed = inner_bytes = 0
        for i in range(count):
            if used == n_slots:
                self._send(groups, now)
                group = []
                groups = {ctx: group}
                used = 0
            end = write(i)
            inner_bytes += end - start
            out = slots[used]
            try:
                end = seal(end, nh, out) if staged else tr.seal_into(scratch[start:end], nh, out)
            except SequenceExhausted:
                self.stats.seq_exhausted += count - i
                self.deliver(self.kernel.expire_now(ctx.sa, now))
                break
            used += 1
            group.append(out[:end])
            sealed += 1
        sa = ctx.sa
        sa.packets_out += sealed
        sa.bytes_out += inner_bytes
        if (sa.packets_in + sa.packets_out >= sa.packet_mark
                or sa.bytes_in + sa.bytes_out >= sa.byte_mark):
            self.deliver(self.kernel.note_traffic(sa, now))
        return used, groups

    def _send(self, groups: dict[SaContext, list[memoryview]], now: float) -> None:
        stats = self.stats
        last_sent = self.last_sent
        for ctx, datagrams in groups.items():
            count = len(datagrams)
            stats.sealed += count
            if ctx.encap:
                if ctx.udp is None:
                    stats.tx_errors += count
                    continue
                sent = ctx.udp.send_batch(datagrams, ctx.addr)
                last_sent[ctx.addr] = now
            else:
                raw = ctx.raw
                if raw is None:
                    stats.tx_errors += count
                    continue
                sent = raw.send_batch(datagrams, ctx.addr[0])
            stats.tx_errors += count - sent

    def _too_big(self, pkt: Buffer, version: int, mtu: int) -> None:
        """Tell the sender (through the TUN) the largest packet that fits this SA."""
        if not icmp_error_allowed(pkt):
            self.stats.malformed += 1
            return
        error = icmp_frag_needed(pkt, mtu) if version == 4 else \
            icmpv6_packet_too_big(pkt, max(mtu, 1280))
        if self.tun.write(error):
            self.stats.ptb_sent += 1
        else:
            self.stats.tun_write_errors += 1

    def _hold(self, policy: Policy, pkt: Buffer, src: bytes, dst: bytes, proto: int,
              sport: int, dport: int, now: float) -> None:
        stats = self.stats
        if self.queue_size:
            queue = self.held.get(policy)
            if queue is None:
                queue = self.held[policy] = deque(maxlen=self.queue_size)
            if len(queue) == self.queue_size:
                stats.queue_drops += 1
            queue.append(bytes(pkt))
            stats.queued += 1
        flow = Flow(ip_address(src), ip_address(dst), proto, sport, dport)
        deliveries = self.kernel.acquire(policy, flow, now)
        if deliveries:
            stats.acquires += 1
            self.deliver(deliveries)

    def flush_held(self, now: float) -> bool:
        """Send held packets whose policy has an SA now; forget those of removed policies.
        False: not now (called back from inside a batch), try again later."""
        if self._busy:
            return False
        spd = self.kernel.spd
        for policy, queue in list(self.held.items()):
            if spd.get(policy.id) is not policy:
                self.stats.queue_drops += len(queue)
                del self.held[policy]
                continue
            ready = []
            for pkt in queue:
                try:
                    _, src, dst, *_ = flow(pkt)
                except MalformedPacket:
                    continue
                if outbound_sa(self.kernel, policy, src, dst) is not None:
                    ready.append(pkt)
            if len(ready) == len(queue):
                del self.held[policy]
            else:
                for pkt in ready:
                    queue.remove(pkt)
            if ready:
                self.stats.queue_flushed += len(ready)
                self.process(ready, now)
        return True
