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
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.daemon_proc import subprocess_env
from tests.integration.test_ike_ours import (
    BY_NAME,
    PROPOSALS,
    PSK,
    Conn,
    Side,
    add_wan_addresses,
    render,
    wait_for,
)
from tests.integration.test_manual_keying import ping
from userspace_ipsec.config import ConfigError, load
from userspace_ipsec.control import ControlError, request
from userspace_ipsec.lab import NetnsHarness, Topology, build_topology, link

CONN = Conn("gcm128", 0, encap=True)


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[NetnsHarness, Topology]]:
    with NetnsHarness() as h:
        topology = build_topology(h)
        add_wan_addresses(topology)  # gwR's address of each of test_ike_ours's connections
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


def test_without_a_datapath_the_ike_process_binds_udp_4500_itself(tmp_path: Path) -> None:
    """``--no-datapath``: nobody relays UDP 4500, so the IKE process opens it; forced
    encapsulation moves IKE there after IKE_SA_INIT."""
    with NetnsHarness() as h:
        a, b = h.netns("a"), h.netns("b")
        link(h, a, b, 9)
        sides = []
        for ns, me, peer in ((b, 2, 1), (a, 1, 2)):
            run_dir = tmp_path / ns.role
            run_dir.mkdir()
            config = run_dir / "uipsec.toml"
            config.touch(mode=0o600)
            config.write_text(f"""[connections.c]
local_addrs = ["10.9.0.{me}"]
remote_addrs = ["10.9.0.{peer}"]
encap = true
[connections.c.children.net]
local_ts = ["10.{me}.0.0/24"]
remote_ts = ["10.{peer}.0.0/24"]
[secrets.psk.all]
secret = "{PSK}"
""")
            log = (run_dir / "daemon.log").open("wb")
            proc = ns.spawn(sys.executable, "-m", "userspace_ipsec.cli", "-v", "--run-dir",
                            str(run_dir), "daemon", "--no-datapath", "--config", str(config),
                            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
            log.close()
            sides.append((proc, run_dir))
        try:
            for _, run_dir in sides:
                assert wait_for(lambda d=run_dir: "IKE service running" in
                                (d / "daemon.log").read_text(), 30), \
                    (run_dir / "daemon.log").read_text()[-3000:]
                assert "and 4500" in (run_dir / "daemon.log").read_text()  # its own socket
            (_, right_dir), (_, left_dir) = sides
            request(left_dir / "control.sock", "up", {"name": "c", "timeout": 20}, timeout=40)
            status = request(left_dir / "control.sock", "status")["ike_sas"]
            assert status[0]["state"] == "established" and status[0]["remote_port"] == 4500
            assert wait_for(lambda: request(right_dir / "control.sock", "status")["ike_sas"],
                            10)
        finally:
            for proc, _ in sides:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=40)


def _status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_privilege_separation_runs_ike_as_nobody_and_reloads_through_the_daemon(
        topo: tuple[NetnsHarness, Topology], tmp_path: Path) -> None:
    daemon_table = '[daemon]\nike_user = "nobody"\n\n'
    with _sides(topo, tmp_path, left_daemon=daemon_table) as (left, right):
        ike = left.control("stats")["ike"]["pid"]
        status = _status_fields(ike)
        assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        _up(left, right, topo[1])  # its sockets and its PF_KEY connection were opened as root
        # The configuration is root's (0600): the daemon reads it for the IKE process.
        config = left.run_dir / "uipsec.toml"
        assert config.stat().st_mode & 0o077 == 0
        extra = Conn("extra", 1, left_ts="10.21.0.0/24", right_ts="10.24.0.0/24")
        config.write_text(daemon_table + render([CONN, extra], left=True))
        assert left.control("reload") == {"added": ["extra"], "changed": [], "removed": []}
        assert "extra" in left.control("status")["connections"]
        assert left.established(CONN.name) is not None  # unchanged: still up
        config.write_text(daemon_table + "[connections.broken]\n")
        with pytest.raises(ControlError, match="configuration refused, nothing changed"):
            left.control("reload")
        assert sorted(left.control("status")["connections"]) == ["extra", CONN.name]
        assert _alive(ike) and _ppid(ike) == left.gw.proc.pid


def test_an_unknown_ike_user_is_refused_with_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "u.toml"
    config.write_text('[daemon]\nike_user = "no-such-user-here"\n')
    with pytest.raises(ConfigError, match=r"u.toml:2: daemon.ike_user: no user"):
        load(config)
    config.write_text('[daemon]\nike_process = false\nike_user = "nobody"\n')
    with pytest.raises(ConfigError, match="needs the IKE process"):
        load(config)


def test_privilege_separated_ike_negotiates_every_suite_and_rekeys_with_pfs(
        topo: tuple[NetnsHarness, Topology], tmp_path: Path) -> None:
    """What the IKE process loads on first use (every cipher and DH group) was loaded before
    it became nobody: each suite comes up, and a Child SA rekey with PFS goes through."""
    conns = [BY_NAME[name] for name in (*PROPOSALS, "rekey")]
    h, t = topo
    daemon_table = '[daemon]\nike_user = "nobody"\n\n'
    right = Side(h, t.gw_r, tmp_path / "gwR", render(conns, left=False))
    left = Side(h, t.gw_l, tmp_path / "gwL", daemon_table + render(conns, left=True))
    try:
        for conn in conns:
            left.cli("up", conn.name, "--timeout", "20")
            assert wait_for(lambda c=conn: right.established(c.name), 10), left.log_tail()
            assert ping(t.host_l, t.host_r_lan.ip4) == 5, left.log_tail()
            if conn.name == "rekey":  # gwL rekeys its Child SA every 3 s, with x25519
                assert wait_for(lambda: ", rekeys " in left.gw.log.read_text(), 15), \
                    left.log_tail()
            left.cli("down", conn.name)
            assert wait_for(lambda c=conn: not right.ike_sas(c.name), 10), right.log_tail()
        assert "ModuleNotFoundError" not in left.gw.log.read_text()
    finally:
        for side in (left, right):
            side.gw.proc.send_signal(signal.SIGTERM)
            side.gw.proc.wait(timeout=40)
