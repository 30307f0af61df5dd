"""PF_KEYv2 wire codec: ``Message`` <-> bytes, as Linux's pfkeyv2.h and ipsec.h lay them out.

Lengths and counters are in host byte order (Linux's convention), SPIs and ports in network
order, every extension 8-byte aligned with its length in 64-bit words. ``decode`` validates the
structure the way Linux's af_key.c does and raises ``PfkeyError`` (carrying the errno the kernel
answers with) for anything malformed; it never raises anything else. Semantic checks that
depend on the message type (which extensions an ADD needs, key length vs algorithm) belong to
the kernel; ``check_sa_keys`` helps with the latter. See docs/pfkey.md.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from socket import htonl, htons, ntohl, ntohs
from typing import TypeAlias, TypeVar

from .. import algorithms
from .constants import (
    AF_INET,
    AF_INET6,
    PF_KEY_V2,
    ExtType,
    IdentType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    NatTType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from .messages import (
    AddressExt,
    Comb,
    Extension,
    IdentityExt,
    IPAddress,
    IpsecRequest,
    KeyExt,
    KmPrivateExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    PolicyExt,
    ProposalExt,
    SA2Ext,
    SAExt,
    SecCtxExt,
    SensitivityExt,
    SpiRangeExt,
    SupportedAlg,
    SupportedExt,
    UipsecExt,
)

Buffer: TypeAlias = bytes | bytearray | memoryview
_T = TypeVar("_T")

# sadb_msg_len is a u16 count of 64-bit words: the largest message the format can describe.
MAX_MESSAGE_SIZE = 0xFFFF * 8
UIPSEC_EXT_VERSION = 1


class PfkeyError(Exception):
    """A message that cannot be encoded or decoded; ``errno`` is what the kernel replies with."""

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(errno, reason)
        self.errno = errno
        self.reason = reason

    def __str__(self) -> str:
        return f"{_errno.errorcode.get(self.errno, str(self.errno))}: {self.reason}"


def _invalid(reason: str) -> PfkeyError:
    return PfkeyError(_errno.EINVAL, reason)


# --- wire structures ('=' is host order, no padding: the C structs are all packed) ---------

_MSG = struct.Struct("=BBBBHHII")  # version type errno satype len reserved seq pid
_EXT = struct.Struct("=HH")  # len exttype
_SA = struct.Struct("=HHIBBBBI")  # spi(be) replay state auth encrypt flags
_LIFETIME = struct.Struct("=HHIQQQ")  # allocations bytes addtime usetime
_ADDRESS = struct.Struct("=HHBBH")  # proto prefixlen reserved
_ADDR4 = struct.Struct("=HHBB2xHH4s8x")  # sadb_address + sockaddr_in (16): 24 bytes
_ADDR6 = struct.Struct("=HHBB2xHHI16sI4x")  # sadb_address + sockaddr_in6 (28) + pad: 40 bytes
_FAMILY = struct.Struct("=H")  # sa_family, the first field of every sockaddr
_SIN = struct.Struct("=HH4s8x")  # family port(be) addr zero
_SIN6 = struct.Struct("=HHI16sI")  # family port(be) flowinfo addr scope_id
_KEY = struct.Struct("=HHH2x")  # bits reserved
_IDENT = struct.Struct("=HHH2xQ")  # type reserved id
_SENS = struct.Struct("=HHIBBBB4x")  # dpd sens_level sens_len integ_level integ_len reserved
_PROP = struct.Struct("=HHB3x")  # replay reserved[3]
_COMB = struct.Struct("=BBHHHHH4xIIQQQQQQ")
_SUPPORTED = struct.Struct("=HH4x")
_ALG = struct.Struct("=BBHH2x")  # id ivlen minbits maxbits reserved
_SPIRANGE = struct.Struct("=HHII4x")  # min max (host order, as Linux reads them)
_KMPRIVATE = struct.Struct("=HH4x")
_POLICY = struct.Struct("=HHHBxII")  # type dir reserved id priority
_IPSECREQ = struct.Struct("=HHBB2xI4x")  # len(BYTES) proto mode level reserved1 reqid reserved2
_SA2 = struct.Struct("=HHB3xII")  # mode reserved1 reserved2 sequence reqid
_NATT_TYPE = struct.Struct("=HHB3x")
_NATT_PORT = struct.Struct("=HHH2x")  # port(be) reserved
_SEC_CTX = struct.Struct("=HHBBH")  # ctx_alg ctx_doi ctx_len
# Private extension, 80 bytes: version, 3 reserved, flags, replay_window, 6 u64 counters and
# 16 reserved bytes for growth (docs/pfkey.md).
_UIPSEC = struct.Struct("=HHB3xII6Q16x")

_SOCKADDR_LEN = {AF_INET: _SIN.size, AF_INET6: _SIN6.size}
_HOST_PREFIX = {AF_INET: 32, AF_INET6: 128}


def _words(nbytes: int) -> int:
    """Length field for an extension of ``nbytes`` (already a multiple of 8)."""
    if nbytes > MAX_MESSAGE_SIZE:
        raise PfkeyError(_errno.EMSGSIZE, f"extension of {nbytes} bytes is too long")
    return nbytes >> 3


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


# --- encoders: (exttype, extension) -> bytes ------------------------------------------------


def _enc_sa(t: int, e: SAExt) -> bytes:
    return _SA.pack(2, t, htonl(e.spi), e.replay, e.state, e.auth, e.encrypt, e.flags)


def _enc_lifetime(t: int, e: LifetimeExt) -> bytes:
    return _LIFETIME.pack(4, t, e.allocations, e.bytes, e.addtime, e.usetime)


def _scope(address: IPv6Address) -> int:
    scope = address.scope_id
    if scope is None:
        return 0
    if not scope.isdigit():
        raise _invalid(f"IPv6 scope {scope!r} is not a numeric interface index")
    return int(scope)


def _enc_address(t: int, e: AddressExt) -> bytes:
    a = e.address
    plen = e.prefixlen
    if isinstance(a, IPv4Address):
        if plen is None:
            plen = 32
        elif plen > 32:
            raise _invalid(f"prefix length {plen} exceeds 32")
        return _ADDR4.pack(3, t, e.proto, plen, AF_INET, htons(e.port), a.packed)
    if plen is None:
        plen = 128
    elif plen > 128:
        raise _invalid(f"prefix length {plen} exceeds 128")
    return _ADDR6.pack(5, t, e.proto, plen, AF_INET6, htons(e.port), 0, a.packed, _scope(a))


def _enc_key(t: int, e: KeyExt) -> bytes:
    key = e.key
    bits = len(key) * 8 if e.bits is None else e.bits
    nbytes = (bits + 7) >> 3
    if nbytes > len(key):
        raise _invalid(f"key_bits {bits} exceed the {len(key)}-byte key")
    body = _pad8(key[:nbytes])
    return _KEY.pack(_words(8 + len(body)), t, bits) + body


def _enc_identity(t: int, e: IdentityExt) -> bytes:
    # A C string: NUL-terminated, then NUL-padded to 8 bytes.
    body = _pad8(e.data + b"\0")
    return _IDENT.pack(_words(16 + len(body)), t, e.type, e.id) + body


def _enc_sensitivity(t: int, e: SensitivityExt) -> bytes:
    sens = _pad8(e.sens_bitmap)
    integ = _pad8(e.integ_bitmap)
    head = _SENS.pack(
        _words(16 + len(sens) + len(integ)), t, e.dpd,
        e.level, len(sens) >> 3, e.integ_level, len(integ) >> 3,
    )
    return head + sens + integ


def _enc_comb(c: Comb) -> bytes:
    return _COMB.pack(
        c.auth, c.encrypt, c.flags, c.auth_minbits, c.auth_maxbits,
        c.encrypt_minbits, c.encrypt_maxbits, c.soft_allocations, c.hard_allocations,
        c.soft_bytes, c.hard_bytes, c.soft_addtime, c.hard_addtime,
        c.soft_usetime, c.hard_usetime,
    )


def _enc_proposal(t: int, e: ProposalExt) -> bytes:
    body = b"".join([_enc_comb(c) for c in e.combs])
    return _PROP.pack(_words(8 + len(body)), t, e.replay) + body


def _enc_supported(t: int, e: SupportedExt) -> bytes:
    body = b"".join([_ALG.pack(a.id, a.ivlen, a.minbits, a.maxbits) for a in e.algs])
    return _SUPPORTED.pack(_words(8 + len(body)), t) + body


def _enc_spirange(t: int, e: SpiRangeExt) -> bytes:
    return _SPIRANGE.pack(2, t, e.min, e.max)


def _enc_kmprivate(t: int, e: KmPrivateExt) -> bytes:
    body = _pad8(e.data)
    return _KMPRIVATE.pack(_words(8 + len(body)), t) + body


def _sockaddr(address: IPAddress, port: int) -> bytes:
    if isinstance(address, IPv4Address):
        return _SIN.pack(AF_INET, htons(port), address.packed)
    return _SIN6.pack(AF_INET6, htons(port), 0, address.packed, _scope(address))


def _enc_request(r: IpsecRequest) -> bytes:
    src, dst = r.src, r.dst
    if src is None and dst is None:
        return _IPSECREQ.pack(_IPSECREQ.size, r.proto, r.mode, r.level, r.reqid)
    if src is None or dst is None or src.version != dst.version:
        raise _invalid("ipsecrequest tunnel endpoints must be both present, of one family")
    addrs = _sockaddr(src, r.src_port) + _sockaddr(dst, r.dst_port)
    size = _IPSECREQ.size + len(addrs)
    pad = -size % 8
    return _IPSECREQ.pack(size + pad, r.proto, r.mode, r.level, r.reqid) + addrs + bytes(pad)


def _enc_policy(t: int, e: PolicyExt) -> bytes:
    body = b"".join([_enc_request(r) for r in e.requests])
    return _POLICY.pack(_words(16 + len(body)), t, e.type, e.dir, e.id, e.priority) + body


def _enc_sa2(t: int, e: SA2Ext) -> bytes:
    return _SA2.pack(2, t, e.mode, e.sequence, e.reqid)


def _enc_natt_type(t: int, e: NatTTypeExt) -> bytes:
    return _NATT_TYPE.pack(1, t, e.type)


def _enc_natt_port(t: int, e: NatTPortExt) -> bytes:
    return _NATT_PORT.pack(1, t, htons(e.port))


def _enc_sec_ctx(t: int, e: SecCtxExt) -> bytes:
    ctx = e.context
    body = _pad8(ctx)
    return _SEC_CTX.pack(_words(8 + len(body)), t, e.alg, e.doi, len(ctx)) + body


def _enc_uipsec(t: int, e: UipsecExt) -> bytes:
    return _UIPSEC.pack(
        _UIPSEC.size >> 3, t, UIPSEC_EXT_VERSION, e.flags, e.replay_window,
        e.packets_in, e.packets_out, e.bytes_in, e.bytes_out, e.replay_drops, e.auth_failures,
    )


# --- decoders: (buffer, offset, length, exttype) -> extension -------------------------------


def _lookup(table: dict[int, _T], value: int, what: str) -> _T:
    try:
        return table[value]
    except KeyError:
        raise _invalid(f"unknown {what} {value}") from None


_STATES = {int(m): m for m in SaState}
_IDENT_TYPES = {int(m): m for m in IdentType}
_MODES = {int(m): m for m in IpsecMode}
_LEVELS = {int(m): m for m in IpsecLevel}
_NATT_TYPES = {int(m): m for m in NatTType}
_POLICY_TYPES = {int(m): m for m in PolicyType}
# MAX and INVALID are sentinels, never a direction on the wire.
_DIRS = {int(m): m for m in PolicyDir if m <= PolicyDir.FWD}
_MSG_TYPES: dict[int, MsgType] = {int(m): m for m in MsgType if m != MsgType.RESERVED}
# An error reply to a request whose type was unreadable carries RESERVED (docs/pfkey.md).
_ERROR_MSG_TYPES: dict[int, MsgType] = {int(m): m for m in MsgType}
_SATYPES = {int(m): m for m in SaType}


def _dec_sa(b: Buffer, o: int, n: int, t: int) -> SAExt:
    _, _, spi, replay, state, auth, encrypt, flags = _SA.unpack_from(b, o)
    return SAExt(ntohl(spi), replay, _lookup(_STATES, state, "SA state"), auth, encrypt, flags)


def _dec_lifetime(b: Buffer, o: int, n: int, t: int) -> LifetimeExt:
    _, _, allocations, nbytes, addtime, usetime = _LIFETIME.unpack_from(b, o)
    return LifetimeExt(allocations, nbytes, addtime, usetime)


# Decoded addresses, shared: they are immutable, and a daemon's messages name the same few
# peers over and over (building an IPv4Address is most of an address extension's decode).
_ADDRESS_CACHE_LIMIT = 4096
_ADDRESS_CACHE: dict[bytes, IPAddress] = {}  # 4 or 16 raw bytes: the family is the length


def _ip(raw: bytes) -> IPAddress:
    address = _ADDRESS_CACHE.get(raw)
    if address is None:
        if len(_ADDRESS_CACHE) >= _ADDRESS_CACHE_LIMIT:
            _ADDRESS_CACHE.clear()
        address = IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)
        _ADDRESS_CACHE[raw] = address
    return address


def _sockaddr_at(b: Buffer, o: int, end: int) -> tuple[int, IPAddress, int]:
    """Decode the sockaddr at ``o``: (family, address, port). Validates family and room."""
    if end - o < 2:
        raise _invalid("sockaddr truncated before its family")
    (family,) = _FAMILY.unpack_from(b, o)
    size = _SOCKADDR_LEN.get(family)
    if size is None:
        raise _invalid(f"unsupported address family {family}")
    if end - o < size:
        raise _invalid(f"sockaddr of family {family} truncated")
    address: IPAddress
    if family == AF_INET:
        _, port, raw = _SIN.unpack_from(b, o)
        address = _ip(raw)
    else:
        _, port, _, raw, scope = _SIN6.unpack_from(b, o)
        address = _ip(raw) if scope == 0 else IPv6Address(f"{IPv6Address(raw)}%{scope}")
    return family, address, ntohs(port)


def _dec_address(b: Buffer, o: int, n: int, t: int) -> AddressExt:
    if n == _ADDR4.size:  # the common case in one unpack: sadb_address + sockaddr_in
        _, _, proto, prefixlen, family, port, raw = _ADDR4.unpack_from(b, o)
        if family == AF_INET:
            if prefixlen > 32:
                raise _invalid(f"prefix length {prefixlen} too long for family {family}")
            return AddressExt(_ip(raw), prefixlen, proto, ntohs(port))
    _, _, proto, prefixlen, _ = _ADDRESS.unpack_from(b, o)
    family, address, port = _sockaddr_at(b, o + 8, o + n)
    # Linux: the extension is exactly sadb_address + sockaddr rounded up to 8 bytes.
    if n != (8 + _SOCKADDR_LEN[family] + 7) & ~7:
        raise _invalid(f"address extension of {n} bytes for family {family}")
    if prefixlen > _HOST_PREFIX[family]:
        raise _invalid(f"prefix length {prefixlen} too long for family {family}")
    return AddressExt(address, prefixlen, proto, port)


def _dec_key(b: Buffer, o: int, n: int, t: int) -> KeyExt:
    _, _, bits = _KEY.unpack_from(b, o)
    nbytes = (bits + 7) >> 3
    if 8 + nbytes > n:
        raise _invalid(f"key_bits {bits} exceed the {n - 8}-byte key payload")
    return KeyExt(bytes(b[o + 8 : o + 8 + nbytes]), bits)


def _dec_identity(b: Buffer, o: int, n: int, t: int) -> IdentityExt:
    _, _, itype, iid = _IDENT.unpack_from(b, o)
    data = bytes(b[o + 16 : o + n])
    nul = data.find(0)
    if nul >= 0:
        data = data[:nul]
    return IdentityExt(_lookup(_IDENT_TYPES, itype, "identity type"), iid, data)


def _dec_sensitivity(b: Buffer, o: int, n: int, t: int) -> SensitivityExt:
    _, _, dpd, level, sens_len, integ_level, integ_len = _SENS.unpack_from(b, o)
    if 16 + 8 * (sens_len + integ_len) != n:
        raise _invalid("sensitivity bitmap lengths do not match the extension length")
    split = o + 16 + 8 * sens_len
    return SensitivityExt(
        dpd, level, integ_level, bytes(b[o + 16 : split]), bytes(b[split : o + n])
    )


def _dec_proposal(b: Buffer, o: int, n: int, t: int) -> ProposalExt:
    (_, _, replay) = _PROP.unpack_from(b, o)
    if (n - 8) % _COMB.size:
        raise _invalid(f"proposal of {n} bytes is not a whole number of sadb_comb")
    combs = []
    for off in range(o + 8, o + n, _COMB.size):
        f = _COMB.unpack_from(b, off)
        combs.append(Comb(*f))
    return ProposalExt(replay, combs)


def _dec_supported(b: Buffer, o: int, n: int, t: int) -> SupportedExt:
    algs = [SupportedAlg(*_ALG.unpack_from(b, off)) for off in range(o + 8, o + n, _ALG.size)]
    return SupportedExt(algs)


def _dec_spirange(b: Buffer, o: int, n: int, t: int) -> SpiRangeExt:
    _, _, lo, hi = _SPIRANGE.unpack_from(b, o)
    return SpiRangeExt(lo, hi)


def _dec_kmprivate(b: Buffer, o: int, n: int, t: int) -> KmPrivateExt:
    return KmPrivateExt(bytes(b[o + 8 : o + n]))


def _dec_request(b: Buffer, o: int, end: int) -> tuple[IpsecRequest, int]:
    if end - o < _IPSECREQ.size:
        raise _invalid("policy ends inside an ipsecrequest header")
    rlen, proto, mode, level, reqid = _IPSECREQ.unpack_from(b, o)
    if rlen < _IPSECREQ.size or rlen > end - o:
        raise _invalid(f"ipsecrequest length {rlen} out of bounds")
    request = IpsecRequest(
        proto, _lookup(_MODES, mode, "ipsec mode"), _lookup(_LEVELS, level, "ipsec level"), reqid
    )
    if rlen > _IPSECREQ.size:
        rend = o + rlen
        fam_src, request.src, request.src_port = _sockaddr_at(b, o + 16, rend)
        size = _SOCKADDR_LEN[fam_src]
        if rlen != (16 + 2 * size + 7) & ~7:
            raise _invalid(f"ipsecrequest length {rlen} does not fit its sockaddrs")
        fam_dst, request.dst, request.dst_port = _sockaddr_at(b, o + 16 + size, rend)
        if fam_dst != fam_src:
            raise _invalid("ipsecrequest tunnel endpoints of different families")
    return request, o + rlen


def _dec_policy(b: Buffer, o: int, n: int, t: int) -> PolicyExt:
    _, _, ptype, pdir, pid, priority = _POLICY.unpack_from(b, o)
    policy = PolicyExt(
        _lookup(_POLICY_TYPES, ptype, "policy type"),
        _lookup(_DIRS, pdir, "policy direction"),
        pid,
        priority,
    )
    off, end = o + _POLICY.size, o + n
    while off < end:
        request, off = _dec_request(b, off, end)
        policy.requests.append(request)
    return policy


def _dec_sa2(b: Buffer, o: int, n: int, t: int) -> SA2Ext:
    _, _, mode, sequence, reqid = _SA2.unpack_from(b, o)
    return SA2Ext(_lookup(_MODES, mode, "ipsec mode"), sequence, reqid)


def _dec_natt_type(b: Buffer, o: int, n: int, t: int) -> NatTTypeExt:
    _, _, ntype = _NATT_TYPE.unpack_from(b, o)
    return NatTTypeExt(_lookup(_NATT_TYPES, ntype, "NAT-T type"))


def _dec_natt_port(b: Buffer, o: int, n: int, t: int) -> NatTPortExt:
    _, _, port = _NATT_PORT.unpack_from(b, o)
    return NatTPortExt(ntohs(port))


def _dec_sec_ctx(b: Buffer, o: int, n: int, t: int) -> SecCtxExt:
    _, _, alg, doi, ctx_len = _SEC_CTX.unpack_from(b, o)
    if n != (8 + ctx_len + 7) & ~7:
        raise _invalid(f"security context of {ctx_len} bytes in a {n}-byte extension")
    return SecCtxExt(alg, doi, bytes(b[o + 8 : o + 8 + ctx_len]))


def _dec_uipsec(b: Buffer, o: int, n: int, t: int) -> UipsecExt:
    _, _, version, flags, window, *counters = _UIPSEC.unpack_from(b, o)
    if version == 0:
        raise _invalid("X_UIPSEC extension version 0")
    # A newer version may be longer; its first 80 bytes keep the version-1 layout.
    return UipsecExt(flags, window, *counters)


# --- tables ---------------------------------------------------------------------------------

_Decoder: TypeAlias = Callable[[Buffer, int, int, int], Extension]

# exttype -> (extension class, encoder, decoder, minimum length in bytes)
_CODECS: dict[int, tuple[type, Callable[..., bytes], _Decoder, int]] = {}


def _register(types: tuple[ExtType, ...], cls: type, enc: Callable[..., bytes],
              dec: _Decoder, minlen: int) -> None:
    for t in types:
        _CODECS[t] = (cls, enc, dec, minlen)


E = ExtType
_register((E.SA,), SAExt, _enc_sa, _dec_sa, _SA.size)
_register((E.LIFETIME_CURRENT, E.LIFETIME_HARD, E.LIFETIME_SOFT), LifetimeExt,
          _enc_lifetime, _dec_lifetime, _LIFETIME.size)
_register((E.ADDRESS_SRC, E.ADDRESS_DST, E.ADDRESS_PROXY, E.X_NAT_T_OA), AddressExt,
          _enc_address, _dec_address, _ADDRESS.size)
_register((E.KEY_AUTH, E.KEY_ENCRYPT), KeyExt, _enc_key, _dec_key, _KEY.size)
_register((E.IDENTITY_SRC, E.IDENTITY_DST), IdentityExt, _enc_identity, _dec_identity,
          _IDENT.size)
_register((E.SENSITIVITY,), SensitivityExt, _enc_sensitivity, _dec_sensitivity, _SENS.size)
_register((E.PROPOSAL,), ProposalExt, _enc_proposal, _dec_proposal, _PROP.size)
_register((E.SUPPORTED_AUTH, E.SUPPORTED_ENCRYPT), SupportedExt, _enc_supported,
          _dec_supported, _SUPPORTED.size)
_register((E.SPIRANGE,), SpiRangeExt, _enc_spirange, _dec_spirange, _SPIRANGE.size)
_register((E.X_KMPRIVATE,), KmPrivateExt, _enc_kmprivate, _dec_kmprivate, _KMPRIVATE.size)
_register((E.X_POLICY,), PolicyExt, _enc_policy, _dec_policy, _POLICY.size)
_register((E.X_SA2,), SA2Ext, _enc_sa2, _dec_sa2, _SA2.size)
_register((E.X_NAT_T_TYPE,), NatTTypeExt, _enc_natt_type, _dec_natt_type, _NATT_TYPE.size)
_register((E.X_NAT_T_SPORT, E.X_NAT_T_DPORT), NatTPortExt, _enc_natt_port, _dec_natt_port,
          _NATT_PORT.size)
_register((E.X_SEC_CTX,), SecCtxExt, _enc_sec_ctx, _dec_sec_ctx, _SEC_CTX.size)
_register((E.X_UIPSEC,), UipsecExt, _enc_uipsec, _dec_uipsec, _UIPSEC.size)
del E

_EXT_TYPES = {int(t): t for t in ExtType}
# exttype number -> (ExtType, decoder, minimum length): one lookup per extension in decode.
_DECODERS: dict[int, tuple[ExtType, _Decoder, int]] = {
    int(t): (_EXT_TYPES[t], codec[2], codec[3]) for t, codec in _CODECS.items()}
# ExtType -> (extension class, encoder).
_ENCODERS: dict[int, tuple[type, Callable[..., bytes]]] = {
    t: (codec[0], codec[1]) for t, codec in _CODECS.items()}
# Linux types this codec does not carry (MIGRATE's KMADDRESS, DUMP's FILTER): refused.
_UNSUPPORTED = frozenset({ExtType.X_KMADDRESS, ExtType.X_FILTER})

SUPPORTED_EXTENSIONS: frozenset[ExtType] = frozenset(_EXT_TYPES[t] for t in _CODECS)


# --- public API -----------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Serialise ``msg``; extensions go out in the dict's order. Raises PfkeyError."""
    parts = [b""]
    total = _MSG.size
    encoders = _ENCODERS
    try:
        for t, e in msg.ext.items():
            codec = encoders.get(t)
            if codec is None:
                raise _invalid(f"cannot encode extension type {t}")
            cls, enc = codec
            if type(e) is not cls:
                raise _invalid(f"{type(e).__name__} stored under extension type {t}")
            part = enc(t, e)
            total += len(part)
            parts.append(part)
        if total > MAX_MESSAGE_SIZE:
            raise PfkeyError(_errno.EMSGSIZE, f"message of {total} bytes is too long")
        if msg.type not in (_ERROR_MSG_TYPES if msg.errno else _MSG_TYPES):
            raise _invalid(f"unknown message type {msg.type}")
        parts[0] = _MSG.pack(
            PF_KEY_V2, msg.type, msg.errno, msg.satype, total >> 3, 0, msg.seq, msg.pid
        )
    except (struct.error, OverflowError) as exc:
        raise _invalid(f"field out of range: {exc}") from None
    return b"".join(parts)


def decode(data: Buffer) -> Message:
    """Parse one PF_KEY message; raises PfkeyError (only) if it is malformed."""
    size = len(data)
    if size < _MSG.size:
        raise PfkeyError(_errno.EMSGSIZE, f"{size} bytes is shorter than sadb_msg")
    version, mtype, err, satype, mlen, reserved, seq, pid = _MSG.unpack_from(data)
    if version != PF_KEY_V2:
        raise _invalid(f"sadb_msg_version {version}, expected {PF_KEY_V2}")
    if reserved:
        raise _invalid("sadb_msg_reserved is not zero")
    msg_type = _lookup(_ERROR_MSG_TYPES if err else _MSG_TYPES, mtype, "message type")
    if mlen * 8 != size:
        raise PfkeyError(_errno.EMSGSIZE, f"sadb_msg_len {mlen} words for {size} bytes")
    exts: dict[ExtType, Extension] = {}
    off = _MSG.size
    decoders = _DECODERS
    ext_header = _EXT.unpack_from
    while off < size:
        elen, etype = ext_header(data, off)
        elen <<= 3
        if elen == 0 or elen > size - off:
            raise _invalid(f"extension length {elen} at offset {off} out of bounds")
        entry = decoders.get(etype)
        if entry is None:
            why = "unsupported" if etype in _UNSUPPORTED else "unknown"
            raise _invalid(f"{why} extension type {etype}")
        key, dec, minlen = entry
        if key in exts:
            raise _invalid(f"duplicate extension type {etype}")
        if elen < minlen:
            raise _invalid(f"extension type {etype} too short ({elen} bytes)")
        exts[key] = dec(data, off, elen, etype)
        off += elen
    return Message(msg_type, _SATYPES.get(satype, satype), seq, pid, err, exts)


def check_sa_keys(msg: Message) -> str | None:
    """Why the keys of ``msg`` do not suit its SA's algorithms (ADD/UPDATE), or None.

    The codec does not call this; the kernel does, and answers EINVAL.
    """
    sa = msg.sa
    if sa is None:
        return None
    pairs = (
        (sa.encrypt, ExtType.KEY_ENCRYPT, algorithms.encryption_by_id, "encryption"),
        (sa.auth, ExtType.KEY_AUTH, algorithms.integrity_by_id, "integrity"),
    )
    for alg_id, key_type, by_id, what in pairs:
        key = msg.ext.get(key_type)
        if alg_id == 0:
            if key is not None:
                return f"{what} key given without an {what} algorithm"
            continue
        alg = by_id(alg_id)
        if alg is None:
            return f"unknown {what} algorithm {alg_id}"
        raw = b""
        if isinstance(key, KeyExt):
            bits = len(key.key) * 8 if key.bits is None else key.bits
            if bits != len(key.key) * 8:
                return f"{what} key_bits {bits} is not a whole number of key bytes"
            raw = key.key
        reason = algorithms.check_key(alg, raw)
        if reason is not None:
            return reason
    return None


__all__ = [
    "MAX_MESSAGE_SIZE",
    "SUPPORTED_EXTENSIONS",
    "UIPSEC_EXT_VERSION",
    "PfkeyError",
    "check_sa_keys",
    "decode",
    "encode",
]
