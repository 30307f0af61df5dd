"""IKEv2 between two of our daemons (datapath on) in network namespaces.

hostL -- gwL ==== gwR -- hostR (userspace_ipsec.lab). Both gateways run ``uipsec daemon`` with a
TOML configuration holding one connection per case; gwR has one WAN address per connection
(10.2.0.1x) because the responder picks a connection by the addresses of IKE_SA_INIT. gwL
brings each one up with ``uipsec up`` and one side takes it down again, after which both SADs and
SPDs must be empty. Per case: ping and a TCP transfer checked by SHA-256. Then: Child SA and IKE
SA rekeys under a continuous ping that must lose no echo, a ``trap`` child negotiated by its
first packet, DPD clearing a SIGKILLed peer, and the same tunnel through the masquerading NAT.
Needs root, ip, nft and /dev/net/tun: without them the tests fail (the harness raises), never
skip. Namespaces and daemons are always removed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_manual_keying import Gateway, ping, start_gateway, tcp_transfer
from userspace_ipsec.control import request
from userspace_ipsec.inspect import policy_record, sa_record
from userspace_ipsec.lab import Netns, NetnsHarness, Topology, build_topology
from userspace_ipsec.pfkey.client import PfkeyClient

TRANSFER = 4 * 1024 * 1024
PSK = "0x" + "6b" * 32
LEFT4, RIGHT4 = "10.1.0.0/24", "10.4.0.0/24"
TRAP_LEFT, TRAP_RIGHT = "10.11.0.0/24", "10.14.0.0/24"  # extra subnets: their policies stay
WAIT = 30.0
TRAP_POLICIES = 3  # out, in, fwd of connection "trap" on gwL, there from the start

# name: (IKE proposal, ESP proposal); the CBC one has PFS (a DH group in the ESP proposal).
PROPOSALS = {
    "gcm128": ("aes128gcm16-prfsha256-x25519", "aes128gcm16"),
    "cbc256": ("aes256-sha256-modp2048", "aes256-sha256-modp2048"),
    "gcm256": ("aes256gcm16-prfsha384-ecp384", "aes256gcm16"),
    "chacha": ("chacha20poly1305-prfsha256-curve25519", "chacha20poly1305"),
}
SUITES = {  # what `uipsec status` shows for the IKE SA and the Child SA
    "gcm128": ("AES_GCM_16_128/HMAC_SHA2_256/CURVE25519", "AES_GCM_16_128"),
    # The first Child SA comes with IKE_AUTH, without a DH exchange: PFS shows from a rekey on.
    "cbc256": ("AES_CBC_256/HMAC_SHA2_256_128/HMAC_SHA2_256/MODP2048",
               "AES_CBC_256/HMAC_SHA2_256_128"),
    "gcm256": ("AES_GCM_16_256/HMAC_SHA2_384/ECP384", "AES_GCM_16_256"),
    "chacha": ("CHACHA20_POLY1305_256/HMAC_SHA2_256/CURVE25519", "CHACHA20_POLY1305_256"),
}


@dataclass(frozen=True, slots=True)
class Conn:
    """One connection of the test configuration, as both sides write it."""

    name: str
    index: int  # gwR's WAN address for it is 10.2.0.<10 + index>
    ike: str = "aes128gcm16-prfsha256-x25519"
    esp: str = "aes128gcm16"
    mode: str = "tunnel"
    encap: bool = False
    left_ts: str = LEFT4
    right_ts: str = RIGHT4
    left_conn: str = ""  # extra settings, gwL only
    left_child: str = ""
    right_conn: str = ""  # extra settings, gwR only
    right_child: str = ""
    addr: str = ""  # gwR's address, if not the one by index

    def right_addr(self, net: int = 2) -> str:
        return self.addr or f"10.{net}.0.{10 + self.index}"


CONNS = [
    *(Conn(name, i, ike, esp) for i, (name, (ike, esp)) in enumerate(PROPOSALS.items())),
    Conn("transport", 4, mode="transport", left_ts="dynamic", right_ts="dynamic"),
    Conn("encap", 5, encap=True),
    # gwL rekeys the Child SA every 3 s (with PFS), gwR the IKE SA every 5 s.
    Conn("rekey", 6, esp="aes128gcm16-x25519",
         left_child="rekey_time = 3\nlife_time = 30\njitter = 0",
         right_conn="rekey_time = 5\njitter = 0"),
    Conn("trap", 7, left_ts=TRAP_LEFT, right_ts=TRAP_RIGHT,
         left_child='start_action = "trap"'),
    Conn("dpd", 8, left_conn="dpd_delay = 1", left_child='dpd_action = "clear"'),
]
BY_NAME = {c.name: c for c in CONNS}

IKE_SETTINGS = """\
[ike]
listen = ["0.0.0.0"]
retransmit_timeout = 0.5
retransmit_tries = 3

"""


def render(conns: list[Conn], left: bool, left_addr: str = "10.2.0.1",
           seen_left: str = "10.2.0.1", right_net: int = 2) -> str:
    """gwL's (left) or gwR's configuration; ``seen_left`` is gwL as gwR sees it (the NAT),
    gwR's addresses are in 10.<right_net>.0.0/24."""
    out = [IKE_SETTINGS]
    for c in conns:
        right = c.right_addr(right_net)
        local, remote = (left_addr, right) if left else (right, seen_left)
        local_ts, remote_ts = (c.left_ts, c.right_ts) if left else (c.right_ts, c.left_ts)
        out.append(f"""[connections.{c.name}]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["{c.ike}"]
encap = {'true' if c.encap and left else 'false'}
{c.left_conn if left else c.right_conn}

[connections.{c.name}.children.net]
local_ts = ["{local_ts}"]
remote_ts = ["{remote_ts}"]
esp_proposals = ["{c.esp}"]
mode = "{c.mode}"
{c.left_child if left else c.right_child}

""")
    out.append(f'[secrets.psk.all]\nsecret = "{PSK}"\n')
    return "".join(out)


class Side:
    """One gateway's daemon, driven through its control and PF_KEY sockets."""

    def __init__(self, h: NetnsHarness, ns: Netns, run_dir: Path, config: str) -> None:
        self.h, self.ns, self.run_dir, self.config = h, ns, run_dir, config
        self.gw: Gateway = self.start()

    def start(self) -> Gateway:
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "uipsec.toml").touch(mode=0o600)  # it holds the PSK
        self.gw = start_gateway(self.h, self.ns, run_dir, self.config)
        deadline = time.monotonic() + WAIT
        while "IKE service running" not in self.gw.log.read_text():
            assert time.monotonic() < deadline and self.gw.proc.poll() is None, self.log_tail()
            time.sleep(0.05)
        return self.gw

    def log_tail(self, n: int = 4000) -> str:
        return f"--- {self.ns.role} log ---\n" + self.gw.log.read_text()[-n:]

    def cli(self, *args: str) -> str:
        return self.gw.uipsec(*args, timeout=60).stdout

    def control(self, command: str, **args: Any) -> Any:
        return request(self.run_dir / "control.sock", command, args)

    def ike_sas(self, name: str | None = None) -> list[dict[str, Any]]:
        sas = self.control("status")["ike_sas"]
        return [s for s in sas if name is None or s["name"] == name]

    def established(self, name: str) -> dict[str, Any] | None:
        for sa in self.ike_sas(name):
            if sa["state"] == "established" and sa["children"]:
                return sa
        return None

    def sad(self) -> list[dict[str, Any]]:
        with PfkeyClient(self.run_dir / "pfkey.sock") as client:
            return [sa_record(m) for m in client.dump()]

    def spd(self) -> list[dict[str, Any]]:
        with PfkeyClient(self.run_dir / "pfkey.sock") as client:
            return [policy_record(m) for m in client.spddump()]


@dataclass
class Pair:
    h: NetnsHarness
    topo: Topology
    left: Side
    right: Side
    kept_policies: int = 0  # gwL's trap policies, there without any SA

    def logs(self) -> str:
        return self.left.log_tail() + "\n" + self.right.log_tail()

    def up(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """`uipsec up NAME` on gwL; both sides' status of the new IKE SA."""
        self.left.cli("up", name, "--timeout", "20")
        left = self.left.established(name)
        right = wait_for(lambda: self.right.established(name), 10)
        assert left is not None and right is not None, self.logs()
        return left, right

    def down_and_check_clean(self, name: str, from_left: bool) -> None:
        """`uipsec down NAME` on one side; then no IKE SA of it and empty SADs and SPDs."""
        side = self.left if from_left else self.right
        side.cli("down", name)
        for gw in (self.left, self.right):
            def clean(g: Side = gw) -> bool:
                return not g.ike_sas(name) and not g.sad()
            assert wait_for(clean, 10), \
                f"{gw.ns.role}: {gw.ike_sas(name)} {gw.sad()}\n" + self.logs()
        assert wait_for(lambda: len(self.left.spd()) == self.kept_policies
                        and not self.right.spd(), 10), \
            f"{self.left.spd()} {self.right.spd()}\n" + self.logs()


def wait_for(fn: Callable[[], Any], timeout: float) -> Any:
    """fn()'s first truthy value within timeout seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def add_wan_addresses(topo: Topology, net: int = 2) -> None:
    for c in CONNS:
        topo.gw_r.add_addr(topo.gw_r_wan.dev, f"{c.right_addr(net)}/24")


def add_trap_subnets(topo: Topology) -> None:
    """hostL 10.11.0.2 and hostR 10.14.0.2 besides their LAN addresses, routed by the gateways."""
    topo.host_l.add_addr(topo.host_l_lan.dev, "10.11.0.2/24")
    topo.host_r.add_addr(topo.host_r_lan.dev, "10.14.0.2/24")
    topo.host_l.ip("route", "replace", TRAP_RIGHT, "via", topo.gw_l_lan.ip4, "src", "10.11.0.2")
    topo.gw_l.add_route(TRAP_LEFT, via=topo.host_l_lan.ip4)
    topo.gw_r.add_route(TRAP_RIGHT, via=topo.host_r_lan.ip4)


def check_traffic(pair: Pair, src: Netns, dst: Netns, dst_addr: str) -> None:
    assert ping(src, dst_addr) == 5, f"ping {dst_addr} lost packets\n" + pair.logs()
    _, sent, received = tcp_transfer(pair.h, src, dst, dst_addr, total=TRANSFER)
    assert sent == received, "TCP data corrupted in the tunnel"


def child_counters(status: dict[str, Any]) -> dict[str, int]:
    return status["children"][0]["counters"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("ike-ours")
    with NetnsHarness() as h:
        topo = build_topology(h)
        add_wan_addresses(topo)
        add_trap_subnets(topo)
        right = Side(h, topo.gw_r, base / "gwR", render(CONNS, left=False))
        left = Side(h, topo.gw_l, base / "gwL", render(CONNS, left=True))
        yield Pair(h, topo, left, right, TRAP_POLICIES)


@pytest.mark.parametrize("name", list(PROPOSALS))
def test_proposals_tunnel_raw_esp(pair: Pair, name: str) -> None:
    """Each IKE/ESP suite: subnet-to-subnet tunnel over raw ESP, ping and TCP, then down."""
    left, right = pair.up(name)
    ike_suite, esp_suite = SUITES[name]
    for status in (left, right):
        assert status["algorithms"] == ike_suite
        child = status["children"][0]
        assert child["algorithms"] == esp_suite and child["mode"] == "tunnel"
        assert child["encap"] is False and status["nat"]["udp_encap"] is False
    assert left["children"][0]["spi_in"] == right["children"][0]["spi_out"]
    t = pair.topo
    check_traffic(pair, t.host_l, t.host_r, t.host_r_lan.ip4)
    for sa in pair.left.sad():
        assert sa["encap"] in (None, "", "-"), sa  # protocol 50 on the wire
    assert child_counters(pair.left.established(name) or {})["packets_out"] > TRANSFER // 1500
    pair.down_and_check_clean(name, from_left=name in ("gcm128", "gcm256"))


def test_transport_mode_between_gateways(pair: Pair) -> None:
    left, right = pair.up("transport")
    t = pair.topo
    conn = BY_NAME["transport"]
    for status in (left, right):
        child = status["children"][0]
        assert child["mode"] == "transport"
    assert left["children"][0]["local_ts"] == "10.2.0.1/32"
    assert left["children"][0]["remote_ts"] == f"{conn.right_addr()}/32"
    check_traffic(pair, t.gw_l, t.gw_r, conn.right_addr())
    assert child_counters(pair.right.established("transport") or {})["packets_in"] > \
        TRANSFER // 1500
    pair.down_and_check_clean("transport", from_left=False)


def test_forced_udp_encapsulation(pair: Pair) -> None:
    left, right = pair.up("encap")
    assert left["nat"]["udp_encap"] and right["nat"]["udp_encap"]
    assert left["remote_port"] == 4500 and right["remote_port"] == 4500
    t = pair.topo
    check_traffic(pair, t.host_l, t.host_r, t.host_r_lan.ip4)
    sad = pair.left.sad()
    assert len(sad) == 2 and all(sa["encap"] == "espinudp" for sa in sad), sad
    pair.down_and_check_clean("encap", from_left=True)


def test_rekeys_under_continuous_ping_lose_no_echo(pair: Pair) -> None:
    """gwL rekeys the Child SA every 3 s (PFS), gwR the IKE SA every 5 s; 14 s of pings."""
    left, _ = pair.up("rekey")
    t = pair.topo
    child_spis, ike_spis = {left["children"][0]["spi_in"]}, {left["spi_i"]}
    suites: set[str] = set()
    count = 140
    with ThreadPoolExecutor(1) as pool:
        pings = pool.submit(t.host_l.ping, t.host_r_lan.ip4, count=count, interval=0.1,
                            timeout=1.0)
        deadline = time.monotonic() + count * 0.1 + 30
        while not pings.done() and time.monotonic() < deadline:
            for sa in pair.left.ike_sas("rekey"):
                ike_spis.add(sa["spi_i"])
                child_spis.update(c["spi_in"] for c in sa["children"])
                suites.update(c["algorithms"] for c in sa["children"])
            time.sleep(0.2)
        rtts = pings.result(timeout=5)
    assert len(rtts) == count, f"{count - len(rtts)} echoes lost\n" + pair.logs()
    assert len(child_spis) >= 3, child_spis  # at least two Child SA rekeys
    assert len(ike_spis) >= 2, ike_spis  # at least one IKE SA rekey
    assert "AES_GCM_16_128/CURVE25519" in suites, suites  # rekeyed with PFS
    log = pair.left.gw.log.read_text()
    assert "rekeyed into" in log and ", rekeys " in log
    pair.down_and_check_clean("rekey", from_left=True)


def test_delete_from_either_side_leaves_both_clean(pair: Pair) -> None:
    for from_left in (True, False):
        pair.up("gcm128")
        assert len(pair.left.sad()) == 2 and len(pair.right.sad()) == 2
        pair.down_and_check_clean("gcm128", from_left=from_left)


def test_trap_negotiates_on_the_first_packet(pair: Pair) -> None:
    t = pair.topo
    traps = pair.left.spd()
    assert len(traps) == TRAP_POLICIES and not pair.left.ike_sas("trap"), traps  # no SA yet
    ping(t.host_l, "10.14.0.2", count=1, wait=3.0)  # the trigger (it may be dropped)
    status = wait_for(lambda: pair.left.established("trap"), 15)
    assert status is not None, pair.logs()
    assert pair.left.control("status")["counters"]["acquires"] >= 1
    assert ping(t.host_l, "10.14.0.2", count=5) == 5
    assert child_counters(pair.left.established("trap") or {})["packets_out"] >= 5
    pair.down_and_check_clean("trap", from_left=True)  # the trap stays


def test_dpd_clears_a_killed_peer(pair: Pair) -> None:
    pair.up("dpd")
    assert len(pair.left.sad()) == 2 and len(pair.left.spd()) == TRAP_POLICIES + 3
    started = time.monotonic()
    os.kill(pair.right.gw.proc.pid, signal.SIGKILL)
    pair.right.gw.proc.wait(timeout=10)
    gone = wait_for(lambda: not pair.left.ike_sas("dpd") and not pair.left.sad()
                    and len(pair.left.spd()) == TRAP_POLICIES, 20)
    assert gone, pair.left.log_tail()
    assert "peer not responding (DPD)" in pair.left.gw.log.read_text()
    assert time.monotonic() - started < 20
    # gwR comes back (its sockets were left behind by the SIGKILL) and works again.
    for stale in (pair.right.run_dir / "pfkey.sock", pair.right.run_dir / "control.sock"):
        stale.unlink(missing_ok=True)
    pair.right.start()
    pair.up("gcm128")
    pair.down_and_check_clean("gcm128", from_left=True)


def test_through_the_nat(tmp_path: Path) -> None:
    """gwL behind a masquerading NAT: NAT detected, IKE and ESP float to UDP 4500."""
    with NetnsHarness() as h:
        topo = build_topology(h, nat=True)
        assert topo.nat_outside is not None
        # gwR's own address: the datapath sends ESP from the route's preferred source, which
        # the NAT's mapping must see (a secondary address would not match it).
        conns = [replace(BY_NAME["chacha"], addr=topo.gw_r_wan.ip4)]
        right = Side(h, topo.gw_r, tmp_path / "gwR",
                     render(conns, left=False, seen_left=topo.nat_outside.ip4, right_net=3))
        left = Side(h, topo.gw_l, tmp_path / "gwL",
                    render(conns, left=True, left_addr=topo.gw_l_wan.ip4, right_net=3))
        pair = Pair(h, topo, left, right)
        for name, from_left in (("chacha", True), ("chacha", False)):
            lstat, rstat = pair.up(name)
            assert lstat["nat"]["local_behind_nat"] and lstat["nat"]["udp_encap"]
            assert rstat["nat"]["remote_behind_nat"] and rstat["remote_port"] == 4500
            check_traffic(pair, topo.host_l, topo.host_r, topo.host_r_lan.ip4)
            check_traffic(pair, topo.host_r, topo.host_l, topo.host_l_lan.ip4)
            sad = right.sad()
            assert all(sa["encap"] == "espinudp" for sa in sad), sad
            assert any(sa["src"] == f"{topo.nat_outside.ip4}[4500]" for sa in sad), sad
            pair.down_and_check_clean(name, from_left=from_left)
