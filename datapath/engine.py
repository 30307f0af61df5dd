"""The datapath engine: TUN and outer sockets wired to Outbound/Inbound in an asyncio loop.

``Datapath(kernel, config, deliver)`` owns the TUN device, the UDP 4500 and raw ESP sockets,
the fwmark rule (datapath.netconf) and the routes into the TUN (datapath.rtnl: sent without
waiting, their answers read by a loop reader like the packets). Each fd has a reader callback
that drains ready packets in batches into preallocated buffers; there is no asyncio work per
packet. Kernel-originated messages (ACQUIRE, EXPIRE) go to ``deliver`` (the daemon's
``PfkeyServer.dispatch(None, ...)``).

The daemon calls ``sync()`` after every PF_KEY request and timer tick (cheap: two generation
compares) and ``tick(now)`` from its timer (NAT keepalives, local address refresh).

UDP 4500 also carries IKE (RFC 3948 non-ESP marker): ``set_ike_handler(fn)`` receives
``fn(message, peer, local)`` where ``local`` is the receiving socket's bound address, and
``send_ike(message, peer, source)`` sends with the marker. NAT keepalives (0xFF) are sent for
the peers of UDP-encapsulated SAs after ``keepalive_interval`` seconds without traffic to them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from datapath.encap import NAT_KEEPALIVE, NON_ESP_MARKER, UdpKind, classify
from datapath.esp import SEAL_HEAD, SEAL_TAIL, SealSlot
from datapath.inbound import Inbound
from datapath.keepalive import KeepalivePeers
from datapath.netconf import NetConfig, NetConfigError, RoutingPolicy, tun_mtu
from datapath.outbound import Outbound
from datapath.routes import RouteSync, local_addresses
from datapath.rtnl import KernelRoutes, RouteClient
from datapath.satable import SaTable
from datapath.sockets import DatagramBatch, RawEspSocket, UdpSocket
from datapath.stats import DatapathStats
from datapath.tun import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    PacketSlots,
    TunDevice,
)
from userspace_ipsec.config import DatapathConfig
from userspace_ipsec.kernel import Delivery, Kernel

log = logging.getLogger(__name__)

BATCH = 64  # packets per read batch
MAX_BATCHES = 16  # batches per wake-up, so one busy fd cannot starve the others
# Outer IPv6 + UDP + ESP header, 16-byte IV, 15 bytes of padding, trailer, 32-byte ICV.
WORST_OVERHEAD = 40 + 8 + 8 + 16 + 15 + 2 + 32
LOCAL_REFRESH = 10.0  # seconds between re-reads of the local addresses
# The TUN's queue towards us (500 by default): room for the bursts that arrive while the daemon
# waits for a CPU, which on a busy host otherwise overflow it.
TUN_QUEUE = 4096
# Partial checksums and TCP super-packets from the TUN (datapath.segment): one read per burst,
# but every segment's checksum is then ours to compute (int.from_bytes + modulo, ~35k
# instructions per 1.4 KB segment), which on the 2-core benchmark host costs more than the
# kernel's segmentation and the per-packet reads it saves (single TCP stream, 5 A/B rounds:
# 186-326 Mbit/s with them, 267-382 without, and more daemon CPU per Mbit). Off until the
# checksum is cheaper; TUN_ALL_OFFLOADS is the set that works.
TUN_ALL_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
TUN_OFFLOADS = 0

NETLINK_TIMEOUT = 10.0
IkeHandler = Callable[[bytes, tuple[Any, ...], tuple[Any, ...]], None]
_T = TypeVar("_T")


class _Netlink:
    """pyroute2's IPRoute runs an event loop of its own and refuses to start inside a running
    one: every netlink call is made in one worker thread (briefly blocking the caller). Only
    the rare calls (link, addresses, rules) go this way; the per-policy routes go through
    datapath.rtnl, whose answers the loop reads."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="uipsec-netlink")
        self.netconf: NetConfig | None = None
        self._ipr: Any = None

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return self._pool.submit(fn, *args).result(NETLINK_TIMEOUT)

    def open(self, policy: RoutingPolicy) -> NetConfig:
        from pyroute2 import IPRoute

        self._ipr = self.call(IPRoute)
        self.netconf = self.call(NetConfig, policy, self._ipr)
        return self.netconf

    def set_queue(self, ifname: str, length: int) -> None:
        def run() -> None:
            index = self._ipr.link_lookup(ifname=ifname)[0]
            self._ipr.link("set", index=index, txqlen=length)

        self.call(run)

    def close(self) -> None:
        netconf, self.netconf = self.netconf, None
        try:
            if netconf is not None:
                try:
                    self.call(netconf.remove_all)
                finally:
                    self.call(self._ipr.close)
        finally:
            self._pool.shutdown(wait=True)


class Datapath:
    def __init__(self, kernel: Kernel, config: DatapathConfig,
                 deliver: Callable[[list[Delivery]], None], *,
                 clock: Callable[[], float] = time.time,
                 local: Callable[[], frozenset[bytes]] = local_addresses) -> None:
        self.kernel = kernel
        self.config = config
        self.deliver = deliver
        self.clock = clock
        self._local = local
        self.counters = DatapathStats()
        self.udp: dict[int, UdpSocket] = {}  # by family: the socket to send from
        self.raw: dict[int, RawEspSocket] = {}
        self._udp_all: list[UdpSocket] = []
        self.tun: TunDevice | None = None
        self.netlink: _Netlink | None = None
        self.kernel_routes: KernelRoutes | None = None
        self.routes: RouteSync | None = None
        self.table = SaTable(kernel, udp=self.udp, raw=self.raw,
                             always_encap=config.always_encap, udp_port=config.udp_port,
                             local=frozenset)
        self.outbound: Outbound | None = None
        self.inbound: Inbound | None = None
        # A fixed [datapath] tun_mtu wins; else the worst case until SAs say what they add.
        self._fixed_mtu: int = config.tun_mtu
        self.mtu = self._fixed_mtu or tun_mtu(config.path_mtu, WORST_OVERHEAD,
                                              ipv6=config.path_mtu - WORST_OVERHEAD >= 1280)
        # Packets are sealed where they are read: room for the ESP header and trailer.
        self._slots = PacketSlots(BATCH, head=SEAL_HEAD, tail=SEAL_TAIL)
        self._seal_slots = [SealSlot(whole) for whole in self._slots.whole]
        self._batch = DatagramBatch(BATCH)
        self._ike: IkeHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[int] = []
        self._spd_gen = -1
        self._sad_gen = -1
        self._syncing = False
        self._flush_due = False  # held packets to retry after a change seen mid-batch
        self._sync_timer: asyncio.Handle | None = None
        self._local_at = 0.0
        self._keepalive = KeepalivePeers()

    # -- lifecycle ---------------------------------------------------------------------------

    def attach(self, tun: TunDevice, udp: list[UdpSocket], raw: list[RawEspSocket]) -> None:
        """Use already-open devices (``start`` opens them; tests may bring their own)."""
        self.tun = tun
        self._udp_all = list(udp)
        for sock in udp:
            self.udp.setdefault(sock.family, sock)
        for rsock in raw:
            self.raw.setdefault(rsock.family, rsock)
        self.table.set_local(self._local())
        self._local_at = self.clock()
        self.outbound = Outbound(self.kernel, self.table, self.counters, tun, self.deliver,
                                 path_mtu=self.config.path_mtu,
                                 queue_size=self.config.acquire_queue, batch=BATCH)
        self.inbound = Inbound(self.kernel, self.table, self.counters, tun, self.deliver)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the TUN and sockets, install the fwmark rules, start reading."""
        cfg = self.config
        mark = cfg.fwmark
        self.netlink = netlink = _Netlink()
        if self._local is local_addresses:
            self._local = lambda: netlink.call(local_addresses)
        tun: TunDevice | None = None
        udp: list[UdpSocket] = []
        raw: list[RawEspSocket] = []
        kernel_routes: KernelRoutes | None = None
        try:
            netconf = netlink.open(RoutingPolicy(table=cfg.table, fwmark=mark))
            kernel_routes = KernelRoutes(RouteClient(cfg.table))
            tun = TunDevice(cfg.tun_name, vnet_hdr=True)  # GSO writes: datapath.tunwriter
            if TUN_OFFLOADS and not tun.set_offload(TUN_OFFLOADS):
                log.info("datapath: TUN offloads refused; the kernel segments for us")
            netlink.set_queue(tun.name, TUN_QUEUE)
            netlink.call(netconf.setup_link, tun.name, (), self.mtu)
            netlink.call(netconf.install_rules)
            for host in cfg.udp_bind:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                udp.append(UdpSocket(family, host, cfg.udp_port, mark=mark))
            if cfg.raw_esp:
                families = {s.family for s in udp} or {socket.AF_INET, socket.AF_INET6}
                raw = [RawEspSocket(f, mark=mark) for f in sorted(families)]
        except BaseException as exc:
            for s in (*udp, *raw):
                s.close()
            if tun is not None:
                tun.close()
            if kernel_routes is not None:
                kernel_routes.close()
            self.netlink = None
            netlink.close()
            if isinstance(exc, NetConfigError):
                raise OSError(str(exc)) from exc
            raise
        self.attach(tun, udp, raw)
        kernel_routes.attach(loop)  # route answers are read by the loop, never waited for
        self.kernel_routes = kernel_routes
        self.routes = RouteSync(kernel_routes, tun.name)
        self._loop = loop
        loop.add_reader(tun.fd, self.handle_tun)
        self._readers.append(tun.fd)
        for sock in udp:
            loop.add_reader(sock.fileno(), self.handle_udp, sock)
            self._readers.append(sock.fileno())
        for rsock in raw:
            loop.add_reader(rsock.fileno(), self.handle_raw, rsock)
            self._readers.append(rsock.fileno())
        self.sync()
        log.info("datapath: TUN %s mtu %d, UDP %s port %d, raw ESP %s", tun.name, self.mtu,
                 ",".join(cfg.udp_bind), cfg.udp_port, "on" if raw else "off")

    def close(self) -> None:
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        for s in (*self._udp_all, *self.raw.values()):
            s.close()
        if self.kernel_routes is not None:  # the daemon leaves no route behind
            try:
                failures = self.kernel_routes.remove_all(NETLINK_TIMEOUT)
            except OSError as exc:
                failures = [str(exc)]
            finally:
                self.kernel_routes.close()
                self.kernel_routes = None
            if failures:
                log.warning("datapath: cleanup: cannot remove routes: %s", "; ".join(failures))
        if self.netlink is not None:
            try:
                self.netlink.close()
            except Exception as exc:  # the TUN's routes die with it anyway
                log.warning("datapath: cleanup: %s", exc)
            self.netlink = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None

    # -- reader callbacks --------------------------------------------------------------------

    def handle_tun(self) -> None:
        tun, outbound = self.tun, self.outbound
        if tun is None or outbound is None:
            return
        slots, seal_slots = self._slots, self._seal_slots
        lengths = slots.lengths
        vnet = slots.vnet if getattr(tun, "offload", 0) else None
        for _ in range(MAX_BATCHES):
            n = tun.read_batch(slots)
            if not n:
                break
            self.counters.tun_packets += n
            outbound.process_slots(seal_slots, lengths, n, self.clock(), vnet)
            if n < BATCH:
                break

    def handle_udp(self, sock: UdpSocket) -> None:
        inbound = self.inbound
        if inbound is None:
            return
        batch = self._batch
        other: list[int] = []  # datagrams that are not ESP: IKE, keepalives, junk
        for _ in range(MAX_BATCHES):
            n = sock.recv_batch(batch)
            if not n:
                break
            inbound.process_batch(batch, self.clock(), other)
            self.counters.esp_received += n - len(other)
            if other:
                for i in other:
                    self._control(sock, batch.view(i), batch.source(i))
                other.clear()
            if batch.used < BATCH:
                break

    def handle_raw(self, sock: RawEspSocket) -> None:
        inbound = self.inbound
        if inbound is None:
            return
        batch = self._batch
        for _ in range(MAX_BATCHES):
            n = sock.recv_batch(batch)
            if not n:
                break
            self.counters.esp_received += n
            inbound.process_batch(batch, self.clock())
            if n < BATCH:
                break

    def _control(self, sock: UdpSocket, view: memoryview, addr: tuple[Any, ...]) -> None:
        """A UDP 4500 datagram that is not ESP: IKE, keepalive or junk."""
        kind, part = classify(view)
        counters = self.counters
        if kind == UdpKind.IKE:
            if self._ike is None:
                counters.ike_dropped += 1
                return
            counters.ike_received += 1
            try:
                self._ike(bytes(part), addr, sock.address)
            except Exception:  # the IKE daemon's bug must not stop the datapath
                log.exception("datapath: IKE handler failed")
        elif kind == UdpKind.KEEPALIVE:
            counters.keepalives_received += 1
        else:
            counters.malformed += 1

    # -- IKE hook ----------------------------------------------------------------------------

    def set_ike_handler(self, handler: IkeHandler | None) -> None:
        """Where IKE messages received on UDP 4500 go (marker stripped)."""
        self._ike = handler

    def send_ike(self, message: bytes, peer: tuple[Any, ...], source: str | None = None) -> bool:
        """Send an IKE message on the UDP 4500 socket of the peer's family, with the marker,
        from our address ``source`` (the IKE SA's: the socket is bound to the wildcard)."""
        family = socket.AF_INET6 if ":" in str(peer[0]) else socket.AF_INET
        sock = self.udp.get(family)
        if sock is None:
            return False
        ok = sock.send(NON_ESP_MARKER + message, peer, source)
        self.counters.ike_sent += ok
        return ok

    # -- control -----------------------------------------------------------------------------

    def sync(self) -> None:
        """Follow SPD and SAD changes: routes, SA contexts, held packets, keepalive peers.

        Called after every PF_KEY message, so under a running loop the work (which walks the
        whole SAD and SPD) is coalesced into one run at the next turn of the loop: a burst of
        PF_KEY messages read in one wake-up costs one walk, while a single change (an IKE
        responder installing its Child SA before it answers) is followed before the IKE
        daemon even reads the kernel's reply."""
        kernel = self.kernel
        if kernel.spd.generation == self._spd_gen and kernel.sad.generation == self._sad_gen \
                and not self._flush_due:
            return
        if self._loop is None:
            self._sync_now()
        elif self._sync_timer is None:
            self._sync_timer = self._loop.call_soon(self._sync_now)

    def _sync_now(self) -> None:
        self._sync_timer = None
        if self._syncing:
            return
        self._syncing = True
        try:
            kernel = self.kernel
            if kernel.spd.generation != self._spd_gen:
                self._spd_gen = kernel.spd.generation
                if self.routes is not None:
                    self.routes.sync(kernel.spd, self.table.local)
            if kernel.sad.generation != self._sad_gen:
                self._sad_gen = kernel.sad.generation
                self.table.refresh()
                self._follow_keepalive_peers()
                self._adapt_mtu()
                self._flush_due = True
            if self._flush_due:
                self._flush_due = bool(self.outbound is not None and self.outbound.held
                                       and not self.outbound.flush_held(self.clock()))
        finally:
            self._syncing = False

    def _adapt_mtu(self) -> None:
        """Size the TUN MTU by the overhead of the SAs in use rather than the worst case (AES-GCM
        in UDP over IPv4 adds at most 65 bytes, not 121), so that, e.g., 1400-byte packets
        cross a 1500-byte path whole. Only grows past the worst case's MTU while every SA
        allows it; Outbound still checks each packet against its own SA (ICMP PTB)."""
        netlink, tun = self.netlink, self.tun
        overheads = self.table.overheads
        if self._fixed_mtu or netlink is None or netlink.netconf is None or tun is None \
                or not overheads:
            return
        path = self.config.path_mtu
        overhead = max(overheads)
        try:
            mtu = tun_mtu(path, overhead, ipv6=path - overhead >= 1280)
        except ValueError:
            return
        if mtu == self.mtu:
            return
        try:
            netlink.call(netlink.netconf.setup_link, tun.name, (), mtu)
        except Exception as exc:  # keep the old MTU: still correct, only smaller
            log.warning("datapath: cannot set TUN MTU %d: %s", mtu, exc)
            return
        log.info("datapath: TUN %s mtu %d (SA overhead up to %d bytes)", tun.name, mtu,
                 overhead)
        self.mtu = mtu

    def tick(self, now: float) -> None:
        """Timer work: local address refresh, route retries, NAT keepalives."""
        if now - self._local_at >= LOCAL_REFRESH:
            self._local_at = now
            if self.routes is not None and self.routes.failed:
                self._spd_gen = -1  # retry refused routes even if the SPD stays as it is
            try:
                local = self._local()
            except OSError as exc:
                log.warning("datapath: cannot read local addresses: %s", exc)
            else:
                if local != self.table.local:
                    self.table.set_local(local)
                    self._spd_gen = self._sad_gen = -1  # re-route and re-index
        self.sync()
        outbound = self.outbound
        if outbound is None:
            return
        interval = self.config.keepalive_interval
        last_sent = outbound.last_sent
        for peer, sock in self._keepalive.peers.items():
            if now - last_sent.get(peer, now - interval) >= interval:
                last_sent[peer] = now
                if sock.send(NAT_KEEPALIVE, peer):
                    self.counters.keepalives_sent += 1

    def _follow_keepalive_peers(self) -> None:
        """Peers of UDP-encapsulated SAs (the far end of each; keepalives keep NATs open)."""
        added = self._keepalive.follow(self.kernel.sad, self.table.local, self.udp)
        if self.outbound is not None and added:
            now = self.clock()
            for peer in added:  # the first keepalive one interval after the SA came
                self.outbound.last_sent.setdefault(peer, now)

    def stats(self) -> dict[str, int]:
        """Global counters, plus the socket and TUN drop counters."""
        out = self.counters.as_dict()
        out["sa_contexts"] = len(self.table.contexts)
        out["held_packets"] = sum(len(q) for q in self.outbound.held.values()) \
            if self.outbound is not None else 0
        out["socket_tx_dropped"] = sum(s.stats.tx_dropped
                                       for s in (*self._udp_all, *self.raw.values()))
        out["socket_rx_dropped"] = sum(s.stats.rx_dropped
                                       for s in (*self._udp_all, *self.raw.values()))
        out["gso_sends"] = sum(s.stats.tx_gso_sends for s in self._udp_all)
        if self.tun is not None:
            out["tun_tx_dropped"] = self.tun.stats.tx_dropped
        if self.inbound is not None:
            writer = self.inbound.writer
            out["tun_write_errors"] += writer.errors
            out["tun_gso_writes"] = writer.gso_writes
            out["tun_gso_segments"] = writer.merged
        if self.routes is not None:
            out["route_errors"] = self.routes.errors
        if self.kernel_routes is not None:
            answers = self.kernel_routes.client.stats
            out["route_answers_lost"] = answers.lost  # receive buffer overruns: retried
            out["route_answers_bad"] = answers.malformed + answers.unexpected
        return out
