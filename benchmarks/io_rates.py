"""Packet rates of the datapath's OS-facing I/O, 1400-byte payloads, inside throwaway namespaces.

    python -m benchmarks.io_rates [--seconds 3]

Prints packets/s for: TUN write (packets dropped by the kernel right after), TUN read_batch
(fed by a GSO sender in a second process), UDP GSO send over veth, and recv_batch over veth
with and without UDP GRO (fed by a GSO sender in a second process). Every loop is bounded by
time; the namespaces are removed at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import select
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from scapy.layers.inet import IP, UDP

from datapath.sockets import DatagramBatch, UdpSocket
from datapath.tun import PacketSlots, TunDevice
from tests.netns import Netns, NetnsHarness, link

PAYLOAD = 1400
CTX = mp.get_context("fork")


def _blast(ns: Netns, dst: tuple[str, int], seconds: float, family: int,
           done: Connection) -> None:
    """GSO-send 64-datagram trains to dst until time is up; reports datagrams handed over."""
    with ns.entered():
        tx = UdpSocket(family, port=0, gro=False)
    train = [bytes(PAYLOAD)] * 64
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent += tx.send_batch(train, dst)
    done.send(sent)


def _in_child(target: Callable[..., None], *args: object) -> tuple[BaseProcess, Connection]:
    parent, child = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def _rate(label: str, count: int, seconds: float, extra: str = "") -> None:
    print(f"{label:<44} {count / seconds:>12,.0f} pkt/s  ({count} in {seconds:.2f} s) {extra}")


def tun_write(ns: Netns, tun: TunDevice, seconds: float) -> None:
    # To an address routed nowhere: the kernel drops it at route lookup, so this is our cost.
    pkt = bytes(IP(src="10.9.0.2", dst="10.66.0.1") / UDP(sport=1, dport=9) / bytes(PAYLOAD))
    n = 0
    start = time.monotonic()
    end = start + seconds
    write = tun.write
    while time.monotonic() < end:
        for _ in range(256):
            write(pkt)
        n += 256
    _rate("TUN write", n, time.monotonic() - start)


def tun_read(ns: Netns, tun: TunDevice, seconds: float) -> None:
    proc, conn = _in_child(_blast, ns, ("10.9.0.2", 9), seconds, socket.AF_INET)
    slots = PacketSlots(64, 2048)
    n = calls = 0
    start = time.monotonic()
    end = start + seconds + 0.2
    while time.monotonic() < end:
        if select.select([tun.fd], [], [], 0.05)[0]:
            n += tun.read_batch(slots)
            calls += 1
    elapsed = time.monotonic() - start
    proc.join(5)
    offered = conn.recv() if conn.poll(1) else 0
    _rate("TUN read_batch (64 slots)", n, elapsed,
          f"batch avg {n / max(calls, 1):.1f}, sender offered {offered / seconds:,.0f}/s")


def gso_send(a: Netns, b: Netns, seconds: float) -> None:
    with b.entered():
        sink = UdpSocket(port=4500, gro=True, bufsize=64 << 20)
    with a.entered():
        tx = UdpSocket(port=0, gro=False)
    train = [bytes(PAYLOAD)] * 64
    n = 0
    batch = DatagramBatch(16)
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        n += tx.send_batch(train, ("10.7.0.2", 4500))
        sink.recv_batch(batch)  # keep the sink from filling (GRO: one buffer per train)
    _rate("UDP GSO send_batch (64 x 1400)", n, time.monotonic() - start,
          f"gso syscalls {tx.stats.tx_gso_sends}")
    sink.close()
    tx.close()


def recv_rate(a: Netns, b: Netns, seconds: float, gro: bool) -> None:
    with b.entered():
        rx = UdpSocket(port=4501, gro=gro, bufsize=64 << 20)
    proc, conn = _in_child(_blast, a, ("10.7.0.2", 4501), seconds, socket.AF_INET)
    batch = DatagramBatch(64)
    n = calls = 0
    start = time.monotonic()
    end = start + seconds + 0.2
    while time.monotonic() < end:
        if select.select([rx.sock], [], [], 0.05)[0]:
            n += rx.recv_batch(batch)
            calls += 1
    elapsed = time.monotonic() - start
    proc.join(5)
    offered = conn.recv() if conn.poll(1) else 0
    _rate(f"UDP recv_batch over veth, GRO {'on' if gro else 'off'}", n, elapsed,
          f"dgrams/call {n / max(calls, 1):.1f}, gro buffers {rx.stats.rx_gro_buffers}, "
          f"offered {offered / seconds:,.0f}/s")
    rx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    s = ap.parse_args().seconds
    with NetnsHarness() as h:
        t, a, b = h.netns("tun"), h.netns("a"), h.netns("b")
        link(h, a, b, 7)
        with t.entered():
            tun = TunDevice("uitb0")
        t.ip("link", "set", "uitb0", "up")
        t.add_addr("uitb0", "10.9.0.1/24")
        tun_write(t, tun, s)
        tun_read(t, tun, s)
        tun.close()
        gso_send(a, b, s)
        recv_rate(a, b, s, gro=False)
        recv_rate(a, b, s, gro=True)


if __name__ == "__main__":
    main()
