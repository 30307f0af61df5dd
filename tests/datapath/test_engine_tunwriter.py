"""TunWriter merges runs of TCP segments into GSO writes, exactly as far as GRO would."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from datapath.ippacket import internet_checksum
from datapath.tunwriter import MAX_SEGMENTS, TunWriter

MSS = 1000
F_SETPIPE_SZ = 1031  # (fcntl.F_SETPIPE_SZ from Python 3.10, but not on every platform)


def seg(seq: int, size: int = MSS, *, flags: str = "A", sport: int = 40000,
        ack: int = 7) -> bytes:
    return bytes(IP(src="10.1.0.2", dst="10.4.0.2", flags="DF") /
                 TCP(sport=sport, dport=5201, seq=seq, ack=ack, flags=flags, window=500,
                     options=[("Timestamp", (1, 2))]) / Raw(bytes([seq % 251]) * size))


class Sink:
    """The writer's two outputs: single packets (write_one) and GSO writes (a pipe)."""

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, 1 << 20)  # room for several GSO packets
        self.singles: list[bytes] = []
        self.writer = TunWriter(write_fd, self.single, vnet=True)
        self.order: list[str] = []

    def single(self, pkt: bytes | bytearray | memoryview) -> bool:
        self.singles.append(bytes(pkt))
        self.order.append("single")
        return True

    def gso(self) -> list[tuple[tuple[int, ...], bytes]]:
        data = b""
        try:
            while chunk := os.read(self.read_fd, 1 << 20):
                data += chunk
        except BlockingIOError:
            pass
        out = []
        while data:
            header = struct.unpack("<BBHHHH", data[:10])
            if data[10] >> 4 == 6:
                length = 40 + struct.unpack("!H", data[14:16])[0]
            else:
                length = struct.unpack("!H", data[12:14])[0]
            out.append((header, data[10:10 + length]))
            data = data[10 + length:]
        return out


def test_a_run_of_segments_becomes_one_gso_packet() -> None:
    sink = Sink()
    segments = [seg(1000 + i * MSS) for i in range(5)] + [seg(6000, 300, flags="PA")]
    for s in segments:
        sink.writer.push(s)
    sink.writer.flush()
    ((header, packet),) = sink.gso()
    assert sink.singles == []
    hlen = 20 + 32  # TCP with the timestamp option (padded)
    assert header == (1, 1, hlen, MSS, 20, 16)
    assert len(packet) == hlen + 5 * MSS + 300
    assert internet_checksum(packet[:20]) == 0  # a valid IPv4 header checksum
    tcp = IP(packet)[TCP]
    assert tcp.seq == 1000 and tcp.flags == "PA"
    assert bytes(tcp.payload) == b"".join(bytes(IP(s)[TCP].payload) for s in segments)
    # Checksum partial: the field holds the uncomplemented pseudo-header sum.
    src_dst = struct.unpack("!4H", packet[12:20])
    total = sum(src_dst) + 6 + len(packet) - 20
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert struct.unpack("!H", packet[36:38])[0] == total
    assert sink.writer.merged == 6 and sink.writer.gso_writes == 1


def test_runs_break_where_gro_would_and_order_is_kept() -> None:
    sink = Sink()
    packets = [
        seg(1000), seg(2000),  # run 1
        seg(3500),  # sequence gap: new run (alone: written as it is)
        seg(4500, sport=40001),  # another flow
        bytes(IP(src="10.1.0.2", dst="10.4.0.2") / UDP() / Raw(b"u")),  # not TCP
        seg(5500, 400), seg(5900),  # a short segment ends a run: 5900 starts a new one
        seg(6900, flags="S"),  # SYN: never merged
        seg(7000, ack=8), seg(8000, ack=9),  # different ACKs
    ]
    for p in packets:
        sink.writer.push(p)
    sink.writer.flush()
    gso = sink.gso()
    assert len(gso) == 1 and IP(gso[0][1])[TCP].seq == 1000
    singles = [IP(p) for p in sink.singles]
    assert [p[TCP].seq if TCP in p else "udp" for p in singles] == [
        3500, 4500, "udp", 5500, 5900, 6900, 7000, 8000]
    assert sink.singles[0] == packets[2]  # written unchanged


def test_without_vnet_header_everything_is_written_singly() -> None:
    sent: list[bytes] = []

    def write_one(pkt: bytes | bytearray | memoryview) -> bool:
        sent.append(bytes(pkt))
        return True

    writer = TunWriter(-1, write_one, vnet=False)
    packets = [seg(1000 + i * MSS) for i in range(3)]
    for p in packets:
        writer.push(p)
    writer.flush()
    assert sent == packets


def test_every_field_gro_compares_breaks_a_run() -> None:
    """The run's header template: TTL, TOS, DF, window and options must repeat; id and
    checksums may change. A packet shorter than the run's headers is not appended."""
    sink = Sink()
    writer = sink.writer
    assert not writer.append(seg(1000))  # no run yet
    writer.push(seg(1000))

    def variant(**fields: object) -> bytes:
        pkt = IP(seg(2000))
        for name, value in fields.items():
            layer = pkt[TCP] if name in ("window", "options") else pkt
            setattr(layer, name, value)
        del pkt[IP].chksum, pkt[TCP].chksum
        return bytes(pkt)

    for changed in (variant(ttl=7), variant(tos=4), variant(flags=0), variant(window=9),
                    variant(options=[("Timestamp", (1, 3))])):
        assert not writer.append(changed)
    assert not writer.append(seg(2000)[:40])
    assert writer.append(variant(id=99))  # the id may differ
    assert writer.append(seg(3000, 10))  # a short segment ends the run ...
    assert not writer.append(seg(3010))
    writer.flush()
    ((_, packet),) = sink.gso()
    assert len(packet) == 52 + 2 * MSS + 10 and sink.singles == []


def test_a_run_goes_on_across_the_sequence_number_wrap() -> None:
    sink = Sink()
    first = (1 << 32) - MSS - MSS // 2
    seqs = [first, first + MSS, (first + 2 * MSS) & 0xFFFFFFFF]
    for seq in seqs:
        sink.writer.push(seg(seq))
    sink.writer.flush()
    ((header, packet),) = sink.gso()
    assert header[3] == MSS and len(packet) == 52 + 3 * MSS and sink.singles == []
    assert IP(packet)[TCP].seq == first


def test_append_at_reads_only_the_packet_it_is_given() -> None:
    """append_at's struct reads may run past ``end`` into other bytes of the buffer: a
    packet cut short there must still be refused, and a whole one at an offset appended."""
    sink = Sink()
    writer = sink.writer
    writer.push(seg(1000))
    nxt = seg(1000 + MSS)
    buf = bytearray(b"\x00" * 7 + nxt + b"\x00" * 9)
    for cut in (20, 52, 53, len(nxt) - 1):  # inside the headers, headers only, part payload
        assert not writer.append_at(buf, 7, 7 + cut)
    assert writer.append_at(buf, 7, 7 + len(nxt))
    assert not writer.append_at(bytearray(nxt[:30]), 0, 30)  # the buffer ends in the headers
    writer.flush()
    ((_, packet),) = sink.gso()
    assert len(packet) == 52 + 2 * MSS


def test_a_run_ends_at_the_segment_bound() -> None:
    sink = Sink()
    writer = sink.writer
    writer.push(seg(1000))
    merged = [writer.append(seg(1000 + i * MSS)) for i in range(1, 70)]
    assert merged == [True] * (MAX_SEGMENTS - 1) + [False] * (70 - MAX_SEGMENTS)


def test_a_batch_larger_than_the_decrypt_arena_reaches_the_tun_intact(tmp_path) -> None:
    """The receive path decrypts each packet of a batch to its own place and the writer keeps
    views of them until flush; a batch of more than the arena holds must flush and start over
    without a merged packet losing or mixing up a byte."""
    from datapath.inbound import ARENA_SIZE
    from tests.datapath.engine_helpers import connected_pair

    left, right = connected_pair()
    out_ctx = next(c for c in left.dp.table.by_spi.values() if c.sa.spi == 0x1001)
    count = ARENA_SIZE // MSS + 200
    assert count * (52 + MSS) > ARENA_SIZE  # the arena fills up once
    segments = [seg(1000 + i * MSS, flags="A" if (i + 1) % 40 else "PA") for i in range(count)]
    datagrams = [out_ctx.transform.seal(s, 4) for s in segments]
    records = open(tmp_path / "tun", "w+b")  # noqa: SIM115 (closed below)
    inbound = right.dp.inbound
    assert inbound is not None
    inbound.writer = TunWriter(records.fileno(), right.tun.write, vnet=True)
    inbound.process([memoryview(d) for d in datagrams], 0.0)
    records.seek(0)
    data = records.read()
    records.close()
    payload = b""
    writes = 0
    while data:
        length = struct.unpack("!H", data[12:14])[0]
        packet = data[10:10 + length]
        payload += packet[52:]
        data = data[10 + length:]
        writes += 1
    assert right.tun.sent == []  # every segment went out in a run
    assert payload == b"".join(s[52:] for s in segments)
    assert writes in (-(-count // 40), -(-count // 40) + 1)  # (+1: a run cut at the wrap)


def dgram(payload: bytes, *, sport: int = 5000, ttl: int = 64, length: int | None = None
          ) -> bytes:
    pkt = IP(src="10.1.0.2", dst="10.4.0.2", flags="DF", ttl=ttl) / UDP(
        sport=sport, dport=5201) / Raw(payload)
    if length is not None:
        pkt[UDP].len = length
    return bytes(pkt)


def test_udp_datagrams_of_one_size_become_one_gso_packet() -> None:
    """As UDP GRO forwarding: equal datagrams of a flow, the last possibly shorter, go out as
    one UDP_L4 GSO packet that the kernel cuts back into the same datagrams."""
    sink = Sink()
    datagrams = [dgram(bytes([i]) * 1000) for i in range(6)] + [dgram(b"tail")]
    for d in datagrams:
        sink.writer.push(d)
    sink.writer.push(dgram(b"x" * 1000))  # after the short one: a run of its own
    sink.writer.flush()
    ((header, packet),) = sink.gso()
    assert header == (1, 5, 28, 1000, 20, 6)
    assert len(packet) == 28 + 6 * 1000 + 4
    assert internet_checksum(packet[:20]) == 0
    assert struct.unpack("!H", packet[24:26])[0] == len(packet) - 20  # the UDP length
    src_dst = struct.unpack("!4H", packet[12:20])
    total = sum(src_dst) + 17 + len(packet) - 20
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert struct.unpack("!H", packet[26:28])[0] == total  # checksum partial
    assert packet[28:] == b"".join(d[28:] for d in datagrams)
    assert sink.singles == [dgram(b"x" * 1000)]
    assert sink.writer.merged == 7 and sink.writer.gso_writes == 1


def test_udp_runs_break_on_any_header_difference() -> None:
    sink = Sink()
    base = dgram(b"a" * 500)
    others = [dgram(b"b" * 500, sport=5001), dgram(b"c" * 500, ttl=9),
              dgram(b"d" * 600),  # larger than the run's datagrams
              dgram(b"e" * 500, length=400)]  # a UDP length that is not the packet's
    for other in others:
        sink.writer.push(base)
        sink.writer.push(other)
        sink.writer.flush()
    assert sink.gso() == []
    assert sink.singles == [p for other in others for p in (base, other)]


def test_udp_datagrams_go_singly_where_the_kernel_takes_no_udp_gso(monkeypatch) -> None:
    """Before Linux 6.2 a TUN refuses VIRTIO_NET_HDR_GSO_UDP_L4 with EINVAL: the run's
    datagrams are written as they came, and later ones are not merged any more."""
    import datapath.tunwriter as tunwriter

    def refuse(fd: int, buffers: list[bytes]) -> int:
        raise OSError(22, "Invalid argument")

    sink = Sink()
    monkeypatch.setattr(tunwriter.os, "writev", refuse)
    datagrams = [dgram(bytes([i]) * 300) for i in range(3)]
    for d in datagrams:
        sink.writer.push(d)
    sink.writer.flush()
    assert sink.singles == datagrams and not sink.writer.udp_gso
    sink.writer.push(datagrams[0])
    assert sink.singles == [*datagrams, datagrams[0]]  # written at once: no run started
    assert sink.writer.errors == 0


def seg6(seq: int, size: int = MSS, *, flags: str = "A", hlim: int = 64) -> bytes:
    from scapy.layers.inet6 import IPv6

    return bytes(IPv6(src="fd01::2", dst="fd04::2", hlim=hlim, fl=7) /
                 TCP(sport=40000, dport=5201, seq=seq, ack=7, flags=flags, window=500,
                     options=[("Timestamp", (1, 2))]) / Raw(bytes([seq % 251]) * size))


def test_an_ipv6_run_of_segments_becomes_one_gso_packet() -> None:
    from scapy.layers.inet6 import IPv6

    sink = Sink()
    segments = [seg6(1000 + i * MSS) for i in range(4)] + [seg6(5000, 300, flags="PA")]
    for s in segments:
        sink.writer.push(s)
    sink.writer.push(seg6(5300, hlim=3))  # another hop limit: not part of the run
    sink.writer.flush()
    ((header, packet),) = sink.gso()
    hlen = 40 + 32
    assert header == (1, 4, hlen, MSS, 40, 16)
    assert len(packet) == hlen + 4 * MSS + 300
    assert struct.unpack("!H", packet[4:6])[0] == len(packet) - 40
    tcp = IPv6(packet)[TCP]
    assert tcp.seq == 1000 and tcp.flags == "PA"
    assert bytes(tcp.payload) == b"".join(bytes(IPv6(s)[TCP].payload) for s in segments)
    total = sum(struct.unpack("!16H", packet[8:40])) + 6 + len(packet) - 40
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert struct.unpack("!H", packet[56:58])[0] == total
    assert sink.singles == [seg6(5300, hlim=3)]


@pytest.mark.parametrize("version", [4, 6])
def test_a_changed_header_byte_breaks_a_run_unless_gro_lets_it_vary(version: int) -> None:
    """Every byte of the IP and TCP headers, one at a time: a follower with that byte
    changed joins the run only where Linux's GRO lets segments differ (IPv4 id, checksums,
    PSH); a changed sequence number, address, port, TTL, ACK, window, option... breaks it."""
    make = seg if version == 4 else seg6
    ip_len = 20 if version == 4 else 40
    hlen = ip_len + 32
    length_field = (2, 3) if version == 4 else (4, 5)  # a shorter follower may join: below
    may_vary = {ip_len + 16, ip_len + 17}  # TCP checksum
    if version == 4:
        may_vary |= {4, 5, 10, 11}  # id, header checksum
    for at in range(hlen):
        if at in length_field:
            continue
        for flip in ((0x08, 0x01) if at == ip_len + 13 else (0x01, 0x80)):  # flags: PSH, FIN
            sink = Sink()
            try:
                sink.writer.push(make(1000))
                follower = bytearray(make(1000 + MSS))
                follower[at] ^= flip
                joined = sink.writer.append(follower)
                pushed = at == ip_len + 13 and flip == 0x08
                assert joined == (at in may_vary or pushed), (at, hex(flip))
            finally:
                os.close(sink.read_fd)
                os.close(sink.writer.fd)
    sink = Sink()
    sink.writer.push(make(1000))
    shorter = bytearray(make(1000 + MSS, MSS - 1))
    assert sink.writer.append(shorter)  # the length field says a short last segment
    assert not sink.writer.append(make(1000 + 2 * MSS - 1))  # ... which ends the run


def test_ipv6_udp_datagrams_of_one_size_become_one_gso_packet() -> None:
    from scapy.layers.inet6 import IPv6

    def d6(payload: bytes, sport: int = 5000) -> bytes:
        return bytes(IPv6(src="fd01::2", dst="fd04::2") / UDP(sport=sport, dport=53) /
                     Raw(payload))

    sink = Sink()
    datagrams = [d6(bytes([i]) * 700) for i in range(3)] + [d6(b"end")]
    for d in datagrams:
        sink.writer.push(d)
    sink.writer.push(d6(b"z" * 700, sport=5001))
    sink.writer.flush()
    ((header, packet),) = sink.gso()
    length = len(packet)
    assert header == (1, 5, 48, 700, 40, 6)
    assert length == 48 + 3 * 700 + 3
    assert struct.unpack("!H", packet[44:46])[0] == length - 40  # the UDP length
    total = sum(struct.unpack("!16H", packet[8:40])) + 17 + length - 40
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert struct.unpack("!H", packet[46:48])[0] == total
    assert packet[48:] == b"".join(d[48:] for d in datagrams)
    assert sink.singles == [d6(b"z" * 700, sport=5001)]


def stream_scenarios(make: object) -> dict[str, list[bytes]]:
    """100 segments of one stream, and the same with one kind of follower GRO would not
    merge (or that ends a run) somewhere in it."""
    def stream(first: int = 1000) -> list[bytes]:
        return [make((first + i * MSS) & 0xFFFFFFFF)  # type: ignore[operator]
                for i in range(100)]

    def changed(at: int, byte: int, flip: int) -> list[bytes]:
        packets = stream()
        follower = bytearray(packets[at])
        follower[byte] ^= flip
        packets[at] = bytes(follower)
        return packets

    ip_len = 20 if make is seg else 40
    short = stream()
    short[40] = make(1000 + 40 * MSS, MSS - 3) + bytes(3)  # type: ignore[operator]
    if make is seg:  # the IP length says 3 bytes less than the packet (trailing bytes)
        short[40] = short[40][:2] + struct.pack("!H", len(short[40]) - 3) + short[40][4:]
    else:
        short[40] = short[40][:4] + struct.pack("!H", len(short[40]) - 43) + short[40][6:]
    return {
        "whole": stream(),
        "psh": changed(10, ip_len + 13, 0x08),
        "fin": changed(15, ip_len + 13, 0x01),
        "port": changed(20, ip_len + 1, 0x01),
        "ack": changed(5, ip_len + 11, 0x01),
        "gap": stream()[:30] + stream(1000 + MSS)[30:],
        "short": short,
        "wrap": stream((1 << 32) - 47 * MSS - MSS // 2),
    }


@pytest.mark.parametrize("version", [4, 6])
def test_append_stream_merges_exactly_what_append_at_would(version: int) -> None:
    """A GRO receive's packets at a fixed stride, fed as the receive path does (append_stream
    for the rest, push for a packet it does not take) or one by one with push: the same GSO
    packets and single writes, whatever breaks the stream and wherever."""
    make = seg if version == 4 else seg6
    for name, packets in stream_scenarios(make).items():
        size = len(packets[0])
        stride = size + 16
        buf = memoryview(b"".join(p + bytes(stride - len(p)) for p in packets))
        bulk, single = Sink(), Sink()
        taken = []
        try:
            j = 0
            while j < len(packets):
                n = bulk.writer.append_stream(buf, j * stride, stride, len(packets) - j, size)
                taken.append(n)
                if not n:
                    bulk.writer.push(buf[j * stride:j * stride + size])
                    n = 1
                j += n
            bulk.writer.flush()
            for packet in packets:
                single.writer.push(packet)
            single.writer.flush()
            assert bulk.gso() == single.gso() and bulk.singles == single.singles, name
            assert bulk.writer.merged == single.writer.merged, name
            assert max(taken) > 30, (name, taken)  # ... and most of them in bulk
        finally:
            for sink in (bulk, single):
                os.close(sink.read_fd)
                os.close(sink.writer.fd)


def test_append_stream_without_a_run_or_room_takes_nothing() -> None:
    sink = Sink()
    packets = [seg(1000 + i * MSS) for i in range(70)]
    buf = b"".join(packets)
    size = len(packets[0])
    assert sink.writer.append_stream(buf, 0, size, 3, size) == 0  # no run to continue
    sink.writer.push(packets[0])
    assert sink.writer.append_stream(buf, size, size, 0, size) == 0
    assert sink.writer.append_stream(buf, size, size, 69, size) == MAX_SEGMENTS - 1
    assert sink.writer.append_stream(buf, MAX_SEGMENTS * size, size, 6, size) == 0  # full
    sink.writer.push(packets[MAX_SEGMENTS])
    sink.writer.flush()
    ((_, packet),) = sink.gso()
    assert len(packet) == 52 + MAX_SEGMENTS * MSS and sink.singles == [packets[MAX_SEGMENTS]]
