"""The PF_KEY side of the IKE daemon: what racoon's pfkey.c does for a BSD kernel.

REGISTER for ESP (to hear ACQUIRE and EXPIRE), GETSPI for inbound SPIs, UPDATE/ADD of both SAs
of a Child SA with keys, algorithms, reqid, mode, NAT-T ports, replay window, ESN (private
extension) and soft/hard lifetimes, X_SPDADD of the in/out/fwd policies with `unique` reqid
templates (X_SPDUPDATE points them at a peer's new address), and the DELETE / X_SPDDELETE2
that take all of it away again. Keys go into PF_KEY messages only; nothing here logs them.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from dataclasses import dataclass, field

from ike.constants import EncrId, IntegId
from ike.events import ChildSaEstablished
from ike.payloads import TrafficSelector
from ike.pfkey_async import AsyncPfkey
from ike.transforms import TransformSet
from userspace_ipsec.pfkey.client import PfkeyReplyError
from userspace_ipsec.pfkey.constants import (
    IPPROTO_ESP,
    UIPSEC_FLAG_ESN,
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    NatTType,
    PolicyDir,
    PolicyType,
    SaType,
)
from userspace_ipsec.pfkey.messages import (
    AddressExt,
    Extension,
    IPAddress,
    IpsecRequest,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    PolicyExt,
    SA2Ext,
    SAExt,
    UipsecExt,
)

log = logging.getLogger(__name__)

# IKEv2 transform IDs -> PF_KEY algorithm numbers (userspace_ipsec.algorithms).
PFKEY_ENCR: dict[int, int] = {
    EncrId.AES_CBC: 12, EncrId.AES_GCM_16: 20, EncrId.CHACHA20_POLY1305: 28, EncrId.TRIPLE_DES: 3}
PFKEY_INTEG: dict[int, int] = {
    IntegId.NONE: 0, IntegId.HMAC_SHA2_256_128: 5, IntegId.HMAC_SHA2_384_192: 6,
    IntegId.HMAC_SHA2_512_256: 7, IntegId.HMAC_SHA1_96: 3, IntegId.HMAC_MD5_96: 2}
MAX_PORT_EXPANSION = 16  # a port range becomes at most this many policies per pair
POLICY_BASE_PRIORITY = 1000


class KeyingError(Exception):
    """The kernel refused something we asked for; the message names it (never a key)."""


@dataclass(slots=True)
class SaParams:
    """How a Child SA's two SAs are to be installed (the IKE SA's view of the path)."""

    local: IPAddress
    remote: IPAddress
    mode: IpsecMode
    reqid: int
    local_port: int = 500  # IKE ports in use: the NAT-T ports when `encap`
    remote_port: int = 500
    encap: bool = False
    replay_window: int = 32
    soft: int = 0  # seconds; 0 = none
    hard: int = 0


@dataclass(slots=True)
class PolicySelector:
    """One SPD entry pair's selector, as the out policy sees it (in/fwd swap src and dst)."""

    local: ipaddress.IPv4Network | ipaddress.IPv6Network
    remote: ipaddress.IPv4Network | ipaddress.IPv6Network
    proto: int = 0
    local_port: int = 0
    remote_port: int = 0

    def priority(self) -> int:
        """Lower first: narrower selectors win, like strongSwan's priorities."""
        width = 2 * self.local.max_prefixlen - self.local.prefixlen - self.remote.prefixlen
        return POLICY_BASE_PRIORITY + width * 4 + (0 if self.proto else 2) + \
            (0 if self.local_port or self.remote_port else 1)


@dataclass(slots=True)
class PolicySet:
    """Policies installed for one set of selectors of one child config."""

    reqid: int
    ids: list[int] = field(default_factory=list)
    refs: int = 0
    trap: bool = False


def _ports(ts: TrafficSelector) -> list[int]:
    if ts.start_port == 0 and ts.end_port == 65535:
        return [0]
    count = ts.end_port - ts.start_port + 1
    if count > MAX_PORT_EXPANSION:
        raise ValueError(f"port range {ts.start_port}-{ts.end_port} needs {count} policies")
    return list(range(ts.start_port, ts.end_port + 1))


def _prefixes(ts: TrafficSelector) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    out.extend(ipaddress.summarize_address_range(ts.start_addr, ts.end_addr))  # type: ignore[arg-type]
    return out


def policy_selectors(local_ts: list[TrafficSelector],
                     remote_ts: list[TrafficSelector]) -> list[PolicySelector]:
    """The SPD selectors that cover exactly these traffic selectors, never more: ranges are
    split into prefixes, port ranges into ports. ValueError when that cannot be done."""
    out: list[PolicySelector] = []
    for lts in local_ts:
        for rts in remote_ts:
            if lts.start_addr.version != rts.start_addr.version:
                continue
            if lts.ip_protocol and rts.ip_protocol and lts.ip_protocol != rts.ip_protocol:
                continue
            proto = lts.ip_protocol or rts.ip_protocol
            lnets = _prefixes(lts)
            rnets = _prefixes(rts)
            for lnet in lnets:
                for rnet in rnets:
                    for lport in _ports(lts):
                        for rport in _ports(rts):
                            out.append(PolicySelector(lnet, rnet, proto, lport, rport))
    if not out:
        raise ValueError("no policy: the selectors share no address family and protocol")
    return out


def _get_request(spi: int, src: IPAddress, dst: IPAddress) -> Message:
    """SADB_GET of one ESP SA."""
    return Message(MsgType.GET, SaType.ESP, ext={
        ExtType.SA: SAExt(spi), ExtType.ADDRESS_SRC: _addr(src),
        ExtType.ADDRESS_DST: _addr(dst)})


def _addr(ip: IPAddress, port: int = 0) -> AddressExt:
    return AddressExt(ip, None, 0, port)


class Keying:
    def __init__(self, pfkey: AsyncPfkey) -> None:
        self.pfkey = pfkey

    async def register(self) -> None:
        await self.pfkey.request(Message(MsgType.REGISTER, SaType.ESP))

    async def getspi(self, local: IPAddress, remote: IPAddress, mode: IpsecMode,
                     reqid: int) -> int:
        """A larval inbound SA (remote -> local) and its SPI; UPDATE makes it mature."""
        msg = Message(MsgType.GETSPI, SaType.ESP, ext={
            ExtType.X_SA2: SA2Ext(mode, 0, reqid),
            ExtType.ADDRESS_SRC: _addr(remote), ExtType.ADDRESS_DST: _addr(local)})
        try:
            reply = await self.pfkey.request(msg)
        except PfkeyReplyError as exc:
            raise KeyingError(f"GETSPI {remote}->{local}: {exc}") from None
        sa = reply.sa
        if sa is None:
            raise KeyingError("GETSPI reply without an SA extension")
        return sa.spi

    def _sa_message(self, msg_type: MsgType, spi: int, src: IPAddress, dst: IPAddress,
                    sport: int, dport: int, suite: TransformSet, encr: bytes, integ: bytes,
                    p: SaParams) -> Message:
        ext: dict[ExtType, Extension] = {
            ExtType.SA: SAExt(spi, min(p.replay_window, 255), auth=PFKEY_INTEG[suite.integ],
                              encrypt=PFKEY_ENCR[suite.encr]),
            ExtType.X_SA2: SA2Ext(p.mode, 0, p.reqid),
            ExtType.ADDRESS_SRC: _addr(src), ExtType.ADDRESS_DST: _addr(dst),
            ExtType.KEY_ENCRYPT: KeyExt(encr),
        }
        if integ:
            ext[ExtType.KEY_AUTH] = KeyExt(integ)
        if p.hard:
            ext[ExtType.LIFETIME_HARD] = LifetimeExt(addtime=p.hard)
        if p.soft:
            ext[ExtType.LIFETIME_SOFT] = LifetimeExt(addtime=p.soft)
        if p.encap:
            ext[ExtType.X_NAT_T_TYPE] = NatTTypeExt(NatTType.ESPINUDP)
            ext[ExtType.X_NAT_T_SPORT] = NatTPortExt(sport)
            ext[ExtType.X_NAT_T_DPORT] = NatTPortExt(dport)
        ext[ExtType.X_UIPSEC] = UipsecExt(UIPSEC_FLAG_ESN if suite.esn == 1 else 0,
                                          p.replay_window)
        return Message(msg_type, SaType.ESP, ext=ext)

    async def install_child(self, ev: ChildSaEstablished, p: SaParams, larval: bool,
                            outbound: bool = True) -> None:
        """Inbound SA (UPDATE of the larval GETSPI one, else ADD), then outbound (ADD) unless
        `outbound` is False (then `install_outbound` later)."""
        spi_in = int.from_bytes(ev.inbound_spi, "big")
        spi_out = int.from_bytes(ev.outbound_spi, "big")
        if ev.transforms.encr not in PFKEY_ENCR or ev.transforms.integ not in PFKEY_INTEG:
            raise KeyingError(f"no PF_KEY number for {ev.transforms}")

        def inbound(kind: MsgType) -> Message:
            return self._sa_message(kind, spi_in, p.remote, p.local, p.remote_port,
                                    p.local_port, ev.transforms, ev.encr_in, ev.integ_in, p)

        msgs = [inbound(MsgType.UPDATE if larval else MsgType.ADD)]
        if outbound:  # pipelined with the inbound SA: one wait for both replies
            msgs.append(self._outbound_message(ev, p))
        replies = await self.pfkey.requests(msgs)
        reply_in = replies[0]
        if larval and isinstance(reply_in, PfkeyReplyError) and reply_in.errno == errno.ESRCH:
            # The larval SA timed out while the install waited its turn (thousands of
            # negotiations at once); ADD takes the SPI unless it went to another since.
            reply_in = (await self.pfkey.requests([inbound(MsgType.ADD)]))[0]
        reply_out = replies[1] if outbound else None
        if isinstance(reply_in, PfkeyReplyError):
            if reply_out is not None and not isinstance(reply_out, PfkeyReplyError):
                await self.delete_sa(p.local, p.remote, spi_out)
            raise KeyingError(f"inbound SA {spi_in:08x}: {reply_in}")
        if isinstance(reply_out, PfkeyReplyError):
            await self.delete_sa(p.remote, p.local, spi_in)
            raise KeyingError(f"outbound SA {spi_out:08x}: {reply_out}")

    async def install_outbound(self, ev: ChildSaEstablished, p: SaParams) -> None:
        """The outbound SA (ADD) of a pair; the newest mature SA is the one the kernel uses."""
        try:
            await self.pfkey.request(self._outbound_message(ev, p))
        except PfkeyReplyError as exc:
            raise KeyingError(f"outbound SA {ev.outbound_spi.hex()}: {exc}") from None

    def _outbound_message(self, ev: ChildSaEstablished, p: SaParams) -> Message:
        return self._sa_message(MsgType.ADD, int.from_bytes(ev.outbound_spi, "big"), p.local,
                                p.remote, p.local_port, p.remote_port, ev.transforms,
                                ev.encr_out, ev.integ_out, p)

    async def delete_sa(self, src: IPAddress, dst: IPAddress, spi: int) -> bool:
        """DELETE one SA; False if it was already gone (hard expiry got there first)."""
        msg = Message(MsgType.DELETE, SaType.ESP, ext={
            ExtType.SA: SAExt(spi), ExtType.ADDRESS_SRC: _addr(src),
            ExtType.ADDRESS_DST: _addr(dst)})
        try:
            await self.pfkey.request(msg)
        except PfkeyReplyError as exc:
            if exc.errno == errno.ESRCH:
                return False
            raise KeyingError(f"DELETE {spi:08x}: {exc}") from None
        return True

    async def get_sa(self, src: IPAddress, dst: IPAddress, spi: int) -> Message | None:
        try:
            reply = await self.pfkey.request(_get_request(spi, src, dst))
        except PfkeyReplyError:
            return None
        # Only counters and lifetimes are wanted: drop the keys at once.
        reply.ext.pop(ExtType.KEY_AUTH, None)
        reply.ext.pop(ExtType.KEY_ENCRYPT, None)
        return reply

    async def add_policies(self, selectors: list[PolicySelector], local: IPAddress,
                           remote: IPAddress, mode: IpsecMode, reqid: int) -> list[int]:
        """out, in and fwd policies for each selector; all or nothing."""
        msgs = [self._spdadd_message(sel, direction, local, remote, mode, reqid)
                for sel in selectors
                for direction in (PolicyDir.OUTBOUND, PolicyDir.INBOUND, PolicyDir.FWD)]
        replies = await self.pfkey.requests(msgs)  # pipelined: one wait for all of them
        ids = [r.policy.id for r in replies if isinstance(r, Message) and r.policy is not None]
        failed = next((r for r in replies if not isinstance(r, Message) or r.policy is None),
                      None)
        if failed is not None:
            await self.delete_policies(ids)
            reason = failed if isinstance(failed, PfkeyReplyError) else \
                "X_SPDADD reply without a policy"
            raise KeyingError(
                f"policy for {selectors[0].local}<->{selectors[0].remote}: {reason}")
        return ids

    async def update_policies(self, selectors: list[PolicySelector], local: IPAddress,
                              remote: IPAddress, mode: IpsecMode, reqid: int) -> list[int]:
        """Point the out, in and fwd policies of these selectors at new tunnel endpoints with
        X_SPDUPDATE (same selector and direction: the kernel keeps their ids); pipelined.
        Returns the ids; KeyingError names the first refusal (the others are done)."""
        msgs = [self._spdadd_message(sel, direction, local, remote, mode, reqid,
                                     MsgType.X_SPDUPDATE)
                for sel in selectors
                for direction in (PolicyDir.OUTBOUND, PolicyDir.INBOUND, PolicyDir.FWD)]
        replies = await self.pfkey.requests(msgs)
        failed = next((r for r in replies if not isinstance(r, Message) or r.policy is None),
                      None)
        if failed is not None:
            reason = failed if isinstance(failed, PfkeyReplyError) else \
                "X_SPDUPDATE reply without a policy"
            raise KeyingError(f"policy for {selectors[0].local}<->{selectors[0].remote} "
                              f"not moved to {local}<->{remote}: {reason}")
        return [r.policy.id for r in replies if isinstance(r, Message) and r.policy is not None]

    @staticmethod
    def _spdadd_message(sel: PolicySelector, direction: PolicyDir, local: IPAddress,
                        remote: IPAddress, mode: IpsecMode, reqid: int,
                        msg_type: MsgType = MsgType.X_SPDADD) -> Message:
        out = direction == PolicyDir.OUTBOUND
        src_net, dst_net = (sel.local, sel.remote) if out else (sel.remote, sel.local)
        sport, dport = (sel.local_port, sel.remote_port) if out else \
            (sel.remote_port, sel.local_port)
        tunnel = mode == IpsecMode.TUNNEL
        req = IpsecRequest(IPPROTO_ESP, mode, IpsecLevel.UNIQUE, reqid,
                           (local if out else remote) if tunnel else None,
                           (remote if out else local) if tunnel else None)
        return Message(msg_type, SaType.UNSPEC, ext={
            ExtType.ADDRESS_SRC: AddressExt(src_net.network_address, src_net.prefixlen,
                                            sel.proto, sport),
            ExtType.ADDRESS_DST: AddressExt(dst_net.network_address, dst_net.prefixlen,
                                            sel.proto, dport),
            ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, direction, 0, sel.priority(), [req]),
        })

    async def delete_policies(self, ids: list[int]) -> None:
        msgs = [Message(MsgType.X_SPDDELETE2, SaType.UNSPEC, ext={
            ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, PolicyDir.OUTBOUND, policy_id)})
            for policy_id in ids]
        for policy_id, reply in zip(ids, await self.pfkey.requests(msgs), strict=True):
            if isinstance(reply, PfkeyReplyError) and reply.errno != errno.ENOENT:
                log.warning("keying: policy %d not deleted: %s", policy_id, reply)

    async def move_peer(self, inbound_spi: bytes, outbound_spi: bytes, p: SaParams,
                        remote: IPAddress, remote_port: int) -> bool:
        """The peer's address or NAT port changed: re-add both SAs with the new endpoint
        (PF_KEY cannot change a mature SA). `p` is updated. False if an SA was gone."""
        moves = ((int.from_bytes(inbound_spi, "big"), p.remote, p.local, remote, p.local,
                  remote_port, p.local_port),
                 (int.from_bytes(outbound_spi, "big"), p.local, p.remote, p.local, remote,
                  p.local_port, remote_port))
        for spi, src, dst, new_src, new_dst, sport, dport in moves:
            try:
                current = await self.pfkey.request(_get_request(spi, src, dst))
            except PfkeyReplyError:
                return False
            ext: dict[ExtType, Extension] = {t: e for t, e in current.ext.items()
                   if t not in (ExtType.LIFETIME_CURRENT, ExtType.X_NAT_T_SPORT,
                                ExtType.X_NAT_T_DPORT, ExtType.X_NAT_T_TYPE)}
            ext[ExtType.ADDRESS_SRC] = _addr(new_src)
            ext[ExtType.ADDRESS_DST] = _addr(new_dst)
            if p.encap:
                ext[ExtType.X_NAT_T_TYPE] = NatTTypeExt(NatTType.ESPINUDP)
                ext[ExtType.X_NAT_T_SPORT] = NatTPortExt(sport)
                ext[ExtType.X_NAT_T_DPORT] = NatTPortExt(dport)
            await self.delete_sa(src, dst, spi)
            try:
                await self.pfkey.request(Message(MsgType.ADD, SaType.ESP, ext=ext))
            except PfkeyReplyError as exc:
                raise KeyingError(f"SA {spi:08x} not re-added for the new peer address: {exc}")\
                    from None
        p.remote, p.remote_port = remote, remote_port
        return True
