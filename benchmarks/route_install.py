"""Route installs into a TUN: pyroute2 (datapath.netconf.NetConfig) against datapath.rtnl.

    python -m benchmarks.route_install [--count 1000] [--rounds 3]

For each way and round, a fresh namespace with a TUN (10.9.0.1/24, fd09::1/64) gets ``count``
routes in table 220 (half v4, half v6, every other one with a preferred source), which are then
removed; the table is checked (``ip route show``) after both steps. Ways:

- pyroute2: ``NetConfig.add_route`` / ``remove_route``, one call per route, as the datapath
  used to (without the worker-thread hand-off it also paid, see ``pyroute2+thread``);
- pyroute2+thread: the same calls through a one-thread executor, waiting for each;
- rtnl: ``RouteClient`` requests sent back to back, answers read afterwards (what the event
  loop's reader does), capped at the client's in-flight capacity;
- rtnl-wait: ``RouteClient``, waiting for each answer before the next request.

Printed: routes/s per way (median of the rounds, and the best), and each way's ratio to pyroute2.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import click

from datapath.netconf import NetConfig, RoutingPolicy
from datapath.rtnl import RouteClient
from datapath.tun import TunDevice
from userspace_ipsec.lab import Netns, NetnsHarness, sweep_stale

TABLE = 220
PREFIX = "uib-"
# (routes, TUN index, check after the adds) -> (add, remove) seconds
Install = Callable[[dict[str, str | None], int, Callable[[], None]], tuple[float, float]]


def routes_for(count: int) -> dict[str, str | None]:
    routes: dict[str, str | None] = {}
    for i in range(count):
        if i % 2:
            routes[f"fd50:{i // 2 + 1:x}::/48"] = "fd09::1" if i % 4 == 3 else None
        else:
            routes[f"10.{100 + i // 512}.{i // 2 % 256}.0/24"] = "10.9.0.1" if i % 4 == 2 \
                else None
    return routes


def table_size(ns: Netns) -> int:
    total = 0
    for version in (4, 6):
        shown = ns.ip("-j", f"-{version}", "route", "show", "table", str(TABLE), check=False)
        total += len(json.loads(shown.stdout or "[]")) if shown.returncode == 0 else 0
    return total


def with_pyroute2(threaded: bool) -> Install:
    def run(routes: dict[str, str | None], oif: int,
            check: Callable[[], None]) -> tuple[float, float]:
        nc = NetConfig(RoutingPolicy(table=TABLE))
        pool = ThreadPoolExecutor(1) if threaded else None

        def call(fn: Callable[..., None], *args: object) -> None:
            if pool is None:
                fn(*args)
            else:
                pool.submit(fn, *args).result(10.0)

        try:
            start = time.perf_counter()
            for dst, src in routes.items():
                call(nc.add_route, dst, "uit0", src)
            add_s = time.perf_counter() - start
            check()
            start = time.perf_counter()
            for dst in routes:
                call(nc.remove_route, dst, "uit0")
            return add_s, time.perf_counter() - start
        finally:
            if pool is not None:
                pool.shutdown()
            nc.close()

    return run


def with_rtnl(pipelined: bool) -> Install:
    def run(routes: dict[str, str | None], oif: int,
            check: Callable[[], None]) -> tuple[float, float]:
        with RouteClient(TABLE) as client:
            refused = 0

            def settle(seq: int | None = None) -> None:
                nonlocal refused
                answers = client.drain(10.0) if seq is None else client.drain(10.0, seq)
                refused += sum(1 for a in answers if a.error)

            def each(send: Callable[[str, str | None], int]) -> float:
                start = time.perf_counter()
                for dst, src in routes.items():
                    if pipelined and client.in_flight >= client.capacity:
                        settle()
                    seq = send(dst, src)
                    if not pipelined:
                        settle(seq)
                settle()
                return time.perf_counter() - start

            add_s = each(lambda dst, src: client.add(dst, oif, src))
            check()
            del_s = each(lambda dst, src: client.delete(dst, oif))
            if refused or client.in_flight:
                raise SystemExit(f"rtnl: {refused} refused, {client.in_flight} unanswered")
            return add_s, del_s

    return run


WAYS: dict[str, Install] = {
    "pyroute2": with_pyroute2(False),
    "pyroute2+thread": with_pyroute2(True),
    "rtnl": with_rtnl(True),
    "rtnl-wait": with_rtnl(False),
}


def measure(install: Install, count: int) -> tuple[float, float]:
    """(add, remove) seconds for ``count`` routes in a fresh namespace; the table is checked
    after the adds and after the removals, outside the timings."""
    routes = routes_for(count)
    with NetnsHarness(prefix=PREFIX, tools=("ip", "sysctl")) as harness:
        ns = harness.netns("rt")
        with ns.entered():
            tun = TunDevice("uit0")
            try:
                ns.add_addr("uit0", "10.9.0.1/24")
                ns.add_addr("uit0", "fd09::1/64")
                ns.ip("link", "set", "uit0", "up")

                def check_all_in() -> None:
                    if (n := table_size(ns)) != count:
                        raise SystemExit(f"{n} routes in the table, not {count}")

                add_s, del_s = install(routes, socket.if_nametoindex("uit0"), check_all_in)
                if table_size(ns):
                    raise SystemExit("routes left behind")
            finally:
                tun.close()
    return add_s, del_s


@click.command()
@click.option("--count", default=1000, show_default=True, help="routes per round")
@click.option("--rounds", default=3, show_default=True, help="rounds per way")
def main(count: int, rounds: int) -> None:
    """Routes/s for installing routes into a TUN: pyroute2 against datapath.rtnl."""
    sweep_stale(PREFIX)
    rates: dict[str, tuple[list[float], list[float]]] = {}
    for _ in range(rounds):
        for name, install in WAYS.items():  # interleaved: machine noise hits every way
            add_s, del_s = measure(install, count)
            adds, dels = rates.setdefault(name, ([], []))
            adds.append(count / add_s)
            dels.append(count / del_s)
    base = statistics.median(rates["pyroute2"][0])
    print(f"{count} routes into a TUN (table {TABLE}, half v6, half with a source), "
          f"{rounds} rounds, median (best) routes/s")
    print(f"{'way':<17}{'add/s':>18}{'remove/s':>18}{'add vs pyroute2':>17}")
    for name, (adds, dels) in rates.items():
        add, remove = statistics.median(adds), statistics.median(dels)
        print(f"{name:<17}{add:>9,.0f} ({max(adds):>6,.0f}){remove:>10,.0f} ({max(dels):>6,.0f})"
              f"{add / base:>16.1f}x")


if __name__ == "__main__":
    main()
