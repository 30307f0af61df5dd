"""Kernel network configuration for the datapath: TUN link, routes into it, policy routing.

Routes to protected prefixes live in a table of their own (220 by default, as strongSwan does),
consulted by a rule ``not fwmark MARK lookup TABLE``. The datapath's own UDP 4500 and raw ESP
sockets carry SO_MARK = MARK, so their packets skip that table and take the main one; without
that a host-to-host or transport-mode policy would route the ESP packets back into the TUN.

Everything installed is remembered and ``remove_all`` deletes exactly that, in reverse order.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

FIB_RULE_INVERT = 0x2
IPV6_MIN_MTU = 1280
IPV4_MIN_MTU = 576
_GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV)


class NetConfigError(RuntimeError):
    """A configuration step failed; the message names the step and the kernel's reason."""


@dataclass(slots=True, frozen=True)
class RoutingPolicy:
    """Table and mark numbers. The mark must be the SO_MARK given to the datapath sockets."""

    table: int = 220
    fwmark: int = 0x220
    fwmask: int = 0xFFFFFFFF
    priority: int = 220

    def __post_init__(self) -> None:
        if not 0 < self.table < 2**32 or self.table in (253, 254, 255):
            raise ValueError(f"routing table {self.table} is reserved or out of range")
        if not 0 < self.fwmark < 2**32 or self.fwmark & ~self.fwmask:
            raise ValueError("fwmark must be non-zero and inside fwmask")
        if not 0 < self.priority < 32766:
            raise ValueError("rule priority must be below the main table's 32766")


def tun_mtu(path_mtu: int, overhead: int, *, ipv6: bool = True) -> int:
    """TUN MTU that keeps an encapsulated packet within path_mtu, given the worst-case overhead.

    Overhead is outer IP + (UDP) + ESP header + IV + max padding + trailer + ICV. Refuses a result
    below the minimum of the inner families (1280 when IPv6 runs inside, 576 otherwise).
    """
    if overhead < 0 or path_mtu <= 0:
        raise ValueError("path MTU and overhead must be positive")
    mtu = path_mtu - overhead
    floor = IPV6_MIN_MTU if ipv6 else IPV4_MIN_MTU
    if mtu < floor:
        raise ValueError(
            f"path MTU {path_mtu} minus overhead {overhead} = {mtu} is below {floor}"
        )
    return mtu


def _family(prefix: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_network(prefix, strict=False).version == 6 \
        else socket.AF_INET


@dataclass(slots=True)
class _Undo:
    what: str
    kind: str  # "addr" | "route" | "rule" | "link"
    args: dict[str, Any] = field(default_factory=dict)


class NetConfig:
    """Idempotent installer of the datapath's addresses, routes and rules, with exact undo."""

    __slots__ = ("policy", "_ipr", "_own_ipr", "_undo", "_routes", "_ifindex")

    def __init__(self, policy: RoutingPolicy | None = None, ipr: IPRoute | None = None) -> None:
        self.policy = policy or RoutingPolicy()
        self._own_ipr = ipr is None
        self._ipr = ipr if ipr is not None else IPRoute()
        self._undo: list[_Undo] = []
        self._routes: set[str] = set()  # the routes among _undo, by description
        self._ifindex: dict[str, int] = {}  # a dump of every link per route is costly

    # -- helpers -----------------------------------------------------------------------------
    def _index(self, ifname: str) -> int:
        index = self._ifindex.get(ifname)
        if index is not None:
            return index
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetConfigError(f"no interface named {ifname!r}")
        index = self._ifindex[ifname] = int(found[0])
        return index

    def _do(self, what: str, fn: Any, *args: Any, **kw: Any) -> bool:
        """Run a netlink request; False if it already existed, NetConfigError on failure."""
        try:
            fn(*args, **kw)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise NetConfigError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}") from exc
        return True

    @property
    def installed(self) -> list[str]:
        """Human-readable list of what remove_all would undo."""
        return [u.what for u in self._undo]

    # -- link --------------------------------------------------------------------------------
    def setup_link(self, ifname: str, addresses: Sequence[str] = (),
                   mtu: int | None = None) -> None:
        """Set MTU, add addresses (CIDR; v6 without DAD) and bring the link up."""
        idx = self._index(ifname)
        link = self._ipr.get_links(idx)[0]
        if mtu is not None and link.get_attr("IFLA_MTU") != mtu:
            old = link.get_attr("IFLA_MTU")
            self._do(f"set mtu {mtu} on {ifname}", self._ipr.link, "set", index=idx, mtu=mtu)
            self._undo.append(_Undo(f"mtu {ifname} {mtu}", "link",
                                    {"index": idx, "mtu": old}))
        for cidr in addresses:
            iface = ipaddress.ip_interface(cidr)
            kw: dict[str, Any] = {"index": idx, "address": str(iface.ip),
                                  "prefixlen": iface.network.prefixlen}
            if iface.version == 6:
                kw["family"] = socket.AF_INET6
                kw["flags"] = 0x02  # IFA_F_NODAD: usable at once, nobody else is on a TUN
            else:
                kw["family"] = socket.AF_INET
            if self._do(f"add address {cidr} to {ifname}", self._ipr.addr, "add", **kw):
                self._undo.append(_Undo(f"address {cidr} on {ifname}", "addr",
                                        {k: v for k, v in kw.items() if k != "flags"}))
        if not link["flags"] & 0x1:  # IFF_UP
            self._do(f"bring {ifname} up", self._ipr.link, "set", index=idx, state="up")
            self._undo.append(_Undo(f"link {ifname} up", "link",
                                    {"index": idx, "state": "down"}))

    # -- routes ------------------------------------------------------------------------------
    def _route_kw(self, dst: str, ifname: str, src: str | None) -> dict[str, Any]:
        net = ipaddress.ip_network(dst, strict=False)
        kw: dict[str, Any] = {"dst": str(net.network_address), "dst_len": net.prefixlen,
                              "oif": self._index(ifname), "table": self.policy.table,
                              "family": _family(dst)}
        if src is not None:
            if ipaddress.ip_address(src).version != net.version:
                raise ValueError(f"source {src} is not of the family of {dst}")
            kw["prefsrc"] = src
        return kw

    def add_route(self, dst: str, ifname: str, src: str | None = None) -> None:
        """Route dst into ifname in the policy table, preferring source address src.

        A route for dst already in the table is replaced (the table is ours) and then removed
        by remove_all like one we added.
        """
        kw = self._route_kw(dst, ifname, src)
        what = f"route {dst} dev {ifname} table {self.policy.table}"
        try:
            if not self._do(what, self._ipr.route, "add", **kw):
                self._do(what, self._ipr.route, "replace", **kw)
        except NetConfigError:
            self._ifindex.pop(ifname, None)  # the device may have gone: look it up again
            raise
        if what not in self._routes:
            self._routes.add(what)
            self._undo.append(_Undo(what, "route", kw))

    def remove_route(self, dst: str, ifname: str) -> None:
        what = f"route {dst} dev {ifname} table {self.policy.table}"
        self._delete(_Undo(what, "route", self._route_kw(dst, ifname, None)))
        if what in self._routes:
            self._routes.discard(what)
            self._undo = [u for u in self._undo if u.what != what]

    # -- rules -------------------------------------------------------------------------------
    def install_rules(self) -> None:
        """``not fwmark MARK/MASK lookup TABLE`` at the policy priority, for v4 and v6."""
        p = self.policy
        for fam in (socket.AF_INET, socket.AF_INET6):
            kw: dict[str, Any] = {"family": fam, "table": p.table, "priority": p.priority,
                                  "fwmark": p.fwmark, "fwmask": p.fwmask,
                                  "flags": FIB_RULE_INVERT, "action": "FR_ACT_TO_TBL"}
            what = f"rule v{4 if fam == socket.AF_INET else 6} not fwmark {p.fwmark:#x} " \
                   f"lookup {p.table}"
            if self._do(what, self._ipr.rule, "add", **kw):
                self._undo.append(_Undo(what, "rule", kw))

    # -- undo --------------------------------------------------------------------------------
    def _delete(self, u: _Undo) -> None:
        try:
            if u.kind == "addr":
                self._ipr.addr("del", **u.args)
            elif u.kind == "route":
                self._ipr.route("del", **u.args)
            elif u.kind == "rule":
                self._ipr.rule("del", **u.args)
            else:
                self._ipr.link("set", **u.args)
        except NetlinkError as exc:
            if exc.code not in _GONE:  # gone already (the TUN was closed): nothing to undo
                raise NetConfigError(f"undo {u.what}: {exc}") from exc

    def remove_all(self) -> None:
        """Undo everything installed, newest first; keeps going and reports all failures."""
        errors = []
        self._routes.clear()
        self._ifindex.clear()
        while self._undo:
            u = self._undo.pop()
            try:
                self._delete(u)
            except NetConfigError as exc:
                errors.append(str(exc))
        if errors:
            raise NetConfigError("; ".join(errors))

    def close(self) -> None:
        if self._own_ipr:
            self._ipr.close()

    def __enter__(self) -> NetConfig:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.remove_all()
        finally:
            self.close()
