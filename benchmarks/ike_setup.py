"""How fast IKE SAs come up: N IKE SAs, each with one Child SA, between two gateways.

    python -m benchmarks.ike_setup                          # N = 1, 100, 1000; every case
    python -m benchmarks.ike_setup --counts 1,100 --cases ours-ours,ours-strongswan --runs 5

Two namespaces, gwL 10.9.0.1 -- veth -- gwR 10.9.0.2, built afresh for each case and N. The
responder has one connection whose selectors (10.200.0.0/16 === 10.100.0.0/16) it narrows to
what each initiator proposes; the initiator has N connections ``c0..c{N-1}``, each with its own
identity (``cI.bench``, so that INITIAL_CONTACT of one drops no other) and its own /32 pair
(10.100.x.y === 10.200.x.y). PSK, aes128gcm16-prfsha256-x25519 and ESP aes128gcm16.

The clock starts when the initiator is told to start all N at once and stops when it holds N
established IKE SAs with their Child SAs installed (polled every 2% of the time elapsed, 5 to
100 ms):

- ours (``uipsec daemon`` with its datapath and, as by default, its IKE process; logging
  warnings only, as charon logs nothing here): the N connections are loaded with
  ``start_action = "none"``, then rewritten to ``"start"`` and ``uipsec reload``-ed; done
  when ``uipsec stats`` counts N Child SAs installed.
- strongSwan (charon 5.x with kernel-libipsec, tests.strongswan, logging off): the same with
  ``swanctl --load-conns``; done when ``swanctl --stats`` counts N IKE SAs, none half-open,
  and ``swanctl --list-sas`` N installed Child SAs.

Each case and N runs ``--runs`` times (3), the cases taking turns, since one run of a few
tenths of a second swings by a third on a shared machine (strongSwan's own as much as ours).
Printed per case and N: the median seconds, the median IKE SAs per second with the spread of the
runs, and the ratio of that median to strongswan-strongswan's for the same N. Every wait is
bounded (``--timeout``); a run that does not finish in time is reported with how far it got.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from benchmarks.topology import stop_process
from userspace_ipsec.control import ControlError, request
from userspace_ipsec.lab import Netns, NetnsHarness, link, sweep_stale

LEFT, RIGHT = "10.9.0.1", "10.9.0.2"
PSK = "0x" + "b3" * 32  # benchmark-only key
IKE_PROPOSAL, ESP_PROPOSAL = "aes128gcm16-prfsha256-x25519", "aes128gcm16"
INITIATOR_NETS, RESPONDER_NETS = "10.100.0.0/16", "10.200.0.0/16"
START_TIMEOUT = 30.0
POLL = 0.1
# While the clock runs, the poll interval grows with the time elapsed (2% of it, from 5 ms to
# 100 ms): a fixed 100 ms would dominate the figure for N = 1, a fixed 5 ms would load both
# sides with status requests for N = 1,000.
POLL_MIN, POLL_SHARE = 0.005, 0.02
MAX_COUNT = 10_000
PREFIX = "uib-"  # namespaces of this benchmark


def pair_ts(i: int) -> tuple[str, str]:
    """Connection i's initiator-side and responder-side /32."""
    a, b = divmod(i, 256)
    return f"10.100.{a}.{b}/32", f"10.200.{a}.{b}/32"


# -- our daemon -----------------------------------------------------------------------------


OURS_DAEMON = '[daemon]\nlog_level = "warning"\n\n'


def ours_initiator_config(n: int, start: bool) -> str:
    action = "start" if start else "none"
    parts = [OURS_DAEMON]
    for i in range(n):
        mine, theirs = pair_ts(i)
        parts.append(f"""[connections.c{i}]
local_addrs = ["{LEFT}"]
remote_addrs = ["{RIGHT}"]
local_id = "c{i}.bench"
proposals = ["{IKE_PROPOSAL}"]
[connections.c{i}.children.net]
local_ts = ["{mine}"]
remote_ts = ["{theirs}"]
esp_proposals = ["{ESP_PROPOSAL}"]
start_action = "{action}"
""")
    parts.append(f'[secrets.psk.all]\nsecret = "{PSK}"\n')
    return "\n".join(parts)


OURS_RESPONDER = OURS_DAEMON + f"""[connections.resp]
local_addrs = ["{RIGHT}"]
remote_addrs = ["{LEFT}"]
proposals = ["{IKE_PROPOSAL}"]
[connections.resp.children.net]
local_ts = ["{RESPONDER_NETS}"]
remote_ts = ["{INITIATOR_NETS}"]
esp_proposals = ["{ESP_PROPOSAL}"]

[secrets.psk.all]
secret = "{PSK}"
"""


@dataclass
class OursDaemon:
    ns: Netns
    run_dir: Path
    config: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, ns: Netns, run_dir: Path, config_text: str) -> OursDaemon:
        run_dir.mkdir(parents=True)
        config = run_dir / "uipsec.toml"
        config.touch(mode=0o600)
        config.write_text(config_text)
        log = (run_dir / "daemon.log").open("wb")
        proc = ns.spawn(sys.executable, "-m", "userspace_ipsec.cli", "--run-dir", str(run_dir),
                        "daemon", "--config", str(config), stdout=log, stderr=log,
                        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
        log.close()
        daemon = cls(ns, run_dir, config, proc)
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the IKE commands exist once the IKE service runs
            with contextlib.suppress(OSError, ControlError):
                request(run_dir / "control.sock", "status", timeout=5)
                return daemon
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uipsec daemon in {ns.role} did not start:\n{daemon.log()}")
            time.sleep(POLL)

    def log(self) -> str:
        return (self.run_dir / "daemon.log").read_text(errors="replace")[-3000:]

    def trigger(self, n: int) -> Callable[[], int]:
        """Start all N connections; returns a poll of how many Child SAs are installed."""
        self.config.write_text(ours_initiator_config(n, start=True))
        request(self.run_dir / "control.sock", "reload", timeout=120)

        def poll() -> int:
            stats = request(self.run_dir / "control.sock", "stats", timeout=30)
            return int(stats["ike"]["child_sas"])

        return poll


# -- strongSwan -----------------------------------------------------------------------------


def charon_class() -> type:
    from tests.strongswan import Charon, available_plugins, strongswan_conf

    class QuietCharon(Charon):  # type: ignore[misc]
        """A charon that logs nothing (a log line per SA would be part of the measurement)
        and lets one peer have any number of half-open IKE SAs (no cookies, no blocking)."""

        def _write_config(self) -> None:
            super()._write_config()
            self.conf_file.write_text(strongswan_conf(
                self.vici_socket, self.log_file, plugins=available_plugins(self.plugins),
                charon_extra=self.charon_extra, log_levels="default = -1\n"))

    return QuietCharon


CHARON_EXTRA = """  cookie_threshold = 1000000
  cookie_threshold_ip = 1000000
  block_threshold = 1000000
  init_limit_half_open = 0
"""


def swan_initiator_conns(n: int, start: bool) -> str:
    action = "start" if start else "none"
    parts = ["connections {"]
    for i in range(n):
        mine, theirs = pair_ts(i)
        parts.append(f"""  c{i} {{
    version = 2
    local_addrs = {LEFT}
    remote_addrs = {RIGHT}
    proposals = {IKE_PROPOSAL}
    local {{ auth = psk
      id = c{i}.bench }}
    remote {{ auth = psk }}
    children {{ net {{ local_ts = {mine}
      remote_ts = {theirs}
      esp_proposals = {ESP_PROPOSAL}
      start_action = {action} }} }}
  }}""")
    parts.append("}")
    return "\n".join(parts)


SWAN_RESPONDER = f"""connections {{
  resp {{
    version = 2
    local_addrs = {RIGHT}
    remote_addrs = {LEFT}
    proposals = {IKE_PROPOSAL}
    local {{ auth = psk
      id = {RIGHT} }}
    remote {{ auth = psk }}
    children {{ net {{ local_ts = {RESPONDER_NETS}
      remote_ts = {INITIATOR_NETS}
      esp_proposals = {ESP_PROPOSAL} }} }}
  }}
}}
"""
SWAN_SECRET = f'  ike-any {{\n    secret = "{PSK}"\n  }}\n'
_STATS = re.compile(r"IKE_SAs: (\d+) total, (\d+) half-open")


def swan_established(charon: object, n: int) -> int:
    """Installed Child SAs, counted once ``--stats`` (cheap) shows N IKE SAs, none half-open."""
    out = charon.swanctl("--stats")  # type: ignore[attr-defined]
    match = _STATS.search(out)
    if match is None or int(match.group(1)) - int(match.group(2)) < n:
        return 0
    sas = charon.swanctl("--list-sas", "--noblock")  # type: ignore[attr-defined]
    return len(re.findall(r"^\s+net: #\d+, reqid \d+, INSTALLED", sas, re.MULTILINE))


def swan_trigger(charon: object, n: int) -> Callable[[], int]:
    conf = charon.swanctl_dir / "swanctl.conf"  # type: ignore[attr-defined]
    text = conf.read_text().replace("start_action = none", "start_action = start")
    conf.write_text(text)
    charon.swanctl("--load-conns", "--file", str(conf), timeout=120)  # type: ignore[attr-defined]
    return lambda: swan_established(charon, n)


# -- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    case: str
    count: int
    seconds: float
    done: int  # IKE SAs up when the clock stopped (== count unless timed out)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def _side(h: NetnsHarness, ns: Netns, kind: str, initiator: bool, n: int,
          work: Path) -> Iterator[Callable[[], Callable[[], int]] | None]:
    """Start one side; for the initiator, yield its trigger (a call that starts all N)."""
    if kind == "ours":
        text = ours_initiator_config(n, start=False) if initiator else OURS_RESPONDER
        daemon = OursDaemon.start(ns, work / ns.role, text)
        try:
            yield (lambda: daemon.trigger(n)) if initiator else None
        finally:
            stop_process(daemon.proc)
        return
    conns = swan_initiator_conns(n, start=False) if initiator else SWAN_RESPONDER
    with charon_class()(ns.name, conns, SWAN_SECRET, charon_extra=CHARON_EXTRA) as charon:
        yield (lambda: swan_trigger(charon, n)) if initiator else None


def add_selector_addresses(gw_l: Netns, gw_r: Netns, n: int) -> None:
    """Each /32 of the selectors as an address on lo: kernel-libipsec installs a route per
    Child SA and refuses the SA without a local address inside its local selector."""
    for ns, index in ((gw_l, 0), (gw_r, 1)):
        script = "".join(f"addr add {pair_ts(i)[index]} dev lo\n" for i in range(n))
        done = subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=script, text=True,
                              capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"adding {n} addresses in {ns.role}: {done.stderr[-500:]}")


def run_case(case: str, n: int, timeout: float, logs: Path | None = None) -> Result:
    initiator_kind, responder_kind = case.split("-")
    with NetnsHarness(prefix=PREFIX) as h, tempfile.TemporaryDirectory(
            prefix="uipsec-ike-bench-") as tmp:
        gw_l, gw_r = h.netns("gwL"), h.netns("gwR")
        link(h, gw_l, gw_r, 9)
        add_selector_addresses(gw_l, gw_r, n)
        work = Path(tmp)
        with _side(h, gw_r, responder_kind, False, n, work), \
                _side(h, gw_l, initiator_kind, True, n, work) as trigger:
            assert trigger is not None
            started = time.monotonic()
            poll = trigger()
            done = 0
            while time.monotonic() - started < timeout:
                done = poll()
                if done >= n:
                    break
                time.sleep(min(POLL, max(POLL_MIN, POLL_SHARE * (time.monotonic() - started))))
            result = Result(case, n, time.monotonic() - started, done)
        if logs is not None:  # before the work directory goes
            for log in work.glob("*/daemon.log"):
                dest = logs / f"{case}-{n}-{log.parent.name}.log"
                dest.write_bytes(log.read_bytes())
        return result


CASES = ("ours-ours", "ours-strongswan", "strongswan-ours", "strongswan-strongswan")


def print_report(results: list[Result]) -> None:
    """Per case and N: the median over the runs, its spread, and the ratio of medians."""
    runs: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        runs.setdefault((r.case, r.count), []).append(r)
    medians = {key: statistics.median(x.rate for x in rs) for key, rs in runs.items()}
    print(f"\n{'initiator-responder':<24}{'N':>6}{'runs':>6}{'seconds':>10}"
          f"{'IKE SAs/s median [min-max]':>30}{'vs swan-swan':>14}")
    for (case, count), rs in runs.items():
        ref = medians.get(("strongswan-strongswan", count))
        ratio = f"{medians[case, count] / ref:.2f}x" if ref else "-"
        rates = [x.rate for x in rs]
        spread = f"{medians[case, count]:.1f} [{min(rates):.1f}-{max(rates):.1f}]"
        late = [x for x in rs if x.done < x.count]
        note = f"  ({len(late)} timed out, e.g. {late[0].done} up)" if late else ""
        print(f"{case:<24}{count:>6}{len(rs):>6}{statistics.median(x.seconds for x in rs):>10.2f}"
              f"{spread:>30}{ratio:>14}{note}")


@click.command()
@click.option("--counts", default="1,100,1000", show_default=True,
              help="Comma-separated numbers of IKE SAs.")
@click.option("--cases", "case_names", default=",".join(CASES), show_default=True,
              help="Comma-separated initiator-responder cases.")
@click.option("--timeout", default=300.0, show_default=True,
              help="Seconds to wait for one case and N.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 50),
              help="Runs of each case and N (interleaved across cases); medians are shown.")
@click.option("--logs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep our daemons' logs in this directory.")
def main(counts: str, case_names: str, timeout: float, runs: int,
         logs: Path | None) -> None:
    """Time N IKE SAs (with a Child SA each) coming up, per implementation pair."""
    if os.geteuid() != 0:
        raise click.UsageError("run as root: the benchmark builds network namespaces")
    try:
        ns = [int(c) for c in counts.split(",") if c.strip()]
    except ValueError:
        raise click.UsageError(f"--counts must be numbers, got {counts!r}") from None
    if not ns or not all(1 <= n <= MAX_COUNT for n in ns):
        raise click.UsageError(f"--counts must be within 1..{MAX_COUNT}")
    cases = [c.strip() for c in case_names.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise click.UsageError(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if any("strongswan" in c for c in cases):
        from tests.strongswan import StrongSwanError, require_strongswan

        try:
            require_strongswan()
        except StrongSwanError as exc:
            print(f"skipping the strongSwan cases: {exc}", file=sys.stderr)
            cases = [c for c in cases if "strongswan" not in c]
    # SIGTERM (a timeout around us) unwinds like Ctrl-C: namespaces and daemons are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sweep_stale(PREFIX)
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    results = []
    for n in ns:
        for _ in range(runs):  # interleaved, so that a noisy minute hits every case
            for case in cases:
                print(f"{case}: {n} IKE SAs ...", file=sys.stderr, flush=True)
                result = run_case(case, n, timeout, logs)
                print(f"  {result.seconds:.2f} s, {result.rate:.1f}/s", file=sys.stderr)
                results.append(result)
    print(f"\nIKE SAs (each with one Child SA) set up at once, {os.cpu_count()} CPUs, "
          f"{IKE_PROPOSAL} / ESP {ESP_PROPOSAL}, PSK")
    print_report(results)


if __name__ == "__main__":
    main()
