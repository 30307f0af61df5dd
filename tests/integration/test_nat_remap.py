"""The NAT in front of the initiator changes its mapping: the responder's SAs and policies follow.

hostL -- gwL -- nat -- gwR -- hostR (userspace_ipsec.lab), two of our daemons, gwL behind the
NAT. The NAT is stateless (nftables `notrack` and payload rewrites, no conntrack), so the test
switches its mapping at will: first gwL appears as 10.3.0.1 with ports 30500/34500, then as
10.3.0.9 (a second address of the NAT's outside) with 40500/44500, then only its port changes
(10.3.0.9, 40501/45500). gwL runs DPD every second, as strongSwan's liveness check would: that
INFORMATIONAL is what gwR sees coming from the new address. After each switch gwR's SAs must name
the new address and port, its policies the new tunnel endpoint (same ids: X_SPDUPDATE), and
the Child SA must have been rekeyed (re-added SAs start their sequence numbers over), and
traffic both ways must flow again within a bounded time. Needs root, ip, nft and /dev/net/tun:
without them the test fails (the harness raises), never skips. Namespaces and daemons are always
removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tests.integration.test_ike_ours import Conn, Pair, Side, render, wait_for
from tests.integration.test_manual_keying import ping, tcp_transfer
from userspace_ipsec.lab import Netns, NetnsHarness, Topology, build_topology

GW_L = "10.2.0.2"  # gwL's own (inside) address
NAT_EXTRA = "10.3.0.9"  # the NAT's second outside address
FOLLOW = 15.0  # seconds for gwR to notice a new mapping and traffic to flow again
TRANSFER = 512 * 1024


@dataclass(frozen=True, slots=True)
class Mapping:
    """How the NAT shows gwL to the outside: one address, a port for IKE and one for NAT-T."""

    addr: str
    ike_port: int
    natt_port: int

    def endpoint(self) -> str:
        """gwL's NAT-T endpoint as gwR's SAD shows it."""
        return f"{self.addr}[{self.natt_port}]"


MAPPINGS = [Mapping("10.3.0.1", 30500, 34500), Mapping(NAT_EXTRA, 40500, 44500),
            Mapping(NAT_EXTRA, 40501, 45500)]


def stateless_nat(nat: Netns, inside: str, outside: str, m: Mapping) -> None:
    """Replace the NAT's rules in one transaction: gwL's UDP 500 and 4500 leave as m, and what
    comes back to m goes to gwL. Untracked, so a switch takes effect on the next packet."""
    rules = []
    for own, mapped in ((500, m.ike_port), (4500, m.natt_port)):
        rules.append(f'iifname "{outside}" ip daddr {m.addr} udp dport {mapped} notrack '
                     f"ip daddr set {GW_L} udp dport set {own}")
        rules.append(f'iifname "{inside}" ip saddr {GW_L} udp sport {own} notrack')
    out = [f'oifname "{outside}" ip saddr {GW_L} udp sport {own} '
           f"ip saddr set {m.addr} udp sport set {mapped}"
           for own, mapped in ((500, m.ike_port), (4500, m.natt_port))]
    nat.nft("table ip uit_remap {}\nflush table ip uit_remap\ntable ip uit_remap {\n"
            "  chain pre { type filter hook prerouting priority raw; policy accept;\n"
            + "".join(f"    {r}\n" for r in rules) + "  }\n"
            "  chain post { type filter hook postrouting priority srcnat; policy accept;\n"
            + "".join(f"    {r}\n" for r in out) + "  }\n}\n")


def responder_view(right: Side) -> tuple[list[tuple[str, str, int]], list[dict[str, Any]]]:
    """gwR's SAs (source, destination, SPI) and its policies."""
    return [(sa["src"], sa["dst"], sa["spi"]) for sa in right.sad()], right.spd()


def follows(right: Side, m: Mapping, gw_r: str) -> bool:
    """gwR's two SAs name m (address and NAT-T port), its three policies m's address."""
    sad, spd = responder_view(right)
    if len(spd) != 3 or sorted((src, dst) for src, dst, _ in sad) != sorted(
            [(m.endpoint(), f"{gw_r}[4500]"), (f"{gw_r}[4500]", m.endpoint())]):
        return False
    want = {"out": f"{gw_r}-{m.addr}", "in": f"{m.addr}-{gw_r}", "fwd": f"{m.addr}-{gw_r}"}
    return all([r["endpoints"] for r in p["requests"]] == [want[str(p["direction"])]]
               for p in spd)


def traffic_flows(pair: Pair, topo: Topology) -> None:
    """Pings both ways (the responder side's too: its outbound SA and policy are the moved
    ones) and a TCP transfer checked by SHA-256."""
    for src, dst in ((topo.host_l, topo.host_r_lan.ip4), (topo.host_r, topo.host_l_lan.ip4)):
        assert wait_for(partial(ping, src, dst, count=1, wait=1.0), FOLLOW), \
            f"no echo {dst}\n" + pair.logs()
        assert ping(src, dst, count=5) == 5, f"echoes to {dst} lost\n" + pair.logs()
    _, sent, received = tcp_transfer(pair.h, topo.host_l, topo.host_r, topo.host_r_lan.ip4,
                                     total=TRANSFER)
    assert sent == received, "TCP data corrupted in the tunnel"


def test_sas_and_policies_follow_a_new_nat_mapping(tmp_path: Path) -> None:
    with NetnsHarness() as h:
        topo = build_topology(h, nat=True)
        nat, inside, outside = topo.nat, topo.nat_inside, topo.nat_outside
        assert nat is not None and inside is not None and outside is not None
        nat.nft("delete table inet uit_nat\n")  # the lab's masquerade: conntrack, not ours
        nat.add_addr(outside.dev, f"{NAT_EXTRA}/24")
        stateless_nat(nat, inside.dev, outside.dev, MAPPINGS[0])
        gw_r = topo.gw_r_wan.ip4
        conns = [Conn("remap", 0, addr=gw_r, left_conn="dpd_delay = 1")]
        right = Side(h, topo.gw_r, tmp_path / "gwR",
                     render(conns, left=False, seen_left="%any", right_net=3))
        left = Side(h, topo.gw_l, tmp_path / "gwL",
                    render(conns, left=True, left_addr=GW_L, right_net=3))
        pair = Pair(h, topo, left, right)
        lstat, rstat = pair.up("remap")
        assert lstat["nat"]["local_behind_nat"] and rstat["nat"]["remote_behind_nat"]
        assert follows(right, MAPPINGS[0], gw_r), f"{responder_view(right)}\n" + pair.logs()
        ids = sorted(int(str(p["id"])) for p in right.spd())
        traffic_flows(pair, topo)

        for old, new in zip(MAPPINGS, MAPPINGS[1:], strict=False):
            spis = {spi for _, _, spi in responder_view(right)[0]}
            stateless_nat(nat, inside.dev, outside.dev, new)
            switched = time.monotonic()
            assert wait_for(partial(follows, right, new, gw_r), FOLLOW), \
                f"{responder_view(right)}\n" + pair.logs()
            assert time.monotonic() - switched < FOLLOW
            assert sorted(int(str(p["id"])) for p in right.spd()) == ids  # updated in place
            # Re-added SAs restart their sequence numbers: the Child SA is rekeyed (strongSwan
            # does so when its PF_KEY kernel cannot update an SA's addresses).
            assert not spis & {spi for _, _, spi in responder_view(right)[0]}
            log = right.gw.log.read_text()
            assert (f"peer moved from {old.addr}:{old.natt_port} to "
                    f"{new.addr}:{new.natt_port}") in log, pair.logs()
            traffic_flows(pair, topo)
            status = right.established("remap")
            assert status is not None and status["remote_port"] == new.natt_port, status
        right_log = right.gw.log.read_text()
        assert right_log.count("follow the peer from") == 1, pair.logs()  # not on a port change
        # The moved policy set is found by its new key: down removes everything on both sides.
        pair.down_and_check_clean("remap", from_left=True)
