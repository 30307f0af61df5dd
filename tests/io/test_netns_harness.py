"""The namespace harness builds what it promises and always removes it."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

import pytest

from tests.netns import (
    HarnessError,
    Netns,
    NetnsHarness,
    build_topology,
    check_prerequisites,
    collect,
    list_namespaces,
    run_as_nobody,
)

Received = tuple[bytes, tuple[Any, ...]]


def _udp_echo_once(src_sock: socket.socket, dst: socket.socket,
                   addr: tuple[str, int]) -> Received:
    src_sock.sendto(b"ping", addr)
    got = collect(lambda: _recv_all(dst), 1)
    assert got, f"nothing arrived at {addr}"
    return got[0]


def _recv_all(sock: socket.socket) -> list[Received]:
    out: list[Received] = []
    for _ in range(64):
        try:
            out.append(sock.recvfrom(2048))
        except BlockingIOError:
            break
    return out


def _udp(ns: Netns, family: int, port: int = 0) -> socket.socket:
    with ns.entered():
        s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    return s


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_namespaces_are_removed_after_an_exception(exc_type: type[BaseException]) -> None:
    names: list[str] = []
    with pytest.raises(exc_type, match="boom"), NetnsHarness() as h:
        a, b = h.netns("a"), h.netns("b")
        h.veth(a, b)
        proc = a.spawn("sleep", "30")
        names = [a.name, b.name]
        assert set(names) <= set(list_namespaces())
        raise exc_type("boom")
    assert names and not set(names) & set(list_namespaces())
    assert proc.poll() is not None, "background process survived the harness"
    assert not [n for n in list_namespaces() if n.startswith(f"uit-{h.tag}")]


def test_processes_are_killed_by_pid_and_only_ours() -> None:
    bystander = subprocess.Popen(["sleep", "30"])  # same command line, not started by harness
    try:
        with NetnsHarness() as h:
            ns = h.netns("p")
            ours = ns.spawn("sleep", "30")
            # A child that ignores SIGTERM must still die (SIGKILL after the grace period).
            stubborn = ns.spawn("sh", "-c", "trap '' TERM; sleep 30")
            time.sleep(0.2)
        assert ours.poll() is not None and stubborn.poll() is not None
        assert bystander.poll() is None, "harness killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


def test_prerequisite_check_fails_clearly_when_not_root() -> None:
    def check() -> str:
        try:
            check_prerequisites()
        except HarnessError as exc:
            return str(exc)
        return "no error"

    assert "must run as root" in run_as_nobody(check)


def test_plain_topology_dual_stack_and_isolated_lans(netns_harness: NetnsHarness) -> None:
    t = build_topology(netns_harness)
    assert t.nat is None
    for fam, dst in ((socket.AF_INET, t.gw_r_wan.ip4), (socket.AF_INET6, t.gw_r_wan.ip6)):
        rx = _udp(t.gw_r, fam, 7001)
        _, src = _udp_echo_once(_udp(t.gw_l, fam), rx, (dst, 7001))
        assert src[0] in (t.gw_l_wan.ip4, t.gw_l_wan.ip6)
    # hostL reaches its gateway, but not hostR: no route between the LANs without a tunnel.
    rx = _udp(t.gw_l, socket.AF_INET, 7002)
    _udp_echo_once(_udp(t.host_l, socket.AF_INET), rx, (t.gw_l_lan.ip4, 7002))
    far = _udp(t.host_r, socket.AF_INET, 7003)
    _udp(t.host_l, socket.AF_INET).sendto(b"leak?", (t.host_r_lan.ip4, 7003))
    assert collect(lambda: _recv_all(far), 1, timeout=0.5) == []


def test_nat_topology_masquerades_v4_and_v6(netns_harness: NetnsHarness) -> None:
    t = build_topology(netns_harness, nat=True)
    assert t.nat is not None and t.nat_outside is not None
    rules = t.nat.exec("nft", "list", "ruleset").stdout
    assert "masquerade" in rules
    for fam, dst, public in ((socket.AF_INET, t.gw_r_wan.ip4, t.nat_outside.ip4),
                             (socket.AF_INET6, t.gw_r_wan.ip6, t.nat_outside.ip6)):
        rx = _udp(t.gw_r, fam, 4500)
        tx = _udp(t.gw_l, fam, 4500)
        _, src = _udp_echo_once(tx, rx, (dst, 4500))
        assert src[0] == public, "gwR must see the NAT's outside address"
        # The reply to the mapped address goes back through the NAT to gwL.
        rx.sendto(b"pong", src)
        assert _recv_back(tx)[0][0] == b"pong"


def _recv_back(sock: socket.socket) -> list[Received]:
    return collect(lambda: _recv_all(sock), 1)


def test_random_drop_loses_about_the_requested_share(netns_harness: NetnsHarness) -> None:
    t = build_topology(netns_harness, nat=True, drop_percent=50)
    rx = _udp(t.gw_r, socket.AF_INET, 4600)
    tx = _udp(t.gw_l, socket.AF_INET)
    for i in range(400):
        tx.sendto(i.to_bytes(2, "big"), (t.gw_r_wan.ip4, 4600))
    got = collect(lambda: _recv_all(rx), 400, timeout=1.0)
    # Binomial(400, 0.5): 120..280 is far beyond 6 sigma either way.
    assert 120 < len(got) < 280, len(got)
