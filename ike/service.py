"""The IKE daemon: a thin asyncio adapter around the sans-IO `IkeSa` objects.

`IkeService(pfkey_path, config, natt_send=..., natt_register=...)` owns the UDP 500 sockets
(and UDP 4500 when no datapath lends its socket), one PF_KEY socket, and one `IkeSa` per IKE
SA. Datagrams are routed by our IKE SPI; a new IKE_SA_INIT request makes a responder for the
connection that matches its addresses. Events become PF_KEY work (`ike.keying`), run one at a
time in order; kernel EXPIREs become rekeys (soft) and deletes (hard), ACQUIREs on `trap`
policies start negotiations. Every log line names the IKE SA as name[uniqueid] with its SPIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ike.addresses import ip_literal, network_literal
from ike.config import IkeConfig
from ike.connections import (
    ChildConfig,
    ConnectionConfig,
    Connections,
    Identity,
    address_identity,
    format_identity,
    from_config,
)
from ike.constants import DhId, EncrId, ExchangeType, HeaderFlag, IntegId, PrfId
from ike.core import TERMINAL, ChildState, State
from ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    Event,
    IkeRekeyFailed,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaRekeyed,
    InitialContact,
    LivenessFailed,
    PeerNotify,
)
from ike.keying import Keying, KeyingError, PolicySet, SaParams, policy_selectors
from ike.lanes import JobLanes, KeyedLocks
from ike.payloads import TrafficSelector
from ike.pfkey_async import AsyncPfkey
from ike.sa import IkeSa
from ike.transforms import TransformSet
from userspace_ipsec.config import Config
from userspace_ipsec.pfkey.constants import ExtType, IpsecMode, MsgType
from userspace_ipsec.pfkey.messages import IPAddress, LifetimeExt, Message

log = logging.getLogger("ike")

Address = tuple[str, int]
NattSend = Callable[[bytes, Address, str], Any]
NattHandler = Callable[[bytes, Any, Any], None]
NattRegister = Callable[[NattHandler | None], None]

NON_ESP_MARKER = b"\x00\x00\x00\x00"
IKE_HEADER = 28
MAX_DATAGRAM = 65535
MAX_IKE_SAS = 10_000  # half-open and established: a bound against floods
MAX_HALF_OPEN = 1_000
STOP_GRACE = 2.0  # seconds to let deletes reach the peers on stop
IP_PKTINFO = 8  # Linux <netinet/in.h>; not exported by Python's socket module
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RECEIVE_BUFFER = 8 << 20  # bytes, for each UDP 500 / 4500 socket of ours
_IN_PKTINFO = struct.Struct("=i4s4s")
_IN6_PKTINFO = struct.Struct("=16si")


def _spi(spi: bytes) -> str:
    return spi.hex()


def _our_spi(sa: IkeSa) -> bytes:
    return sa.spi_i if sa.initiator else sa.spi_r


def suite_name(ts: TransformSet | None) -> str:
    """"AES_GCM_16_256/HMAC_SHA2_256/CURVE25519": the algorithms, for logs and status."""
    if ts is None:
        return "-"
    parts = [f"{EncrId(ts.encr).name}_{ts.encr_key_bits}"]
    if ts.integ:
        parts.append(IntegId(ts.integ).name)
    if ts.prf is not None:
        parts.append(PrfId(ts.prf).name)
    if ts.dh:
        parts.append(DhId(ts.dh).name)
    if ts.esn:
        parts.append("ESN")
    return "/".join(parts)


def ts_text(ts: list[TrafficSelector]) -> str:
    out = []
    for t in ts:
        nets = list(ipaddress.summarize_address_range(t.start_addr, t.end_addr))
        text = ",".join(str(n) for n in nets) if len(nets) <= 2 else \
            f"{t.start_addr}-{t.end_addr}"
        if t.ip_protocol or t.start_port or t.end_port != 65535:
            ports = "" if (t.start_port, t.end_port) == (0, 65535) else (
                f"/{t.start_port}" if t.start_port == t.end_port
                else f"/{t.start_port}-{t.end_port}")
            text += f"[{t.ip_protocol}{ports}]"
        out.append(text)
    return " ".join(out)


def _within(narrowed: list[TrafficSelector], configured: list[TrafficSelector]) -> bool:
    """Each narrowed selector lies inside one configured selector."""
    for n in narrowed:
        if not any(n.start_addr.version == c.start_addr.version
                   and int(c.start_addr) <= int(n.start_addr)
                   and int(n.end_addr) <= int(c.end_addr)
                   and (c.ip_protocol in (0, n.ip_protocol))
                   and c.start_port <= n.start_port and n.end_port <= c.end_port
                   for c in configured):
            return False
    return bool(narrowed)


@dataclass(slots=True)
class ChildRecord:
    """An installed Child SA pair and where it came from."""

    child: ChildConfig
    inbound_spi: bytes
    outbound_spi: bytes
    transforms: TransformSet
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    mode: IpsecMode
    reqid: int
    policy_key: tuple[Any, ...]
    params: SaParams
    installed_at: float
    rekey_at: float  # wall clock of the soft expiry


@dataclass(slots=True)
class IkeRecord:
    """One IKE SA as the daemon tracks it, across IKE SA rekeys (`sa` is the current one)."""

    uid: int
    conn: ConnectionConfig
    sa: IkeSa
    local_ip: str
    natt: bool = False  # IKE moved to the NAT-T port
    established_at: float | None = None
    rekey_at: float | None = None  # loop time of the next IKE SA rekey
    dpd_at: float | None = None
    children: dict[bytes, ChildRecord] = field(default_factory=dict)  # by inbound SPI
    larval: set[bytes] = field(default_factory=set)  # inbound SPIs from GETSPI
    spare: bytes | None = None  # GETSPI'd for the exchange being started, not yet taken
    deferred: int = 0  # datagrams waiting in the lane for a spare SPI (order is kept)
    rekeys_due: set[bytes] = field(default_factory=set)  # Child SAs whose rekey waits for one
    pending: list[ChildConfig] = field(default_factory=list)  # create once established
    liveness_failed: bool = False
    transforms: TransformSet | None = None  # of the IKE SA, once established
    remote_id: tuple[int, bytes] | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    routed: dict[bytes, IkeSa] = field(default_factory=dict)  # our SPI -> IKE SA, old ones too

    @property
    def name(self) -> str:
        sa = self.sa
        return f"{self.conn.name}[{self.uid}] {_spi(sa.spi_i)}_i {_spi(sa.spi_r)}_r"


class IkeServiceError(Exception):
    """A request the service cannot do; the message is for the user."""


class IkeService:
    def __init__(self, pfkey_path: Any, config: Config, *,
                 natt_send: NattSend | None = None,
                 natt_register: NattRegister | None = None,
                 connections: Connections | None = None) -> None:
        """`natt_send(message, peer, source)` sends IKE on the datapath's UDP 4500 socket (it adds
        the non-ESP marker); `natt_register(handler)` gives the datapath our
        `handle_natt(message, peer, local)`. Without them we bind UDP 4500 ourselves."""
        self.config = config
        self.connections = connections or from_config(config)
        self.pfkey = AsyncPfkey(pfkey_path, self._on_pfkey)
        self.keying = Keying(self.pfkey)
        self._natt_send = natt_send
        self._natt_register = natt_register
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socks: list[socket.socket] = []
        self._ike_socks: dict[int, socket.socket] = {}  # family -> UDP 500
        self._natt_socks: dict[int, socket.socket] = {}  # family -> own UDP 4500
        self._wildcard: set[socket.socket] = set()  # bound to any address: we pick the source
        self._routes: dict[bytes, tuple[IkeSa, IkeRecord]] = {}
        self._half_open: dict[tuple[bytes, Address], tuple[IkeSa, IkeRecord]] = {}
        self._records: dict[int, IkeRecord] = {}
        self._by_conn: dict[str, dict[int, IkeRecord]] = {}  # connection name -> its records
        self._uids = 0
        self._reqids: dict[tuple[str, str], int] = {}
        self._policies: dict[tuple[Any, ...], PolicySet] = {}
        self._traps: dict[tuple[str, str], tuple[Any, ...]] = {}  # (conn, child) -> policy key
        # Responder of a Child SA rekey: the new pair's outbound SA, by the old pair's inbound
        # SPI; added when the old pair goes (the peer's delete), as strongSwan does, because the
        # peer installs its new inbound SA only once it has our response.
        self._deferred_out: dict[bytes, tuple[ChildSaEstablished, SaParams]] = {}
        self._jobs = JobLanes()  # PF_KEY work: in order per IKE SA, concurrent across them
        self._policy_locks = KeyedLocks()  # a policy set's check and its PF_KEY requests
        self._tick: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.counters = {"datagrams_in": 0, "datagrams_out": 0, "dropped": 0,
                         "acquires": 0, "expires": 0}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.pfkey.open()
        await self.keying.register()
        settings = self.connections.settings
        try:
            for addr in settings.listen:
                self._bind(addr, settings.port, natt=False)
                if self._natt_send is None:
                    self._bind(addr, settings.natt_port, natt=True)
        except OSError:
            self._close_sockets()
            self.pfkey.close()
            raise
        if self._natt_register is not None:
            self._natt_register(self.handle_natt)
        self._tick = asyncio.create_task(self._ticker())
        log.info("ike: listening on %s port %d%s", ", ".join(settings.listen), settings.port,
                 "" if self._natt_send else f" and {settings.natt_port}")
        await self._apply_start_actions(list(self.connections.connections.values()))

    async def close(self) -> None:
        """Delete every IKE SA (telling the peers), then everything installed in the kernel."""
        for rec in list(self._records.values()):
            self._down(rec)
        deadline = time.monotonic() + STOP_GRACE
        while self._records and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rec in list(self._records.values()):
            self._forget(rec, "daemon stopping")
        await self._jobs.join()
        for key in list(self._policies):
            policy_set = self._policies.pop(key)
            await self._safely(self.keying.delete_policies(policy_set.ids))
        self._traps.clear()
        if self._natt_register is not None:
            self._natt_register(None)
        await self._jobs.cancel()
        for task in (self._tick,):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._close_sockets()
        self.pfkey.close()
        log.info("ike: stopped")

    def _close_sockets(self) -> None:
        loop = self._loop
        for sock in self._socks:
            if loop is not None:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
        self._ike_socks.clear()
        self._natt_socks.clear()
        self._wildcard.clear()

    def _bind(self, addr: str, port: int, natt: bool) -> None:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _grow_receive_buffer(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        if self._natt_send is not None:
            # With a datapath: IKE bypasses its routes into the TUN like its own ESP sockets do,
            # or a transport-mode or host-to-host policy would catch the IKE datagrams too.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.config.datapath.fwmark)
            except OSError as exc:
                log.warning("ike: SO_MARK on the IKE socket: %s (IKE may enter the tunnel)", exc)
        try:
            sock.bind((addr, port))
        except OSError:
            sock.close()
            raise
        self._socks.append(sock)
        if addr in ("0.0.0.0", "::"):
            self._wildcard.add(sock)
        (self._natt_socks if natt else self._ike_socks).setdefault(family, sock)
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._readable, sock, natt)

    # -- receiving ---------------------------------------------------------------------------

    def _readable(self, sock: socket.socket, natt: bool) -> None:
        for _ in range(256):
            try:
                data, anc, _flags, src = sock.recvmsg(MAX_DATAGRAM, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("ike: recvmsg: %s", exc)
                return
            local = _pktinfo_dst(anc) or sock.getsockname()[0]
            if natt:
                if data[:4] != NON_ESP_MARKER:
                    self.counters["dropped"] += 1  # ESP or keepalive: no datapath here
                    continue
                data = data[4:]
            self.receive(data, (src[0], src[1]), (local, sock.getsockname()[1]), natt)

    def handle_natt(self, message: bytes, peer: Any, local: Any) -> None:
        """IKE from the datapath's UDP 4500 socket (marker already stripped)."""
        self.receive(bytes(message), (str(peer[0]), int(peer[1])),
                     (str(local[0]), int(local[1])), True)

    def receive(self, data: bytes, src: Address, local: Address, natt: bool) -> None:
        """One IKE datagram from `src` to our `local` address."""
        self.counters["datagrams_in"] += 1
        if len(data) < IKE_HEADER:
            self.counters["dropped"] += 1
            return
        spi_i, spi_r = data[0:8], data[8:16]
        exchange, flags = data[18], data[19]
        from_initiator = bool(flags & HeaderFlag.INITIATOR)
        if from_initiator and spi_r == bytes(8):
            if exchange != ExchangeType.IKE_SA_INIT or flags & HeaderFlag.RESPONSE:
                self.counters["dropped"] += 1
                return
            entry = self._half_open.get((spi_i, src)) or self._new_responder(spi_i, src, local)
        else:
            entry = self._routes.get(spi_r if from_initiator else spi_i)
        if entry is None:
            self.counters["dropped"] += 1
            return
        sa, rec = entry
        if rec.deferred or sa.awaiting_child_spi or (
                not flags & HeaderFlag.RESPONSE and sa.state is not State.IDLE and (
                    exchange == ExchangeType.CREATE_CHILD_SA or
                    (exchange == ExchangeType.IKE_AUTH and not sa.initiator))):
            # A request that may create a Child SA, or the IKE_SA_INIT answer after which we
            # offer the first one: its inbound SPI comes from GETSPI, a PF_KEY round trip, so
            # the datagram waits for it in the IKE SA's lane (and so does what comes after it,
            # to keep the order).
            rec.deferred += 1
            self._enqueue(rec, functools.partial(self._receive_later, sa, rec, data, src,
                                                 spi_i, natt))
            return
        self._process(sa, rec, data, src, spi_i, natt)

    async def _receive_later(self, sa: IkeSa, rec: IkeRecord, data: bytes, src: Address,
                             spi_i: bytes, natt: bool) -> None:
        try:
            await self._using_spare(rec, lambda: self._process(sa, rec, data, src, spi_i, natt))
        finally:
            rec.deferred -= 1

    def _process(self, sa: IkeSa, rec: IkeRecord, data: bytes, src: Address, spi_i: bytes,
                 natt: bool) -> None:
        now = self._now()
        drops = sa.drops
        moved = src != sa.remote_addr and sa.state not in (State.IDLE,)
        sa.receive_datagram(data, src, now)
        if natt and not rec.natt and sa.drops == drops:
            rec.natt = True  # the peer floated to 4500 (RFC 7296 2.23)
        if moved and sa.drops == drops and sa.state not in TERMINAL:
            self._peer_moved(rec, sa, src)
        if sa.state is State.IDLE and not sa.initiator:
            self._half_open.pop((spi_i, src), None)  # answered statelessly (cookie, INVALID_KE)
            self._drop_record(rec)
            return
        if not sa.initiator and sa.spi_r != bytes(8) and sa.spi_r not in self._routes:
            self._half_open.pop((spi_i, src), None)
            self._route(sa.spi_r, sa, rec)
        self._pump(sa, rec)

    def _peer_moved(self, rec: IkeRecord, sa: IkeSa, src: Address) -> None:
        """A verified message from a new address: the NAT mapping changed (RFC 7296 2.23).
        The Child SAs follow; on a new address (not only a new port) their policies too."""
        old = sa.remote_addr
        sa.remote_addr = src
        log.info("ike: %s peer moved from %s:%d to %s:%d", rec.name, old[0], old[1], *src)
        for child in rec.children.values():
            if child.params.remote_port != src[1] or str(child.params.remote) != src[0]:
                self._enqueue(rec, functools.partial(self._migrate, rec, child, src))
        for key in {c.policy_key for c in rec.children.values() if c.policy_key[6] != src[0]}:
            # Users now, not when the job runs: a Child SA deleted meanwhile (the old pair of a
            # rekey) still gives its reference back, and must find the set by its new key.
            users = [(r, c) for r in self._records.values() for c in r.children.values()
                     if c.policy_key == key]
            self._enqueue(rec, functools.partial(
                self._move_policies, rec, key, users, ipaddress.ip_address(src[0])))

    async def _migrate(self, rec: IkeRecord, child: ChildRecord, src: Address) -> None:
        """Re-add the pair with the peer's new address/port (PF_KEY cannot change a mature SA)."""
        if rec.children.get(child.inbound_spi) is not child:
            return  # deleted while this waited: its uninstall follows in this lane
        p = child.params
        try:
            ok = await self.keying.move_peer(child.inbound_spi, child.outbound_spi, p,
                                             ipaddress.ip_address(src[0]), src[1])
        except KeyingError as exc:
            log.error("ike: %s %s: SAs %s/%s not moved to %s:%d: %s", rec.name,
                      child.child.name, _spi(child.inbound_spi), _spi(child.outbound_spi),
                      *src, exc)
            return
        if not ok and any(ev.inbound_spi == child.inbound_spi
                          for ev, _ in self._deferred_out.values()):
            # Responder of a rekey: the inbound SA moved, the outbound one is added only when
            # the old pair goes, with these (shared) parameters: it must go to the new address.
            p.remote, p.remote_port = ipaddress.ip_address(src[0]), src[1]
            log.info("ike: %s %s: SA %s follows the peer to %s:%d", rec.name,
                     child.child.name, _spi(child.inbound_spi), *src)
            return  # the pair it replaces goes soon; its own outbound SA starts afresh
        if not ok:
            return  # an SA was gone: the Child SA is going away
        log.info("ike: %s %s: SAs %s/%s follow the peer to %s:%d, rekeying", rec.name,
                 child.child.name, _spi(child.inbound_spi), _spi(child.outbound_spi), *src)
        # PF_KEY cannot change a mature SA: the re-added outbound SA starts its sequence numbers
        # over, and the peer's replay window drops what it sends until it passes the old ones.
        # strongSwan's kernel-pfkey refuses such updates and strongSwan then rekeys the Child
        # SA; so do we (a rekey already under way, or a pair being replaced, is left alone).
        if not any(c.inbound_spi == child.inbound_spi and c.state is ChildState.INSTALLED
                   for c in rec.sa.child_sas):
            return  # being rekeyed or deleted already: nothing to do, no SPI to ask for

        def rekey() -> None:
            try:
                rec.sa.rekey_child(child.inbound_spi, self._now())
            except (ValueError, RuntimeError) as exc:
                log.warning("ike: %s %s: no rekey after the move: %s", rec.name,
                            child.child.name, exc)
                return
            self._pump(rec.sa, rec)
        await self._using_spare(rec, rekey)

    async def _move_policies(self, rec: IkeRecord, old_key: tuple[Any, ...],
                             users: list[tuple[IkeRecord, ChildRecord]],
                             remote: IPAddress) -> None:
        """The policy set `old_key` follows the peer to `remote`, as strongSwan's
        child_sa update does: tunnel mode points the templates at the new endpoint
        (X_SPDUPDATE keeps the policy ids); transport mode has no endpoints, but a selector
        that was the peer's old address (a "dynamic" one) becomes the new address. The set
        moves to its new key with its references; its users and traps follow it."""
        mode: IpsecMode = old_key[2]
        local_ts: tuple[TrafficSelector, ...] = old_key[3]
        old_ts: tuple[TrafficSelector, ...] = old_key[4]
        old_remote = ipaddress.ip_address(old_key[6])
        remote_ts = old_ts
        if mode is IpsecMode.TRANSPORT:
            remote_ts = tuple(_follow_host(ts, old_remote, remote) for ts in old_ts)
        new_key = (*old_key[:4], remote_ts, old_key[5], str(remote))
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted((old_key, new_key), key=repr):  # one order: no deadlock
                await stack.enter_async_context(self._policy_locks.hold(key))
            policy_set = self._policies.get(old_key)
            if policy_set is None:
                return  # its users are all gone (the IKE SA ended meanwhile)
            local = ipaddress.ip_address(old_key[5])
            try:
                if mode is IpsecMode.TUNNEL:
                    ids = await self.keying.update_policies(
                        policy_selectors(list(local_ts), list(old_ts)), local, remote, mode,
                        policy_set.reqid)
                elif remote_ts != old_ts:  # new selectors: add them, then drop the old ones
                    ids = await self.keying.add_policies(
                        policy_selectors(list(local_ts), list(remote_ts)), local, remote, mode,
                        policy_set.reqid)
                    await self.keying.delete_policies(policy_set.ids)
                else:
                    ids = policy_set.ids
                    if not any(_ts_covers(ts, remote) for ts in remote_ts):
                        log.warning("ike: %s transport-mode policies (%s === %s) do not cover "
                                    "the peer's new address %s: its traffic there is not "
                                    "protected, and what goes to %s finds no SA", rec.name,
                                    ts_text(list(local_ts)), ts_text(list(old_ts)), remote,
                                    old_remote)
            except (KeyingError, ValueError) as exc:
                log.error("ike: %s policies %s === %s still name the peer's old address %s, "
                          "its traffic finds no SA: %s", rec.name, ts_text(list(local_ts)),
                          ts_text(list(old_ts)), old_remote, exc)
                return
            policy_set.ids = ids
            del self._policies[old_key]
            merged = self._policies.get(new_key)
            if merged is not None:  # cannot share SPD entries; keep the bookkeeping whole
                log.warning("ike: %s policies for %s were already installed", rec.name, remote)
                merged.refs += policy_set.refs
                merged.trap = merged.trap or policy_set.trap
            else:
                self._policies[new_key] = policy_set
            self._rename_policy_users(rec, old_key, new_key, users)
        log.info("ike: %s policies %s === %s (%d) follow the peer from %s to %s", rec.name,
                 ts_text(list(local_ts)), ts_text(list(remote_ts)), len(ids), old_remote,
                 remote)

    def _rename_policy_users(self, rec: IkeRecord, old_key: tuple[Any, ...],
                             new_key: tuple[Any, ...],
                             users: list[tuple[IkeRecord, ChildRecord]]) -> None:
        remote_ts: tuple[TrafficSelector, ...] = new_key[4]
        for owner, child in users:
            if child.policy_key != old_key:
                continue
            child.policy_key = new_key
            if remote_ts != old_key[4]:  # transport mode: a rekey proposes the new address
                child.remote_ts = list(remote_ts)
                for core in owner.sa.child_sas:
                    if core.inbound_spi == child.inbound_spi:
                        core.remote_ts = list(remote_ts)
            if owner is not rec:  # the SPD holds one policy per selector: it moves for both
                log.warning("ike: %s Child SA %s of %s shares the policies that moved",
                            rec.name, _spi(child.inbound_spi), owner.name)
        for trap, key in self._traps.items():
            if key == old_key:
                self._traps[trap] = new_key

    def _new_responder(self, spi_i: bytes, src: Address,
                       local: Address) -> tuple[IkeSa, IkeRecord] | None:
        if len(self._half_open) >= MAX_HALF_OPEN or len(self._records) >= MAX_IKE_SAS:
            return None
        candidates = [c for c in self.connections.connections.values()
                      if c.matches_local(local[0]) and c.matches_remote(src[0])]
        if not candidates:
            log.info("ike: IKE_SA_INIT from %s:%d to %s: no connection matches", *src, local[0])
            return None
        # IKE_SA_INIT goes by address (the first match's proposals); IKE_AUTH then picks the
        # connection by the identities, among those that match the addresses.
        conn = candidates[0]
        config = self._ike_config(conn, list(conn.children.values()), local[0], src[0],
                                  responder=True)

        def peer_config(idi: Identity, idr: Identity | None) -> IkeConfig | None:
            chosen = _by_identity(candidates, idi, idr)
            if chosen is None:
                log.info("ike: %s: no connection for peer identity %s", rec.name,
                         format_identity(idi))
                return None
            if chosen is not rec.conn:
                self._regroup(rec, chosen)
            return self._ike_config(chosen, list(chosen.children.values()), local[0], src[0],
                                    responder=True)

        sa = IkeSa(config, initiator=False, local_addr=local, remote_addr=src, child_spi=b"",
                   spi_allocator=lambda: self._take_spare(rec), peer_config=peer_config)
        rec = self._new_record(conn, sa, local[0])
        self._half_open[(spi_i, src)] = (sa, rec)
        return sa, rec

    # -- sending and timers ------------------------------------------------------------------

    def _pump(self, sa: IkeSa, rec: IkeRecord) -> None:
        """After any input: send what the SA wants sent, handle its events, re-arm timers.

        When a Child SA was just negotiated, what goes out (our IKE_AUTH or CREATE_CHILD_SA
        response, the delete of the SA a rekey replaces) waits in the PF_KEY queue until the
        SAs are installed: the peer uses the new SA as soon as it has our message, and ESP
        that arrives before its SA would be dropped (strongSwan also installs first)."""
        now = self._now()
        self._float_if_needed(sa, rec)
        datagrams = sa.datagrams_to_send(now)
        events: list[Event] = []
        for _ in range(10_000):
            event = sa.next_event()
            if event is None:
                break
            events.append(event)
        installs = any(isinstance(e, ChildSaEstablished) for e in events)
        if not installs:
            self._send_all(rec, datagrams)
        for event in events:
            self._on_event(sa, rec, event)
        if installs and datagrams:
            async def send_installed() -> None:
                self._send_all(rec, datagrams)

            self._enqueue(rec, send_installed)
        self._arm(rec)

    def _send_all(self, rec: IkeRecord, datagrams: list[tuple[bytes, Address]]) -> None:
        for data, addr in datagrams:
            self._send(rec, data, addr)

    def _float_if_needed(self, sa: IkeSa, rec: IkeRecord) -> None:
        """Initiator: after IKE_SA_INIT, move to port 4500 if a NAT is seen or encap forced."""
        if rec.natt or not sa.initiator or sa.state is State.IDLE or \
                sa.state is State.INIT_SENT:
            return
        if sa.local_behind_nat or sa.remote_behind_nat or rec.conn.encap:
            rec.natt = True
            natt_port = self.connections.settings.natt_port
            if sa.remote_addr[1] == rec.conn.remote_port != natt_port:
                sa.remote_addr = (sa.remote_addr[0], natt_port)
            log.info("ike: %s NAT %s, switching to port %d", rec.name,
                     "detected" if sa.local_behind_nat or sa.remote_behind_nat else "forced",
                     sa.remote_addr[1])

    def _send(self, rec: IkeRecord, data: bytes, addr: Address) -> None:
        self.counters["datagrams_out"] += 1
        if rec.natt:
            addr = rec.sa.remote_addr if addr[0] == rec.sa.remote_addr[0] else addr
            if self._natt_send is not None:
                self._natt_send(data, addr, rec.local_ip)  # from the IKE SA's address
                return
            self._sendto(self._natt_socks, NON_ESP_MARKER + data, addr, rec.local_ip)
            return
        self._sendto(self._ike_socks, data, addr, rec.local_ip)

    def _sendto(self, socks: dict[int, socket.socket], data: bytes, addr: Address,
                source: str) -> None:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = socks.get(family)
        if sock is None:
            log.warning("ike: no socket for %s", addr[0])
            return
        anc = []
        if source and sock in self._wildcard:
            try:
                packed = ip_literal(source).packed
                if family == socket.AF_INET:
                    anc = [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, packed, bytes(4)))]
                else:
                    anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                            _IN6_PKTINFO.pack(packed, 0))]
            except ValueError:
                anc = []
        try:
            sock.sendmsg([data], anc, 0, addr)
        except OSError as exc:
            log.warning("ike: send to %s:%d failed: %s", addr[0], addr[1], exc)

    def _arm(self, rec: IkeRecord) -> None:
        """Wake up for the record's next deadline. A timer already set for an earlier time is
        kept (it finds nothing due and re-arms): most messages push a deadline out (a reply
        ends a retransmission), and replacing a loop timer per message costs more."""
        times = [t for t in (rec.sa.get_timer(), rec.dpd_at, rec.rekey_at) if t is not None]
        times += [t for old in self._old_sas(rec) if (t := old.get_timer()) is not None]
        if not times or self._loop is None:
            return
        when = min(times)
        if rec.timer is not None:
            if rec.timer.when() <= when:
                return
            rec.timer.cancel()
        rec.timer = self._loop.call_at(when, self._on_timer, rec)

    def _old_sas(self, rec: IkeRecord) -> list[IkeSa]:
        return [sa for sa in rec.routed.values() if sa is not rec.sa]

    def _route(self, spi: bytes, sa: IkeSa, rec: IkeRecord) -> None:
        """Datagrams with our SPI ``spi`` go to ``sa`` of ``rec``."""
        self._routes[spi] = (sa, rec)
        rec.routed[spi] = sa

    def _unroute(self, spi: bytes) -> None:
        entry = self._routes.pop(spi, None)
        if entry is not None:
            entry[1].routed.pop(spi, None)

    def _on_timer(self, rec: IkeRecord) -> None:
        rec.timer = None
        now = self._now()
        sa = rec.sa
        for old in self._old_sas(rec):
            old.handle_timer(now)
            self._pump(old, rec)
        if sa.state is State.ESTABLISHED:
            if rec.dpd_at is not None and now >= rec.dpd_at:
                rec.dpd_at = now + rec.conn.dpd_delay
                sa.check_liveness(now)
            if rec.rekey_at is not None and now >= rec.rekey_at:
                rec.rekey_at = None
                log.info("ike: %s rekeying the IKE SA", rec.name)
                sa.rekey_ike(now)
        sa.handle_timer(now)
        self._pump(sa, rec)

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    async def _ticker(self) -> None:
        """Timers are armed per IKE SA; this only backs them up against a lost wake-up."""
        while True:
            await asyncio.sleep(5.0)
            for rec in list(self._records.values()):
                if rec.timer is None:
                    self._arm(rec)

    # -- records -----------------------------------------------------------------------------

    def _new_record(self, conn: ConnectionConfig, sa: IkeSa, local_ip: str) -> IkeRecord:
        self._uids += 1
        rec = IkeRecord(self._uids, conn, sa, local_ip)
        self._records[rec.uid] = rec
        self._by_conn.setdefault(conn.name, {})[rec.uid] = rec
        return rec

    def _regroup(self, rec: IkeRecord, conn: ConnectionConfig) -> None:
        """The responder's record belongs to another connection (chosen by identity)."""
        same = self._by_conn.get(rec.conn.name)
        if same is not None:
            same.pop(rec.uid, None)
            if not same:
                del self._by_conn[rec.conn.name]
        rec.conn = conn
        self._by_conn.setdefault(conn.name, {})[rec.uid] = rec

    def _records_of(self, name: str) -> list[IkeRecord]:
        return list(self._by_conn.get(name, {}).values())

    # -- inbound SPIs: GETSPI ahead of the exchange that needs one ---------------------------

    def _take_spare(self, rec: IkeRecord) -> bytes:
        """The core's SPI allocator: the SPI GETSPI'd for the exchange being started, else (an
        exchange that had to wait for the window of one, or GETSPI failed) a random one, which
        the install ADDs."""
        spi, rec.spare = rec.spare, None
        return spi or _random_spi()

    async def _using_spare(self, rec: IkeRecord, use: Callable[[], None]) -> None:
        """GETSPI a larval SPI, run ``use`` (which may make the core start an exchange that
        takes it), and delete it again if nothing took it (an IKE SA rekey, a refusal)."""
        local, remote = ip_literal(rec.local_ip), ip_literal(rec.sa.remote_addr[0])
        try:
            value = await self.keying.getspi(local, remote, IpsecMode.ANY, 0)
        except (KeyingError, OSError) as exc:
            log.warning("ike: %s: GETSPI failed (%s): a random SPI will do", rec.name, exc)
        else:
            rec.spare = value.to_bytes(4, "big")
            rec.larval.add(rec.spare)
        try:
            if rec.uid in self._records:
                use()
        finally:
            spi, rec.spare = rec.spare, None
            if spi is not None:
                rec.larval.discard(spi)
                await self._safely(self.keying.delete_sa(remote, local,
                                                         int.from_bytes(spi, "big")))

    def _with_spare(self, rec: IkeRecord, start: Callable[[], None]) -> None:
        """Run ``start`` (which makes the core ask for a Child SA) with a GETSPI'd SPI at hand,
        in the IKE SA's lane; ``start`` copes with an SA no longer established."""
        def use() -> None:
            start()
            self._pump(rec.sa, rec)
        self._enqueue(rec, functools.partial(self._using_spare, rec, use))

    def _drop_record(self, rec: IkeRecord) -> None:
        self._records.pop(rec.uid, None)
        same = self._by_conn.get(rec.conn.name)
        if same is not None:
            same.pop(rec.uid, None)
            if not same:
                del self._by_conn[rec.conn.name]
        for spi in list(rec.routed):
            self._unroute(spi)
        for key in [k for k, (_, r) in self._half_open.items() if r is rec]:
            del self._half_open[key]
        if rec.timer is not None:
            rec.timer.cancel()
            rec.timer = None
        rec.gone.set()

    def _forget(self, rec: IkeRecord, reason: str) -> None:
        """Drop an IKE SA without the peer's word: uninstall its Child SAs."""
        for child in list(rec.children.values()):
            self._child_gone(rec, child.inbound_spi, child.outbound_spi, reason)
        self._drop_record(rec)

    def _reqid(self, conn: str, child: str) -> int:
        reqid = self._reqids.get((conn, child))
        if reqid is None:
            reqid = len(self._reqids) + 1
            self._reqids[(conn, child)] = reqid
        return reqid

    def _ike_config(self, conn: ConnectionConfig, children: list[ChildConfig], local: str,
                    remote: str, responder: bool = False) -> IkeConfig:
        first = children[0]
        if responder:
            # The responder narrows against all its children (then maps the result back).
            local_ts = [ts for c in children for ts in c.selectors(True, local)]
            remote_ts = [ts for c in children for ts in c.selectors(False, remote)]
        else:
            local_ts, remote_ts = first.selectors(True, local), first.selectors(False, remote)
        return IkeConfig(local_id=conn.local_id or address_identity(local), psk=conn.psk,
                         ike_proposals=list(conn.proposals),
                         esp_proposals=list(first.esp_proposals), local_ts=local_ts,
                         remote_ts=remote_ts, remote_id=conn.remote_id,
                         transport_mode=first.mode == "transport",
                         retransmit_timeout=self.connections.settings.retransmit_timeout,
                         retransmit_tries=self.connections.settings.retransmit_tries)

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, sa: IkeSa, rec: IkeRecord, event: Event) -> None:
        if isinstance(event, IkeSaEstablished):
            self._on_established(sa, rec, event)
        elif isinstance(event, ChildSaEstablished):
            self._enqueue(rec, lambda: self._install(sa, rec, event))
        elif isinstance(event, ChildSaDeleted):
            self._child_gone(rec, event.inbound_spi, event.outbound_spi, event.reason)
        elif isinstance(event, ChildSaFailed):
            log.warning("ike: %s Child SA %s: %s", rec.name,
                        "rekey failed" if event.rekey_of else "not created", event.reason)
        elif isinstance(event, IkeSaRekeyed):
            self._on_ike_rekeyed(sa, rec, event)
        elif isinstance(event, IkeRekeyFailed):
            log.warning("ike: %s IKE SA rekey failed: %s", rec.name, event.reason)
            rec.rekey_at = self._now() + 60.0
        elif isinstance(event, LivenessFailed):
            rec.liveness_failed = True
            log.warning("ike: %s peer not responding (DPD)", rec.name)
        elif isinstance(event, InitialContact):
            self._initial_contact(rec, event)
        elif isinstance(event, PeerNotify):
            log.info("ike: %s peer notify %d (protocol %d, SPI %s)", rec.name,
                     event.notify_type, event.protocol, _spi(event.spi))
        elif isinstance(event, (IkeSaDeleted, IkeSaFailed)):
            self._on_ike_end(sa, rec, event)

    def _on_established(self, sa: IkeSa, rec: IkeRecord, ev: IkeSaEstablished) -> None:
        now = self._now()
        rec.established_at = time.time()
        rec.transforms, rec.remote_id = ev.transforms, ev.remote_id
        conn = rec.conn
        if conn.dpd_delay:
            rec.dpd_at = now + conn.dpd_delay
        if conn.rekey_time:
            rec.rekey_at = now + conn.rekey_time - random.uniform(0, conn.jitter)
        nat = ("local behind NAT" if ev.local_behind_nat else "") + \
            (" remote behind NAT" if ev.remote_behind_nat else "")
        log.info("ike: %s established with %s (%s:%d), %s%s", rec.name,
                 format_identity(ev.remote_id), *sa.remote_addr, suite_name(ev.transforms),
                 f", {nat.strip()}" if nat else "")
        for child in rec.pending:
            self._create_child(rec, child)
        rec.pending.clear()

    def _create_child(self, rec: IkeRecord, child: ChildConfig) -> None:
        def start() -> None:
            sa = rec.sa
            try:
                sa.create_child(self._now(), local_ts=child.selectors(True, rec.local_ip),
                                remote_ts=child.selectors(False, sa.remote_addr[0]),
                                transport_mode=child.mode == "transport")
            except (RuntimeError, ValueError) as exc:
                log.warning("ike: %s %s: cannot create: %s", rec.name, child.name, exc)
        self._with_spare(rec, start)

    def _on_ike_rekeyed(self, sa: IkeSa, rec: IkeRecord, ev: IkeSaRekeyed) -> None:
        old_name = rec.name
        rec.sa = ev.new_sa
        self._route(_our_spi(ev.new_sa), ev.new_sa, rec)
        if ev.redundant_sa is not None:
            self._route(_our_spi(ev.redundant_sa), ev.redundant_sa, rec)
        if rec.conn.rekey_time:
            rec.rekey_at = self._now() + rec.conn.rekey_time - random.uniform(0, rec.conn.jitter)
        log.info("ike: %s rekeyed into %s", old_name, rec.name)
        self._pump(ev.new_sa, rec)
        if ev.redundant_sa is not None:
            self._pump(ev.redundant_sa, rec)

    def _on_ike_end(self, sa: IkeSa, rec: IkeRecord, ev: IkeSaDeleted | IkeSaFailed) -> None:
        if sa is not rec.sa:  # a superseded or redundant IKE SA: only unroute it
            self._unroute(_our_spi(sa))
            log.info("ike: %s old IKE SA %s_i %s_r gone (%s)", rec.name, _spi(sa.spi_i),
                     _spi(sa.spi_r), ev.reason)
            return
        level = logging.INFO if isinstance(ev, IkeSaDeleted) else logging.WARNING
        log.log(level, "ike: %s %s: %s", rec.name,
                "deleted" if isinstance(ev, IkeSaDeleted) else "failed", ev.reason)
        for child in list(rec.children.values()):
            self._child_gone(rec, child.inbound_spi, child.outbound_spi, ev.reason)
        self._drop_record(rec)
        if rec.conn.name not in self.connections.connections:
            return  # removed by a reload
        if rec.liveness_failed:
            self._after_loss(rec, {c.name: c.dpd_action for c in rec.conn.children.values()})
        elif isinstance(ev, IkeSaDeleted) and "peer" in ev.reason:
            self._after_loss(rec, {c.name: c.close_action for c in rec.conn.children.values()})

    def _after_loss(self, rec: IkeRecord, actions: dict[str, str]) -> None:
        """dpd_action / close_action: restart renegotiates, trap waits for traffic."""
        conn = rec.conn
        for child_name, action in actions.items():
            if action == "trap" and (conn.name, child_name) not in self._traps:
                self._spawn(self._install_trap(conn, conn.children[child_name]))
        if any(a in ("restart", "start") for a in actions.values()):
            log.info("ike: %s restarting", conn.name)
            self._spawn(self.initiate(conn.name))

    def _initial_contact(self, rec: IkeRecord, ev: InitialContact) -> None:
        for other in self._records_of(rec.conn.name):
            if other is rec or other.sa.remote_id != ev.remote_id:
                continue
            log.info("ike: %s INITIAL_CONTACT from %s: dropping %s", rec.name,
                     format_identity(ev.remote_id), other.name)
            self._forget(other, "replaced (INITIAL_CONTACT)")

    # -- PF_KEY work -------------------------------------------------------------------------

    def _enqueue(self, rec: IkeRecord, job: Callable[[], Awaitable[None]]) -> None:
        """PF_KEY work for ``rec``: after its earlier work, alongside other IKE SAs' work."""
        self._jobs.put(rec.uid, job)

    @staticmethod
    async def _safely(coro: Awaitable[Any]) -> None:
        try:
            await coro
        except (KeyingError, OSError) as exc:
            log.warning("ike: %s", exc)

    def _child_config_for(self, rec: IkeRecord, ev: ChildSaEstablished) -> ChildConfig | None:
        if ev.rekey_of is not None:
            old = rec.children.get(ev.rekey_of)
            if old is not None:
                return old.child
        remote_ip = rec.sa.remote_addr[0]
        for child in rec.conn.children.values():
            if _within(ev.local_ts, child.selectors(True, rec.local_ip)) and \
                    _within(ev.remote_ts, child.selectors(False, remote_ip)) and \
                    (child.mode == "transport") == ev.transport_mode:
                return child
        return None

    def _params(self, rec: IkeRecord, child: ChildConfig, mode: IpsecMode) -> SaParams:
        sa = rec.sa
        settings = self.connections.settings
        soft = 0
        if child.rekey_time:
            soft = max(1, int(child.rekey_time - random.uniform(0, child.jitter)))
        return SaParams(
            ip_literal(rec.local_ip), ip_literal(sa.remote_addr[0]), mode,
            self._reqid(rec.conn.name, child.name),
            settings.natt_port if rec.natt else settings.port,
            sa.remote_addr[1], rec.natt, child.replay_window, soft, int(child.life_time))

    async def _install(self, sa: IkeSa, rec: IkeRecord, ev: ChildSaEstablished) -> None:
        child = self._child_config_for(rec, ev)
        if child is None:
            log.error("ike: %s Child SA %s/%s matches no child config (%s === %s): deleting",
                      rec.name, _spi(ev.inbound_spi), _spi(ev.outbound_spi),
                      ts_text(ev.local_ts), ts_text(ev.remote_ts))
            self._request_delete_child(rec, ev.inbound_spi)
            return
        mode = IpsecMode.TRANSPORT if ev.transport_mode else IpsecMode.TUNNEL
        params = self._params(rec, child, mode)
        try:
            selectors = policy_selectors(ev.local_ts, ev.remote_ts)
            defer = not ev.initiated and ev.rekey_of is not None and ev.rekey_of in rec.children
            await self.keying.install_child(ev, params, ev.inbound_spi in rec.larval,
                                            outbound=not defer)
            if defer and ev.rekey_of is not None:
                self._deferred_out[ev.rekey_of] = (ev, params)
            rec.larval.discard(ev.inbound_spi)
            key = (rec.conn.name, child.name, mode, tuple(ev.local_ts), tuple(ev.remote_ts),
                   str(params.local), str(params.remote))
            async with self._policy_locks.hold(key):
                policy_set = self._policies.get(key)
                if policy_set is None:
                    ids = await self.keying.add_policies(selectors, params.local, params.remote,
                                                         mode, params.reqid)
                    policy_set = self._policies[key] = PolicySet(params.reqid, ids)
                policy_set.refs += 1
        except (KeyingError, ValueError) as exc:
            log.error("ike: %s %s: Child SA %s/%s not installed: %s", rec.name, child.name,
                      _spi(ev.inbound_spi), _spi(ev.outbound_spi), exc)
            await self._safely(self._delete_pair(params, ev.inbound_spi, ev.outbound_spi))
            self._request_delete_child(rec, ev.inbound_spi)
            return
        rec.children[ev.inbound_spi] = ChildRecord(
            child, ev.inbound_spi, ev.outbound_spi, ev.transforms, list(ev.local_ts),
            list(ev.remote_ts), mode, params.reqid, key, params, time.time(),
            time.time() + params.soft if params.soft else 0.0)
        if rec.uid not in self._records:  # the IKE SA ended while we installed
            self._child_gone(rec, ev.inbound_spi, ev.outbound_spi, "IKE SA gone")
            return
        log.info("ike: %s %s: Child SA installed, SPIs %s_i %s_o, %s, %s === %s%s%s",
                 rec.name, child.name, _spi(ev.inbound_spi), _spi(ev.outbound_spi),
                 suite_name(ev.transforms), ts_text(ev.local_ts), ts_text(ev.remote_ts),
                 ", UDP-encapsulated" if params.encap else "",
                 f", rekeys {_spi(ev.rekey_of)}" if ev.rekey_of else "")

    def _request_delete_child(self, rec: IkeRecord, inbound_spi: bytes) -> None:
        try:
            rec.sa.delete_child(inbound_spi, self._now())
        except (ValueError, RuntimeError):
            return
        self._pump(rec.sa, rec)

    async def _delete_pair(self, p: SaParams, inbound: bytes, outbound: bytes) -> None:
        await self.keying.delete_sa(p.remote, p.local, int.from_bytes(inbound, "big"))
        await self.keying.delete_sa(p.local, p.remote, int.from_bytes(outbound, "big"))

    def _child_gone(self, rec: IkeRecord, inbound: bytes, outbound: bytes, reason: str) -> None:
        child = rec.children.pop(inbound, None)
        if child is None:
            return  # never installed (or its install is still queued: it checks the record)
        log.info("ike: %s %s: Child SA %s_i %s_o deleted (%s)", rec.name, child.child.name,
                 _spi(inbound), _spi(outbound), reason)
        successor = self._deferred_out.pop(inbound, None)
        for old, (ev, _) in list(self._deferred_out.items()):
            if ev.inbound_spi == inbound:  # gone before the pair it replaces: never sends
                del self._deferred_out[old]

        async def uninstall() -> None:
            if successor is not None:  # the new outbound SA first: no gap in what we send
                await self._safely(self.keying.install_outbound(*successor))
            await self._safely(self._delete_pair(child.params, inbound, outbound))
            async with self._policy_locks.hold(child.policy_key):
                policy_set = self._policies.get(child.policy_key)
                if policy_set is not None:
                    policy_set.refs -= 1
                    if policy_set.refs <= 0 and not policy_set.trap:
                        del self._policies[child.policy_key]
                        await self._safely(self.keying.delete_policies(policy_set.ids))

        self._enqueue(rec, uninstall)

    # -- kernel messages ---------------------------------------------------------------------

    def _on_pfkey(self, msg: Message) -> None:
        if msg.type == MsgType.EXPIRE:
            self.counters["expires"] += 1
            self._on_expire(msg)
        elif msg.type == MsgType.ACQUIRE:
            self.counters["acquires"] += 1
            self._on_acquire(msg)

    def _on_expire(self, msg: Message) -> None:
        sa_ext = msg.sa
        if sa_ext is None:
            return
        spi = sa_ext.spi.to_bytes(4, "big")
        hard = isinstance(msg.ext.get(ExtType.LIFETIME_HARD), LifetimeExt)
        for rec in self._records.values():
            for child in rec.children.values():
                if spi not in (child.inbound_spi, child.outbound_spi):
                    continue
                core_child = next((c for c in rec.sa.child_sas
                                   if c.inbound_spi == child.inbound_spi), None)
                if hard:
                    log.info("ike: %s %s: SA %s hard expired: deleting the Child SA",
                             rec.name, child.child.name, _spi(spi))
                    self._request_delete_child(rec, child.inbound_spi)
                elif core_child is not None and core_child.state is ChildState.INSTALLED \
                        and rec.sa.state is State.ESTABLISHED \
                        and child.inbound_spi not in rec.rekeys_due:  # both SAs expire
                    log.info("ike: %s %s: SA %s soft expired: rekeying", rec.name,
                             child.child.name, _spi(spi))
                    rec.rekeys_due.add(child.inbound_spi)
                    self._with_spare(rec, functools.partial(self._rekey_child, rec,
                                                            child.inbound_spi))
                return

    def _rekey_child(self, rec: IkeRecord, inbound_spi: bytes) -> None:
        rec.rekeys_due.discard(inbound_spi)
        try:
            rec.sa.rekey_child(inbound_spi, self._now())
        except (ValueError, RuntimeError) as exc:  # deleted or replaced meanwhile
            log.info("ike: %s: no rekey of %s: %s", rec.name, _spi(inbound_spi), exc)

    def _on_acquire(self, msg: Message) -> None:
        policy = msg.policy
        if policy is None:
            return
        for (conn_name, child_name), key in self._traps.items():
            policy_set = self._policies.get(key)
            if policy_set is None or policy.id not in policy_set.ids:
                continue
            log.info("ike: ACQUIRE for %s/%s (policy %d)", conn_name, child_name, policy.id)
            self._acquired(conn_name, child_name)
            return

    def _acquired(self, conn_name: str, child_name: str) -> None:
        for rec in self._records_of(conn_name):
            if any(c.child.name == child_name for c in rec.children.values()) or \
                    any(c.name == child_name for c in rec.pending):
                return  # already there or on its way
            if rec.sa.state is State.ESTABLISHED:
                self._create_child(rec, rec.conn.children[child_name])
                self._pump(rec.sa, rec)
                return
            if rec.sa.state not in TERMINAL:
                rec.pending.append(rec.conn.children[child_name])
                return
        self._spawn(self.initiate(conn_name, child_name))

    # -- start actions, traps ----------------------------------------------------------------

    async def _apply_start_actions(self, conns: list[ConnectionConfig]) -> None:
        for conn in conns:
            for child in conn.children.values():
                if child.start_action == "trap":
                    await self._install_trap(conn, child)
            if any(c.start_action == "start" for c in conn.children.values()):
                self._spawn(self.initiate(conn.name))

    async def _install_trap(self, conn: ConnectionConfig, child: ChildConfig) -> None:
        try:
            local, remote = await self._endpoints(conn)
        except IkeServiceError as exc:
            log.warning("ike: %s/%s: no trap: %s", conn.name, child.name, exc)
            return
        mode = IpsecMode.TRANSPORT if child.mode == "transport" else IpsecMode.TUNNEL
        local_ts, remote_ts = child.selectors(True, local), child.selectors(False, remote)
        key = (conn.name, child.name, mode, tuple(local_ts), tuple(remote_ts), local, remote)
        async with self._policy_locks.hold(key):
            policy_set = self._policies.get(key)
            if policy_set is None:
                reqid = self._reqid(conn.name, child.name)
                try:
                    ids = await self.keying.add_policies(
                        policy_selectors(local_ts, remote_ts), ipaddress.ip_address(local),
                        ipaddress.ip_address(remote), mode, reqid)
                except (KeyingError, ValueError) as exc:
                    log.error("ike: %s/%s: trap not installed: %s", conn.name, child.name, exc)
                    return
                policy_set = self._policies[key] = PolicySet(reqid, ids)
            policy_set.trap = True
        self._traps[(conn.name, child.name)] = key
        log.info("ike: %s/%s: trap policies installed for %s === %s", conn.name, child.name,
                 ts_text(local_ts), ts_text(remote_ts))

    async def _uninstall_traps(self, conn_name: str) -> None:
        for (name, child_name), key in list(self._traps.items()):
            if name != conn_name:
                continue
            del self._traps[(name, child_name)]
            async with self._policy_locks.hold(key):
                policy_set = self._policies.get(key)
                if policy_set is None:
                    continue
                policy_set.trap = False
                if policy_set.refs <= 0:
                    del self._policies[key]
                    await self._safely(self.keying.delete_policies(policy_set.ids))

    async def _endpoints(self, conn: ConnectionConfig) -> tuple[str, str]:
        remote = next((a for a in conn.remote_addrs if a != "%any"), None)
        if remote is None:
            raise IkeServiceError(f"connection {conn.name} has no remote address to initiate to")
        try:
            remote_ip = str(network_literal(remote).network_address)
        except ValueError:
            assert self._loop is not None
            infos = await self._loop.getaddrinfo(remote, None, type=socket.SOCK_DGRAM)
            if not infos:
                raise IkeServiceError(f"cannot resolve {remote}") from None
            remote_ip = str(infos[0][4][0])
        local = next((a for a in conn.local_addrs if a != "%any"), None)
        return (local or _route_source(remote_ip)), remote_ip

    # -- daemon requests (control commands) ----------------------------------------------------

    async def initiate(self, name: str, child_name: str | None = None) -> IkeRecord:
        """Start an IKE SA for connection `name` with its children (or only `child_name`):
        IKE_SA_INIT at once; the first Child SA's inbound SPI is GETSPI'd when its answer
        comes (a round trip to the kernel that then overlaps the peer's work, not ours)."""
        conn = self.connections.connections.get(name)
        if conn is None:
            raise IkeServiceError(f"no connection named {name!r}")
        children = list(conn.children.values())
        if child_name is not None:
            children = [conn.children[child_name]]
        local_ip, remote_ip = await self._endpoints(conn)
        config = self._ike_config(conn, children, local_ip, remote_ip)
        sa = IkeSa(config, initiator=True, local_addr=(local_ip, self.connections.settings.port),
                   remote_addr=(remote_ip, conn.remote_port), child_spi=b"",
                   spi_allocator=lambda: self._take_spare(rec))
        rec = self._new_record(conn, sa, local_ip)
        rec.pending = children[1:]
        self._route(sa.spi_i, sa, rec)
        log.info("ike: %s initiating to %s:%d", rec.name, *sa.remote_addr)
        sa.initiate(self._now())
        self._pump(sa, rec)
        return rec

    def _spawn(self, coro: Awaitable[Any]) -> None:
        """Run a request from a callback (ACQUIRE, DPD restart), logging its failure."""
        async def run() -> None:
            try:
                await coro
            except (IkeServiceError, KeyingError, OSError) as exc:
                log.warning("ike: %s", exc)
        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _down(self, rec: IkeRecord) -> None:
        if rec.sa.state in TERMINAL:
            return
        rec.sa.delete(self._now())
        self._pump(rec.sa, rec)

    async def terminate(self, name: str, timeout: float = 10.0) -> int:
        """Delete the IKE SAs of connection `name`; wait until they are gone. Returns how many."""
        if name not in self.connections.connections:
            raise IkeServiceError(f"no connection named {name!r}")
        recs = self._records_of(name)
        for rec in recs:
            self._down(rec)
        waits = [asyncio.ensure_future(r.gone.wait()) for r in recs]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for task in pending:
                task.cancel()
        for rec in recs:
            if rec.uid in self._records:
                self._forget(rec, "no answer to our delete")
        await self._jobs.join()
        return len(recs)

    async def wait_established(self, rec: IkeRecord, timeout: float = 30.0) -> bool:
        """Until rec's IKE SA and its first Child SA are up, or it ended."""
        deadline = self._now() + timeout
        while self._now() < deadline:
            if rec.uid not in self._records:
                return False
            if rec.sa.state is State.ESTABLISHED and rec.children and not rec.pending:
                await self._jobs.join()
                return True
            await asyncio.sleep(0.02)
        return False

    async def reload(self, connections: Connections | None = None) -> dict[str, list[str]]:
        """Apply a new configuration: removed and changed connections go down (and lose their
        traps), added and changed ones get their start actions; unchanged ones are kept."""
        if connections is None:
            from ike.connections import TABLES
            from userspace_ipsec import config as config_mod
            self.config = config_mod.load(self.config.source, extra_tables=TABLES)
            connections = from_config(self.config)
        old, new = self.connections.connections, connections.connections
        removed = [n for n in old if n not in new]
        # Equal configurations (all but where they were written) keep their tunnels up.
        changed = [n for n in old if n in new and old[n] != new[n]]
        added = [n for n in new if n not in old]
        for name in removed + changed:
            await self.terminate(name)
            await self._uninstall_traps(name)
        self.connections = Connections(new, self.connections.settings, connections.source)
        await self._apply_start_actions([new[n] for n in added + changed])
        log.info("ike: reloaded: %d added, %d changed, %d removed", len(added), len(changed),
                 len(removed))
        return {"added": added, "changed": changed, "removed": removed}

    @property
    def records(self) -> list[IkeRecord]:
        return list(self._records.values())

    def stats(self) -> dict[str, int]:
        """Counters, and how many IKE SAs are up and Child SAs installed right now."""
        established = sum(1 for r in self._records.values() if r.sa.state is State.ESTABLISHED)
        children = sum(len(r.children) for r in self._records.values())
        return {**self.counters, "ike_sas": len(self._records),
                "ike_sas_established": established, "child_sas": children,
                "pid": os.getpid()}  # the daemon's, or its IKE process's

    @property
    def policy_sets(self) -> dict[tuple[Any, ...], PolicySet]:
        return self._policies


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Room for the answers to a burst of IKE_SA_INITs (a thousand connections starting at
    once): the default buffer holds about 200 datagrams, and what overflows costs a 4 s
    retransmission. Forced past net.core.rmem_max when we may (CAP_NET_ADMIN)."""
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
            return
        except OSError:
            continue


def _by_identity(conns: list[ConnectionConfig], idi: Identity,
                 idr: Identity | None) -> ConnectionConfig | None:
    """The connection for a peer showing identity ``idi`` (and asking for ``idr``, if it did):
    one that names the peer beats one that takes any identity, and one whose identity is the
    ``idr`` asked for beats one that is not; between equals, the first configured."""
    best, best_score = None, -1
    for conn in conns:
        if conn.remote_id is not None and conn.remote_id != idi:
            continue
        score = (2 if conn.remote_id is not None else 0) + \
            (1 if idr is not None and conn.local_id == idr else 0)
        if score > best_score:
            best, best_score = conn, score
    return best


def _random_spi() -> bytes:
    """An inbound SPI the kernel's GETSPI range would give (installed with ADD)."""
    return random.SystemRandom().randrange(0x100, 0x0FFFFFFF).to_bytes(4, "big")


def _route_source(remote: str) -> str:
    """The local address the routing table picks for `remote` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in remote else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((remote, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"


def _pktinfo_dst(anc: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, _, addr = _IN_PKTINFO.unpack_from(data)
            return str(ipaddress.IPv4Address(addr))
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and \
                len(data) >= _IN6_PKTINFO.size:
            addr6, _ = _IN6_PKTINFO.unpack_from(data)
            return str(ipaddress.IPv6Address(addr6))
    return None


def _follow_host(ts: TrafficSelector, old: IPAddress, new: IPAddress) -> TrafficSelector:
    """`ts` with the peer's new address if it was exactly the old one (a dynamic selector)."""
    if ts.start_addr == ts.end_addr == old and new.version == old.version:
        return replace(ts, start_addr=new, end_addr=new)
    return ts


def _ts_covers(ts: TrafficSelector, addr: IPAddress) -> bool:
    return ts.start_addr.version == addr.version and \
        int(ts.start_addr) <= int(addr) <= int(ts.end_addr)
