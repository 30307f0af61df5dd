"""Per-SA datapath state: the ESP transform built once per SA, where its packets go, and the
inbound SPI index. Kept up to date from the SAD's change log when its generation moves: one SA
installed costs O(1), not a walk of the SAD.

A context lives as long as its SA object: the Kernel replaces an SA (UPDATE) by a new object
and removes it by marking it DEAD, so identity is the cache key and nothing is rebuilt when an
SA merely turns DYING (which would reset its sequence numbers).
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from datapath.esp import EspConfigError, EspTransform
from datapath.sockets import RawEspSocket, UdpSocket
from userspace_ipsec.kernel import Kernel
from userspace_ipsec.pfkey.constants import IPPROTO_ESP, IpsecMode, NatTType, SaState, SaType
from userspace_ipsec.sa import Policy, SecurityAssociation

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class SaContext:
    """What the hot path needs of one SA, resolved once."""

    sa: SecurityAssociation
    transform: EspTransform
    encap: bool  # UDP-encapsulated (RFC 3948)
    udp: UdpSocket | None  # the socket to send on when encap
    raw: RawEspSocket | None  # ... and when not
    addr: tuple[Any, ...]  # sendto address: (host, port) for UDP, (host, 0) for raw
    outer: int  # outer IP (+ UDP) header bytes the kernel adds
    src_packed: bytes
    dst_packed: bytes
    natt: bool
    # Inbound packets open where they were received (an AEAD, and not transport mode, whose
    # rebuilt IP header needs room in front of the payload): datapath.inbound.
    in_place: bool


class SaTable:
    """SA contexts, the inbound SPI index and the inbound policy-template verdicts."""

    __slots__ = ("kernel", "udp", "raw", "always_encap", "udp_port", "local", "contexts",
                 "by_spi", "verdicts", "generation", "spd_generation", "build_errors",
                 "overheads", "_candidates", "_cursor", "_rescan")

    def __init__(self, kernel: Kernel, *, udp: dict[int, UdpSocket],
                 raw: dict[int, RawEspSocket], always_encap: bool = False,
                 udp_port: int = 4500,
                 local: Callable[[], frozenset[bytes]] = frozenset) -> None:
        self.kernel = kernel
        self.udp = udp  # by address family
        self.raw = raw
        self.always_encap = always_encap
        self.udp_port = udp_port
        self.local: frozenset[bytes] = local()
        self.contexts: dict[SecurityAssociation, SaContext | None] = {}
        self.by_spi: dict[int, SaContext] = {}
        self.verdicts: dict[tuple[SecurityAssociation, Policy], bool] = {}
        self.generation = -1  # SAD generation the index was built for
        self.spd_generation = -1
        self.build_errors = 0
        # Per-packet overhead (outer headers and ESP) -> how many indexed SAs have it.
        self.overheads: Counter[int] = Counter()
        # SPI -> the usable ESP SAs that have it (more than one only with manual keying).
        self._candidates: dict[int, dict[SecurityAssociation, SaContext]] = {}
        self._cursor = -1
        self._rescan = True

    def context(self, sa: SecurityAssociation) -> SaContext | None:
        """The SA's context (None: the SA cannot be used by this datapath)."""
        try:
            return self.contexts[sa]
        except KeyError:
            ctx = self.contexts[sa] = self._build(sa)
            return ctx

    def _build(self, sa: SecurityAssociation) -> SaContext | None:
        if sa.encryption is None or sa.state not in (SaState.MATURE, SaState.DYING):
            return None
        try:
            transform = EspTransform.build(
                sa.spi, sa.encryption.name, sa.enc_key,
                sa.integrity.name if sa.integrity else "null", sa.auth_key,
                esn=sa.esn, replay_window=sa.replay_window, allow_weak=True)
        except EspConfigError as exc:
            self.build_errors += 1
            log.warning("datapath: SA %#x unusable: %s", sa.spi, exc)
            return None
        family = socket.AF_INET if sa.dst.version == 4 else socket.AF_INET6
        natt = sa.natt_type != NatTType.NONE
        encap = natt or self.always_encap or family not in self.raw
        port = sa.natt_dport if natt and sa.natt_dport else self.udp_port
        return SaContext(
            sa, transform, encap, self.udp.get(family), self.raw.get(family),
            (str(sa.dst), port if encap else 0),
            (20 if family == socket.AF_INET else 40) + (8 if encap else 0),
            sa.src.packed, sa.dst.packed, natt,
            transform.opens_in_place and sa.mode != IpsecMode.TRANSPORT,
        )

    def refresh(self) -> bool:
        """Follow the SAD's changes into the SPI index; True if it changed."""
        sad = self.kernel.sad
        spd_gen = self.kernel.spd.generation
        if spd_gen != self.spd_generation:
            self.spd_generation = spd_gen
            self.verdicts.clear()
        if sad.generation == self.generation and not self._rescan:
            return False
        self.generation = sad.generation
        changed = None if self._rescan else sad.changes.since(self._cursor)
        self._cursor = sad.changes.cursor
        if changed is None:
            self._rescan = False
            old = self.contexts  # contexts of SAs still in the SAD carry over (by identity)
            self.contexts = {sa: old[sa] for sa in sad if sa in old}
            self.by_spi, self._candidates = {}, {}
            self.overheads.clear()
            changed = list(sad)
        for sa in dict.fromkeys(changed):
            self._follow(sa)
        return True

    def _follow(self, sa: SecurityAssociation) -> None:
        """Index or unindex one SA after a change, and settle who holds its SPI."""
        ctx = None
        if sa in self.kernel.sad:
            if sa.satype == SaType.ESP and sa.usable():
                ctx = self.context(sa)
        else:
            self.contexts.pop(sa, None)
        spi = sa.spi
        candidates = self._candidates.get(spi)
        old = None if candidates is None else candidates.get(sa)
        if old is not ctx:  # a context lives as long as its SA: usually nothing to do here
            if candidates is None:
                candidates = self._candidates[spi] = {}
            if old is not None:
                del candidates[sa]
                self._count_overhead(old, -1)
            if ctx is not None:
                candidates[sa] = ctx
                self._count_overhead(ctx, 1)
        if not candidates:
            self._candidates.pop(spi, None)
            self.by_spi.pop(spi, None)
            return
        # One SPI for both directions (manual keying does that): the SA to us wins, else the
        # oldest.
        local = self.local
        best = next(iter(candidates.values()))
        if best.dst_packed not in local:
            best = next((c for c in candidates.values() if c.dst_packed in local), best)
        self.by_spi[spi] = best

    def _count_overhead(self, ctx: SaContext, step: int) -> None:
        overhead = ctx.outer + ctx.transform.max_overhead
        count = self.overheads[overhead] + step
        if count > 0:
            self.overheads[overhead] = count
        else:
            del self.overheads[overhead]

    def set_local(self, local: frozenset[bytes]) -> None:
        if local != self.local:
            self.local = local
            self._rescan = True  # SPI collisions are settled by local addresses

    def satisfies(self, sa: SecurityAssociation, policy: Policy) -> bool:
        """Whether a packet that came in through ``sa`` may pass inbound ``policy``."""
        key = (sa, policy)
        verdict = self.verdicts.get(key)
        if verdict is None:
            if len(self.verdicts) > 4096:
                self.verdicts.clear()
            verdict = self.verdicts[key] = template_satisfied(sa, policy)
        return verdict


def template_satisfied(sa: SecurityAssociation, policy: Policy) -> bool:
    """RFC 4301 5.2 step 4: the SA is the one the policy's ESP template asks for."""
    req = next((r for r in policy.requests if r.proto == IPPROTO_ESP), None)
    if req is None:
        return False
    if req.reqid and sa.reqid != req.reqid:
        return False
    if sa.mode not in (req.mode, IpsecMode.ANY):
        return False
    if req.mode == IpsecMode.TUNNEL and req.src is not None:
        return req.src == sa.src and req.dst == sa.dst
    return True


def outbound_sa(kernel: Kernel, policy: Policy, src: bytes, dst: bytes
                ) -> SecurityAssociation | None:
    """The SA an outbound packet (src, dst packed) of ``policy`` uses (its ESP template)."""
    req = next((r for r in policy.requests if r.proto == IPPROTO_ESP), None)
    if req is None:
        return None
    return kernel.sad.for_request(req, ip_address(src), ip_address(dst))
