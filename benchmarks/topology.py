"""The standard four-namespace topology: hostL -- gwL -- [nat] -- gwR -- hostR (IPv4).

Used by the throughput benchmark and by the strongSwan interop tests. Addresses come from the
RFC 2544 benchmarking range 198.18.0.0/15 and live only inside namespaces created here.

    hostL 198.18.1.2 --host-- gwL 198.18.1.1
    gwL   198.18.0.1 --wan--- gwR 198.18.0.2          (no NAT)
    gwL   198.18.3.1 --wan--- nat 198.18.3.254 / 198.18.0.1 --wan-- gwR 198.18.0.2  (NAT)
    gwR   198.18.2.1 --host-- hostR 198.18.2.2

gwR always sees gwL as 198.18.0.1 (gwL itself, or the NAT's masquerading address), so IKE peer
addresses do not change with the NAT option; only gwL's own outer address does.

Without ``cleartext_routes`` the gateways have no route to the far host subnet: hostL reaches
hostR only through a tunnel that installs its own routes (as strongSwan's kernel-libipsec does).
Every namespace is deleted on exit, and any process started through ``popen`` is ended by PID.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from userspace_ipsec.lab import stop_process

LEFT_NET = "198.18.1.0/24"
RIGHT_NET = "198.18.2.0/24"
HOST_L_ADDR = "198.18.1.2"
GW_L_INNER = "198.18.1.1"
GW_R_INNER = "198.18.2.1"
HOST_R_ADDR = "198.18.2.2"
GW_L_WAN = "198.18.0.1"  # gwL's outer address without NAT; the NAT's outside address with it
GW_R_WAN = "198.18.0.2"
GW_L_WAN_NATTED = "198.18.3.1"  # gwL's outer address behind the NAT
NAT_INSIDE = "198.18.3.254"

STOP_TIMEOUT = 5.0

# Runs inside a namespace: argv = dst, count, wait; prints the number of echo replies received.
_PING_CODE = r"""
import os, select, socket, struct, sys, time
dst, count, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, got = os.getpid() & 0xFFFF, 0
for seq in range(count):
    body = struct.pack("!HH", ident, seq) + b"uipsec-ping-payload-" * 3
    sock.sendto(struct.pack("!BBH", 8, 0, csum(b"\x08\x00\x00\x00" + body)) + body, (dst, 0))
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
        pkt, src = sock.recvfrom(2048)
        icmp = pkt[(pkt[0] & 15) * 4:]
        if src[0] == dst and icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            got += 1
            break
print(got)
"""


class TopologyError(RuntimeError):
    """A namespace command failed; the message carries the command and its stderr."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    """Run a command (bounded in time); return its stdout, raise TopologyError on failure."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise TopologyError(f"command not found: {argv[0]}") from exc
    if check and done.returncode != 0:
        raise TopologyError(f"{' '.join(argv)} -> exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def netns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@dataclass(slots=True)
class Topology:
    """Names of the namespaces of one built topology, and helpers to run commands in them."""

    host_l: str
    gw_l: str
    gw_r: str
    host_r: str
    nat: str | None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        names = [self.host_l, self.gw_l, self.gw_r, self.host_r]
        return names + ([self.nat] if self.nat else [])

    @property
    def gw_l_outer(self) -> str:
        """gwL's own address on its outer interface (IKE/ESP source)."""
        return GW_L_WAN_NATTED if self.nat else GW_L_WAN

    @property
    def gw_l_seen_by_r(self) -> str:
        return GW_L_WAN

    @property
    def gw_r_outer(self) -> str:
        return GW_R_WAN

    def run(
        self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> str:
        return run(netns_argv(ns, argv), check=check, timeout=timeout)

    def popen(
        self, ns: str, argv: Sequence[str], *, stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start a process in ``ns``; it is ended by PID at teardown if still running."""
        proc = subprocess.Popen(netns_argv(ns, argv), stdout=stdout, stderr=stderr)
        self.processes.append(proc)
        return proc

    def ping(self, src_ns: str, dst: str, *, count: int = 3, wait: float = 1.0) -> int:
        """Send ``count`` ICMP echo requests from ``src_ns``; return how many were answered.

        Done by a small Python prober (raw ICMP socket) so that no ping binary is needed.
        """
        out = run(
            netns_argv(src_ns, [sys.executable, "-c", _PING_CODE, dst, str(count), str(wait)]),
            timeout=count * (wait + 0.5) + 10,
        )
        return int(out.strip() or 0)

    def teardown(self) -> None:
        for proc in reversed(self.processes):
            stop_process(proc)
        self.processes.clear()
        for ns in self.namespaces:
            run(["ip", "netns", "del", ns], check=False)


def _veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    # Created directly inside the namespaces: no name clash with the root namespace or other runs.
    run(["ip", "-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b,
         "netns", ns_b])
    run(["ip", "-n", ns_a, "link", "set", name_a, "up"])
    run(["ip", "-n", ns_b, "link", "set", name_b, "up"])


def _addr(ns: str, dev: str, cidr: str) -> None:
    run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])


def _route(ns: str, dest: str, via: str) -> None:
    run(["ip", "-n", ns, "route", "add", dest, "via", via])


def _sysctl(ns: str, *settings: str) -> None:
    run(netns_argv(ns, ["sysctl", "-q", "-w", *settings]))


def _build(topo: Topology, cleartext_routes: bool) -> None:
    for ns in topo.namespaces:
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    for ns in (topo.gw_l, topo.gw_r, *([topo.nat] if topo.nat else [])):
        _sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0")

    _veth(topo.host_l, "gw", topo.gw_l, "host")
    _addr(topo.host_l, "gw", f"{HOST_L_ADDR}/24")
    _addr(topo.gw_l, "host", f"{GW_L_INNER}/24")
    run(["ip", "-n", topo.host_l, "route", "add", "default", "via", GW_L_INNER])

    _veth(topo.host_r, "gw", topo.gw_r, "host")
    _addr(topo.host_r, "gw", f"{HOST_R_ADDR}/24")
    _addr(topo.gw_r, "host", f"{GW_R_INNER}/24")
    run(["ip", "-n", topo.host_r, "route", "add", "default", "via", GW_R_INNER])

    if topo.nat is None:
        _veth(topo.gw_l, "wan", topo.gw_r, "wan")
        _addr(topo.gw_l, "wan", f"{GW_L_WAN}/24")
        _addr(topo.gw_r, "wan", f"{GW_R_WAN}/24")
        l_next_hop = GW_R_WAN
    else:
        _veth(topo.gw_l, "wan", topo.nat, "in")
        _veth(topo.nat, "out", topo.gw_r, "wan")
        _addr(topo.gw_l, "wan", f"{GW_L_WAN_NATTED}/24")
        _addr(topo.nat, "in", f"{NAT_INSIDE}/24")
        _addr(topo.nat, "out", f"{GW_L_WAN}/24")
        _addr(topo.gw_r, "wan", f"{GW_R_WAN}/24")
        # gwL reaches the outside only through the NAT, which masquerades everything it forwards.
        _route(topo.gw_l, f"{GW_R_WAN}/32", NAT_INSIDE)
        l_next_hop = NAT_INSIDE
        run(netns_argv(topo.nat, ["nft", "add table ip nat; add chain ip nat post "
                                  "{ type nat hook postrouting priority 100; }; "
                                  'add rule ip nat post oifname "out" masquerade']))
        if cleartext_routes:
            _route(topo.nat, RIGHT_NET, GW_R_WAN)
            _route(topo.nat, LEFT_NET, GW_L_WAN_NATTED)
    if cleartext_routes:
        _route(topo.gw_l, RIGHT_NET, l_next_hop)
        _route(topo.gw_r, LEFT_NET, GW_L_WAN)


NS_PREFIX = "uip"


def sweep_stale() -> list[str]:
    """Delete namespaces named by ``topology()`` whose creating process is gone (a killed run)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/run/netns"):
            pid = name[len(NS_PREFIX):].split("-", 1)[0]
            if name.startswith(NS_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                run(["ip", "netns", "del", name], check=False)
                removed.append(name)
    return removed


@contextlib.contextmanager
def topology(
    prefix: str | None = None, *, nat: bool = False, cleartext_routes: bool = False
) -> Iterator[Topology]:
    """Build the topology in fresh namespaces named ``<prefix>-<role>``; always tear it down."""
    if prefix is None:
        sweep_stale()
        prefix = f"{NS_PREFIX}{os.getpid()}-{time.monotonic_ns() % 100000}"
    topo = Topology(
        host_l=f"{prefix}-hostL", gw_l=f"{prefix}-gwL", gw_r=f"{prefix}-gwR",
        host_r=f"{prefix}-hostR", nat=f"{prefix}-nat" if nat else None,
    )
    try:
        _build(topo, cleartext_routes)
        yield topo
    finally:
        topo.teardown()
