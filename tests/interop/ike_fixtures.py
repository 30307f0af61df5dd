"""Our IKE daemon (with its ESP datapath) against strongSwan's charon in namespaces.

    hostL 10.1.0.2 — gwL (uipsec daemon) ==== [nat] ==== gwR (charon) — hostR 10.4.0.2

``interop_lab(workdir, ours, theirs)`` builds the topology of ``userspace_ipsec.lab``, starts
charon (kernel-libipsec, tests/strongswan.py) in gwR and ``uipsec daemon --config`` in gwL, and
always removes both and every namespace. Helpers read both sides' view of the tunnel (ours
through the control socket and ``uipsec sa list/spd list --json``, charon's through ``swanctl
--list-sas --raw``), ping, and move a TCP stream host to host checked by SHA-256.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.daemon.daemon_proc import subprocess_env
from tests.strongswan import Charon, parse_raw, psk_secret, require_strongswan
from userspace_ipsec.control import ControlError, request
from userspace_ipsec.lab import Netns, NetnsHarness, Topology, build_topology

PSK = "interop-psk-not-a-secret-0123456789abcdef"
LEFT_NET = "10.1.0.0/24"
RIGHT_NET = "10.4.0.0/24"
CONN = "gw"
CHILD = "net"
T = TypeVar("T")


@dataclass(slots=True)
class OurSide:
    """Settings of our connection ``gw`` / child ``net`` in gwL."""

    proposal: str = "aes128gcm16-prfsha256-x25519"
    esp_proposal: str = "aes128gcm16"
    start_action: str = "none"
    dpd_delay: float = 0.0
    dpd_action: str = "clear"
    ike_rekey_time: float = 14400.0
    child_rekey_time: float = 3600.0
    retransmit_timeout: float = 1.0
    retransmit_tries: int = 3


@dataclass(slots=True)
class TheirSide:
    """Settings of charon's connection ``gw`` / child ``net`` in gwR."""

    proposal: str = "aes128gcm16-prfsha256-x25519"
    esp_proposal: str = "aes128gcm16"
    start_action: str = "none"
    dpd_delay: int = 0


def our_config(ours: OurSide, local: str, remote: str) -> str:
    child_rekey = ours.child_rekey_time
    return f"""
[ike]
retransmit_timeout = {ours.retransmit_timeout}
retransmit_tries = {ours.retransmit_tries}

[connections.{CONN}]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
local_id = "gwL"
remote_id = "gwR"
proposals = ["{ours.proposal}"]
dpd_delay = {ours.dpd_delay}
rekey_time = {ours.ike_rekey_time}
jitter = 0

[connections.{CONN}.children.{CHILD}]
local_ts = ["{LEFT_NET}"]
remote_ts = ["{RIGHT_NET}"]
esp_proposals = ["{ours.esp_proposal}"]
start_action = "{ours.start_action}"
dpd_action = "{ours.dpd_action}"
rekey_time = {child_rekey}
life_time = {child_rekey * 3}
jitter = 0

[secrets.psk.{CONN}]
id = ["gwL", "gwR"]
secret = "{PSK}"
"""


def charon_config(theirs: TheirSide, local: str, remote: str) -> str:
    """swanctl.conf ``connections`` for gwR; rekeying is left to our side or to swanctl."""
    return f"""connections {{
  {CONN} {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = {theirs.proposal}
    dpd_delay = {theirs.dpd_delay}s
    rekey_time = 0
    local {{
      auth = psk
      id = gwR
    }}
    remote {{
      auth = psk
      id = gwL
    }}
    children {{
      {CHILD} {{
        mode = tunnel
        local_ts = {RIGHT_NET}
        remote_ts = {LEFT_NET}
        esp_proposals = {theirs.esp_proposal}
        start_action = {theirs.start_action}
        rekey_time = 0
        life_time = 0
      }}
    }}
  }}
}}
"""


def wait_until(poll: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """poll() until it returns something truthy or timeout passes; return the last value."""
    deadline = time.monotonic() + timeout
    value = poll()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = poll()
    return value


@dataclass(slots=True)
class InteropLab:
    topo: Topology
    workdir: Path
    charon: Charon
    daemon: subprocess.Popen[bytes] | None = None
    run_dir: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = self.workdir / "run"
        self.log = self.workdir / "uipsec.log"

    # --- our side -----------------------------------------------------------------------------

    def control(self, command: str, args: dict[str, Any] | None = None,
                timeout: float = 30.0) -> dict[str, Any]:
        answer: dict[str, Any] = request(self.run_dir / "control.sock", command, args, timeout)
        return answer

    def up(self, timeout: int = 20) -> dict[str, Any]:
        return self.control("up", {"name": CONN, "timeout": timeout}, timeout + 10)

    def down(self) -> dict[str, Any]:
        return self.control("down", {"name": CONN, "timeout": 10}, 20)

    def ike_sas(self) -> list[dict[str, Any]]:
        sas: list[dict[str, Any]] = self.control("status")["ike_sas"]
        return sas

    def established(self) -> dict[str, Any] | None:
        """Our one established IKE SA with an installed Child SA, or None."""
        for sa in self.ike_sas():
            if sa["state"] == "established" and sa["children"]:
                return sa
        return None

    def cli_json(self, *args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "userspace_ipsec.cli", "--run-dir", str(self.run_dir), *args,
             "--json"], capture_output=True, text=True, timeout=30, env=subprocess_env(),
            check=False)
        if done.returncode != 0:
            raise AssertionError(f"uipsec {' '.join(args)}: {done.stderr}")
        return json.loads(done.stdout)

    def sad(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.cli_json("sa", "list")
        return entries

    def stats(self) -> dict[str, Any]:
        counters: dict[str, Any] = self.cli_json("stats")
        return counters

    def spd(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.cli_json("spd", "list")
        return entries

    # --- charon ------------------------------------------------------------------------------

    def their_sas(self) -> list[dict[str, Any]]:
        """charon's IKE SAs as raw dicts (``swanctl --list-sas --raw``), each with "name"."""
        out = self.charon.swanctl("--list-sas", "--raw", "--noblock")
        sas = []
        for line in out.splitlines():
            if line.startswith("list-sa event"):
                for name, raw in parse_raw(line).items():
                    sas.append({"name": name, **raw})
        return sas

    def their_established(self) -> dict[str, Any] | None:
        for sa in self.their_sas():
            children = [c for c in sa.get("child-sas", {}).values()
                        if c.get("state") == "INSTALLED"]
            if sa.get("state") == "ESTABLISHED" and children:
                return {**sa, "child": children[0]}
        return None

    # --- hosts -------------------------------------------------------------------------------

    def ping(self, count: int = 3, timeout: float = 1.0, interval: float = 0.1) -> int:
        """Echo requests hostL -> hostR through the tunnel; the number answered."""
        host_r = self.topo.host_r_lan.ip4
        return len(self.topo.host_l.ping(host_r, count=count, timeout=timeout,
                                         interval=interval))

    def diagnostics(self) -> str:
        ours = self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""
        theirs = self.charon.diagnostics(60) if self.charon.process is not None else ""
        return f"--- uipsec daemon log (tail):\n{ours}\n{theirs}"


def start_daemon(lab: InteropLab, ours: OurSide, local: str, remote: str) -> None:
    conf = lab.workdir / "gwL.toml"
    conf.touch(mode=0o600)  # it holds the PSK
    conf.write_text(our_config(ours, local, remote))
    with open(lab.log, "wb") as out:
        lab.daemon = lab.topo.gw_l.spawn(
            sys.executable, "-m", "userspace_ipsec.cli", "--run-dir", str(lab.run_dir), "-v",
            "daemon", "--config", str(conf), stdout=out, stderr=out, env=subprocess_env())
    # The control socket answers before the IKE commands are registered: wait for "status".
    if not wait_until(lambda: _ike_ready(lab), 20):
        raise AssertionError("uipsec daemon did not start\n" + lab.diagnostics())


def _ike_ready(lab: InteropLab) -> bool:
    if lab.daemon is None or lab.daemon.poll() is not None:
        raise AssertionError("uipsec daemon exited at start\n" + lab.diagnostics())
    try:
        lab.control("status", timeout=5)
    except (OSError, ControlError):
        return False
    return True


@contextlib.contextmanager
def interop_lab(workdir: Path, ours: OurSide | None = None, theirs: TheirSide | None = None,
                *, nat: bool = False) -> Iterator[InteropLab]:
    """charon in gwR, our daemon in gwL (charon first, so that an initiating daemon finds it)."""
    require_strongswan()
    ours = ours or OurSide()
    theirs = theirs or TheirSide()
    with NetnsHarness() as harness:
        topo = build_topology(harness, nat=nat)
        gw_l, gw_r = topo.gw_l_wan.ip4, topo.gw_r_wan.ip4
        charon = Charon(topo.gw_r.name, charon_config(theirs, gw_r, topo.gw_l_public.ip4),
                        psk_secret("gwL", "gwR", PSK))
        lab = InteropLab(topo, workdir, charon)
        charon.start()
        try:
            start_daemon(lab, ours, gw_l, gw_r)
            yield lab
        finally:
            charon.stop()  # the harness ends the daemon (by its process group) and namespaces


# --- host-to-host traffic ------------------------------------------------------------------

_SINK = r"""
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1); srv.settimeout(float(sys.argv[2]))
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(float(sys.argv[2]))
digest, total = hashlib.sha256(), 0
buf = bytearray(65536)
while n := conn.recv_into(buf):
    digest.update(memoryview(buf)[:n]); total += n
print(total, digest.hexdigest(), flush=True)
"""

_SOURCE = r"""
import hashlib, random, socket, sys
dst, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng, digest = random.Random(size), hashlib.sha256()
sock = socket.create_connection((dst, port), timeout=timeout)
left = size
while left:
    chunk = rng.randbytes(min(left, 65536)); digest.update(chunk); sock.sendall(chunk)
    left -= len(chunk)
sock.shutdown(socket.SHUT_WR); sock.recv(1); sock.close()
print(size, digest.hexdigest(), flush=True)
"""


def tcp_transfer(src: Netns, dst: Netns, dst_ip: str, size: int,
                 timeout: float = 30.0) -> tuple[str, str]:
    """Send ``size`` pseudo-random bytes src -> dst_ip:5001 over TCP; the (sent, received)
    "bytes sha256" lines, which are equal when every byte arrived intact."""
    sink = dst.spawn(sys.executable, "-c", _SINK, "5001", str(timeout),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != b"ready":
            raise AssertionError(f"TCP sink did not start: {sink.communicate(timeout=5)}")
        sent = src.exec(sys.executable, "-c", _SOURCE, dst_ip, "5001", str(size), str(timeout),
                        timeout=timeout + 5).stdout.strip()
        received = sink.communicate(timeout=timeout)[0].decode().strip()
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(5)
    return sent, received


@dataclass(slots=True)
class ContinuousPing:
    """hostL pings hostR at about 10/s in a thread until stop(); counts sent and answered."""

    src: Netns
    dst: str
    sent: int = 0
    answered: int = 0
    lost_at: list[str] = field(default_factory=list)  # wall-clock times of unanswered echoes
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ContinuousPing:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        for _ in range(3000):  # bounded: 5 minutes at 10/s
            if self._stop.is_set():
                return
            sent_at = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
            if self.src.ping(self.dst, count=1, timeout=1.0):
                self.answered += 1
            else:
                self.lost_at.append(sent_at)
            self.sent += 1
            time.sleep(0.1)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.sent, self.answered
