"""The engine's packet paths, two datapaths back to back over loopback UDP (no root needed)."""

from __future__ import annotations

import os
import socket
import struct

from datapath.encap import NON_ESP_MARKER
from datapath.ippacket import parse
from datapath.outbound import Outbound
from tests.datapath.engine_helpers import (
    KEY_A,
    KEY_B,
    LEFT,
    NOW,
    RIGHT,
    Side,
    connected_pair,
    make_side,
    tunnel_scripts,
    udp_packet,
)
from userspace_ipsec.kernel import Audience
from userspace_ipsec.pfkey.constants import ExtType, MsgType


def sealed_datagrams(left: Side, right: Side, *packets: bytes) -> list[bytes]:
    """Let left seal packets and take the ESP datagrams off right's socket ourselves."""
    left.send(*packets)
    right.udp.sock.settimeout(2)
    try:
        return [right.udp.sock.recv(65535) for _ in packets]
    finally:
        right.udp.sock.setblocking(False)


def sa(side: Side, spi: int, dst: str) -> object:
    from ipaddress import ip_address

    found = side.kernel.sad.get(ip_address(dst), 3, spi)
    assert found is not None
    return found


def test_tunnel_round_trip_counts_per_sa_and_globally() -> None:
    left, right = connected_pair()
    packets = [udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * (50 + i)) for i in range(5)]
    left.send(*packets)
    right.receive()
    assert right.tun.sent == packets
    out = sa(left, 0x1001, RIGHT)
    inn = sa(right, 0x1001, RIGHT)
    assert out.packets_out == inn.packets_in == 5  # type: ignore[attr-defined]
    assert out.bytes_out == inn.bytes_in == sum(map(len, packets))  # type: ignore[attr-defined]
    assert left.dp.stats()["sealed"] == 5 and right.dp.stats()["opened"] == 5
    # The reply goes back through the other SA.
    reply = udp_packet("10.4.0.2", "10.1.0.2", b"pong")
    right.send(reply)
    left.receive()
    assert left.tun.sent == [reply]


def test_replay_forgery_unknown_spi_and_malformed_are_counted() -> None:
    left, right = connected_pair()
    first, second = sealed_datagrams(left, right, udp_packet("10.1.0.2", "10.4.0.2"),
                                     udp_packet("10.1.0.2", "10.4.0.2"))
    inbound = right.dp.inbound
    assert inbound is not None
    inbound.process([first, first], NOW)
    forged = bytearray(second)
    forged[-5] ^= 0x01
    inbound.process([bytes(forged), b"\x00\x00\xbe\xef" + second[4:], second[:12]], NOW)
    stats = right.dp.stats()
    assert (stats["opened"], stats["replay"], stats["auth_failures"], stats["no_sa"],
            stats["malformed"]) == (1, 1, 1, 1, 1)
    sa_in = sa(right, 0x1001, RIGHT)
    assert sa_in.replay_drops == 1 and sa_in.auth_failures == 1  # type: ignore[attr-defined]
    inbound.process([second], NOW)  # the forgery did not move the window
    assert right.dp.stats()["opened"] == 2


def test_inner_packet_outside_the_inbound_policy_is_dropped() -> None:
    left, right = connected_pair()
    # left also tunnels 10.1.0.0/24 -> 10.9.0.0/24 through the same SA; right never allowed it.
    left.setkey(f"spdadd 10.1.0.0/24 10.9.0.0/24 any -P out ipsec "
                f"esp/tunnel/{LEFT}[{left.port}]-{RIGHT}[{right.port}]/require;\n")
    left.send(udp_packet("10.1.0.2", "10.9.0.2"))
    right.receive()
    assert right.tun.sent == []
    assert right.dp.stats()["policy_mismatch"] == 1


def test_no_policy_and_discard_are_counted() -> None:
    left, right = connected_pair()
    left.setkey("spdadd 10.1.0.0/24 10.7.0.0/24 any -P out discard;\n")
    left.send(udp_packet("10.1.0.2", "10.7.0.2"), udp_packet("10.1.0.2", "10.8.0.2"),
              b"\x45garbage")
    stats = left.dp.stats()
    assert (stats["discard"], stats["no_policy"], stats["malformed"], stats["sealed"]) == \
        (1, 1, 1, 0)


def test_acquire_holds_packets_until_the_sa_arrives() -> None:
    left, right = make_side(LEFT, acquire_queue=2), make_side(RIGHT)
    l_policies, _ = tunnel_scripts(left, right, with_sas=False)
    l_full, r_full = tunnel_scripts(left, right)
    left.setkey(l_policies)
    right.setkey(r_full)
    left.register()
    packets = [udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * 20) for i in range(3)]
    left.send(*packets)
    acquires = [d for d in left.deliveries if d.message and d.message.type == MsgType.ACQUIRE]
    assert len(acquires) == 1 and acquires[0].audience is Audience.REGISTERED  # rate-limited
    stats = left.dp.stats()
    assert (stats["queued"], stats["queue_drops"], stats["held_packets"]) == (3, 1, 2)
    left.setkey("\n".join(line for line in l_full.splitlines() if line.startswith("add")))
    right.receive()
    assert right.tun.sent == packets[1:]  # the oldest was pushed out of the queue
    assert left.dp.stats()["queue_flushed"] == 2


def test_oversized_packet_with_df_gets_frag_needed_into_the_tun() -> None:
    left, right = connected_pair(path_mtu=800)
    big = udp_packet("10.1.0.2", "10.4.0.2", b"z" * 760, df=True)
    left.send(big)
    assert left.dp.stats()["ptb_sent"] == 1
    (icmp,) = left.tun.sent
    info = parse(icmp)
    assert (info.proto, info.sport, info.dport) == (1, 3, 4)  # ICMP frag needed
    assert info.dst == socket.inet_aton("10.1.0.2")
    ctx = left.dp.table.context(sa(left, 0x1001, RIGHT))  # type: ignore[arg-type]
    assert ctx is not None
    mtu = struct.unpack_from("!H", icmp, info.l4_offset + 6)[0]
    assert mtu == 800 - 28 - ctx.transform.max_overhead
    # Without DF the packet goes out (the outer packet is fragmented by the kernel).
    left.send(udp_packet("10.1.0.2", "10.4.0.2", b"z" * 760))
    assert left.dp.stats()["sealed"] == 1


def test_transport_mode_round_trip() -> None:
    left, right = make_side(LEFT), make_side(RIGHT)
    lp, rp = f"[{left.port}]", f"[{right.port}]"
    sas = (f"add {LEFT}{lp} {RIGHT}{rp} esp-udp 0x2001 -m transport -r 64 -E aes-gcm-16 {KEY_A};"
           f"\nadd {RIGHT}{rp} {LEFT}{lp} esp-udp 0x2002 -m transport -r 64 "
           f"-E aes-gcm-16 {KEY_B};\n")
    left.setkey(sas + f"spdadd {LEFT} {RIGHT} udp -P out ipsec esp/transport//require;\n")
    right.setkey(sas + f"spdadd {LEFT} {RIGHT} udp -P in ipsec esp/transport//require;\n")
    pkt = udp_packet(LEFT, RIGHT, b"transport payload")
    left.send(pkt)
    right.receive()
    (got,) = right.tun.sent
    info = parse(got)
    assert (info.src, info.dst, info.proto) == (socket.inet_aton(LEFT), socket.inet_aton(RIGHT),
                                                17)
    assert got[info.l4_offset:] == pkt[20:]


def test_soft_byte_lifetime_reports_expire_once() -> None:
    left, right = make_side(LEFT), make_side(RIGHT)
    l_script, r_script = tunnel_scripts(left, right, soft_bytes=1000)
    left.setkey(l_script)
    right.setkey(r_script)
    left.register()
    for _ in range(4):
        left.send(udp_packet("10.1.0.2", "10.4.0.2", b"p" * 400))
    expires = [d for d in left.deliveries if d.message and d.message.type == MsgType.EXPIRE]
    assert len(expires) == 1
    assert ExtType.LIFETIME_SOFT in expires[0].message.ext  # type: ignore[union-attr]
    assert left.dp.stats()["sealed"] == 4  # a soft expiry does not stop the SA


def test_sequence_exhaustion_hard_expires_the_sa() -> None:
    left, right = connected_pair()
    left.register()
    out = sa(left, 0x1001, RIGHT)
    ctx = left.dp.table.context(out)  # type: ignore[arg-type]
    assert ctx is not None
    ctx.transform._next_seq = 0xFFFFFFFF  # the last sequence number without ESN
    left.send(udp_packet("10.1.0.2", "10.4.0.2"), udp_packet("10.1.0.2", "10.4.0.2"))
    stats = left.dp.stats()
    assert (stats["sealed"], stats["seq_exhausted"]) == (1, 1)
    assert out not in left.kernel.sad
    expires = [d for d in left.deliveries if d.message and d.message.type == MsgType.EXPIRE]
    assert len(expires) == 1 and ExtType.LIFETIME_HARD in expires[0].message.ext  # type: ignore[union-attr]
    left.send(udp_packet("10.1.0.2", "10.4.0.2"))  # no SA now: held, ACQUIRE
    assert left.dp.stats()["queued"] == 1


def test_sa_replaced_gets_a_new_transform() -> None:
    left, right = connected_pair()
    left.send(udp_packet("10.1.0.2", "10.4.0.2"))
    right.receive()
    old = sa(right, 0x1001, RIGHT)
    right.setkey(f"delete {LEFT}[{left.port}] {RIGHT}[{right.port}] esp-udp 0x1001;\n")
    left.send(udp_packet("10.1.0.2", "10.4.0.2"))
    right.receive()
    assert right.dp.stats()["no_sa"] == 1
    assert old not in right.dp.table.contexts


def test_ike_hook_keepalives_and_marker() -> None:
    left, right = connected_pair(keepalive_interval=20)
    got: list[tuple[bytes, tuple[object, ...], tuple[object, ...]]] = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((LEFT, 0))
    with probe:
        dst = (RIGHT, right.port)
        probe.sendto(NON_ESP_MARKER + b"ike message", dst)
        right.receive()
        assert right.dp.stats()["ike_dropped"] == 1
        right.dp.set_ike_handler(lambda data, peer, local: got.append((data, peer, local)))
        probe.sendto(NON_ESP_MARKER + b"ike message", dst)
        probe.sendto(b"\xff", dst)
        probe.sendto(b"\x01\x02", dst)
        probe.sendto(b"", dst)
        right.receive()
        assert got == [(b"ike message", probe.getsockname(), (RIGHT, right.port))]
        stats = right.dp.stats()
        assert (stats["ike_received"], stats["keepalives_received"], stats["malformed"]) == \
            (1, 1, 2)
        probe.settimeout(2)
        assert right.dp.send_ike(b"reply", probe.getsockname())
        assert probe.recv(100) == NON_ESP_MARKER + b"reply"
    # Keepalives: after the interval of silence towards the peer, one 0xFF each interval.
    left.dp.tick(NOW + 5)
    assert left.dp.stats()["keepalives_sent"] == 0
    left.dp.tick(NOW + 21)
    left.dp.tick(NOW + 22)
    right.receive()
    assert left.dp.stats()["keepalives_sent"] == 1
    assert right.dp.stats()["keepalives_received"] == 2


def test_outbound_batch_larger_than_the_slots() -> None:
    left, right = connected_pair()
    outbound = left.dp.outbound
    assert isinstance(outbound, Outbound)
    packets = [udp_packet("10.1.0.2", "10.4.0.2", i.to_bytes(2, "big")) for i in range(150)]
    outbound.process(packets, NOW)
    assert left.dp.stats()["sealed"] == 150
    right.receive()
    for _ in range(5):
        right.receive(timeout=0.2)
    assert right.tun.sent == packets


def test_each_packet_of_a_batch_gets_its_own_verdict() -> None:
    """The outbound shortcut for packets of the flow before them must not carry a verdict
    over to a packet that differs in its ports, or that is too big with DF set; the counts
    per SA still add up."""
    left, right = connected_pair(path_mtu=800)
    left.setkey("spdadd 10.1.0.2[1111] 10.4.0.2[3333] udp -P out prio high discard;\n")
    ok = [udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * 40) for i in range(3)]
    discarded = udp_packet("10.1.0.2", "10.4.0.2", b"d" * 40, dport=3333)
    too_big = udp_packet("10.1.0.2", "10.4.0.2", b"z" * 760, df=True)
    left.send(ok[0], ok[1], discarded, ok[2], too_big, ok[0])
    stats = left.dp.stats()
    assert (stats["sealed"], stats["discard"], stats["ptb_sent"]) == (4, 1, 1)
    right.receive()
    assert right.tun.sent == [ok[0], ok[1], ok[2], ok[0]]
    out = sa(left, 0x1001, RIGHT)
    assert out.packets_out == 4  # type: ignore[attr-defined]
    assert out.bytes_out == 4 * len(ok[0])  # type: ignore[attr-defined]


def test_packets_are_sealed_where_they_were_read_without_what_follows_them() -> None:
    """The send path writes the ESP trailer into the read slot right after the IP packet:
    bytes the read returned beyond the IP total length are not sent, on the first packet of
    a flow and on the ones after it, and a packet that fills its slot is sealed whole."""
    left, right = connected_pair()
    packets = [udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * (30 + i)) for i in range(4)]
    left.send(*(p + b"\xaa" * 7 for p in packets))
    big = udp_packet("10.1.0.2", "10.4.0.2", b"b" * 1300)
    left.send(big, big)
    right.receive()
    assert right.tun.sent == [*packets, big, big]


def test_a_gro_receive_is_opened_datagram_by_datagram() -> None:
    """The datagrams of coalesced receives: equal-sized ones, a shorter last one, a non-ESP
    datagram in a receive of its own (handed back by index) and one too short to be ESP of
    a known SPI (malformed)."""
    from datapath.sockets import DatagramBatch

    left, right = connected_pair()
    ctx = next(c for c in left.dp.table.by_spi.values() if c.sa.spi == 0x1001)
    packets = [udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * 200) for i in range(4)]
    packets.append(udp_packet("10.1.0.2", "10.4.0.2", b"short"))
    datagrams = [ctx.transform.seal(p, 4) for p in packets]
    assert len({len(d) for d in datagrams[:4]}) == 1 and len(datagrams[4]) < len(datagrams[0])
    batch = DatagramBatch(4)
    coalesced = b"".join(datagrams)
    marker = NON_ESP_MARKER + b"ike"
    runt = struct.pack("!II", 0x1001, 77)  # 8 bytes with a known SPI
    for k, (data, seg, offset) in enumerate([(coalesced, len(datagrams[0]), 0),
                                             (b"\xee" * 20 + marker, len(marker), 20),
                                             (runt, len(runt), 0)]):
        batch.views[k][:len(data)] = data
        batch.got[k], batch.seg[k], batch.offset[k] = len(data) - offset, seg, offset
    batch.used, batch.count = 3, 7
    other: list[int] = []
    inbound = right.dp.inbound
    assert inbound is not None
    inbound.process_batch(batch, NOW, other)
    assert right.tun.sent == packets
    assert [bytes(batch.view(i)) for i in other] == [marker] and other == [5]
    assert right.dp.stats()["malformed"] == 1


def gro_batch(slots: list[list[bytes]]) -> object:
    """A DatagramBatch as a GRO receive leaves it: slot k holds the datagrams slots[k]
    back to back (all of one size but the last)."""
    from datapath.sockets import DatagramBatch

    batch = DatagramBatch(max(len(slots), 1))
    fill_gro(batch, slots)
    return batch


def fill_gro(batch: object, slots: list[list[bytes]]) -> None:
    from datapath.sockets import DatagramBatch

    assert isinstance(batch, DatagramBatch)
    for k, datagrams in enumerate(slots):
        data = b"".join(datagrams)
        batch.views[k][:len(data)] = data
        batch.got[k], batch.seg[k], batch.offset[k] = len(data), len(datagrams[0]), 0
    batch.used = len(slots)
    batch.count = sum(map(len, slots))


def test_gro_receives_opened_in_place_batch_after_batch() -> None:
    """The receive path opens AEAD datagrams in the receive buffer through views it keeps per
    slot and datagram size: the same batch refilled with more, fewer and other-sized
    datagrams, then another batch object of the same shape, all open to the right packets."""
    from datapath.sockets import DatagramBatch

    left, right = connected_pair()
    ctx = next(c for c in left.dp.table.by_spi.values() if c.sa.spi == 0x1001)
    inbound = right.dp.inbound
    assert inbound is not None and ctx.in_place

    def stream(first: int, count: int, size: int) -> tuple[list[bytes], list[bytes]]:
        packets = [udp_packet("10.1.0.2", "10.4.0.2", bytes([first + i]) * size)
                   for i in range(count)]
        return packets, [ctx.transform.seal(p, 4) for p in packets]

    batch = DatagramBatch(2)
    expected: list[bytes] = []
    for slots in ([(0, 3, 300), (10, 2, 300)], [(20, 5, 300), (30, 1, 300)],
                  [(40, 2, 500), (50, 4, 300)], [(60, 4, 300), (70, 4, 120)]):
        made = [stream(*spec) for spec in slots]
        fill_gro(batch, [datagrams for _, datagrams in made])
        inbound.process_batch(batch, NOW)
        expected += [p for packets, _ in made for p in packets]
        assert right.tun.sent == expected
    packets, datagrams = stream(80, 3, 300)
    inbound.process_batch(gro_batch([datagrams]), NOW)  # type: ignore[arg-type]
    assert right.tun.sent == expected + packets
    assert right.dp.stats()["opened"] == len(expected) + 3


def test_a_gro_receive_of_several_kinds_of_sa_in_one_buffer() -> None:
    """Datagrams of one size in one receive: AEAD tunnel (opened in place), CBC tunnel and
    AEAD transport mode (opened into the arena), a non-ESP one and an unknown SPI, in one
    order that the TUN must see kept."""
    left, right = connected_pair()
    lp, rp = f"[{left.port}]", f"[{right.port}]"
    cbc_key, hmac_key = "0x" + "c3" * 16, "0x" + "d4" * 32
    extra = (f"add {LEFT}{lp} {RIGHT}{rp} esp-udp 0x3001 -m tunnel -r 64 "
             f"-E aes-cbc {cbc_key} -A hmac-sha256 {hmac_key};\n"
             f"add {LEFT}{lp} {RIGHT}{rp} esp-udp 0x3002 -m transport -r 64 "
             f"-E aes-gcm-16 {KEY_B};\n")
    left.setkey(extra)
    right.setkey(extra + f"spdadd {LEFT} {RIGHT} udp -P in ipsec esp/transport//require;\n")
    by_spi = {c.sa.spi: c for c in left.dp.table.by_spi.values()}
    gcm, cbc, transport = by_spi[0x1001], by_spi[0x3001], by_spi[0x3002]
    assert gcm.in_place and not cbc.in_place and not transport.in_place
    seg = 248

    def payload_for(ctx: object, header: int) -> int:
        tr = ctx.transform  # type: ignore[attr-defined]
        return next(n for n in range(seg) if tr.sealed_len(header + n) == seg)

    def tunneled(i: int, ctx: object) -> tuple[bytes, bytes]:
        packet = udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * payload_for(ctx, 28))
        return packet, ctx.transform.seal(packet, 4)  # type: ignore[attr-defined]

    a1, a2, b1, a3 = tunneled(1, gcm), tunneled(2, gcm), tunneled(3, cbc), tunneled(4, gcm)
    carried = udp_packet(LEFT, RIGHT, b"t" * payload_for(transport, 8))
    t1 = transport.transform.seal(carried[20:], 17)
    marker = NON_ESP_MARKER + b"i" * (seg - 4)
    unknown = struct.pack("!II", 0x7777, 1) + bytes(seg - 8)
    datagrams = [a1[1], b1[1], a2[1], t1, marker, unknown, a3[1]]
    assert {len(d) for d in datagrams} == {seg}
    batch = gro_batch([datagrams])
    other: list[int] = []
    inbound = right.dp.inbound
    assert inbound is not None
    inbound.process_batch(batch, NOW, other)  # type: ignore[arg-type]
    sent = right.tun.sent
    assert [sent[0], sent[1], sent[2], sent[4]] == [a1[0], b1[0], a2[0], a3[0]]
    info = parse(sent[3])
    assert (info.src, info.dst) == (socket.inet_aton(LEFT), socket.inet_aton(RIGHT))
    assert sent[3][info.l4_offset:] == carried[20:]
    assert other == [4] and bytes(batch.view(4)) == marker  # type: ignore[attr-defined]
    assert right.dp.stats()["no_sa"] == 1 and right.dp.stats()["opened"] == 5


def test_a_stream_is_parsed_once_per_batch(monkeypatch: object) -> None:
    """Outbound: the packets of a flow after its first in a batch take the shortcut (no
    parse, no lookups), also now that each is sealed where it lies."""
    import datapath.outbound as outbound_module

    parsed: list[int] = []
    real_flow = outbound_module.flow

    def counting_flow(packet: object) -> object:
        parsed.append(1)
        return real_flow(packet)  # type: ignore[arg-type]

    monkeypatch.setattr(outbound_module, "flow", counting_flow)  # type: ignore[attr-defined]
    left, right = connected_pair()
    packets = [udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * 100) for i in range(20)]
    left.send(*packets)
    assert len(parsed) == 1
    right.receive()
    for _ in range(3):
        right.receive(timeout=0.2)
    assert right.tun.sent == packets


def test_a_gro_receive_of_one_stream_drops_what_it_must_and_delivers_the_rest(
        monkeypatch: object) -> None:
    """A receive of one SA's datagrams goes through EspTransform.open_run: a forgery, a
    replayed datagram, a dummy packet and a packet padded differently in it are dropped and
    counted, or delivered, exactly as one by one, in order."""
    from datapath.esp import EspTransform

    left, right = connected_pair()
    ctx = next(c for c in left.dp.table.by_spi.values() if c.sa.spi == 0x1001)
    tr = ctx.transform
    runs: list[tuple[int, bool]] = []
    real = type(right.dp.table.by_spi[0x1001].transform).open_run

    def recording(self: EspTransform, *args: object) -> tuple[int, bool]:
        runs.append(real(self, *args))  # type: ignore[arg-type]
        return runs[-1]

    monkeypatch.setattr(type(tr), "open_run", recording)  # type: ignore[attr-defined]
    packets = [udp_packet("10.1.0.2", "10.4.0.2", bytes([i]) * 202) for i in range(16)]
    packets[3] = udp_packet("10.1.0.2", "10.4.0.2", b"p" * 201)  # 1 byte more of padding
    datagrams = [tr.seal(p, 4) for p in packets[:6]]
    dummy = tr.seal(b"d" * len(packets[0]), 59)  # number 7, in the run
    datagrams += [tr.seal(p, 4) for p in packets[6:]]
    assert {len(d) for d in datagrams} == {len(dummy)}
    forged = bytearray(datagrams[9])
    forged[20] ^= 0x04
    batch = gro_batch([datagrams[:6] + [dummy] + datagrams[6:9] + [bytes(forged)]
                       + datagrams[10:12] + [datagrams[4]] + datagrams[12:]])
    inbound = right.dp.inbound
    assert inbound is not None
    inbound.process_batch(batch, NOW)  # type: ignore[arg-type]
    assert runs == [(10, True)]
    assert right.tun.sent == packets[:9] + packets[10:]
    stats = right.dp.stats()
    assert (stats["opened"], stats["auth_failures"], stats["replay"], stats["dummy"]) == \
        (15, 1, 1, 1)
    sa_in = sa(right, 0x1001, RIGHT)
    assert sa_in.packets_in == 15 and sa_in.bytes_in == sum(map(len, packets)) - len(
        packets[9])  # type: ignore[attr-defined]
    inbound.process([datagrams[9]], NOW)  # the genuine one, late but inside the window
    assert right.tun.sent[-1] == packets[9]


def test_a_gro_receive_of_a_tcp_stream_becomes_one_gso_write() -> None:
    """The receive path end to end for one TCP stream: opened in one pass, its segments
    joined to one GSO packet in bulk (TunWriter.append_stream), the PSH segment last."""
    from scapy.layers.inet import IP, TCP
    from scapy.packet import Raw

    from tests.datapath.test_engine_tunwriter import Sink

    left, right = connected_pair()
    ctx = next(c for c in left.dp.table.by_spi.values() if c.sa.spi == 0x1001)
    segments = [bytes(IP(src="10.1.0.2", dst="10.4.0.2") / TCP(
        sport=40000, dport=5201, seq=1000 + i * 1200, ack=1, flags="PA" if i == 39 else "A")
        / Raw(bytes([i]) * 1200)) for i in range(40)]
    inbound = right.dp.inbound
    assert inbound is not None
    sink = Sink()
    inbound.writer = sink.writer
    try:
        inbound.process_batch(gro_batch(  # type: ignore[arg-type]
            [[ctx.transform.seal(s, 4) for s in segments]]), NOW)
        ((header, packet),) = sink.gso()
        assert header[1:4] == (1, 40, 1200) and sink.singles == []
        tcp = IP(packet)[TCP]
        assert tcp.seq == 1000 and tcp.flags == "PA"
        assert bytes(tcp.payload) == b"".join(bytes(IP(s)[TCP].payload) for s in segments)
        assert right.dp.stats()["opened"] == 40
        assert sa(right, 0x1001, RIGHT).bytes_in == sum(map(len, segments))  # type: ignore
    finally:
        os.close(sink.read_fd)
        os.close(sink.writer.fd)


def test_a_stream_in_a_read_batch_is_sealed_in_one_pass(monkeypatch: object) -> None:
    """Outbound: packets of a flow after its first that repeat their header fields and length
    are sealed as a run (EspTransform.seal_run); a packet of another length or flow, or one
    the read cut short, ends the run and gets its own verdict. All arrive, in order, and
    the SA's counts add up."""
    from datapath.esp import EspTransform, SealSlot

    left, right = connected_pair()
    outbound = left.dp.outbound
    assert isinstance(outbound, Outbound)
    tr = next(c for c in left.dp.table.by_spi.values() if c.sa.spi == 0x1001).transform
    runs: list[int] = []
    real = type(tr).seal_run

    def recording(self: EspTransform, slots: list[SealSlot], n: int, nh: int) -> object:
        runs.append(len(slots))
        return real(self, slots, n, nh)

    monkeypatch.setattr(type(tr), "seal_run", recording)  # type: ignore[attr-defined]

    def stream(first: int, count: int, size: int = 300, **kw: object) -> list[bytes]:
        return [udp_packet("10.1.0.2", "10.4.0.2", bytes([first + i]) * size, **kw)
                for i in range(count)]

    cut = stream(90, 1)[0]
    packets = (stream(0, 8) + stream(20, 1, 299) + stream(30, 6) + stream(40, 1, dport=7)
               + stream(50, 4) + [cut] + stream(60, 3) + stream(70, 2))
    lengths = [len(p) for p in packets]
    lengths[packets.index(cut)] -= 1  # the read returned less than the IP length says
    outbound.process_slots([SealSlot.holding(p) for p in packets], lengths, len(packets), NOW)
    # The first packet of a flow takes the full path, its followers a run until one that
    # differs (the 299-byte one is sealed alone); the cut one is malformed, and the stream
    # after it is the flow before it again.
    assert runs == [7, 6, 3, 5]
    right.receive()
    for _ in range(3):
        right.receive(timeout=0.2)
    delivered = [p for p in packets if p is not cut]
    assert right.tun.sent == delivered and left.dp.stats()["malformed"] == 1
    out = sa(left, 0x1001, RIGHT)
    assert out.packets_out == len(delivered)  # type: ignore[attr-defined]
    assert out.bytes_out == sum(map(len, delivered))  # type: ignore[attr-defined]
