"""Security associations and security policies: the records the SAD and SPD hold.

Both are plain mutable dataclasses that the datapath reads (and, for the per-SA counters, writes)
directly; the Kernel owns every other change so that the SAD/SPD indexes stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network

from .algorithms import Algorithm
from .pfkey.constants import (
    IPSEC_PROTO_ANY,
    IpsecMode,
    NatTType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from .pfkey.messages import IPAddress, IpsecRequest, LifetimeExt

IPNetwork = IPv4Network | IPv6Network

# Far above any counter: a traffic mark that is never reached.
NO_MARK = 1 << 64

# Upper-layer protocols whose selectors carry ports (ICMP/ICMPv6: type and code, as Linux).
PORT_PROTOS = frozenset({1, 6, 17, 58, 132, 136})


@dataclass(slots=True, eq=False)
class SecurityAssociation:
    """One SA. Identity (not value) equality: SAs live in sets and dicts of the SAD.

    ``packets_*``/``bytes_*``/``replay_drops``/``auth_failures`` belong to the datapath, which
    increments them in place. The lifetime "allocations" counter is the packet count, as on
    Linux. When ``packets_in + packets_out >= packet_mark`` or the byte total reaches
    ``byte_mark`` the datapath calls ``Kernel.note_traffic(sa, now)``; both marks start at 0 so
    that the first packet also reports the SA's first use.
    """

    spi: int
    satype: SaType
    src: IPAddress
    dst: IPAddress
    mode: IpsecMode = IpsecMode.ANY
    reqid: int = 0
    state: SaState = SaState.MATURE
    encryption: Algorithm | None = None
    integrity: Algorithm | None = None
    enc_key: bytes = field(default=b"", repr=False)
    auth_key: bytes = field(default=b"", repr=False)
    replay_window: int = 32  # packets; 0 disables anti-replay
    esn: bool = False
    flags: int = 0  # sadb_sa_flags, kept for the datapath (NOECN, DECAP_DSCP, ...)
    natt_type: NatTType = NatTType.NONE
    natt_sport: int = 0
    natt_dport: int = 0
    natt_oa: IPAddress | None = None
    hard: LifetimeExt = field(default_factory=LifetimeExt)
    soft: LifetimeExt = field(default_factory=LifetimeExt)
    add_time: float = 0.0
    use_time: float = 0.0  # 0: not used yet
    # Datapath counters.
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    replay_drops: int = 0
    auth_failures: int = 0
    # Larval SAs: the socket that asked GETSPI for it and the sadb_msg_seq of that request.
    owner: int | None = None
    seq: int = 0
    # Bumped on every change the Kernel makes (state, replacement), for datapath caches.
    generation: int = 0
    packet_mark: int = field(default=0, repr=False)
    byte_mark: int = field(default=0, repr=False)
    soft_expired: bool = field(default=False, repr=False)
    timer_at: float | None = field(default=None, repr=False)  # the Kernel's pending timer

    @property
    def key(self) -> tuple[IPAddress, int, int]:
        """The SAD's primary key: (dst, satype, SPI)."""
        return (self.dst, int(self.satype), self.spi)

    @property
    def allocations(self) -> int:
        return self.packets_in + self.packets_out

    @property
    def total_bytes(self) -> int:
        return self.bytes_in + self.bytes_out

    def current_lifetime(self) -> LifetimeExt:
        return LifetimeExt(self.allocations, self.total_bytes, int(self.add_time),
                           int(self.use_time))

    def usable(self) -> bool:
        return self.state in (SaState.MATURE, SaState.DYING)


@dataclass(frozen=True, slots=True)
class Selector:
    """Traffic selector: prefixes, upper-layer protocol (IPSEC_PROTO_ANY) and ports (0 = any)."""

    src: IPNetwork
    dst: IPNetwork
    proto: int = IPSEC_PROTO_ANY
    sport: int = 0
    dport: int = 0

    @classmethod
    def build(cls, src: IPAddress, src_len: int, dst: IPAddress, dst_len: int, proto: int = 0,
              sport: int = 0, dport: int = 0) -> Selector:
        """Host bits beyond the prefix are cleared; protocol 0 means any, as on Linux."""
        return cls(ip_network((src, src_len), strict=False),
                   ip_network((dst, dst_len), strict=False),
                   IPSEC_PROTO_ANY if proto == 0 else proto, sport, dport)

    @property
    def version(self) -> int:
        return self.src.version


@dataclass(slots=True, eq=False)
class Policy:
    """One SPD entry. ``id`` is assigned by the SPD on insertion and never reused."""

    selector: Selector
    direction: PolicyDir
    action: PolicyType
    priority: int = 0
    requests: list[IpsecRequest] = field(default_factory=list)
    id: int = 0
    hard: LifetimeExt = field(default_factory=LifetimeExt)
    soft: LifetimeExt = field(default_factory=LifetimeExt)
    add_time: float = 0.0
    use_time: float = 0.0
