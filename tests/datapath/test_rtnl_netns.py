"""datapath.rtnl against the kernel, in a namespace of its own (removed after each test): routes
into a TUN added, replaced, refused and removed, read back with ``ip route show``; RouteSync and
the datapath engine installing routes through it from an event loop."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from datapath.engine import Datapath
from datapath.routes import RouteSync, wanted_routes
from datapath.rtnl import KernelRoutes, RouteClient
from datapath.tun import TunDevice
from tests.datapath.engine_helpers import make_side
from tests.netns import Netns, NetnsHarness
from userspace_ipsec.config import DatapathConfig
from userspace_ipsec.kernel import Kernel, KernelOptions
from userspace_ipsec.setkey.parser import parse_script

TABLE = 220
V4_SRC, V6_SRC = "10.9.0.1", "fd09::1"


@pytest.fixture
def ns(netns_harness: NetnsHarness) -> Iterator[Netns]:
    """A namespace with a TUN uit0 (up, 10.9.0.1/24 and fd09::1/64); the test runs inside it."""
    ns = netns_harness.netns("rt")
    with ns.entered():
        tun = TunDevice("uit0")
        try:
            ns.add_addr("uit0", "10.9.0.1/24")
            ns.add_addr("uit0", "fd09::1/64")
            ns.ip("link", "set", "uit0", "up")
            yield ns
        finally:
            tun.close()


def table(ns: Netns) -> dict[str, str | None]:
    """Destination -> preferred source of every route in our table (v4 and v6), per ip(8)."""
    out: dict[str, str | None] = {}
    for version in (4, 6):
        shown = ns.ip("-j", f"-{version}", "route", "show", "table", str(TABLE), check=False)
        if shown.returncode and "table does not exist" in shown.stderr:
            continue  # never had a route of this version
        assert shown.returncode == 0, shown.stderr
        for route in json.loads(shown.stdout or "[]"):
            assert route["dev"] == "uit0", route
            dst = route["dst"]
            out[dst if "/" in dst else f"{dst}/{32 if version == 4 else 128}"] = \
                route.get("prefsrc")
    return out


def many_routes(count: int) -> dict[str, str | None]:
    """count / 2 v4 and count / 2 v6 prefixes, every other one with a preferred source."""
    routes: dict[str, str | None] = {}
    for i in range(count // 2):
        routes[f"10.{100 + i // 256}.{i % 256}.0/24"] = V4_SRC if i % 2 else None
        routes[f"fd50:{i + 1:x}::/48"] = V6_SRC if i % 2 else None
    return routes


def test_thousands_of_routes_added_replaced_refused_and_removed(ns: Netns) -> None:
    oif = socket.if_nametoindex("uit0")
    routes = many_routes(2000)
    with RouteClient(TABLE) as client:
        seqs = [client.add(dst, oif, src) for dst, src in routes.items()]  # none waited for
        answers = client.drain(10.0)
        assert sorted(a.seq for a in answers) == sorted(seqs)
        assert all(a.error == 0 for a in answers), answers[:3]
        assert table(ns) == routes
        # replace: the same destination, another source, then none
        client.call(client.add("10.100.0.0/24", oif, V4_SRC))
        client.call(client.add("fd50:2::/48", oif, None))
        assert routes["10.100.0.0/24"] is None and routes["fd50:2::/48"] == V6_SRC
        routes.update({"10.100.0.0/24": V4_SRC, "fd50:2::/48": None})
        assert table(ns) == routes
        # refused, with the kernel's errno
        refused = {
            client.add("10.50.0.0/16", oif, "10.99.99.99"): errno.EINVAL,  # not local
            client.add("fd51::/48", oif, "fd99::9"): errno.EINVAL,
            client.add("10.51.0.0/16", oif + 100): errno.ENODEV,  # no such device
            client.delete("10.52.0.0/16", oif): errno.ESRCH,  # no such route
        }
        answers = client.drain(5.0)
        assert {a.seq: a.error for a in answers} == refused
        assert "prefsrc" in next(a.reason for a in answers if a.error == errno.EINVAL).lower()
        assert table(ns) == routes
        # removed, all of them
        for dst in routes:
            client.delete(dst, oif)
        answers = client.drain(10.0)
        assert len(answers) == len(routes) and all(a.error == 0 for a in answers)
        assert table(ns) == {}
        stats = client.stats
    assert stats.sent == 2 * len(routes) + 2 + len(refused)
    assert (stats.done, stats.refused) == (2 * len(routes) + 2, len(refused))
    assert stats.lost == stats.overruns == stats.malformed == stats.unexpected == 0


def test_overruns_are_reported_lost_and_retried_until_every_route_is_in(ns: Netns) -> None:
    """A receive buffer too small for its answers: lost answers come back as ENOBUFS, are
    counted, and RouteSync's retries still converge; remove_all then leaves nothing."""
    side = make_side("127.0.0.1")
    side.setkey("".join(f"spdadd 10.9.0.0/24 10.{100 + i // 256}.{i % 256}.0/24 any -P out "
                        "ipsec esp/tunnel/10.9.0.1-192.0.2.2/require;\n" for i in range(300)))
    local = frozenset({socket.inet_aton(V4_SRC)})
    client = RouteClient(TABLE, rcvbuf=2048)  # room for a few answers ...
    client.capacity = 1000  # ... but as many requests in flight as RouteSync asks for
    installer = KernelRoutes(client)
    loop = asyncio.new_event_loop()
    try:
        installer.attach(loop)
        sync = RouteSync(installer, "uit0")
        deadline = time.monotonic() + 20.0
        while not (sync.sync(side.kernel.spd, local) and sync.in_flight == 0
                   and sync.installed) and time.monotonic() < deadline:
            run_until(loop, lambda: sync.in_flight == 0, 2.0)
        want = wanted_routes(side.kernel.spd, local)
        assert sync.installed == want == table(ns)
        assert installer.client.stats.lost > 0 and sync.errors >= installer.client.stats.lost
        assert installer.remove_all() == [] and table(ns) == {}
    finally:
        installer.close()
        loop.close()


def run_until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool], timeout: float) -> None:
    async def wait() -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    loop.run_until_complete(wait())


def test_route_sync_counts_refusals_and_retries_them(ns: Netns) -> None:
    """Without a loop the installer answers before returning; a route whose source is not (yet)
    an address of ours is refused (EINVAL), counted, and installed by a later sync."""
    side = make_side("127.0.0.1")
    side.setkey("spdadd 10.7.0.0/24 10.60.0.0/24 any -P out ipsec "
                "esp/tunnel/10.9.0.1-192.0.2.2/require;\n"
                "spdadd 10.9.0.0/24 10.61.0.0/24 any -P out ipsec "
                "esp/tunnel/10.9.0.1-192.0.2.2/require;\n")
    local = frozenset({socket.inet_aton(V4_SRC), socket.inet_aton("10.7.0.1")})
    with RouteClient(TABLE) as client:
        sync = RouteSync(KernelRoutes(client), "uit0")
        assert not sync.sync(side.kernel.spd, local)
        assert sync.errors == 1 and client.stats.refused == 1
        assert table(ns) == sync.installed == {"10.61.0.0/24": V4_SRC}
        ns.add_addr("uit0", "10.7.0.1/24")
        assert sync.sync(side.kernel.spd, local)  # the SPD did not change: the retry did it
        assert table(ns) == sync.installed == {"10.60.0.0/24": "10.7.0.1",
                                               "10.61.0.0/24": V4_SRC}
        side.setkey("spddelete 10.9.0.0/24 10.61.0.0/24 any -P out;\n")
        assert sync.sync(side.kernel.spd, local)
        assert table(ns) == sync.installed == {"10.60.0.0/24": "10.7.0.1"}


def test_the_datapath_installs_routes_from_its_loop_and_leaves_none_behind(
        netns_harness: NetnsHarness) -> None:
    ns = netns_harness.netns("dp")
    with ns.entered():
        ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ns.ip("link", "set", "v0", "up")
        ns.add_addr("v0", "192.0.2.1/24")
        kernel = Kernel(KernelOptions())
        config = DatapathConfig(tun_name="uit0", udp_bind=("192.0.2.1",), raw_esp=False)
        dp = Datapath(kernel, config, lambda deliveries: None)
        loop = asyncio.new_event_loop()
        try:
            dp.start(loop)
            sock = kernel.open_socket()
            script = "".join(
                f"spdadd 192.0.2.0/24 10.{100 + i}.0.0/16 any -P out ipsec "
                "esp/tunnel/192.0.2.1-192.0.2.2/require;\n" for i in range(50))
            for command in parse_script(script, rfc_mode=False):
                for msg in command.messages:
                    kernel.handle(sock, msg, time.time())
            dp.sync()
            routes = {f"10.{100 + i}.0.0/16": "192.0.2.1" for i in range(50)}
            run_until(loop, lambda: dp.routes is not None and dp.routes.installed == routes,
                      10.0)
            assert dp.routes is not None and dp.routes.installed == routes
            assert table(ns) == routes
            assert dp.stats()["route_errors"] == 0
            kernel_routes = dp.kernel_routes
            assert kernel_routes is not None and len(kernel_routes.present) == 50
        finally:
            dp.close()
            loop.close()
        assert table(ns) == {}
        assert kernel_routes.present == {}  # deleted one by one, not only gone with the TUN
