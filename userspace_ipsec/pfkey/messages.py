"""PF_KEYv2 messages as Python values: the shared vocabulary of codec, kernel, setkey and clients.

A ``Message`` is the ``sadb_msg`` header plus at most one extension of each type (RFC 2367
section 2.3: duplicates are an error). Extensions are plain dataclasses whose fields follow the C
structures of RFC 2367 and Linux's pfkeyv2.h; lengths, padding and reserved fields are the
codec's business and do not appear here. Addresses are ``ipaddress`` objects.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias, TypeVar

from .constants import (
    IPSEC_PROTO_ANY,
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

IPAddress: TypeAlias = IPv4Address | IPv6Address
_E = TypeVar("_E")


@dataclass(slots=True)
class SAExt:
    """sadb_sa."""

    spi: int  # host order here; network order on the wire
    replay: int = 0  # window size in packets (Linux semantics, see docs/pfkey.md)
    state: SaState = SaState.MATURE
    auth: int = 0  # SADB_AALG_* / SADB_X_AALG_*
    encrypt: int = 0  # SADB_EALG_* / SADB_X_EALG_*
    flags: int = 0


@dataclass(slots=True)
class LifetimeExt:
    """sadb_lifetime (current, hard or soft, by the extension type it is stored under)."""

    allocations: int = 0
    bytes: int = 0
    addtime: int = 0  # seconds: absolute (current) or relative (hard/soft)
    usetime: int = 0


@dataclass(slots=True)
class AddressExt:
    """sadb_address + sockaddr_in/sockaddr_in6 (src, dst, proxy, NAT-T OA)."""

    address: IPAddress
    prefixlen: int | None = None  # None: the full host length (32 or 128)
    proto: int = 0  # upper-layer protocol; 0 or IPSEC_PROTO_ANY (255) for any
    port: int = 0  # in the sockaddr, 0 = any

    @property
    def full_prefixlen(self) -> int:
        return self.address.max_prefixlen if self.prefixlen is None else self.prefixlen


@dataclass(slots=True)
class KeyExt:
    """sadb_key (auth or encrypt key). ``bits`` may be less than len(key) * 8 on the wire."""

    key: bytes = field(repr=False)
    bits: int | None = None  # None: len(key) * 8


@dataclass(slots=True)
class IdentityExt:
    """sadb_ident: the identity string follows the header, NUL-padded."""

    type: IdentType
    id: int = 0
    data: bytes = b""


@dataclass(slots=True)
class SensitivityExt:
    """sadb_sens, kept opaque past its header fields (nobody uses it)."""

    dpd: int = 0
    level: int = 0
    integ_level: int = 0
    sens_bitmap: bytes = b""
    integ_bitmap: bytes = b""


@dataclass(slots=True)
class Comb:
    """sadb_comb: one algorithm combination of a proposal."""

    auth: int = 0
    encrypt: int = 0
    flags: int = 0
    auth_minbits: int = 0
    auth_maxbits: int = 0
    encrypt_minbits: int = 0
    encrypt_maxbits: int = 0
    soft_allocations: int = 0
    hard_allocations: int = 0
    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_addtime: int = 0
    hard_addtime: int = 0
    soft_usetime: int = 0
    hard_usetime: int = 0


@dataclass(slots=True)
class ProposalExt:
    """sadb_prop followed by sadb_comb entries (used in ACQUIRE)."""

    replay: int = 0
    combs: list[Comb] = field(default_factory=list)


@dataclass(slots=True)
class SupportedAlg:
    """sadb_alg."""

    id: int
    ivlen: int = 0
    minbits: int = 0
    maxbits: int = 0


@dataclass(slots=True)
class SupportedExt:
    """sadb_supported (auth or encrypt list, by the extension type it is stored under)."""

    algs: list[SupportedAlg] = field(default_factory=list)


@dataclass(slots=True)
class SpiRangeExt:
    """sadb_spirange (inclusive)."""

    min: int
    max: int


@dataclass(slots=True)
class KmPrivateExt:
    """sadb_x_kmprivate: opaque to the kernel."""

    data: bytes = b""


@dataclass(slots=True)
class IpsecRequest:
    """sadb_x_ipsecrequest: one IPsec transform a policy asks for."""

    proto: int  # IPPROTO_ESP / IPPROTO_AH / IPPROTO_COMP
    mode: IpsecMode
    level: IpsecLevel
    reqid: int = 0
    # Tunnel endpoints (tunnel mode only); both present or both absent.
    src: IPAddress | None = None
    dst: IPAddress | None = None
    # Ports in the endpoint sockaddrs (0 = unset); only ESP-in-UDP policies use them (setkey(8)).
    src_port: int = 0
    dst_port: int = 0


@dataclass(slots=True)
class PolicyExt:
    """sadb_x_policy followed by its ipsecrequests."""

    type: PolicyType
    dir: PolicyDir
    id: int = 0  # assigned by the kernel; names the policy for X_SPDDELETE2 / X_SPDGET
    priority: int = 0
    requests: list[IpsecRequest] = field(default_factory=list)


@dataclass(slots=True)
class SA2Ext:
    """sadb_x_sa2."""

    mode: IpsecMode = IpsecMode.ANY
    sequence: int = 0
    reqid: int = 0


@dataclass(slots=True)
class NatTTypeExt:
    """sadb_x_nat_t_type."""

    type: NatTType


@dataclass(slots=True)
class NatTPortExt:
    """sadb_x_nat_t_port (sport or dport, by the extension type it is stored under)."""

    port: int


@dataclass(slots=True)
class SecCtxExt:
    """sadb_x_sec_ctx, kept opaque."""

    alg: int = 0
    doi: int = 0
    context: bytes = b""


@dataclass(slots=True)
class UipsecExt:
    """Private extension (ExtType.X_UIPSEC): what standard PF_KEY cannot express.

    ``replay_window`` in packets (32 bits, overrides sadb_sa_replay when non-zero), ``flags``
    (UIPSEC_FLAG_ESN), and the datapath's per-SA counters in replies. An empty one in a request
    only announces that the client understands it.
    """

    flags: int = 0
    replay_window: int = 0
    # Counters, filled by the kernel in GET/DUMP replies; ignored in requests.
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    replay_drops: int = 0
    auth_failures: int = 0


Extension: TypeAlias = (
    SAExt
    | LifetimeExt
    | AddressExt
    | KeyExt
    | IdentityExt
    | SensitivityExt
    | ProposalExt
    | SupportedExt
    | SpiRangeExt
    | KmPrivateExt
    | PolicyExt
    | SA2Ext
    | NatTTypeExt
    | NatTPortExt
    | SecCtxExt
    | UipsecExt
)


@dataclass(slots=True)
class Message:
    """sadb_msg and its extensions, keyed by extension type."""

    type: MsgType
    satype: SaType | int = SaType.UNSPEC
    seq: int = 0
    pid: int = 0
    errno: int = 0
    ext: dict[ExtType, Extension] = field(default_factory=dict)

    # Typed accessors for the extensions every caller reaches for.
    @property
    def sa(self) -> SAExt | None:
        return self._get(ExtType.SA, SAExt)

    @property
    def src(self) -> AddressExt | None:
        return self._get(ExtType.ADDRESS_SRC, AddressExt)

    @property
    def dst(self) -> AddressExt | None:
        return self._get(ExtType.ADDRESS_DST, AddressExt)

    @property
    def policy(self) -> PolicyExt | None:
        return self._get(ExtType.X_POLICY, PolicyExt)

    @property
    def sa2(self) -> SA2Ext | None:
        return self._get(ExtType.X_SA2, SA2Ext)

    @property
    def uipsec(self) -> UipsecExt | None:
        return self._get(ExtType.X_UIPSEC, UipsecExt)

    def _get(self, ext_type: ExtType, cls: builtins.type[_E]) -> _E | None:
        value: object = self.ext.get(ext_type)
        return value if isinstance(value, cls) else None


__all__ = [
    "IPSEC_PROTO_ANY",
    "AddressExt",
    "Comb",
    "Extension",
    "IPAddress",
    "IdentityExt",
    "IpsecRequest",
    "KeyExt",
    "KmPrivateExt",
    "LifetimeExt",
    "Message",
    "NatTPortExt",
    "NatTTypeExt",
    "PolicyExt",
    "ProposalExt",
    "SA2Ext",
    "SAExt",
    "SecCtxExt",
    "SensitivityExt",
    "SpiRangeExt",
    "SupportedAlg",
    "SupportedExt",
    "UipsecExt",
]
