"""The IKE daemon in its own process (``[daemon] ike_process``, on by default), for real.

hostL -- gwL ==== gwR -- hostR as in test_ike_ours, one connection (``gcm128``, forced UDP
encapsulation so that IKE and ESP go through the datapath's UDP 4500 and the relay). Each test
starts fresh daemons: the IKE process is the daemon's child, keys it over PF_KEY, and negotiates
through the relay; SIGTERM makes it delete its IKE SA towards the peer before both exit; a dead
IKE process stops the daemon with an error; a dead daemon takes its IKE process with it; with
``ike_process = false`` one process does everything. Fails, never skips, without root, ip, nft
or /dev/net/tun.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_ike_ours import Conn, Side, render, wait_for
from tests.integration.test_manual_keying import ping
from userspace_ipsec.lab import NetnsHarness, Topology, build_topology

CONN = Conn("gcm128", 0, encap=True)


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[NetnsHarness, Topology]]:
    with NetnsHarness() as h:
        topology = build_topology(h)
        topology.gw_r.add_addr(topology.gw_r_wan.dev, f"{CONN.right_addr()}/24")
        yield h, topology


@contextlib.contextmanager
def _sides(topo: tuple[NetnsHarness, Topology], base: Path,
           left_daemon: str = "") -> Iterator[tuple[Side, Side]]:
    """Fresh daemons on both gateways, stopped (if a test left them running) at the end."""
    h, t = topo
    sides = [Side(h, t.gw_r, base / "gwR", render([CONN], left=False))]
    try:
        sides.append(Side(h, t.gw_l, base / "gwL", left_daemon + render([CONN], left=True)))
        yield sides[1], sides[0]
    finally:
        for side in sides:
            if side.gw.proc.poll() is None:
                side.gw.proc.send_signal(signal.SIGTERM)
                side.gw.proc.wait(timeout=40)


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _up(left: Side, right: Side, topo: Topology) -> None:
    left.cli("up", CONN.name, "--timeout", "20")
    assert wait_for(lambda: right.established(CONN.name), 10), left.log_tail()
    assert ping(topo.host_l, topo.host_r_lan.ip4) == 5, left.log_tail() + right.log_tail()


def test_ike_runs_in_a_child_process_and_deletes_its_sas_on_stop(
        topo: tuple[NetnsHarness, Topology], tmp_path: Path) -> None:
    with _sides(topo, tmp_path) as (left, right):
        daemon = left.gw.proc.pid
        ike = left.control("stats")["ike"]["pid"]
        assert ike != daemon and _ppid(ike) == daemon
        _up(left, right, topo[1])
        status = left.established(CONN.name)
        assert status is not None and status["nat"]["udp_encap"] and status["remote_port"] == 4500
        stats = left.control("stats")
        assert stats["datapath"]["ike_received"] >= 1  # IKE_AUTH's answer came by the relay
        assert stats["ike"]["relay_dropped"] == 0 and stats["ike"]["child_sas"] == 1
        left.gw.proc.send_signal(signal.SIGTERM)
        assert left.gw.proc.wait(timeout=40) == 0, left.log_tail()
        assert not _alive(ike)
        # Only our DELETE (sent by the IKE process through the relay before the daemon closed
        # its socket) removes it this fast: the connection has no DPD.
        assert wait_for(lambda: not right.ike_sas(CONN.name), 5), right.log_tail()
        assert not right.sad(), right.log_tail()


def test_a_dead_ike_process_stops_the_daemon_with_an_error(
        topo: tuple[NetnsHarness, Topology], tmp_path: Path) -> None:
    with _sides(topo, tmp_path) as (left, right):
        ike = left.control("stats")["ike"]["pid"]
        os.kill(ike, signal.SIGKILL)
        assert left.gw.proc.wait(timeout=40) == 1
        log = left.gw.log.read_text()
        assert "the IKE process exited unexpectedly (status -9)" in log, log[-3000:]
        assert not (left.run_dir / "control.sock").exists()


def test_the_ike_process_does_not_outlive_a_killed_daemon(
        topo: tuple[NetnsHarness, Topology], tmp_path: Path) -> None:
    with _sides(topo, tmp_path) as (left, right):
        ike = left.control("stats")["ike"]["pid"]
        left.gw.proc.send_signal(signal.SIGKILL)
        left.gw.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(ike) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(ike)


def test_ike_in_the_daemons_process_when_configured(
        topo: tuple[NetnsHarness, Topology], tmp_path: Path) -> None:
    with _sides(topo, tmp_path, left_daemon="[daemon]\nike_process = false\n\n") as (left, right):
        assert left.control("stats")["ike"]["pid"] == left.gw.proc.pid
        _up(left, right, topo[1])
        left.cli("down", CONN.name)
        assert wait_for(lambda: not right.ike_sas(CONN.name) and not right.sad(), 10)
