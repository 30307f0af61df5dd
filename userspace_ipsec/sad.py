"""The security association database, indexed for the datapath and for PF_KEY.

Indexes: (dst, satype, SPI) for inbound packets and PF_KEY lookups; (src, dst, satype, mode) and
(src, dst, satype, reqid) for outbound packets. Each outbound group caches its best SA (Linux's
choice: the newest mature SA, else the newest dying one), so finding it costs a dict lookup
whatever the size of the SAD. Every change goes through this class, which keeps all indexes
consistent, bumps ``generation`` so datapath caches can tell when to look again, and records
the SAs it touched in ``changes`` so that derived state can follow them one by one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .changelog import ChangeLog
from .pfkey.constants import IPPROTO_AH, IPPROTO_ESP, IpsecLevel, IpsecMode, SaState, SaType
from .pfkey.messages import IPAddress, IpsecRequest
from .sa import SecurityAssociation

# RFC 4303 section 2.1: SPIs 1..255 are reserved by IANA, 0 is never sent.
SPI_RESERVED_MAX = 255
SPI_MAX = 0xFFFFFFFF
_RANDOM_PROBES = 16
_PROTO_SATYPE = {IPPROTO_ESP: int(SaType.ESP), IPPROTO_AH: int(SaType.AH)}


class SpiExhausted(Exception):
    """No free SPI in the requested range (``single``: the one asked for is taken)."""

    def __init__(self, single: bool) -> None:
        super().__init__("the SPI is in use" if single else "no free SPI in the range")
        self.single = single


class _Group:
    """SAs sharing an outbound key, oldest first, with the best one cached."""

    __slots__ = ("sas", "_best", "_dirty")

    def __init__(self) -> None:
        self.sas: dict[SecurityAssociation, None] = {}
        self._best: SecurityAssociation | None = None
        self._dirty = False

    def best(self) -> SecurityAssociation | None:
        if self._dirty:
            dying: SecurityAssociation | None = None
            best: SecurityAssociation | None = None
            for sa in reversed(self.sas):
                if sa.state == SaState.MATURE:
                    best = sa
                    break
                if dying is None and sa.state == SaState.DYING:
                    dying = sa
            self._best = best if best is not None else dying
            self._dirty = False
        return self._best


_EndpointKey = tuple[IPAddress, IPAddress, int, int]


class SAD:
    def __init__(self) -> None:
        self._by_spi: dict[tuple[IPAddress, int, int], SecurityAssociation] = {}
        self._by_endpoints: dict[_EndpointKey, _Group] = {}
        self._by_reqid: dict[_EndpointKey, _Group] = {}
        self.generation = 0
        self.changes: ChangeLog[SecurityAssociation] = ChangeLog()

    def __len__(self) -> int:
        return len(self._by_spi)

    def __iter__(self) -> Iterator[SecurityAssociation]:
        return iter(self._by_spi.values())

    def __contains__(self, sa: object) -> bool:
        return isinstance(sa, SecurityAssociation) and self._by_spi.get(sa.key) is sa

    def get(self, dst: IPAddress, satype: int, spi: int) -> SecurityAssociation | None:
        """The datapath's inbound lookup (and PF_KEY GET/DELETE/UPDATE)."""
        return self._by_spi.get((dst, satype, spi))

    def snapshot(self, satype: int = 0) -> list[SecurityAssociation]:
        """References to the SAs (of one satype, or all), for a dump that outlives changes."""
        if not satype:
            return list(self._by_spi.values())
        return [sa for sa in self._by_spi.values() if sa.satype == satype]

    # -- changes -----------------------------------------------------------------------------

    def add(self, sa: SecurityAssociation) -> None:
        key = sa.key
        if key in self._by_spi:
            raise KeyError(f"SPI {sa.spi:#x} already in use for {sa.dst}")
        self._by_spi[key] = sa
        self._by_endpoints.setdefault(_endpoint_key(sa), _Group()).sas[sa] = None
        if sa.reqid:
            self._by_reqid.setdefault(_reqid_key(sa), _Group()).sas[sa] = None
        self._dirty(sa)
        self.generation += 1
        self.changes.record(sa)

    def remove(self, sa: SecurityAssociation) -> None:
        if self._by_spi.get(sa.key) is not sa:
            raise KeyError("SA not in the SAD")
        del self._by_spi[sa.key]
        self._ungroup(self._by_endpoints, _endpoint_key(sa), sa)
        if sa.reqid:
            self._ungroup(self._by_reqid, _reqid_key(sa), sa)
        sa.state = SaState.DEAD
        sa.generation += 1
        self.generation += 1
        self.changes.record(sa)

    def set_state(self, sa: SecurityAssociation, state: SaState) -> None:
        sa.state = state
        sa.generation += 1
        self._dirty(sa)
        self.generation += 1
        self.changes.record(sa)

    def replace(self, old: SecurityAssociation, new: SecurityAssociation) -> None:
        """Put ``new`` in place of ``old`` (same key): UPDATE of a larval SA."""
        self.remove(old)
        self.add(new)

    def clear(self) -> list[SecurityAssociation]:
        removed = list(self._by_spi.values())
        for sa in removed:
            sa.state = SaState.DEAD
            sa.generation += 1
        self._by_spi.clear()
        self._by_endpoints.clear()
        self._by_reqid.clear()
        self.generation += 1
        self.changes.reset()
        return removed

    # -- outbound lookups --------------------------------------------------------------------

    def best_by_endpoints(self, src: IPAddress, dst: IPAddress, satype: int,
                          mode: IpsecMode) -> SecurityAssociation | None:
        """Newest mature (else dying) SA for the endpoints; an SA of mode "any" fits any mode."""
        exact = self._best(self._by_endpoints, (src, dst, satype, int(mode)))
        if mode == IpsecMode.ANY:
            return exact
        wild = self._best(self._by_endpoints, (src, dst, satype, int(IpsecMode.ANY)))
        return _better(exact, wild)

    def best_by_reqid(self, src: IPAddress, dst: IPAddress, satype: int,
                      reqid: int) -> SecurityAssociation | None:
        """Newest mature (else dying) SA with this reqid between these endpoints."""
        return self._best(self._by_reqid, (src, dst, satype, reqid))

    def for_request(self, request: IpsecRequest, src: IPAddress,
                    dst: IPAddress) -> SecurityAssociation | None:
        """The SA an outbound packet from ``src`` to ``dst`` uses for a policy's template.

        Tunnel mode: the template's endpoints; transport: the packet's. Level unique with a
        reqid: only SAs of that reqid (Linux); otherwise any SA between the endpoints.
        """
        if request.mode == IpsecMode.TUNNEL and request.src is not None and (
                request.dst is not None):
            src, dst = request.src, request.dst
        satype = _PROTO_SATYPE.get(request.proto, 0)
        if request.level == IpsecLevel.UNIQUE and request.reqid:
            return self.best_by_reqid(src, dst, satype, request.reqid)
        return self.best_by_endpoints(src, dst, satype, request.mode)

    # -- SPI allocation ----------------------------------------------------------------------

    def allocate_spi(self, dst: IPAddress, satype: int, low: int, high: int,
                     rng: random.Random) -> int:
        """A free SPI in [low, high] (reserved values excluded) for this dst and satype.

        Random probes first, as Linux does, then a scan from a random point, which ends after
        at most (SAs using the range + 1) steps. Raises ValueError for an empty range and
        SpiExhausted when nothing is free.
        """
        low = max(low, SPI_RESERVED_MAX + 1)
        high = min(high, SPI_MAX)
        if low > high:
            raise ValueError("empty SPI range")
        taken = self._by_spi
        if low == high:
            if (dst, satype, low) in taken:
                raise SpiExhausted(single=True)
            return low
        span = high - low + 1
        for _ in range(min(_RANDOM_PROBES, span)):
            spi = low + rng.randrange(span)
            if (dst, satype, spi) not in taken:
                return spi
        start = rng.randrange(span)
        for step in range(min(span, len(taken) + 1)):
            spi = low + (start + step) % span
            if (dst, satype, spi) not in taken:
                return spi
        raise SpiExhausted(single=False)

    # -- internals ---------------------------------------------------------------------------

    def _dirty(self, sa: SecurityAssociation) -> None:
        group = self._by_endpoints.get(_endpoint_key(sa))
        if group is not None:
            group._dirty = True
        if sa.reqid:
            group = self._by_reqid.get(_reqid_key(sa))
            if group is not None:
                group._dirty = True

    @staticmethod
    def _ungroup(index: dict[_EndpointKey, _Group], key: _EndpointKey,
                 sa: SecurityAssociation) -> None:
        group = index[key]
        del group.sas[sa]
        if group.sas:
            group._dirty = True
        else:
            del index[key]

    @staticmethod
    def _best(index: dict[_EndpointKey, _Group], key: _EndpointKey) -> SecurityAssociation | None:
        group = index.get(key)
        return None if group is None else group.best()


def _endpoint_key(sa: SecurityAssociation) -> _EndpointKey:
    return (sa.src, sa.dst, int(sa.satype), int(sa.mode))


def _reqid_key(sa: SecurityAssociation) -> _EndpointKey:
    return (sa.src, sa.dst, int(sa.satype), sa.reqid)


def _better(a: SecurityAssociation | None,
            b: SecurityAssociation | None) -> SecurityAssociation | None:
    """Mature beats dying; between equals the newer (later add_time) wins."""
    if a is None or b is None:
        return a if b is None else b
    if (a.state == SaState.MATURE) != (b.state == SaState.MATURE):
        return a if a.state == SaState.MATURE else b
    return a if a.add_time >= b.add_time else b
