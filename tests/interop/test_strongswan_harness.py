"""The strongSwan reference-peer recipe: two isolated charons (kernel-libipsec) tunnel hostL-hostR.

Topology hostL -- gwL -- gwR -- hostR in fresh namespaces. The gateways have no cleartext route
to the far host subnet and an nft rule that drops anything forwarded across the wan link, so a
ping that gets through was carried by the tunnel; nft counters on gwL's wan show it left as UDP
4500 (ESP-in-UDP) with no ICMP, and both charons' Child SA counters moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.topology import (
    HOST_R_ADDR,
    LEFT_NET,
    RIGHT_NET,
    Topology,
    TopologyError,
    topology,
)
from tests.strongswan import (
    Charon,
    StrongSwanError,
    parse_list_sas,
    psk_gateway_pair,
    require_strongswan,
)

PSK = "harness-test-psk-not-secret-0123456789"

# On gwL: nothing is forwarded across the wan link in clear; count what leaves on it.
WAN_GUARD = """
add table inet guard
add chain inet guard forwarded { type filter hook forward priority 0; policy accept; }
add rule inet guard forwarded oifname "wan" counter drop
add rule inet guard forwarded iifname "wan" counter drop
add chain inet guard egress { type filter hook postrouting priority 0; policy accept; }
add rule inet guard egress oifname "wan" udp dport 4500 counter
add rule inet guard egress oifname "wan" ip protocol icmp counter
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    try:
        require_strongswan()
    except StrongSwanError as exc:
        pytest.fail(str(exc), pytrace=False)
    with topology() as built:
        for ns in (built.gw_l, built.gw_r):
            built.run(ns, ["nft", WAN_GUARD])
        yield built


def guard_counters(topo: Topology) -> dict[str, int]:
    """Packets counted by WAN_GUARD on gwL: forwarded-drop, esp-in-udp out, icmp out."""
    listing = topo.run(topo.gw_l, ["nft", "list", "chain", "inet", "guard", "egress"])
    listing += topo.run(topo.gw_l, ["nft", "list", "chain", "inet", "guard", "forwarded"])
    counts: dict[str, int] = {}
    for line in listing.splitlines():
        if "counter packets" not in line:
            continue
        packets = int(line.split("counter packets", 1)[1].split()[0])
        key = ("udp4500" if "4500" in line else "icmp" if "icmp" in line else "fwd_dropped")
        counts[key] = counts.get(key, 0) + packets
    return counts


def make_charons(topo: Topology) -> tuple[Charon, Charon]:
    return psk_gateway_pair(
        left_ns=topo.gw_l, right_ns=topo.gw_r, left_addr=topo.gw_l_outer,
        right_addr=topo.gw_r_outer, left_as_seen_by_right=topo.gw_l_seen_by_r,
        left_net=LEFT_NET, right_net=RIGHT_NET, psk=PSK,
    )


def test_no_cleartext_path_without_tunnel(topo: Topology) -> None:
    assert topo.ping(topo.host_l, HOST_R_ADDR, count=2, wait=0.5) == 0


def test_psk_tunnel_carries_ping_encrypted(topo: Topology) -> None:
    left, right = make_charons(topo)
    with left, right:
        # Two charons at once, each with its own pid file under its private /run.
        assert (left.workdir / "run" / "charon.pid").read_text().strip() == str(left.pid)
        assert (right.workdir / "run" / "charon.pid").read_text().strip() == str(right.pid)

        left.initiate("net")
        [ike] = left.list_sas()
        assert (ike.name, ike.state) == ("gw", "ESTABLISHED")
        assert (ike.encr_alg, ike.dh_group) == ("AES_GCM_16", "CURVE_25519")
        [child] = ike.children
        assert (child.state, child.mode, child.encap) == ("INSTALLED", "TUNNEL", True)
        assert (child.local_ts, child.remote_ts) == ([LEFT_NET], [RIGHT_NET])
        before = guard_counters(topo)
        assert right.child_sa("net").spi_in == child.spi_out

        assert topo.ping(topo.host_l, HOST_R_ADDR, count=5) == 5

        after = guard_counters(topo)
        assert after["udp4500"] - before["udp4500"] >= 5
        assert after["icmp"] == 0
        assert after["fwd_dropped"] == 0
        for charon in (left, right):
            sa = charon.child_sa("net")
            assert sa.packets_out >= 5 and sa.packets_in >= 5
            assert sa.bytes_out >= 5 * 84 and sa.bytes_in >= 5 * 84

        left.terminate("gw")
        assert left.list_sas() == []
        assert topo.ping(topo.host_l, HOST_R_ADDR, count=1, wait=0.5) == 0
    assert not Path(left.workdir).exists()


def test_psk_tunnel_through_nat() -> None:
    require_strongswan()
    with topology(nat=True) as natted:
        left, right = make_charons(natted)
        with left, right:
            left.initiate("net")
            assert natted.ping(natted.host_l, HOST_R_ADDR, count=3) == 3
            [seen_by_right] = right.list_sas()
            # gwR talks to the NAT's outside address, not gwL's own 198.18.3.1.
            assert (seen_by_right.state, seen_by_right.remote_host) == (
                "ESTABLISHED", natted.gw_l_seen_by_r)
            assert left.list_sas()[0].local_host == natted.gw_l_outer != natted.gw_l_seen_by_r
            assert right.child_sa("net").packets_in >= 3


def test_stop_ends_charon_and_missing_peer_is_a_clear_error(topo: Topology) -> None:
    left, _ = make_charons(topo)
    with left:
        pid = left.pid
        with pytest.raises(StrongSwanError, match="initiate"):
            left.initiate("net", timeout=4)  # no charon on gwR: IKE_SA_INIT goes unanswered
    assert not Path(f"/proc/{pid}").exists()


def test_parse_list_sas_reads_nested_raw_output() -> None:
    raw = (
        "list-sa event {gw {uniqueid=1 version=2 state=ESTABLISHED local-host=198.18.0.1 "
        "remote-host=198.18.0.2 nat-any=yes encr-alg=AES_GCM_16 dh-group=CURVE_25519 "
        "child-sas {net-1 {name=net state=INSTALLED mode=TUNNEL encap=yes spi-in=c1 "
        "spi-out=c2 bytes-in=84 packets-in=1 bytes-out=168 packets-out=2 "
        "local-ts=[198.18.1.0/24 10.0.0.0/8] remote-ts=[198.18.2.0/24]}}}}\n"
        "list-sas reply {}\n"
    )
    [ike] = parse_list_sas(raw)
    assert (ike.name, ike.remote_host, ike.nat_any) == ("gw", "198.18.0.2", True)
    [child] = ike.children
    assert (child.bytes_in, child.packets_out, child.spi_out) == (84, 2, "c2")
    assert child.local_ts == ["198.18.1.0/24", "10.0.0.0/8"]
    assert parse_list_sas("list-sas reply {}\n") == []


def test_topology_removes_its_namespaces() -> None:
    with topology() as built:
        names = built.namespaces
        assert all(Path("/run/netns", n).exists() for n in names)
    assert not any(Path("/run/netns", n).exists() for n in names)
    with pytest.raises(TopologyError), topology() as built:
        built.run(built.gw_l, ["false"])
    assert not any(Path("/run/netns", n).exists() for n in built.namespaces)
