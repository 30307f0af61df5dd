"""Routes into the TUN that follow the SPD: one per outbound ipsec policy's destination.

Only outbound ``ipsec`` policies get a route (in the datapath's policy table), so bypass and
unprotected traffic never enters the TUN. The preferred source of a route is a local address
inside the policy's source selector when there is one (so that the gateway's own traffic to
the remote subnet is protected too, as strongSwan's kernel-libipsec does), else the tunnel's
local endpoint if it is ours, else none.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

from userspace_ipsec.pfkey.constants import IpsecMode, PolicyDir, PolicyType
from userspace_ipsec.sa import Policy
from userspace_ipsec.spd import SPD

log = logging.getLogger(__name__)


Done = Callable[[OSError | None], None]  # None: done; else why the kernel refused


class RouteInstaller(Protocol):
    """Installs routes into a device; ``done`` is called once per request, before the call
    returns or later (from the event loop), unless the call raises instead."""

    def add_route(self, dst: str, ifname: str, src: str | None, done: Done) -> None: ...
    def remove_route(self, dst: str, ifname: str, done: Done) -> None: ...


def local_addresses() -> frozenset[bytes]:
    """Packed addresses of every interface in this network namespace (netlink)."""
    from pyroute2 import IPRoute

    out: set[bytes] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                family = socket.AF_INET if msg["family"] == socket.AF_INET else socket.AF_INET6
                out.add(socket.inet_pton(family, addr.split("%")[0]))
    return frozenset(out)


class LocalIndex:
    """The local addresses sorted as integers per IP version: the lowest one inside a prefix
    is one bisection away, whatever the number of addresses."""

    __slots__ = ("packed", "sorted")

    def __init__(self, local: Iterable[bytes]) -> None:
        self.packed = frozenset(local)
        self.sorted: dict[int, list[int]] = {4: [], 6: []}
        for a in self.packed:
            if len(a) in (4, 16):
                self.sorted[4 if len(a) == 4 else 6].append(int.from_bytes(a, "big"))
        for values in self.sorted.values():
            values.sort()

    def lowest_in(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
        values = self.sorted[net.version]
        i = bisect.bisect_left(values, int(net.network_address))
        if i < len(values) and values[i] <= int(net.broadcast_address):
            return str(ipaddress.ip_address(values[i]) if net.version == 4
                       else ipaddress.IPv6Address(values[i]))
        return None


def preferred_source(policy: Policy, local: Iterable[bytes] | LocalIndex) -> str | None:
    """A local address inside the source selector (the lowest), else the tunnel's local
    endpoint."""
    index = local if isinstance(local, LocalIndex) else LocalIndex(local)
    net = policy.selector.src
    inside = index.lowest_in(net)
    if inside is not None:
        return inside
    req = policy.requests[0] if policy.requests else None
    if req is not None and req.mode == IpsecMode.TUNNEL and req.src is not None \
            and req.src.version == net.version and req.src.packed in index.packed:
        return str(req.src)
    return None


SourceCache = dict[Any, Any]
MAX_CACHED_SOURCES = 1 << 16  # policies long gone are forgotten past this

_OUT, _IPSEC = PolicyDir.OUTBOUND, PolicyType.IPSEC


def wanted_routes(policies: Iterable[Policy], local: frozenset[bytes] | LocalIndex,
                  cache: SourceCache | None = None) -> dict[str, str | None]:
    """Destination prefix -> preferred source for every outbound ipsec policy (first wins)."""
    index = local if isinstance(local, LocalIndex) else LocalIndex(local)
    cache = {} if cache is None else cache
    routes: dict[str, str | None] = {}
    for policy in policies:
        dst, src = route_of(policy, index, cache)
        if dst and dst not in routes:
            routes[dst] = src
    return routes


def route_of(policy: Policy, index: LocalIndex, cache: SourceCache) -> tuple[str, str | None]:
    """The policy's route (destination prefix, preferred source); ("", None) for none.
    ``cache`` holds the answers for one set of local addresses: a policy's selector and
    requests never change (an update replaces the object)."""
    known = cache.get(policy)
    if known is None:
        if policy.direction != _OUT or policy.action != _IPSEC:
            known = cache[policy] = ("", None)
        else:
            known = cache[policy] = (str(policy.selector.dst), preferred_source(policy, index))
    return known


class RouteSync:
    """Keeps the installed routes equal to ``wanted_routes`` of the SPD, following the SPD's
    change log (a policy added or removed costs O(1), not a walk of the SPD); failures are
    logged and retried on the next sync (a route the kernel refuses must not stop the daemon).

    Requests may complete later (``RouteInstaller``): a destination has at most one request in
    flight, and when its answer comes the route is brought to what is wanted by then.
    ``installed`` holds only what the kernel confirmed.

    Among outbound ipsec policies with one destination, the oldest still present chooses the
    route's source."""

    __slots__ = ("installer", "ifname", "installed", "errors", "_index", "_sources", "_wanted",
                 "_cursor", "_retry", "_in_flight", "_warned")

    def __init__(self, installer: RouteInstaller, ifname: str) -> None:
        self.installer = installer
        self.ifname = ifname
        self.installed: dict[str, str | None] = {}
        self.errors = 0
        self._index: LocalIndex | None = None
        self._sources: SourceCache = {}
        self._wanted: dict[str, dict[Policy, str | None]] = {}  # dst -> its policies' sources
        self._cursor = -1
        self._retry: set[str] = set()
        self._in_flight: dict[str, tuple[bool, str | None]] = {}  # dst -> (add?, source)
        self._warned: set[str] = set()  # failing destinations already logged at warning

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._in_flight)

    @property
    def failed(self) -> int:
        """Destinations whose last request failed: the next sync tries them again."""
        return len(self._retry)

    def sync(self, spd: SPD, local: frozenset[bytes]) -> bool:
        """Add, change and remove routes; False when a request failed (answers that come
        later count in ``errors`` and are retried on the next sync)."""
        index = self._index
        changed = spd.changes.since(self._cursor)
        self._cursor = spd.changes.cursor
        if index is None or (index.packed is not local and index.packed != local) or \
                len(self._sources) > MAX_CACHED_SOURCES:
            self._index = index = LocalIndex(local)
            self._sources = {}
            changed = None
        dirty = self._retry
        self._retry = set()
        if changed is None:  # rescan: every destination, old and new
            self._wanted = {}
            dirty.update(self.installed)
            changed = list(spd)
        for policy in dict.fromkeys(changed):
            dst, src = route_of(policy, index, self._sources)
            if not dst:
                continue
            dirty.add(dst)
            if policy in spd:
                self._wanted.setdefault(dst, {})[policy] = src
            elif (sources := self._wanted.get(dst)) is not None:
                sources.pop(policy, None)
                if not sources:
                    del self._wanted[dst]
        for dst in dirty:
            self._apply(dst)
        return not self._retry

    def _apply(self, dst: str) -> None:
        if dst in self._in_flight:
            return  # its answer brings it up to date
        sources = self._wanted.get(dst)
        src = None
        if sources:
            src = next(iter(sources.values()))
            if dst in self.installed and self.installed[dst] == src:
                return
        elif dst not in self.installed:
            return
        add = bool(sources)
        self._in_flight[dst] = (add, src)
        done = partial(self._done, dst)
        try:
            if add:
                self.installer.add_route(dst, self.ifname, src, done)
            else:
                self.installer.remove_route(dst, self.ifname, done)
        except Exception as exc:  # netlink refusal: keep what is there, try again next time
            if dst in self._in_flight:
                done(exc if isinstance(exc, OSError) else OSError(str(exc)))

    def _done(self, dst: str, error: OSError | None) -> None:
        asked = self._in_flight.pop(dst, None)
        if asked is None:
            return  # answered twice: the installer's bug, not a route change
        add, src = asked
        if error is not None:
            self.errors += 1
            # Retried from the timer: warn once per destination until it works, not each time.
            warn = log.debug if dst in self._warned else log.warning
            self._warned.add(dst)
            warn("datapath: cannot %s route %s: %s", "add" if add else "remove", dst, error)
            self._retry.add(dst)
            return
        self._warned.discard(dst)
        if add:
            self.installed[dst] = src
            log.debug("datapath: route %s dev %s src %s", dst, self.ifname, src or "-")
        else:
            self.installed.pop(dst, None)
        self._apply(dst)  # the SPD may have changed while the request was out
