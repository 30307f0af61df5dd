"""Throughput of hostL -> hostR through the two gateways, per gateway implementation.

    python -m benchmarks.throughput                      # 3 runs x (TCP 10 s + UDP rates)
    python -m benchmarks.throughput --duration 3 --runs 1 --udp-rates 100M
    python -m benchmarks.throughput --case userspace=mypkg.bench:start_gateways

iperf3 server in hostR, client in hostL: one TCP stream, then UDP with ``--udp-len``-byte
datagrams (``-w 4M``) at each offered rate. Every case gets a fresh topology
(benchmarks.topology). Printed per case and test: received Mbit/s, delivered packets/s, loss,
and each gateway daemon's CPU share (utime+stime from /proc/PID/stat over the run, in % of one
core), as median [min-max] over the runs; then each case's median throughput as a ratio to the
strongSwan case.

Cases: ``bare`` (plain routing over veth, no IPsec: the ceiling), ``strongswan`` (charon with
kernel-libipsec on both gateways: the reference) and ``ours`` (``uipsec daemon`` on both
gateways, AES-GCM-128 SAs loaded with ``uipsec setkey``: raw ESP, or ESP in UDP 4500 with --nat)
and ``ours-udp`` (the same, always ESP in UDP 4500).

Adding a case (the extension point): write a *gateway starter*, a function

    def start_gateways(topo: Topology) -> contextlib.AbstractContextManager[Mapping[str, int]]

that, on enter, starts the gateway daemons in ``topo.gw_l`` and ``topo.gw_r``, sets up a tunnel
between ``topo.gw_l_outer`` and ``topo.gw_r_outer`` (gwR sees gwL as ``topo.gw_l_seen_by_r``)
protecting LEFT_NET <-> RIGHT_NET, waits until hostL can reach hostR through it, and yields
``{"gwL": pid, "gwR": pid}`` (the processes whose CPU to measure); on exit it stops them. The
gateways have no cleartext route between the host subnets, so the tunnel must install its own
(or route via its TUN device). Then register it: add a ``Case`` to ``CASES`` or pass
``--case NAME=module:function`` on the command line. The userspace-ipsec daemon's case (c)
plugs in here once the daemon exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from benchmarks.topology import (
    HOST_R_ADDR,
    LEFT_NET,
    RIGHT_NET,
    Topology,
    TopologyError,
    topology,
)

GatewayStarter = Callable[[Topology], contextlib.AbstractContextManager[Mapping[str, int]]]

IPERF_PORT = 5201
# strongSwan 5.9's libipsec fixes its TUN MTU at 1400 and sizes its read buffer by it (raising
# the device MTU afterwards makes bigger packets vanish), so 1400-byte IP packets are the largest
# that cross unfragmented: 1372 bytes of UDP payload.
TUNNEL_MTU = 1400
UDP_PAYLOAD = TUNNEL_MTU - 28
BENCH_PSK = "benchmark-only-psk-0123456789abcdef"
REFERENCE_CASE = "strongswan"


@dataclass(slots=True, frozen=True)
class Case:
    name: str
    description: str
    start: GatewayStarter
    cleartext_routes: bool = False
    nat: bool = False


@dataclass(slots=True)
class Sample:
    """One iperf3 run: what arrived, and each gateway daemon's CPU share (% of one core)."""

    mbit_s: float
    pps: float
    loss_pct: float
    cpu_pct: dict[str, float] = field(default_factory=dict)
    error: str = ""


@contextlib.contextmanager
def no_gateways(topo: Topology) -> Iterator[Mapping[str, int]]:
    """Case (a): the kernel forwards in clear; there is no daemon to measure."""
    yield {}


@contextlib.contextmanager
def strongswan_gateways(topo: Topology) -> Iterator[Mapping[str, int]]:
    """Case (b): charon with kernel-libipsec on both gateways, PSK tunnel LEFT_NET<->RIGHT_NET."""
    from tests.strongswan import psk_gateway_pair

    left, right = psk_gateway_pair(
        left_ns=topo.gw_l, right_ns=topo.gw_r, left_addr=topo.gw_l_outer,
        right_addr=topo.gw_r_outer, left_as_seen_by_right=topo.gw_l_seen_by_r,
        left_net=LEFT_NET, right_net=RIGHT_NET, psk=BENCH_PSK,
    )
    with left, right:
        left.initiate("net")
        if topo.ping(topo.host_l, HOST_R_ADDR, count=3) != 3:
            raise TopologyError("strongSwan tunnel up but hostL cannot reach hostR\n"
                                + left.diagnostics())
        yield {"gwL": left.pid, "gwR": right.pid}


# AES-GCM-128 (RFC 4106): 128-bit key + 4-byte salt. Benchmark-only keys.
_OURS_KEYS = ("0x" + "5a" * 16 + "0badcafe", "0x" + "a5" * 16 + "0badf00d")


def _ours_script(me: str, peer: str, mine: str, theirs: str, out_spi: int, in_spi: int,
                 encap: bool) -> str:
    port = "[4500]" if encap else ""
    kind = "esp-udp" if encap else "esp"
    keys = dict(zip((0x4001, 0x4002), _OURS_KEYS, strict=True))
    return (
        "flush;\nspdflush;\n"
        f"add {me}{port} {peer}{port} {kind} {out_spi:#x} -m tunnel -r 128 "
        f"-E aes-gcm-16 {keys[out_spi]};\n"
        f"add {peer}{port} {me}{port} {kind} {in_spi:#x} -m tunnel -r 128 "
        f"-E aes-gcm-16 {keys[in_spi]};\n"
        f"spdadd {mine} {theirs} any -P out ipsec esp/tunnel/{me}{port}-{peer}{port}/require;\n"
        f"spdadd {theirs} {mine} any -P in ipsec esp/tunnel/{peer}{port}-{me}{port}/require;\n"
        f"spdadd {theirs} {mine} any -P fwd ipsec esp/tunnel/{peer}{port}-{me}{port}/require;\n"
    )


def uipsec_gateways(topo: Topology) -> contextlib.AbstractContextManager[Mapping[str, int]]:
    """Case (c): ``uipsec daemon`` on both gateways, manually keyed AES-GCM-128 tunnel, raw
    ESP (ESP in UDP through a NAT)."""
    return _uipsec_gateways(topo, encap=topo.nat is not None)


def uipsec_udp_gateways(topo: Topology) -> contextlib.AbstractContextManager[Mapping[str, int]]:
    """Case (c'): the same with ESP in UDP 4500 (esp-udp SAs): UDP GSO/GRO batch the I/O."""
    return _uipsec_gateways(topo, encap=True)


@contextlib.contextmanager
def _uipsec_gateways(topo: Topology, *, encap: bool) -> Iterator[Mapping[str, int]]:
    import tempfile

    sides = (
        ("gwL", topo.gw_l, topo.gw_l_outer, topo.gw_r_outer, LEFT_NET, RIGHT_NET, 0x4001,
         0x4002),
        ("gwR", topo.gw_r, topo.gw_r_outer, topo.gw_l_seen_by_r, RIGHT_NET, LEFT_NET, 0x4002,
         0x4001),
    )
    cli = [sys.executable, "-m", "userspace_ipsec.cli"]
    with tempfile.TemporaryDirectory(prefix="uipsec-bench-") as tmp:
        pids: dict[str, int] = {}
        for name, ns, me, peer, mine, theirs, out_spi, in_spi in sides:
            run_dir = os.path.join(tmp, name)
            os.makedirs(run_dir)
            log_path = os.path.join(run_dir, "daemon.log")
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                proc = topo.popen(ns, [*cli, "-v", "--run-dir", run_dir, "daemon"],
                                  stdout=log_fd, stderr=subprocess.STDOUT)
            finally:
                os.close(log_fd)
            deadline = time.monotonic() + 20
            while "datapath: TUN" not in (log := Path(log_path).read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise TopologyError(f"uipsec daemon in {name} did not start:\n{log[-2000:]}")
                time.sleep(0.05)
            script = os.path.join(run_dir, "tunnel.conf")
            with open(script, "w") as f:
                f.write(_ours_script(me, peer, mine, theirs, out_spi, in_spi, encap))
            topo.run(ns, [*cli, "--run-dir", run_dir, "setkey", "-k", "-f", script])
            pids[name] = proc.pid
        if topo.ping(topo.host_l, HOST_R_ADDR, count=3) != 3:
            raise TopologyError("uipsec tunnel loaded but hostL cannot reach hostR")
        yield pids


CASES: dict[str, Case] = {
    "bare": Case("bare", "(a) veth routing, no IPsec", no_gateways, cleartext_routes=True),
    "strongswan": Case("strongswan", "(b) strongSwan kernel-libipsec", strongswan_gateways),
    "ours": Case("ours", "(c) uipsec daemon (manual keys, raw ESP)", uipsec_gateways),
    "ours-udp": Case("ours-udp", "(c') uipsec daemon (manual keys, ESP in UDP)",
                     uipsec_udp_gateways),
}


def load_case(spec: str) -> Case:
    """``NAME=module:function`` -> a Case whose gateway starter is that function."""
    name, sep, target = spec.partition("=")
    module_name, sep2, func_name = target.partition(":")
    if not (sep and sep2 and name and module_name and func_name):
        raise click.BadParameter(f"expected NAME=module:function, got {spec!r}")
    start = getattr(importlib.import_module(module_name), func_name)
    return Case(name, f"{name} ({target})", start)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def iperf_client(
    topo: Topology, argv: Sequence[str], pids: Mapping[str, int], duration: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run one iperf3 client in hostL; return its JSON report and the daemons' CPU shares."""
    before = {name: cpu_ticks(pid) for name, pid in pids.items()}
    start = time.monotonic()
    done = subprocess.run(
        ["ip", "netns", "exec", topo.host_l, "iperf3", "-c", HOST_R_ADDR, "-p", str(IPERF_PORT),
         "-J", *argv], capture_output=True, text=True, timeout=duration + 30, check=False,
    )
    wall = time.monotonic() - start
    hz = os.sysconf("SC_CLK_TCK")
    cpu = {name: 100.0 * (cpu_ticks(pid) - before[name]) / hz / wall
           for name, pid in pids.items()}
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {"error": f"iperf3 exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return report, cpu


def tcp_sample(report: dict[str, Any], cpu: dict[str, float]) -> Sample:
    if "error" in report:
        return Sample(0.0, 0.0, 100.0, cpu, str(report["error"]))
    received = report["end"]["sum_received"]
    seconds = float(received["seconds"]) or 1.0
    # Packets/s for TCP is estimated from bytes at the path MSS (no per-packet count in iperf3).
    mss = float(report["start"].get("tcp_mss_default", 1448)) or 1448.0
    return Sample(received["bits_per_second"] / 1e6, received["bytes"] / mss / seconds, 0.0, cpu)


def udp_sample(report: dict[str, Any], cpu: dict[str, float], length: int) -> Sample:
    if "error" in report:
        return Sample(0.0, 0.0, 100.0, cpu, str(report["error"]))
    end = report["end"]
    sent = end.get("sum_sent") or end["sum"]
    # The receiver's view: "packets" is what its sequence numbers say was sent, lost the gaps.
    received = end.get("sum_received", {})
    delivered = max(int(received.get("packets", 0)) - int(received.get("lost_packets", 0)), 0)
    seconds = float(sent["seconds"]) or 1.0
    sent_packets = int(sent["packets"])
    loss = 100.0 * (1 - delivered / sent_packets) if sent_packets else 100.0
    return Sample(delivered * length * 8 / seconds / 1e6, delivered / seconds, loss, cpu)


@contextlib.contextmanager
def iperf_server(topo: Topology) -> Iterator[None]:
    proc = topo.popen(topo.host_r, ["iperf3", "-s", "-B", HOST_R_ADDR, "-p", str(IPERF_PORT)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listening = topo.run(topo.host_r, ["ss", "-Hltn", f"sport = :{IPERF_PORT}"], check=False)
        if listening.strip():
            break
        if proc.poll() is not None:
            raise TopologyError(f"iperf3 server exited with {proc.returncode}")
        time.sleep(0.05)
    else:
        raise TopologyError("iperf3 server did not listen within 10 s")
    yield


def run_case(case: Case, tests: Sequence[tuple[str, list[str], int]], runs: int,
             duration: float) -> dict[str, list[Sample]]:
    """All runs of all tests for one case in one fresh topology. ``length`` 0 means TCP."""
    results: dict[str, list[Sample]] = {name: [] for name, _, _ in tests}
    with topology(nat=case.nat, cleartext_routes=case.cleartext_routes) as topo, \
            case.start(topo) as pids, iperf_server(topo):
        for run_no in range(runs):
            for name, argv, length in tests:
                report, cpu = iperf_client(topo, argv, pids, duration)
                sample = tcp_sample(report, cpu) if length == 0 else \
                    udp_sample(report, cpu, length)
                results[name].append(sample)
                print(f"  {case.name} run {run_no + 1}/{runs} {name}: {sample.mbit_s:.1f} Mbit/s"
                      f"{' ERROR ' + sample.error if sample.error else ''}", file=sys.stderr)
    return results


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def interpreter() -> str:
    """The Python that runs our daemons (this one): the datapath is interpreter-bound, and
    builds differ (Debian's /usr/bin/python3 runs it in about 10% fewer instructions than a
    plain source build of 3.11)."""
    import platform

    import cryptography

    return (f"{sys.executable} (Python {platform.python_version()}), "
            f"cryptography {cryptography.__version__}")


def congestion_control() -> str:
    """The TCP congestion control iperf3 gets (new namespaces take the host's): BBR and CUBIC
    give different figures through the same tunnel (in a few runs here CUBIC gave ~10% less)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def print_report(all_results: dict[str, dict[str, list[Sample]]], cases: dict[str, Case]) -> None:
    print(f"{'case':<12} {'test':<10} {'Mbit/s med [min-max]':<26} {'kpps':<22} "
          f"{'loss %':<20} CPU % of one core (med)")
    for case_name, results in all_results.items():
        for test, samples in results.items():
            ok = [s for s in samples if not s.error]
            cpu_names = sorted({n for s in ok for n in s.cpu_pct})
            cpu = " ".join(f"{n} {statistics.median(s.cpu_pct[n] for s in ok):.0f}"
                           for n in cpu_names) or "-"
            errors = f" ({len(samples) - len(ok)} failed)" if len(ok) < len(samples) else ""
            print(f"{case_name:<12} {test:<10} {spread([s.mbit_s for s in ok]):<26} "
                  f"{spread([s.pps / 1000 for s in ok], '{:.2f}'):<22} "
                  f"{spread([s.loss_pct for s in ok], '{:.2f}'):<20} {cpu}{errors}")
    if REFERENCE_CASE not in all_results:
        return
    print(f"\nratio of median Mbit/s to {REFERENCE_CASE} ({cases[REFERENCE_CASE].description}):")
    reference = all_results[REFERENCE_CASE]
    for case_name, results in all_results.items():
        ratios = []
        for test, samples in results.items():
            ref = [s.mbit_s for s in reference.get(test, []) if not s.error]
            mine = [s.mbit_s for s in samples if not s.error]
            if ref and mine and statistics.median(ref) > 0:
                ratios.append(f"{test} {statistics.median(mine) / statistics.median(ref):.2f}")
        print(f"  {case_name:<12} " + "  ".join(ratios))


@click.command()
@click.option("--duration", default=10.0, show_default=True, help="Seconds per iperf3 run.")
@click.option("--runs", default=3, show_default=True, help="Runs of each test per case.")
@click.option("--udp-rates", default="50M,100M,200M,500M", show_default=True,
              help="Comma-separated offered UDP rates (iperf3 -b), empty for none.")
@click.option("--udp-len", default=UDP_PAYLOAD, show_default=True,
              help="UDP payload bytes (-l); the default makes 1400-byte IP packets.")
@click.option("--no-tcp", is_flag=True, help="Skip the TCP test.")
@click.option("--cases", "case_names", default="bare,strongswan,ours,ours-udp",
              show_default=True,
              help=f"Comma-separated built-in cases: {', '.join(CASES)}.")
@click.option("--case", "extra", multiple=True, metavar="NAME=module:function",
              help="Add a case from a gateway starter function (see module docstring).")
@click.option("--nat", is_flag=True, help="Put a masquerading NAT namespace between the gateways.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write all samples to this file as JSON.")
def main(duration: float, runs: int, udp_rates: str, udp_len: int, no_tcp: bool,
         case_names: str, extra: tuple[str, ...], nat: bool, json_path: str | None) -> None:
    """Measure hostL->hostR throughput through each case's gateways (see module docstring)."""
    if os.geteuid() != 0:
        raise click.UsageError("run as root: the benchmark builds network namespaces")
    if not 1 <= runs <= 50 or not 0.5 <= duration <= 300:
        raise click.UsageError("--runs must be 1..50 and --duration 0.5..300")
    cases: dict[str, Case] = {}
    for name in filter(None, (n.strip() for n in case_names.split(","))):
        if name not in CASES:
            raise click.UsageError(f"unknown case {name!r}; built-in: {', '.join(CASES)}")
        cases[name] = CASES[name]
    for spec in extra:
        case = load_case(spec)
        cases[case.name] = case
    if nat:
        cases = {name: dataclasses.replace(case, nat=True) for name, case in cases.items()}
    tests: list[tuple[str, list[str], int]] = []
    if not no_tcp:
        tests.append(("tcp", ["-t", str(duration)], 0))
    for rate in filter(None, (r.strip() for r in udp_rates.split(","))):
        tests.append((f"udp {rate}", ["-u", "-b", rate, "-l", str(udp_len), "-w", "4M",
                                      "-t", str(duration)], udp_len))
    all_results = {}
    for case in cases.values():
        print(f"case {case.name}: {case.description}", file=sys.stderr)
        all_results[case.name] = run_case(case, tests, runs, duration)
    print(f"\nhostL -> hostR, {runs} run(s) x {duration:g} s, UDP payload {udp_len} B, "
          f"({udp_len + 28}-byte IP packets), {os.cpu_count()} CPUs{', via NAT' if nat else ''}")
    print(f"uipsec daemons: {interpreter()}; TCP congestion control: {congestion_control()}")
    print_report(all_results, cases)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({c: {t: [asdict(s) for s in ss] for t, ss in r.items()}
                       for c, r in all_results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
