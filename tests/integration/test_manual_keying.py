"""Manually keyed ESP through two ``uipsec daemon`` gateways in network namespaces.

hostL -- gwL -- [nat] -- gwR -- hostR (tests.netns). Each gateway runs its own daemon (own run
directory) with the datapath; setkey scripts written here load SAs and policies. Per case: ping
and a 50 MB TCP transfer checked by SHA-256, host to host through the gateways (transport mode:
gateway to gateway). Needs root, ip, nft and /dev/net/tun: without them the tests fail (the
harness raises), never skip. Every wait is bounded; namespaces and daemons are always removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import Netns, NetnsHarness, Topology, build_topology

REPO = Path(__file__).resolve().parents[2]
TRANSFER = 50 * 1024 * 1024
TCP_PORT = 5555
KEY_A = "0x" + "a1" * 32 + "c0ffee01"  # aes-gcm-16: 256-bit key + 4-byte salt
KEY_B = "0x" + "b2" * 32 + "c0ffee02"
LEFT4, RIGHT4 = "10.1.0.0/24", "10.4.0.0/24"
LEFT6, RIGHT6 = "fd00:1::/64", "fd00:4::/64"

PING = r"""
import os, select, socket, struct, sys, time
dst, count, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
v6 = ":" in dst
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                     socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
ident, got = os.getpid() & 0xFFFF, 0
for seq in range(count):
    body = struct.pack("!HH", ident, seq) + b"uipsec-ping-payload-" * 3
    kind = 128 if v6 else 8
    check = 0 if v6 else csum(bytes([kind]) + b"\0\0\0" + body)  # the kernel sums ICMPv6
    sock.sendto(struct.pack("!BBH", kind, 0, check) + body, (dst, 0))
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
        pkt = sock.recv(4096)
        icmp = pkt if v6 else pkt[(pkt[0] & 15) * 4:]
        if icmp[0] == (129 if v6 else 0) and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            got += 1
            break
print(got)
"""

# argv: bind address, port. Prints "ready", then "<bytes> <sha256>" of what one client sent.
TCP_SINK = r"""
import hashlib, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(60)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
h, n = hashlib.sha256(), 0
buf = bytearray(1 << 16)
while True:
    got = conn.recv_into(buf)
    if not got:
        break
    h.update(buf[:got])
    n += got
print(n, h.hexdigest(), flush=True)
"""

# argv: destination, port, bytes. Sends seeded pseudo-random data, prints its SHA-256.
TCP_SOURCE = r"""
import hashlib, random, socket, sys
dst, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = random.Random(4303).randbytes(1 << 20)
h = hashlib.sha256()
sock = socket.create_connection((dst, port), timeout=30)
sent = 0
while sent < total:
    chunk = block[: min(len(block), total - sent)]
    sock.sendall(chunk)
    h.update(chunk)
    sent += len(chunk)
sock.shutdown(socket.SHUT_WR)
sock.recv(1)
print(sent, h.hexdigest(), flush=True)
"""


@dataclass
class Gateway:
    ns: Netns
    run_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def uipsec(self, *args: str, check: bool = True,
               timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        done = self.ns.exec(sys.executable, "-m", "userspace_ipsec.cli", "--run-dir",
                            str(self.run_dir), *args, check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"uipsec {' '.join(args)} failed: {done.stderr}\n"
                                 f"daemon log:\n{self.log.read_text()[-3000:]}")
        return done

    def setkey(self, script: str) -> None:
        path = self.run_dir / "script.conf"
        path.write_text(textwrap.dedent(script))
        self.uipsec("setkey", "-k", "-f", str(path))

    def sas(self) -> dict[int, dict[str, object]]:
        records = json.loads(self.uipsec("sa", "list", "--json").stdout)
        return {int(r["spi"]): r for r in records}

    def counters(self, spi: int) -> dict[str, int]:
        return self.sas()[spi]["counters"]  # type: ignore[return-value]

    def stats(self) -> dict[str, int]:
        """The datapath's global counters (``uipsec stats --json``)."""
        return json.loads(self.uipsec("stats", "--json").stdout)["datapath"]  # type: ignore[no-any-return]


def start_gateway(h: NetnsHarness, ns: Netns, run_dir: Path, config: str = "") -> Gateway:
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "userspace_ipsec.cli", "-v", "--run-dir", str(run_dir),
            "daemon"]
    if config:
        (run_dir / "uipsec.toml").write_text(config)
        argv += ["--config", str(run_dir / "uipsec.toml")]
    log = run_dir / "daemon.log"
    out = log.open("wb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = ns.spawn(*argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()
    gw = Gateway(ns, run_dir, log, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "datapath: TUN" in log.read_text():
            return gw
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"daemon in {ns.role} did not start:\n{log.read_text()[-3000:]}")


def ping(ns: Netns, dst: str, count: int = 5, wait: float = 2.0) -> int:
    done = ns.exec(sys.executable, "-c", PING, dst, str(count), str(wait),
                   timeout=count * (wait + 1) + 10)
    return int(done.stdout.strip() or 0)


def tcp_transfer(h: NetnsHarness, src: Netns, dst: Netns, dst_addr: str,
                 total: int = TRANSFER) -> tuple[float, str, str]:
    """Send ``total`` bytes src -> dst_addr; returns (seconds, sent SHA-256, received)."""
    sink = h.spawn(dst, [sys.executable, "-c", TCP_SINK, dst_addr, str(TCP_PORT)],
                   stdout=subprocess.PIPE)
    assert sink.stdout is not None
    ready, _, _ = select.select([sink.stdout], [], [], 15)
    assert ready and sink.stdout.readline().strip() == b"ready", "TCP sink did not start"
    start = time.monotonic()
    sent = src.exec(sys.executable, "-c", TCP_SOURCE, dst_addr, str(TCP_PORT), str(total),
                    timeout=120).stdout.split()
    seconds = time.monotonic() - start
    out, _ = sink.communicate(timeout=30)
    got = out.decode().split()
    assert sent[0] == str(total) and got[0] == str(total), (sent, got)
    return seconds, sent[1], got[1]


def check_path(h: NetnsHarness, src: Netns, dst: Netns, dst_addr: str) -> float:
    """Ping, then 50 MB over TCP with matching SHA-256; returns Mbit/s."""
    assert ping(src, dst_addr) == 5, f"ping {dst_addr} lost packets"
    seconds, sent, received = tcp_transfer(h, src, dst, dst_addr)
    assert sent == received, "TCP data corrupted in the tunnel"
    return TRANSFER * 8 / seconds / 1e6


def tunnel_script(local: str, remote: str, routes: list[tuple[str, str]], *, encap: bool,
                  reqid: bool, soft_bytes: int = 0, outbound: bool = True) -> str:
    """SAs local<->remote (SPIs 0x1001 left->right, 0x1002 back) and policies for the subnet
    pairs in ``routes`` (local subnet, remote subnet). ``outbound``: we are the left side."""
    port = "[4500]" if encap else ""
    kind = "esp-udp" if encap else "esp"
    left, right = (local, remote) if outbound else (remote, local)
    soft = f" -bs {soft_bytes}" if soft_bytes else ""
    lines = [
        "flush;", "spdflush;",
        f"add {left}{port} {right}{port} {kind} 0x1001 -m tunnel -u 11 -r 64{soft} "
        f"-E aes-gcm-16 {KEY_A};",
        f"add {right}{port} {left}{port} {kind} 0x1002 -m tunnel -u 12 -r 64{soft} "
        f"-E aes-gcm-16 {KEY_B};",
    ]
    out_id, in_id = (11, 12) if outbound else (12, 11)
    out_level = f"unique:{out_id}" if reqid else "require"
    in_level = f"unique:{in_id}" if reqid else "require"
    for mine, theirs in routes:
        lines += [
            f"spdadd {mine} {theirs} any -P out ipsec "
            f"esp/tunnel/{local}{port}-{remote}{port}/{out_level};",
            f"spdadd {theirs} {mine} any -P in ipsec "
            f"esp/tunnel/{remote}{port}-{local}{port}/{in_level};",
            f"spdadd {theirs} {mine} any -P fwd ipsec "
            f"esp/tunnel/{remote}{port}-{local}{port}/require;",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Lab:
    h: NetnsHarness
    topo: Topology
    left: Gateway
    right: Gateway

    def tunnel(self, outer: int, inner: list[int], *, encap: bool, reqid: bool = False,
               soft_bytes: int = 0) -> None:
        t = self.topo
        lw, rw = t.gw_l_wan, t.gw_r_wan
        local, remote = (lw.ip4, rw.ip4) if outer == 4 else (lw.ip6, rw.ip6)
        nets = [(LEFT4, RIGHT4) if v == 4 else (LEFT6, RIGHT6) for v in inner]
        self.left.setkey(tunnel_script(local, remote, nets, encap=encap, reqid=reqid,
                                       soft_bytes=soft_bytes))
        self.right.setkey(tunnel_script(remote, local, [(b, a) for a, b in nets], encap=encap,
                                        reqid=reqid, soft_bytes=soft_bytes, outbound=False))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("manual")
    with NetnsHarness() as h:
        topo = build_topology(h)
        left = start_gateway(h, topo.gw_l, base / "gwL")
        right = start_gateway(h, topo.gw_r, base / "gwR")
        yield Lab(h, topo, left, right)


def test_tunnel_v4_and_v6_in_v4_raw_esp(lab: Lab) -> None:
    """v4-in-v4 and v6-in-v4 over raw ESP (protocol 50), SAs chosen by unique reqid."""
    lab.tunnel(4, [4, 6], encap=False, reqid=True)
    t = lab.topo
    check_path(lab.h, t.host_l, t.host_r, t.host_r_lan.ip4)
    check_path(lab.h, t.host_l, t.host_r, t.host_r_lan.ip6)
    out = lab.left.counters(0x1001)
    assert out["packets_out"] > 2 * TRANSFER // 1500
    assert lab.right.counters(0x1001)["packets_in"] == out["packets_out"]
    assert lab.left.stats()["sealed"] >= out["packets_out"]
    assert lab.left.sas()[0x1001]["encap"] in (None, "", "-")


def test_tunnel_v4_in_v4_udp_encap(lab: Lab) -> None:
    lab.tunnel(4, [4], encap=True)
    t = lab.topo
    check_path(lab.h, t.host_l, t.host_r, t.host_r_lan.ip4)
    before = lab.right.stats()["esp_received"]
    assert ping(t.host_l, t.host_r_lan.ip4) == 5
    assert lab.right.stats()["esp_received"] >= before + 5
    assert lab.left.sas()[0x1001]["encap"] == "espinudp"


def test_tunnel_v4_and_v6_in_v6(lab: Lab) -> None:
    lab.tunnel(6, [4, 6], encap=False)
    t = lab.topo
    check_path(lab.h, t.host_l, t.host_r, t.host_r_lan.ip4)
    check_path(lab.h, t.host_l, t.host_r, t.host_r_lan.ip6)
    assert lab.right.counters(0x1001)["packets_in"] > 2 * TRANSFER // 1500


def test_transport_mode_between_gateways(lab: Lab) -> None:
    t = lab.topo
    lw, rw = t.gw_l_wan.ip4, t.gw_r_wan.ip4
    common = f"""flush;
        spdflush;
        add {lw} {rw} esp 0x2001 -m transport -E aes-gcm-16 {KEY_A};
        add {rw} {lw} esp 0x2002 -m transport -E aes-gcm-16 {KEY_B};
        """
    lab.left.setkey(common + f"spdadd {lw} {rw} any -P out ipsec esp/transport//require;\n"
                    f"spdadd {rw} {lw} any -P in ipsec esp/transport//require;\n")
    lab.right.setkey(common + f"spdadd {rw} {lw} any -P out ipsec esp/transport//require;\n"
                     f"spdadd {lw} {rw} any -P in ipsec esp/transport//require;\n")
    check_path(lab.h, t.gw_l, t.gw_r, rw)
    assert lab.left.counters(0x2001)["packets_out"] > TRANSFER // 1500
    assert lab.left.counters(0x2002)["packets_in"] > 0


def capture_esp(ns: Netns, dev: str, trigger: Netns, dst: str) -> bytes:
    """One ESP packet (from the SPI on) arriving on ``dev`` of ``ns`` while ``trigger`` pings."""
    with ns.entered():
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    with sniff:
        sniff.bind((dev, 0))
        sniff.settimeout(5)
        assert ping(trigger, dst, count=1) == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame = sniff.recv(65535)
            ip = frame[14:]
            if len(ip) > 28 and ip[9] == 50:
                return ip[(ip[0] & 15) * 4:]
    raise AssertionError("no ESP packet seen")


def inject_esp(ns: Netns, dst: str, esp: bytes) -> None:
    with ns.entered():
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    with raw:
        raw.sendto(esp, (dst, 0))


def wait_for(fn: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_replay_forgery_and_unknown_spi_are_dropped_and_counted(lab: Lab) -> None:
    lab.tunnel(4, [4], encap=False)
    t = lab.topo
    right = lab.right
    esp = capture_esp(t.gw_r, t.gw_r_wan.dev, t.host_l, t.host_r_lan.ip4)
    assert int.from_bytes(esp[:4], "big") == 0x1001
    before = right.stats()
    sa_before = right.counters(0x1001)

    inject_esp(t.gw_l, t.gw_r_wan.ip4, esp)  # the same packet again: a replay
    assert wait_for(lambda: right.counters(0x1001)["replay_drops"] == sa_before["replay_drops"] + 1)

    forged = bytearray(esp)
    forged[5] ^= 0x10  # a bit of the sequence number: new to the window, but not authentic
    inject_esp(t.gw_l, t.gw_r_wan.ip4, bytes(forged))
    assert wait_for(
        lambda: right.counters(0x1001)["auth_failures"] == sa_before["auth_failures"] + 1)

    forged = bytearray(esp)
    forged[-20] ^= 0x01  # ciphertext bit of a packet replayed: the window catches it first
    inject_esp(t.gw_l, t.gw_r_wan.ip4, bytes(forged))

    inject_esp(t.gw_l, t.gw_r_wan.ip4, b"\xde\xad\xbe\xef" + esp[4:])  # unknown SPI
    assert wait_for(lambda: right.stats()["no_sa"] == before["no_sa"] + 1)
    after = right.stats()
    assert after["replay"] == before["replay"] + 2
    assert after["auth_failures"] == before["auth_failures"] + 1
    assert right.counters(0x1001)["packets_in"] == sa_before["packets_in"]
    # The forged packet did not move the window: the tunnel still works.
    assert ping(t.host_l, t.host_r_lan.ip4) == 5


def test_soft_byte_lifetime_raises_expire(lab: Lab) -> None:
    monitor_out = lab.left.run_dir / "monitor.txt"
    with monitor_out.open("wb") as out:
        monitor = lab.h.spawn(
            lab.left.ns,
            [sys.executable, "-m", "userspace_ipsec.cli", "--run-dir", str(lab.left.run_dir),
             "setkey", "-x", "--monitor-seconds", "30"],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        time.sleep(1.0)  # registered before the traffic starts
        lab.tunnel(4, [4], encap=False, soft_bytes=20000)
        t = lab.topo
        assert ping(t.host_l, t.host_r_lan.ip4) == 5
        _, sent, received = tcp_transfer(lab.h, t.host_l, t.host_r, t.host_r_lan.ip4,
                                         total=1 << 20)
        assert sent == received  # a soft expiry does not stop the SA
        assert wait_for(lambda: "(expire)" in monitor_out.read_text(), timeout=10), \
            monitor_out.read_text()
        assert lab.left.sas()[0x1001]["state"] == "dying"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(monitor.pid, signal.SIGTERM)
        monitor.wait(timeout=10)


def test_nat_traversal_with_keepalives(tmp_path: Path) -> None:
    """gwL behind a masquerading NAT: ESP in UDP 4500; the NAT keeps the source port."""
    with NetnsHarness() as h:
        t = build_topology(h, nat=True)
        assert t.nat_outside is not None
        config = "[datapath]\nkeepalive_interval = 2\n"
        left = start_gateway(h, t.gw_l, tmp_path / "gwL", config)
        right = start_gateway(h, t.gw_r, tmp_path / "gwR", config)
        inside, public, far = t.gw_l_wan.ip4, t.nat_outside.ip4, t.gw_r_wan.ip4
        left.setkey(tunnel_script(inside, far, [(LEFT4, RIGHT4)], encap=True, reqid=False))
        right.setkey(tunnel_script(far, public, [(RIGHT4, LEFT4)], encap=True, reqid=False,
                                   outbound=False))
        check_path(h, t.host_l, t.host_r, t.host_r_lan.ip4)
        assert right.sas()[0x1001]["src"] == f"{public}[4500]"
        time.sleep(4.5)  # idle: gwL keeps the NAT mapping open with keepalives
        assert left.stats()["keepalives_sent"] >= 1
        assert right.stats()["keepalives_received"] >= 1
        assert ping(t.host_r, t.host_l_lan.ip4) == 5  # gwR -> NAT -> gwL still maps
