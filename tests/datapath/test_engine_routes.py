"""Routes into the TUN follow the SPD; the [datapath] config table is checked before start."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import pytest

from datapath.engine import LOCAL_REFRESH
from datapath.routes import Done, RouteSync, preferred_source, wanted_routes
from tests.datapath.engine_helpers import NOW, make_side
from userspace_ipsec.config import ConfigError, loads


class RecordingInstaller:
    """Netlink stand-in that records what RouteSync asks for (RouteSync is under test).

    Answers at once (refusing by raising, as a failed send does), or, with ``deferred``, when
    ``answer()`` is called (as the loop reader does; refusing with EINVAL)."""

    def __init__(self, refuse: str = "", deferred: bool = False) -> None:
        self.routes: dict[str, str | None] = {}
        self.calls: list[str] = []
        self.refuse = refuse
        self.deferred = deferred
        self.waiting: list[tuple[str, Callable[[], object], Done]] = []

    def _request(self, dst: str, apply: Callable[[], object], done: Done) -> None:
        if self.deferred:
            self.waiting.append((dst, apply, done))
            return
        if dst == self.refuse:
            raise OSError(errno.EINVAL, "refused")
        apply()
        done(None)

    def add_route(self, dst: str, ifname: str, src: str | None, done: Done) -> None:
        self.calls.append(f"add {dst} {src}")
        self._request(dst, lambda: self.routes.__setitem__(dst, src), done)

    def remove_route(self, dst: str, ifname: str, done: Done) -> None:
        self.calls.append(f"del {dst}")
        self._request(dst, lambda: self.routes.pop(dst), done)

    def answer(self) -> int:
        """Answer every waiting request, in order; how many there were."""
        waiting, self.waiting = self.waiting, []
        for dst, apply, done in waiting:
            if dst == self.refuse:
                done(OSError(errno.EINVAL, "refused"))
            else:
                apply()
                done(None)
        return len(waiting)


def packed(*addrs: str) -> frozenset[bytes]:
    return frozenset(socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
                     for a in addrs)


SCRIPT = """
spdadd 10.1.0.0/24 10.4.0.0/24 any -P out ipsec esp/tunnel/192.0.2.1-192.0.2.2/require;
spdadd 10.4.0.0/24 10.1.0.0/24 any -P in ipsec esp/tunnel/192.0.2.2-192.0.2.1/require;
spdadd 10.9.0.0/24 10.5.0.0/24 any -P out ipsec esp/tunnel/192.0.2.1-192.0.2.2/require;
spdadd 192.0.2.1 192.0.2.3 any -P out ipsec esp/transport//require;
spdadd 10.1.0.0/24 10.6.0.0/24 any -P out none;
spdadd fd00:1::/64 fd00:4::/64 any -P out ipsec esp/tunnel/192.0.2.1-192.0.2.2/require;
"""


def test_one_route_per_outbound_ipsec_policy_with_a_sensible_source() -> None:
    side = make_side("127.0.0.1")
    side.setkey(SCRIPT)
    local = packed("10.1.0.1", "192.0.2.1", "fd00:1::1")
    assert wanted_routes(side.kernel.spd, local) == {
        "10.4.0.0/24": "10.1.0.1",  # a local address inside the source selector
        "10.5.0.0/24": "192.0.2.1",  # else the tunnel's local endpoint
        "192.0.2.3/32": "192.0.2.1",  # transport: the host itself
        "fd00:4::/64": "fd00:1::1",  # v6 in v4: a v6 source, never the v4 endpoint
    }
    policy = next(p for p in side.kernel.spd if str(p.selector.dst) == "10.5.0.0/24")
    assert preferred_source(policy, packed("10.1.0.1")) is None  # nothing of ours fits


def test_route_sync_follows_spd_changes_and_retries_failures(
        caplog: pytest.LogCaptureFixture) -> None:
    side = make_side("127.0.0.1")
    side.setkey(SCRIPT)
    installer = RecordingInstaller(refuse="10.5.0.0/24")
    sync = RouteSync(installer, "uipsec0")
    local = packed("10.1.0.1", "192.0.2.1")
    assert not sync.sync(side.kernel.spd, local)
    assert sync.errors == 1 and "10.5.0.0/24" not in installer.routes
    assert not sync.sync(side.kernel.spd, local)  # retried, refused again: logged once
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert sync.errors == 2 and len(warnings) == 1 and "10.5.0.0/24" in warnings[0].message
    installer.refuse = ""
    assert sync.sync(side.kernel.spd, local)
    assert set(installer.routes) == {"10.4.0.0/24", "10.5.0.0/24", "192.0.2.3/32",
                                     "fd00:4::/64"}
    side.setkey("spddelete 10.9.0.0/24 10.5.0.0/24 any -P out;\n")
    installer.calls.clear()
    assert sync.sync(side.kernel.spd, local)
    assert installer.calls == ["del 10.5.0.0/24"]
    assert sync.sync(side.kernel.spd, local) and installer.calls == ["del 10.5.0.0/24"]


def test_route_sync_with_late_answers_converges_and_retries_refusals() -> None:
    """Answers read later (by the loop): one request per destination in flight, the SPD's
    changes meanwhile applied when the answer comes, refusals counted and retried."""
    side = make_side("127.0.0.1")
    side.setkey(SCRIPT)
    installer = RecordingInstaller(refuse="10.5.0.0/24", deferred=True)
    sync = RouteSync(installer, "uipsec0")
    local = packed("10.1.0.1", "192.0.2.1")
    sync.sync(side.kernel.spd, local)
    assert sync.in_flight == 4 and sync.installed == {} and sync.errors == 0
    # changed while in flight: 10.4.0.0/24 goes away before its add is answered
    side.setkey("spddelete 10.1.0.0/24 10.4.0.0/24 any -P out;\n")
    installer.calls.clear()
    sync.sync(side.kernel.spd, local)
    assert installer.calls == []  # nothing sent twice for a destination
    assert installer.answer() == 4
    assert sync.errors == 1 and "10.5.0.0/24" not in sync.installed
    assert installer.calls == ["del 10.4.0.0/24"]  # sent when the add was confirmed
    assert installer.answer() == 1 and sync.in_flight == 0
    assert sync.installed == installer.routes == {"192.0.2.3/32": "192.0.2.1",
                                                  "fd00:4::/64": None}
    installer.refuse = ""
    assert sync.sync(side.kernel.spd, local)  # the refused route is retried
    assert installer.answer() == 1 and sync.errors == 1
    assert sync.installed == wanted_routes(side.kernel.spd, local) == installer.routes


def test_the_datapath_retries_refused_routes_on_its_timer() -> None:
    side = make_side("127.0.0.1")
    installer = RecordingInstaller(refuse="10.5.0.0/24")
    side.dp.routes = sync = RouteSync(installer, "uipsec0")
    side.setkey(SCRIPT)
    assert sync.failed == 1 and "10.5.0.0/24" not in installer.routes
    side.dp.tick(NOW + 1)
    assert sync.errors == 1  # not yet: at most one retry per LOCAL_REFRESH
    installer.refuse = ""
    side.dp.tick(NOW + LOCAL_REFRESH)
    assert sync.failed == 0 and sync.errors == 1 and "10.5.0.0/24" in installer.routes


def test_datapath_config_defaults_and_errors() -> None:
    config = loads("[datapath]\nudp_bind = ['192.0.2.1']\nkeepalive_interval = 5\n")
    assert config.datapath.udp_bind == ("192.0.2.1",)
    assert config.datapath.keepalive_interval == 5.0
    assert loads("").datapath.enabled and loads("").datapath.tun_name == "uipsec0"
    for text, reason in (
        ("[datapath]\n\npath_mtu = 100\n", "t.toml:3: datapath.path_mtu must be within"),
        ("[datapath]\nudp_bind = ['nowhere']\n", "t.toml:2: datapath.udp_bind: 'nowhere'"),
        ("[datapath]\nraw_esp = 1\n", "t.toml:2: datapath.raw_esp must be true or false"),
        ("[datapath]\ntable = 254\n", "t.toml:2: datapath.table 254 is a reserved table"),
        ("[datapath]\nfoo = 1\n", "t.toml:2: unknown setting datapath.foo"),
        ("[datapath]\ntun_name = 'x' \ntun_name2 = 1\n", "unknown setting datapath.tun_name2"),
    ):
        with pytest.raises(ConfigError) as exc:
            loads(text, "t.toml")
        assert reason in str(exc.value)
