"""IKE interop with strongSwan: our service in gwL (own emulated kernel), charon
(kernel-libipsec) in gwR. Both sides must agree on the Child SA's SPIs and algorithms, and our
delete must reach charon. The data plane needs the datapath, which the daemon integrates."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.topology import LEFT_NET, RIGHT_NET, Topology, stop_process, topology
from tests.daemon.daemon_proc import subprocess_env
from tests.strongswan import (
    Charon,
    StrongSwanError,
    psk_secret,
    psk_site_to_site,
    require_strongswan,
)
from userspace_ipsec.control import request

PSK = "interop-test-psk-not-secret-0123456789"


def _our_config(topo: Topology) -> str:
    return f"""
[ike]
listen = ["{topo.gw_l_outer}"]

[connections.gw]
local_addrs = ["{topo.gw_l_outer}"]
remote_addrs = ["{topo.gw_r_outer}"]
local_id = "gwL"
remote_id = "gwR"
proposals = ["aes128gcm16-prfsha256-x25519"]

[connections.gw.children.net]
local_ts = ["{LEFT_NET}"]
remote_ts = ["{RIGHT_NET}"]
esp_proposals = ["aes128gcm16"]

[secrets.psk.gw]
id = ["gwL", "gwR"]
secret = "{PSK}"
"""


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gateway did not start:\n{log.read_text()}")
        time.sleep(0.05)


def test_ike_and_child_sa_agree_with_charon(tmp_path: Path) -> None:
    try:
        require_strongswan()
    except StrongSwanError as exc:
        pytest.fail(str(exc), pytrace=False)
    with topology() as topo:
        conf = tmp_path / "left.toml"
        conf.write_text(_our_config(topo))
        os.chmod(conf, 0o600)
        charon = Charon(topo.gw_r, psk_site_to_site(
            local_addr=topo.gw_r_outer, remote_addr=topo.gw_l_seen_by_r, local_id="gwR",
            remote_id="gwL", local_ts=RIGHT_NET, remote_ts=LEFT_NET),
            psk_secret("gwL", "gwR", PSK))
        run_dir = tmp_path / "run"
        log = tmp_path / "gateway.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", topo.gw_l, sys.executable, "-m",
                 "tests.ike_daemon.gateway_main", str(run_dir), str(conf)],
                stdout=out, stderr=out, env=subprocess_env())
        charon.start()
        try:
            _wait_for(run_dir / "control.sock", proc, log)
            up = request(run_dir / "control.sock", "up", {"name": "gw", "timeout": 20}, 30)
            assert up["state"] == "established", log.read_text()
            ours = request(run_dir / "control.sock", "status")["ike_sas"][0]
            (theirs,) = charon.list_sas()
            assert theirs.state == "ESTABLISHED"
            (child,) = ours["children"]
            (their_child,) = theirs.children
            assert their_child.spi_in == child["spi_out"]
            assert their_child.spi_out == child["spi_in"]
            assert their_child.encr_alg == "AES_GCM_16" and child["algorithms"].startswith(
                "AES_GCM_16_128")
            assert ours["algorithms"].startswith("AES_GCM_16_128") and \
                theirs.encr_alg == "AES_GCM_16"
            request(run_dir / "control.sock", "down", {"name": "gw"}, 30)
            deadline = time.monotonic() + 10
            while charon.list_sas() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not charon.list_sas()
        finally:
            charon.stop()
            stop_process(proc)
            print(log.read_text())
