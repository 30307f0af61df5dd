"""PF_KEY messages <-> SecurityAssociation: the checks a codec cannot make, and the replies.

``Refused`` carries the errno the Kernel answers with; parsing never touches the SAD, so a
refused message changes nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from . import algorithms
from .algorithms import AlgKind, Algorithm
from .pfkey.constants import UIPSEC_FLAG_ESN, ExtType, IpsecMode, MsgType, NatTType, SaType
from .pfkey.messages import (
    AddressExt,
    Extension,
    IPAddress,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    SA2Ext,
    SAExt,
    UipsecExt,
)
from .sa import SecurityAssociation
from .sad import SPI_RESERVED_MAX

MAX_REPLAY_WINDOW = 1 << 20  # packets; the wire's u8 sadb_sa_replay says at most 255
_SA_MODES = (IpsecMode.ANY, IpsecMode.TRANSPORT, IpsecMode.TUNNEL)


class Refused(Exception):
    """A request the Kernel answers with ``errno`` (and logs ``reason``)."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


def einval(reason: str) -> Refused:
    return Refused(errno.EINVAL, reason)


def check_satype(msg: Message, supported: frozenset[int]) -> SaType:
    """ESP or AH (if the datapath does it); anything else is EINVAL, as Linux."""
    if msg.satype not in (SaType.ESP, SaType.AH):
        raise einval(f"SA type {int(msg.satype)} is not ESP or AH")
    if msg.satype not in supported:
        raise Refused(errno.EPROTONOSUPPORT, f"SA type {SaType(msg.satype).name} not supported")
    return SaType(msg.satype)


def address_pair(msg: Message) -> tuple[AddressExt, AddressExt]:
    """Source and destination extensions, both present and of one family."""
    src, dst = msg.src, msg.dst
    if src is None or dst is None:
        raise einval("source and destination addresses are required")
    if src.address.version != dst.address.version:
        raise einval("source and destination addresses of different families")
    for ext in (src, dst):
        if not 0 <= ext.full_prefixlen <= ext.address.max_prefixlen:
            raise einval(f"prefix length {ext.prefixlen} out of range")
    return src, dst


def sa_endpoints(msg: Message) -> tuple[IPAddress, IPAddress]:
    src, dst = address_pair(msg)
    for ext in (src, dst):
        if ext.full_prefixlen != ext.address.max_prefixlen:
            raise einval("an SA address must be a host address (full prefix length)")
    return src.address, dst.address


def mode_reqid(msg: Message) -> tuple[IpsecMode, int]:
    sa2 = msg.sa2
    if sa2 is None:
        return IpsecMode.ANY, 0
    if sa2.mode not in _SA_MODES:
        raise einval(f"SA mode {sa2.mode.name} not supported")
    return sa2.mode, sa2.reqid


def _key(msg: Message, ext_type: ExtType) -> bytes:
    ext = msg.ext.get(ext_type)
    if ext is None:
        return b""
    if not isinstance(ext, KeyExt):
        raise einval(f"extension {ext_type.name} is not a key")
    bits = len(ext.key) * 8 if ext.bits is None else ext.bits
    if bits % 8 or bits > len(ext.key) * 8:
        raise einval(f"key of {bits} bits is not whole bytes of the {len(ext.key)} given")
    return ext.key[: bits // 8]


def _algorithm(alg_id: int, key: bytes, by_id: Callable[[int], Algorithm | None], what: str,
               allow_weak: bool) -> Algorithm:
    alg = by_id(alg_id)
    if alg is None:
        raise einval(f"unknown {what} algorithm {alg_id}")
    if alg.weak and not allow_weak:
        raise einval(f"weak {what} algorithm {alg.name} refused (allow_weak is off)")
    why = algorithms.check_key(alg, key)
    if why is not None:
        raise einval(why)
    return alg


def _algorithms(msg: Message, sa: SAExt, satype: SaType,
                allow_weak: bool) -> tuple[Algorithm | None, bytes, Algorithm | None, bytes]:
    enc_key = _key(msg, ExtType.KEY_ENCRYPT)
    auth_key = _key(msg, ExtType.KEY_AUTH)
    encryption: Algorithm | None = None
    integrity: Algorithm | None = None
    if satype == SaType.AH:
        if sa.encrypt != algorithms.ENCRYPT_NONE or enc_key:
            raise einval("AH takes no encryption algorithm")
    else:
        encryption = _algorithm(sa.encrypt, enc_key, algorithms.encryption_by_id,
                                "encryption", allow_weak)
    if encryption is not None and encryption.kind is AlgKind.AEAD:
        if sa.auth != algorithms.AUTH_NONE or auth_key:
            raise einval(f"{encryption.name} is an AEAD: no integrity algorithm or key")
        return encryption, enc_key, None, b""
    if sa.auth == algorithms.AUTH_NONE:
        raise einval("an integrity algorithm is required (RFC 8221); null if really meant")
    integrity = _algorithm(sa.auth, auth_key, algorithms.integrity_by_id, "integrity",
                           allow_weak)
    if integrity.key_bits == (0,) and (encryption is None or encryption.key_bits == (0,)):
        raise einval("null encryption with null integrity protects nothing")
    return encryption, enc_key, integrity, auth_key


def _natt(msg: Message) -> tuple[NatTType, int, int, IPAddress | None]:
    ntype = msg.ext.get(ExtType.X_NAT_T_TYPE)
    if not isinstance(ntype, NatTTypeExt) or ntype.type == NatTType.NONE:
        return NatTType.NONE, 0, 0, None
    sport = msg.ext.get(ExtType.X_NAT_T_SPORT)
    dport = msg.ext.get(ExtType.X_NAT_T_DPORT)
    if not (isinstance(sport, NatTPortExt) and isinstance(dport, NatTPortExt)
            and sport.port and dport.port):
        raise einval("NAT-T encapsulation needs non-zero source and destination ports")
    oa = msg.ext.get(ExtType.X_NAT_T_OA)
    return ntype.type, sport.port, dport.port, oa.address if isinstance(oa, AddressExt) else None


def copy_lifetime(lt: LifetimeExt) -> LifetimeExt:
    """A copy, so no message shares a mutable extension with the SAD (dataclasses.replace
    costs several times more, and dumps copy two per SA)."""
    return LifetimeExt(lt.allocations, lt.bytes, lt.addtime, lt.usetime)


def _lifetime(msg: Message, ext_type: ExtType) -> LifetimeExt:
    ext = msg.ext.get(ext_type)
    return copy_lifetime(ext) if isinstance(ext, LifetimeExt) else LifetimeExt()


def sa_from_message(msg: Message, satype: SaType, *, allow_weak: bool,
                    now: float) -> SecurityAssociation:
    """A mature SA from an ADD or UPDATE; raises Refused for anything the datapath can't use."""
    sa_ext = msg.sa
    if sa_ext is None:
        raise einval("the SA extension is required")
    if sa_ext.spi <= SPI_RESERVED_MAX:
        raise einval(f"SPI {sa_ext.spi} is reserved (RFC 4303)")
    src, dst = sa_endpoints(msg)
    mode, reqid = mode_reqid(msg)
    encryption, enc_key, integrity, auth_key = _algorithms(msg, sa_ext, satype, allow_weak)
    replay, esn = sa_ext.replay, False
    uipsec = msg.uipsec
    if uipsec is not None:
        replay = uipsec.replay_window or replay
        esn = bool(uipsec.flags & UIPSEC_FLAG_ESN)
    if replay > MAX_REPLAY_WINDOW:
        raise einval(f"replay window {replay} above {MAX_REPLAY_WINDOW}")
    natt_type, natt_sport, natt_dport, natt_oa = _natt(msg)
    if natt_oa is not None and natt_oa.version != src.version:
        raise einval("NAT-T original address of another family")
    hard = _lifetime(msg, ExtType.LIFETIME_HARD)
    soft = _lifetime(msg, ExtType.LIFETIME_SOFT)
    return SecurityAssociation(
        sa_ext.spi, satype, src, dst, mode, reqid,
        encryption=encryption, integrity=integrity, enc_key=enc_key, auth_key=auth_key,
        replay_window=replay, esn=esn, flags=sa_ext.flags,
        natt_type=natt_type, natt_sport=natt_sport, natt_dport=natt_dport, natt_oa=natt_oa,
        hard=hard, soft=soft, add_time=now,
    )


def uipsec_ext(sa: SecurityAssociation) -> UipsecExt:
    return UipsecExt(
        UIPSEC_FLAG_ESN if sa.esn else 0, sa.replay_window,
        sa.packets_in, sa.packets_out, sa.bytes_in, sa.bytes_out,
        sa.replay_drops, sa.auth_failures,
    )


def sa_message(sa: SecurityAssociation, msg_type: MsgType, *, seq: int = 0, pid: int = 0,
               keys: bool = False, lifetimes: tuple[ExtType, ...] = (
                   ExtType.LIFETIME_HARD, ExtType.LIFETIME_SOFT)) -> Message:
    """The SA as PF_KEY describes it; keys only when asked (GET, DUMP)."""
    ext: dict[ExtType, Extension] = {
        ExtType.SA: SAExt(
            sa.spi, min(sa.replay_window, 255), sa.state,
            sa.integrity.pfkey_id if sa.integrity else algorithms.AUTH_NONE,
            sa.encryption.pfkey_id if sa.encryption else algorithms.ENCRYPT_NONE,
            sa.flags,
        ),
        ExtType.LIFETIME_CURRENT: sa.current_lifetime(),
    }
    for which in lifetimes:
        ext[which] = copy_lifetime(sa.hard if which == ExtType.LIFETIME_HARD else sa.soft)
    ext[ExtType.ADDRESS_SRC] = AddressExt(sa.src)
    ext[ExtType.ADDRESS_DST] = AddressExt(sa.dst)
    if keys and sa.auth_key:
        ext[ExtType.KEY_AUTH] = KeyExt(sa.auth_key)
    if keys and sa.enc_key:
        ext[ExtType.KEY_ENCRYPT] = KeyExt(sa.enc_key)
    ext[ExtType.X_SA2] = SA2Ext(sa.mode, sa.seq, sa.reqid)
    if sa.natt_type != NatTType.NONE:
        ext[ExtType.X_NAT_T_TYPE] = NatTTypeExt(sa.natt_type)
        ext[ExtType.X_NAT_T_SPORT] = NatTPortExt(sa.natt_sport)
        ext[ExtType.X_NAT_T_DPORT] = NatTPortExt(sa.natt_dport)
        if sa.natt_oa is not None:
            ext[ExtType.X_NAT_T_OA] = AddressExt(sa.natt_oa)
    return Message(msg_type, sa.satype, seq, pid, 0, ext)
