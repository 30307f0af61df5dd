"""The security policy database, with a per-flow lookup cache (FreeBSD's spdcache idea).

Policies of one direction are kept in Linux's order: by priority (lower value first), then by
insertion order. A packet's profile (direction, addresses, protocol, ports) is matched against
them in that order and the first match wins. The cache maps a profile to that answer, "no
policy" included, so the flows in use cost one dict lookup however many policies there are. Any
change to the SPD empties the cache, bumps ``generation`` and records the policy in ``changes``
(a flush resets that log); when the cache reaches its bound
it is emptied too (the flows in use refill it at once, and it stays correct).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import dataclass

from .changelog import ChangeLog
from .pfkey.constants import IPSEC_PROTO_ANY, PolicyDir
from .pfkey.messages import IPAddress
from .sa import PORT_PROTOS, Policy, Selector

DEFAULT_CACHE_SIZE = 65536
_MISS = object()


@dataclass(frozen=True, slots=True)
class _Entry:
    """A policy compiled for matching: ints and masks, no ipaddress objects."""

    order: tuple[int, int]  # (priority, insertion sequence)
    policy: Policy
    addr_len: int  # 4 or 16: packed address length
    src_net: int
    src_mask: int
    dst_net: int
    dst_mask: int
    proto: int
    sport: int
    dport: int

    def __lt__(self, other: _Entry) -> bool:
        return self.order < other.order


def _compile(policy: Policy, seq: int) -> _Entry:
    sel = policy.selector
    return _Entry(
        (policy.priority, seq), policy, 4 if sel.version == 4 else 16,
        int(sel.src.network_address), int(sel.src.netmask),
        int(sel.dst.network_address), int(sel.dst.netmask),
        sel.proto, sel.sport, sel.dport,
    )


class SPD:
    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.cache_size = cache_size
        self.generation = 0
        self.changes: ChangeLog[Policy] = ChangeLog()
        self.cache_misses = 0
        self.cache_flushes = 0
        self._by_id: dict[int, Policy] = {}
        self._by_selector: dict[tuple[int, Selector], Policy] = {}
        self._entries: dict[int, list[_Entry]] = {int(d): [] for d in PolicyDir}
        self._entry_of: dict[int, _Entry] = {}  # by policy id: removal by bisection
        self._cache: dict[tuple[int, bytes, bytes, int, int, int], Policy | None] = {}
        self._seq = 0
        self._id_gen = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Policy]:
        for direction in sorted(self._entries):
            for entry in self._entries[direction]:
                yield entry.policy

    def __contains__(self, policy: object) -> bool:
        return isinstance(policy, Policy) and self._by_id.get(policy.id) is policy

    def snapshot(self) -> list[Policy]:
        return list(self)

    def get(self, policy_id: int) -> Policy | None:
        return self._by_id.get(policy_id)

    def find(self, selector: Selector, direction: PolicyDir) -> Policy | None:
        return self._by_selector.get((int(direction), selector))

    # -- lookups -----------------------------------------------------------------------------

    def lookup(self, direction: int, src: IPAddress, dst: IPAddress, proto: int,
               sport: int = 0, dport: int = 0) -> Policy | None:
        return self.lookup_packed(direction, src.packed, dst.packed, proto, sport, dport)

    def lookup_packed(self, direction: int, src: bytes, dst: bytes, proto: int,
                      sport: int = 0, dport: int = 0) -> Policy | None:
        """The datapath's lookup, on addresses as packed bytes straight from the header.

        Ports (ICMP type and code) are ignored for protocols that have none.
        """
        if proto not in PORT_PROTOS:
            sport = dport = 0
        key = (direction, src, dst, proto, sport, dport)
        hit = self._cache.get(key, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        policy = self.lookup_uncached(direction, src, dst, proto, sport, dport)
        self.cache_misses += 1
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
            self.cache_flushes += 1
        self._cache[key] = policy
        return policy

    def lookup_uncached(self, direction: int, src: bytes, dst: bytes, proto: int,
                        sport: int = 0, dport: int = 0) -> Policy | None:
        """The first policy in order that matches; ports must already be 0 if not applicable."""
        addr_len = len(src)
        if len(dst) != addr_len:
            return None
        s = int.from_bytes(src, "big")
        d = int.from_bytes(dst, "big")
        for e in self._entries.get(direction, ()):
            if (
                e.addr_len == addr_len
                and s & e.src_mask == e.src_net
                and d & e.dst_mask == e.dst_net
                and (e.proto == IPSEC_PROTO_ANY or e.proto == proto)
                and (not e.sport or e.sport == sport)
                and (not e.dport or e.dport == dport)
            ):
                return e.policy
        return None

    @property
    def cached_flows(self) -> int:
        return len(self._cache)

    # -- changes -----------------------------------------------------------------------------

    def insert(self, policy: Policy) -> Policy:
        """Add a policy with a new id (or the one it has, when it replaces a policy)."""
        key = (int(policy.direction), policy.selector)
        if key in self._by_selector:
            raise KeyError("a policy with this selector and direction exists")
        if not policy.id:
            policy.id = self._new_id(policy.direction)
        elif policy.id in self._by_id:
            raise KeyError(f"policy id {policy.id} in use")
        self._seq += 1
        entry = self._entry_of[policy.id] = _compile(policy, self._seq)
        insort(self._entries[int(policy.direction)], entry)
        self._by_selector[key] = policy
        self._by_id[policy.id] = policy
        self._changed()
        self.changes.record(policy)
        return policy

    def update(self, policy: Policy) -> Policy | None:
        """Insert, or replace the policy with the same selector and direction (keeping its
        id); returns the replaced policy."""
        old = self.find(policy.selector, policy.direction)
        if old is not None:
            self.remove(old)
            policy.id = old.id
        self.insert(policy)
        return old

    def remove(self, policy: Policy) -> None:
        if self._by_id.get(policy.id) is not policy:
            raise KeyError("policy not in the SPD")
        del self._by_id[policy.id]
        del self._by_selector[(int(policy.direction), policy.selector)]
        entries = self._entries[int(policy.direction)]
        del entries[bisect_left(entries, self._entry_of.pop(policy.id))]
        self._changed()
        self.changes.record(policy)

    def flush(self) -> list[Policy]:
        removed = self.snapshot()
        self._by_id.clear()
        self._by_selector.clear()
        self._entry_of.clear()
        for entries in self._entries.values():
            entries.clear()
        self._changed()
        self.changes.reset()
        return removed

    def _changed(self) -> None:
        self.generation += 1
        self._cache.clear()

    def _new_id(self, direction: PolicyDir) -> int:
        """Linux's scheme: a multiple of 8 plus the xfrm direction (in 0, out 1, fwd 2)."""
        while True:
            self._id_gen += 8
            policy_id = self._id_gen | (max(int(direction), 1) - 1)
            if policy_id not in self._by_id:
                return policy_id
