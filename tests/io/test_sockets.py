"""Outer sockets over veth between two namespaces: UDP GSO/GRO batching and raw ESP."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

import pytest

from datapath.sockets import (
    GSO_MAX_SEGMENTS,
    DatagramBatch,
    RawEspSocket,
    UdpSocket,
)
from tests.netns import Netns, NetnsHarness, collect, link

FAMILIES = pytest.mark.parametrize(("family", "dst"), [(socket.AF_INET, "10.7.0.2"),
                                                      (socket.AF_INET6, "fd00:7::2")],
                                   ids=["v4", "v6"])


@pytest.fixture
def ab(netns_harness: NetnsHarness) -> tuple[Netns, Netns]:
    a, b = netns_harness.netns("a"), netns_harness.netns("b")
    link(netns_harness, a, b, 7)
    return a, b


def _udp(ns: Netns, family: int, port: int, **kw: bool | int) -> UdpSocket:
    with ns.entered():
        return UdpSocket(family, port=port, **kw)  # type: ignore[arg-type]


def _drain(sock: UdpSocket | RawEspSocket, want: int, batch: DatagramBatch | None = None,
           timeout: float = 2.0) -> list[bytes]:
    batch = batch or DatagramBatch(64)

    def poll() -> list[bytes]:
        sock.recv_batch(batch)
        return batch.datagrams()

    return collect(poll, want, timeout)


def _payloads(sizes: Sequence[int]) -> list[bytes]:
    return [struct.pack("!H", i) + bytes([i % 251]) * (n - 2) for i, n in enumerate(sizes)]


@FAMILIES
def test_gso_send_arrives_as_separate_datagrams(ab: tuple[Netns, Netns], family: int,
                                                dst: str) -> None:
    a, b = ab
    tx = _udp(a, family, 4500)
    rx = _udp(b, family, 4500, gro=False)
    assert tx.gso, "UDP_SEGMENT probe failed on a 6.x kernel"
    sent = _payloads([1400] * 10 + [300])
    assert tx.send_batch(sent, (dst, 4500)) == 11
    assert tx.stats.tx_gso_sends == 1 and tx.stats.tx_datagrams == 11
    assert _drain(rx, 11) == sent
    assert rx.stats.rx_gro_buffers == 0


@FAMILIES
def test_gro_receive_splits_a_coalesced_buffer(ab: tuple[Netns, Netns], family: int,
                                               dst: str) -> None:
    """A GSO train crosses veth as one skb; a UDP_GRO socket gets it as one buffer plus the
    segment size, and recv_batch must split it back into the original datagrams."""
    a, b = ab
    tx = _udp(a, family, 4500)
    rx = _udp(b, family, 4500)
    assert rx.gro
    sent = _payloads([1200] * 20 + [77])
    assert tx.send_batch(sent, (dst, 4500)) == 21
    batch = DatagramBatch(4)
    assert _drain(rx, 21, batch) == sent
    assert rx.stats.rx_gro_buffers == 1
    assert batch.used == 1 and batch.count == 21  # all from one receive buffer
    assert (batch.got[0], batch.seg[0]) == (20 * 1200 + 77, 1200)
    assert len(batch.view(20)) == 77 and batch.view(20).obj is batch.buffers[0]


def test_gro_socket_gives_the_same_datagrams_for_single_sends(ab: tuple[Netns, Netns]) -> None:
    """Singly sent datagrams are not coalesced on this veth (no NAPI GRO without XDP or an
    ethtool toggle), so the GRO socket's no-cmsg path must deliver them unchanged."""
    a, b = ab
    tx = _udp(a, socket.AF_INET, 4500, gso=False)
    rx_gro = _udp(b, socket.AF_INET, 4500)
    rx_plain = _udp(b, socket.AF_INET, 4501, gro=False)
    sent = _payloads([1400] * 30 + [64, 1000, 2])
    for port in (4500, 4501):
        assert tx.send_batch(sent, ("10.7.0.2", port)) == len(sent)
    assert tx.stats.tx_gso_sends == 0
    assert _drain(rx_gro, len(sent)) == sent
    assert _drain(rx_plain, len(sent)) == sent


def test_send_batch_groups_runs_and_respects_segment_limit(ab: tuple[Netns, Netns]) -> None:
    a, b = ab
    tx = _udp(a, socket.AF_INET, 4500)
    rx = _udp(b, socket.AF_INET, 4500, gro=False)
    # Runs: [1400 x3, 1000] [1400 x2, 100] [500] -> 2 GSO sends and one plain send.
    sent = _payloads([1400, 1400, 1400, 1000, 1400, 1400, 100, 500])
    assert tx.send_batch(sent, ("10.7.0.2", 4500)) == len(sent)
    assert tx.stats.tx_gso_sends == 2
    assert _drain(rx, len(sent)) == sent
    many = _payloads([1000] * (GSO_MAX_SEGMENTS + 36))
    assert tx.send_batch(many, ("10.7.0.2", 4500)) == len(many)
    assert tx.stats.tx_gso_sends == 4
    assert _drain(rx, len(many), DatagramBatch(128, 2048)) == many


def test_gso_run_over_mtu_falls_back_to_single_sends(ab: tuple[Netns, Netns]) -> None:
    a, b = ab
    tx = _udp(a, socket.AF_INET, 4500)
    rx = _udp(b, socket.AF_INET, 4500)
    sent = _payloads([1600] * 4)  # above the 1500 link MTU: the kernel refuses the GSO send
    assert tx.send_batch(sent, ("10.7.0.2", 4500)) == 4
    assert tx.stats.gso_fallbacks == 1 and tx.stats.tx_gso_sends == 0 and tx.gso
    assert _drain(rx, 4) == sent


def test_gso_disabled_gives_the_same_wire(ab: tuple[Netns, Netns]) -> None:
    a, b = ab
    tx = _udp(a, socket.AF_INET6, 4500, gso=False, mark=0x220)
    rx = _udp(b, socket.AF_INET6, 4500, gro=False)
    assert tx.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x220
    sent = _payloads([1400] * 8)
    assert tx.send_batch(sent, ("fd00:7::2", 4500)) == 8
    assert tx.stats.tx_gso_sends == 0
    assert _drain(rx, 8) == sent


@pytest.mark.parametrize("gro", [False, True], ids=["plain", "gro"])
def test_recv_batch_bounds_and_truncation(ab: tuple[Netns, Netns], gro: bool) -> None:
    a, b = ab
    tx = _udp(a, socket.AF_INET, 4500, gso=False)
    rx = _udp(b, socket.AF_INET, 4500, gro=gro)
    sent = _payloads([200] * 10)
    tx.send_batch(sent, ("10.7.0.2", 4500))
    time.sleep(0.2)  # veth delivers at once; the pause only makes the counts exact
    batch = DatagramBatch(4, 1024)
    assert rx.recv_batch(batch, limit=0) == 0
    counts, got = [], []
    for _ in range(4):
        counts.append(rx.recv_batch(batch))
        got += batch.datagrams()
    assert counts == [4, 4, 2, 0] and got == sent
    tx.send(bytes(1500), ("10.7.0.2", 4500))  # larger than a 1024-byte slot
    tx.send(b"ok", ("10.7.0.2", 4500))
    assert _drain(rx, 1, batch) == [b"ok"]
    assert rx.stats.rx_dropped == 1


@FAMILIES
def test_raw_esp_between_namespaces(ab: tuple[Netns, Netns], family: int, dst: str) -> None:
    a, b = ab
    src = "10.7.0.1" if family == socket.AF_INET else "fd00:7::1"
    with a.entered():
        ta = RawEspSocket(family, src, mark=0x220)
    with b.entered():
        tb = RawEspSocket(family)
    assert ta.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x220
    esp = [struct.pack("!II", 0x1001, seq) + bytes([seq]) * 80 for seq in range(1, 6)]
    for pkt in esp:
        assert ta.send(pkt, dst)
    batch = DatagramBatch(8, 2048)
    got = collect(lambda: [(bytes(batch.view(i)), batch.source(i)[0])
                           for i in range(tb.recv_batch(batch))], 5)
    assert got == [(p, src) for p in esp]  # v4: IP header stripped; v6: none to strip
    if family == socket.AF_INET:
        assert batch.offset[0] == 20
    # And back the other way, so both ends really receive: one by one, then as a batch.
    assert tb.send(esp[0], src)
    assert _drain(ta, 1) == [esp[0]]
    assert tb.send_batch([memoryview(p) for p in esp], src) == 5
    assert _drain(ta, 5) == esp
    assert tb.stats.tx_datagrams == 6 and tb.stats.tx_dropped == 0


def test_datagram_batch_indexes_datagrams_across_receives() -> None:
    """What recv_batch leaves behind, read back: a GRO buffer cut at its segment size (the
    last datagram shorter), a plain receive, and a raw IPv4 one past its IP header."""
    batch = DatagramBatch(4, 4096)
    batch.buffers[0][:250] = bytes(range(250))
    batch.buffers[1][:7] = b"single!"
    batch.buffers[2][:30] = bytes(20) + b"esp-packet"
    fills = ((0, 250, 100, 0, ("a", 1)), (1, 7, 7, 0, ("b", 2)), (2, 10, 10, 20, ("c", 0)))
    for k, got, seg, offset, addr in fills:
        batch.got[k], batch.seg[k], batch.offset[k], batch.addr[k] = got, seg, offset, addr
    batch.used, batch.count = 3, 5
    views = batch.all_views()
    assert [bytes(v) for v in views] == [bytes(range(100)), bytes(range(100, 200)),
                                         bytes(range(200, 250)), b"single!", b"esp-packet"]
    assert [bytes(batch.view(i)) for i in range(5)] == [bytes(v) for v in views]
    assert [batch.source(i) for i in range(5)] == [("a", 1)] * 3 + [("b", 2), ("c", 0)]
    assert batch.datagrams()[2] == bytes(range(200, 250))
    with pytest.raises(IndexError):
        batch.view(5)
