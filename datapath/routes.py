"""Routes into the TUN that follow the SPD: one per outbound ipsec policy's destination.

Only outbound ``ipsec`` policies get a route (in the datapath's policy table), so bypass and
unprotected traffic never enters the TUN. The preferred source of a route is a local address
inside the policy's source selector when there is one (so that the gateway's own traffic to
the remote subnet is protected too, as strongSwan's kernel-libipsec does), else the tunnel's
local endpoint if it is ours, else none.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Protocol

from userspace_ipsec.pfkey.constants import IpsecMode, PolicyDir, PolicyType
from userspace_ipsec.sa import Policy

log = logging.getLogger(__name__)


class RouteInstaller(Protocol):
    def add_route(self, dst: str, ifname: str, src: str | None = None) -> None: ...
    def remove_route(self, dst: str, ifname: str) -> None: ...


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


def preferred_source(policy: Policy, local: Iterable[bytes]) -> str | None:
    """A local address inside the source selector, else the tunnel's local endpoint."""
    net = policy.selector.src
    inside = sorted(ipaddress.ip_address(a) for a in local
                    if len(a) == (4 if net.version == 4 else 16)
                    and ipaddress.ip_address(a) in net)
    if inside:
        return str(inside[0])
    req = policy.requests[0] if policy.requests else None
    if req is not None and req.mode == IpsecMode.TUNNEL and req.src is not None \
            and req.src.version == net.version and req.src.packed in set(local):
        return str(req.src)
    return None


def wanted_routes(policies: Iterable[Policy], local: frozenset[bytes]) -> dict[str, str | None]:
    """Destination prefix -> preferred source for every outbound ipsec policy (first wins)."""
    routes: dict[str, str | None] = {}
    for policy in policies:
        if policy.direction != PolicyDir.OUTBOUND or policy.action != PolicyType.IPSEC:
            continue
        dst = str(policy.selector.dst)
        if dst not in routes:
            routes[dst] = preferred_source(policy, local)
    return routes


class RouteSync:
    """Keeps the installed routes equal to ``wanted_routes`` of the SPD; failures are logged
    and retried on the next sync (a route the kernel refuses must not stop the daemon)."""

    __slots__ = ("installer", "ifname", "installed", "errors")

    def __init__(self, installer: RouteInstaller, ifname: str) -> None:
        self.installer = installer
        self.ifname = ifname
        self.installed: dict[str, str | None] = {}
        self.errors = 0

    def sync(self, policies: Iterable[Policy], local: frozenset[bytes]) -> bool:
        """Add, change and remove routes; True when everything is in place."""
        want = wanted_routes(policies, local)
        ok = True
        for dst in [d for d in self.installed if d not in want]:
            try:
                self.installer.remove_route(dst, self.ifname)
                del self.installed[dst]
            except Exception as exc:  # netlink refusal: keep it, try again next time
                ok = False
                self.errors += 1
                log.warning("datapath: cannot remove route %s: %s", dst, exc)
        for dst, src in want.items():
            if dst in self.installed and self.installed[dst] == src:
                continue
            try:
                self.installer.add_route(dst, self.ifname, src)
                self.installed[dst] = src
                log.info("datapath: route %s dev %s src %s", dst, self.ifname, src or "-")
            except Exception as exc:
                ok = False
                self.errors += 1
                log.warning("datapath: cannot add route %s: %s", dst, exc)
        return ok
