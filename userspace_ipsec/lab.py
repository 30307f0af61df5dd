"""A network lab: namespaces, veth links, NAT, processes, always cleaned up.

``uipsec demo``, the namespace tests and the benchmarks build their hosts and gateways with it.
Every namespace is named ``<prefix><pid><rand>-<role>`` so parallel runs never collide and a
later run can sweep namespaces left behind by a run that was SIGKILLed (its pid is no longer
alive). All traffic stays inside the namespaces this lab creates.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

PREFIX = "uit-"
NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000
_CMD_TIMEOUT = 20.0
T = TypeVar("T")


class HarnessError(RuntimeError):
    """The harness cannot run here (not root, tools missing) or a setup command failed."""


_PACKAGES = {"ip": "iproute2", "nft": "nftables", "sysctl": "procps"}


def check_prerequisites(tools: Sequence[str] = ("ip", "nft", "sysctl")) -> None:
    """Raise HarnessError with a clear message when namespaces cannot be built here."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, veth, TUN)")
    for tool in tools:
        if shutil.which(tool) is None:
            problems.append(f"'{tool}' not found on PATH (install {_PACKAGES.get(tool, tool)})")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun missing (TUN driver not available)")
    if problems:
        raise HarnessError("network namespaces cannot be built here: " + "; ".join(problems))


def _run(argv: Sequence[str], *, check: bool = True, stdin: str | None = None,
         timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise HarnessError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}"
        )
    return proc


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of existing namespaces starting with prefix (from /run/netns)."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete our namespaces whose creating process is dead (left by a SIGKILLed run)."""
    removed = []
    for name in list_namespaces(prefix):
        digits = name[len(prefix):].split("-", 1)[0][:-4]  # pid then 4 hex chars
        if digits.isdigit() and not _pid_alive(int(digits)):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(slots=True)
class Netns:
    """One network namespace. Commands run through ``ip netns exec``."""

    name: str
    role: str
    harness: NetnsHarness

    def exec(self, *argv: str, check: bool = True,
             timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    def spawn(self, *argv: str, **popen_kw: object) -> subprocess.Popen[bytes]:
        """Start a background process inside this namespace; the harness kills it by PID."""
        return self.harness.spawn(self, list(argv), **popen_kw)

    def add_addr(self, dev: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        extra = ["nodad"] if iface.version == 6 else []
        self.ip(f"-{iface.version}", "addr", "add", cidr, "dev", dev, *extra)

    def add_route(self, dst: str, via: str | None = None, dev: str | None = None) -> None:
        version = ipaddress.ip_network(dst if dst != "default" else (via or "0.0.0.0"),
                                       strict=False).version
        args = [f"-{version}", "route", "replace", dst]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)

    def enable_forwarding(self) -> None:
        self.sysctl("net.ipv4.ip_forward", 1)
        self.sysctl("net.ipv6.conf.all.forwarding", 1)

    def nft(self, ruleset: str) -> None:
        _run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], stdin=ruleset)

    def masquerade(self, out_dev: str) -> None:
        """Source NAT (v4 and v6) of everything leaving out_dev, like a home router."""
        self.nft(
            "table inet uit_nat {\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{out_dev}" masquerade\n'
            "  }\n}\n"
        )

    def random_drop(self, percent: int) -> None:
        """Drop percent % of forwarded packets at random (a lossy path; no netem here)."""
        if not 0 <= percent <= 100:
            raise ValueError(f"drop percent must be 0..100, got {percent}")
        self.nft(
            "table inet uit_loss {\n"
            "  chain forward { type filter hook forward priority filter; policy accept;\n"
            f"    numgen random mod 100 < {percent} counter drop\n"
            "  }\n}\n"
        )

    def ping(self, dst: str, *, count: int = 3, interval: float = 0.2,
             timeout: float = 1.0) -> list[float]:
        """ICMP echo from this namespace (no ping binary needed): round-trip times in ms of the
        answered requests, in order."""
        addr = ipaddress.ip_address(dst)
        v6 = addr.version == 6
        family = socket.AF_INET6 if v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        with self.entered():
            sock = socket.socket(family, socket.SOCK_RAW, proto)
        ident = os.getpid() & 0xFFFF
        rtts: list[float] = []
        with sock:
            for seq in range(1, count + 1):
                payload = secrets.token_bytes(32)
                sent = time.monotonic()
                sock.sendto(_icmp_echo(v6, ident, seq, payload), (dst, 0))
                deadline = sent + timeout
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    try:
                        data = sock.recv(2048)
                    except TimeoutError:
                        break
                    if _is_echo_reply(data, v6, ident, seq, payload):
                        rtts.append((time.monotonic() - sent) * 1000)
                        break
                if seq < count:
                    time.sleep(interval)
        return rtts

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch the calling thread into this namespace for the block.

        Sockets and TUN devices created inside stay in this namespace after the block ends, so a
        test can build its endpoints here and drive them from the main thread.
        """
        with open("/proc/thread-self/ns/net", "rb") as home, \
                open(os.path.join(NETNS_DIR, self.name), "rb") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmp_echo(v6: bool, ident: int, seq: int, payload: bytes) -> bytes:
    # The kernel fills in the ICMPv6 checksum (it needs the pseudo header); ICMP is ours to do.
    kind = 128 if v6 else 8
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    if v6:
        return header + payload
    csum = _icmp_checksum(header + payload)
    return struct.pack("!BBHHH", kind, 0, csum, ident, seq) + payload


def _is_echo_reply(data: bytes, v6: bool, ident: int, seq: int, payload: bytes) -> bool:
    if not v6:
        data = data[(data[0] & 0x0F) * 4:] if data else data  # raw v4 sockets see the IP header
    if len(data) < 8:
        return False
    kind, _, _, r_ident, r_seq = struct.unpack_from("!BBHHH", data)
    return (kind == (129 if v6 else 0) and r_ident == ident and r_seq == seq
            and data[8:] == payload)


@dataclass(slots=True)
class NetnsHarness:
    """Creates namespaces, links and processes; close() removes them all, whatever happened."""

    tag: str = field(default_factory=lambda: f"{os.getpid()}{secrets.token_hex(2)}")
    prefix: str = PREFIX
    tools: tuple[str, ...] = ("ip", "nft", "sysctl")  # what check_prerequisites insists on
    namespaces: list[Netns] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _veth_seq: int = 0

    def __enter__(self) -> NetnsHarness:
        check_prerequisites(self.tools)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, role: str) -> Netns:
        name = f"{self.prefix}{self.tag}-{role}"
        ns = Netns(name, role, self)
        _run(["ip", "netns", "add", name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        # New interfaces take 'default' settings: no DAD so v6 addresses work at once.
        ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.default.accept_ra", 0)
        return ns

    def veth(self, a: Netns, b: Netns, name_a: str | None = None,
             name_b: str | None = None, mtu: int | None = None) -> tuple[str, str]:
        """A veth pair with one end in a and the other in b, both up. Returns the names."""
        self._veth_seq += 1
        name_a = name_a or f"v{self._veth_seq}{b.role}"[:15]
        name_b = name_b or f"v{self._veth_seq}{a.role}"[:15]
        _run(["ip", "link", "add", "name", name_a, "netns", a.name, "type", "veth",
              "peer", "name", name_b, "netns", b.name])
        for ns, dev in ((a, name_a), (b, name_b)):
            if mtu is not None:
                ns.ip("link", "set", dev, "mtu", str(mtu))
            ns.ip("link", "set", dev, "up")
        return name_a, name_b

    def spawn(self, ns: Netns, argv: list[str], **popen_kw: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns.name, *argv], start_new_session=True, **popen_kw
        )
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        """Kill started processes (by PID, TERM then KILL), then delete every namespace."""
        errors: list[str] = []
        # Ignore Ctrl-C while tearing down so an impatient second ^C cannot leave debris.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            for proc in self.processes:
                _stop(proc)
            self.processes.clear()
            for ns in reversed(self.namespaces):
                done = _run(["ip", "netns", "del", ns.name], check=False)
                if done.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, ns.name)):
                    errors.append(f"{ns.name}: {done.stderr.strip()}")
            self.namespaces.clear()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        if errors:
            raise HarnessError("could not delete namespaces: " + "; ".join(errors))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM one process we started, by PID; SIGKILL it if it outlives ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the group we created with start_new_session
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            return


@dataclass(slots=True, frozen=True)
class Site:
    """Addresses of one host or gateway interface: v4 and v6 with prefix length."""

    dev: str
    v4: str
    v6: str

    @property
    def ip4(self) -> str:
        return str(ipaddress.ip_interface(self.v4).ip)

    @property
    def ip6(self) -> str:
        return str(ipaddress.ip_interface(self.v6).ip)


@dataclass(slots=True)
class Topology:
    """hostL — gwL — [nat] — gwR — hostR, dual-stack on every link.

    Left LAN 10.1.0.0/24 fd00:1::/64, right LAN 10.4.0.0/24 fd00:4::/64. Without NAT the WAN is
    10.2.0.0/24 fd00:2::/64 between the gateways. With NAT gwL sits behind it on 10.2.0.0/24
    (inside) and the NAT's outside faces gwR on 10.3.0.0/24 fd00:3::/64, masquerading v4 and v6.
    Gateways forward; hosts route everything to their gateway; gateways have no route to the
    other LAN (that is the tunnel's job), so nothing leaks around the datapath.
    """

    host_l: Netns
    gw_l: Netns
    gw_r: Netns
    host_r: Netns
    nat: Netns | None
    host_l_lan: Site
    gw_l_lan: Site
    gw_l_wan: Site
    gw_r_wan: Site
    gw_r_lan: Site
    host_r_lan: Site
    nat_inside: Site | None = None
    nat_outside: Site | None = None

    @property
    def gw_l_public(self) -> Site:
        """The address gwR sees gwL's packets come from (the NAT's outside when NATed)."""
        return self.nat_outside if self.nat_outside is not None else self.gw_l_wan


def link(h: NetnsHarness, a: Netns, b: Netns, net: int, ha: int = 1,
         hb: int = 2) -> tuple[Site, Site]:
    """veth a<->b with 10.<net>.0.<ha|hb>/24 and fd00:<net>::<ha|hb>/64 on the two ends."""
    da, db = h.veth(a, b)
    sa = Site(da, f"10.{net}.0.{ha}/24", f"fd00:{net}::{ha}/64")
    sb = Site(db, f"10.{net}.0.{hb}/24", f"fd00:{net}::{hb}/64")
    for ns, s in ((a, sa), (b, sb)):
        ns.add_addr(s.dev, s.v4)
        ns.add_addr(s.dev, s.v6)
    return sa, sb


def collect(poll: Callable[[], list[T]], want: int, timeout: float = 3.0) -> list[T]:
    """Call poll until it has returned want items in total or timeout passes (bounded wait)."""
    got: list[T] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        items = poll()
        if items:
            got.extend(items)
        else:
            time.sleep(0.005)
    return got


def run_as_nobody(fn: Callable[[], str], ns: Netns | None = None) -> str:
    """Fork, drop to uid/gid 65534 (inside ns if given), return fn()'s text or 'error: ...'."""
    r, w = os.pipe()
    with ns.entered() if ns is not None else contextlib.nullcontext():
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                text = fn()
            except BaseException as exc:  # report, never raise in a forked child
                text = f"error: {exc}"
            try:
                os.write(w, text.encode())
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def _default_via(ns: Netns, gw: Site) -> None:
    ns.add_route("default", via=gw.ip4)
    ns.ip("-6", "route", "replace", "default", "via", gw.ip6)


def build_topology(h: NetnsHarness, *, nat: bool = False, drop_percent: int = 0) -> Topology:
    """Build the standard five (or four) namespace scenario; drop_percent needs nat=True."""
    if drop_percent and not nat:
        raise ValueError("random drop is installed in the NAT namespace; pass nat=True")
    host_l, gw_l, gw_r, host_r = (h.netns(r) for r in ("hostL", "gwL", "gwR", "hostR"))
    host_l_lan, gw_l_lan = link(h, host_l, gw_l, 1, 2, 1)
    gw_r_lan, host_r_lan = link(h, gw_r, host_r, 4, 1, 2)
    _default_via(host_l, gw_l_lan)
    _default_via(host_r, gw_r_lan)
    for gw in (gw_l, gw_r):
        gw.enable_forwarding()
    nat_ns = None
    nat_in = nat_out = None
    if nat:
        nat_ns = h.netns("nat")
        nat_ns.enable_forwarding()
        gw_l_wan, nat_in = link(h, gw_l, nat_ns, 2, 2, 1)
        nat_out, gw_r_wan = link(h, nat_ns, gw_r, 3, 1, 2)
        _default_via(gw_l, nat_in)  # gwR reaches the NAT's outside on-link; no route back
        nat_ns.masquerade(nat_out.dev)
        if drop_percent:
            nat_ns.random_drop(drop_percent)
    else:
        gw_l_wan, gw_r_wan = link(h, gw_l, gw_r, 2, 1, 2)
    return Topology(host_l, gw_l, gw_r, host_r, nat_ns, host_l_lan, gw_l_lan, gw_l_wan,
                    gw_r_wan, gw_r_lan, host_r_lan, nat_in, nat_out)
