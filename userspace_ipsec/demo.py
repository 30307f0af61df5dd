"""``uipsec demo``: an ESP tunnel between two gateways in network namespaces.

    hostL 10.1.0.2 — gwL ==== ESP tunnel ==== gwR — hostR 10.4.0.2

Each gateway runs its own daemon (own run directory). By default the daemons negotiate the
tunnel with IKEv2 and a fresh random pre-shared key (gwL initiates); with ``manual`` keying each
loads a setkey script instead (the ones in examples/manual-keying/, with fresh random keys).
hostL pings hostR through the tunnel, and the gateways' IKE status and SAs are shown with their
counters. Everything the demo made (namespaces, daemons, run directories) is removed at the
end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .lab import Netns, NetnsHarness, Topology, build_topology
from .pfkey.client import PfkeyClient

DEMO_PREFIX = "uid-"

_SCRIPT = """\
# Manually keyed ESP tunnel between two gateways: {local_lan} <-> {remote_lan}.
# AES-GCM-16 with a 128-bit key (the key is 160 bits: 128 of key and 32 of salt), ESP in UDP
# port 4500 (RFC 3948), as through a NAT. Generate your own keys with:
#     python3 -c 'import os; print("0x" + os.urandom(20).hex())'
# Load with:  uipsec --run-dir RUN_DIR setkey -k -f {name}

flush;
spdflush;

# Outbound SA: this gateway to the peer; inbound SA: the peer to this gateway.
add {local}[4500] {remote}[4500] esp-udp 0x{spi_out:08x} -m tunnel -u {reqid_out}
    -E aes-gcm-16 0x{key_out};
add {remote}[4500] {local}[4500] esp-udp 0x{spi_in:08x} -m tunnel -u {reqid_in}
    -E aes-gcm-16 0x{key_in};

# The LANs talk through the tunnel in both directions (fwd: forwarded to the LAN behind us).
spdadd {local_lan} {remote_lan} any
    -P out ipsec esp/tunnel/{local}-{remote}/unique:{reqid_out};
spdadd {remote_lan} {local_lan} any
    -P in ipsec esp/tunnel/{remote}-{local}/unique:{reqid_in};
spdadd {remote_lan} {local_lan} any
    -P fwd ipsec esp/tunnel/{remote}-{local}/unique:{reqid_in};
"""


@dataclass(frozen=True, slots=True)
class TunnelEnd:
    name: str
    local: str
    remote: str
    local_lan: str
    remote_lan: str
    spi_out: int
    spi_in: int
    key_out: str
    key_in: str
    reqid_out: int
    reqid_in: int


def tunnel_ends(left_wan: str, right_wan: str, left_lan: str, right_lan: str,
                keys: tuple[str, str] | None = None) -> tuple[TunnelEnd, TunnelEnd]:
    """The two ends' parameters: what one sends with, the other receives with."""
    key_lr, key_rl = keys or (os.urandom(20).hex(), os.urandom(20).hex())
    left = TunnelEnd("left.conf", left_wan, right_wan, left_lan, right_lan,
                     0x1001, 0x1002, key_lr, key_rl, 101, 102)
    right = TunnelEnd("right.conf", right_wan, left_wan, right_lan, left_lan,
                      0x1002, 0x1001, key_rl, key_lr, 102, 101)
    return left, right


def render_script(end: TunnelEnd) -> str:
    return _SCRIPT.format(**{f: getattr(end, f) for f in end.__dataclass_fields__})


_IKE_CONFIG = """\
# IKEv2 with a pre-shared key between two gateways: {local_lan} <-> {remote_lan}.
[connections.demo]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
local_id = "{local}"
remote_id = "{remote}"
proposals = ["aes128gcm16-prfsha256-x25519"]
dpd_delay = 10

[connections.demo.children.lan]
local_ts = ["{local_lan}"]
remote_ts = ["{remote_lan}"]
esp_proposals = ["aes128gcm16"]
start_action = "{start_action}"

[secrets.psk.demo]
id = ["{local}", "{remote}"]
secret = "0x{psk}"
"""


def render_ike_config(end: TunnelEnd, psk: str, initiator: bool) -> str:
    return _IKE_CONFIG.format(local=end.local, remote=end.remote, local_lan=end.local_lan,
                              remote_lan=end.remote_lan, psk=psk,
                              start_action="start" if initiator else "none")


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon for {path.parent} exited during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon for {path.parent} did not start in {timeout:.0f} s")
        time.sleep(0.05)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "userspace_ipsec.cli", *args]


class Demo:
    def __init__(self, say: Callable[[str], None], pings: int = 3, keying: str = "ike") -> None:
        if keying not in ("ike", "manual"):
            raise ValueError(f"keying must be 'ike' or 'manual', not {keying!r}")
        self.say = say
        self.pings = pings
        self.keying = keying

    def run(self) -> bool:
        workdir = Path(tempfile.mkdtemp(prefix="uipsec-demo-"))
        try:
            # No NAT in the demo: iproute2 and procps suffice (nftables is not needed).
            with NetnsHarness(prefix=DEMO_PREFIX, tools=("ip", "sysctl")) as lab:
                return self._run(lab, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self.say("cleaned up: namespaces, daemons and run directories removed")

    def _run(self, lab: NetnsHarness, workdir: Path) -> bool:
        self.say("building namespaces: hostL - gwL - gwR - hostR")
        topo = build_topology(lab)
        left, right = tunnel_ends(topo.gw_l_wan.ip4, topo.gw_r_wan.ip4, "10.1.0.0/24",
                                  "10.4.0.0/24")
        psk = os.urandom(32).hex()
        run_dirs = {}
        # The responder first, so that the initiator's first IKE_SA_INIT finds it listening.
        for gw, end in ((topo.gw_r, right), (topo.gw_l, left)):
            run_dir = workdir / gw.role
            run_dirs[gw.role] = run_dir
            args = ["--run-dir", str(run_dir), "daemon"]
            if self.keying == "ike":
                config = workdir / f"{gw.role}.toml"
                config.touch(mode=0o600)  # it holds the PSK
                config.write_text(render_ike_config(end, psk, initiator=gw is topo.gw_l))
                args += ["--config", str(config)]
            log = open(workdir / f"{gw.role}.log", "wb")  # noqa: SIM115 (closed with the dir)
            proc = gw.spawn(*_cli(*args), stdout=log, stderr=log)
            _wait_for(run_dir / "pfkey.sock", proc)
            self.say(f"{gw.role}: daemon running (pid {proc.pid}, run dir {run_dir})")
            if self.keying == "manual":
                script = workdir / end.name
                script.write_text(render_script(end))
                gw.exec(*_cli("--run-dir", str(run_dir), "setkey", "-k", "-f", str(script)))
                self.say(f"{gw.role}: loaded {end.name}: 2 SAs, 3 policies")
        ok = self.keying != "ike" or self._wait_for_ike(run_dirs["gwL"])
        ok = ok and self._ping(topo)
        for role, run_dir in run_dirs.items():
            if self.keying == "ike":
                self.say(f"\n{role}: uipsec status")
                self.say(_cli_output(run_dir, "status"))
            self.say(f"\n{role}: uipsec sa list")
            self.say(_sa_table(run_dir))
        if not ok:
            for role in run_dirs:
                self.say(f"--- {role} daemon log ---\n" +
                         (workdir / f"{role}.log").read_text(errors="replace")[-3000:])
        return ok

    def _wait_for_ike(self, run_dir: Path, timeout: float = 30.0) -> bool:
        """Until gwL's connection is up (it initiates as soon as its daemon starts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ESTABLISHED" in _cli_output(run_dir, "status"):
                self.say("gwL: IKEv2 SA and Child SA established with gwR")
                return True
            time.sleep(0.2)
        self.say(f"gwL: the IKE SA was not established within {timeout:.0f} s")
        return False

    def _ping(self, topo: Topology) -> bool:
        src: Netns = topo.host_l
        dst = topo.host_r_lan.ip4
        self.say(f"\nping {dst} from hostL through the tunnel:")
        rtts = src.ping(dst, count=self.pings, timeout=2.0)
        for i, rtt in enumerate(rtts, 1):
            self.say(f"  reply from {dst}: icmp_seq={i} time={rtt:.2f} ms")
        self.say(f"  {self.pings} packets transmitted, {len(rtts)} received")
        return len(rtts) == self.pings


def _cli_output(run_dir: Path, *args: str) -> str:
    proc = subprocess.run(_cli("--run-dir", str(run_dir), *args), capture_output=True,
                          text=True, timeout=30)
    return (proc.stdout + proc.stderr).rstrip()


def _sa_table(run_dir: Path) -> str:
    from .inspect import sa_record, table

    with PfkeyClient(run_dir / "pfkey.sock") as client:
        records = [sa_record(m) for m in client.dump()]
    rows = []
    for r in records:
        c = r.get("counters") or {}
        rows.append([r["spi_hex"], r["mode"], r["src"], r["dst"], r["encryption"] or "-",
                     f"{c.get('packets_in', 0)}/{c.get('packets_out', 0)}",
                     f"{c.get('bytes_in', 0)}/{c.get('bytes_out', 0)}"])
    return table(rows, ["SPI", "MODE", "SRC", "DST", "ENC", "PKTS IN/OUT", "BYTES IN/OUT"])
