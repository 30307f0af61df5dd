"""Routes into the TUN follow the SPD; the [datapath] config table is checked before start."""

from __future__ import annotations

import socket

import pytest

from datapath.routes import RouteSync, preferred_source, wanted_routes
from tests.datapath.engine_helpers import make_side
from userspace_ipsec.config import ConfigError, loads


class RecordingInstaller:
    """Netlink stand-in that records what RouteSync asks for (RouteSync is under test)."""

    def __init__(self, refuse: str = "") -> None:
        self.routes: dict[str, str | None] = {}
        self.calls: list[str] = []
        self.refuse = refuse

    def add_route(self, dst: str, ifname: str, src: str | None = None) -> None:
        if dst == self.refuse:
            raise OSError("refused")
        self.calls.append(f"add {dst} {src}")
        self.routes[dst] = src

    def remove_route(self, dst: str, ifname: str) -> None:
        self.calls.append(f"del {dst}")
        del self.routes[dst]


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


def test_route_sync_follows_spd_changes_and_retries_failures() -> None:
    side = make_side("127.0.0.1")
    side.setkey(SCRIPT)
    installer = RecordingInstaller(refuse="10.5.0.0/24")
    sync = RouteSync(installer, "uipsec0")
    local = packed("10.1.0.1", "192.0.2.1")
    assert not sync.sync(side.kernel.spd, local)
    assert sync.errors == 1 and "10.5.0.0/24" not in installer.routes
    installer.refuse = ""
    assert sync.sync(side.kernel.spd, local)
    assert set(installer.routes) == {"10.4.0.0/24", "10.5.0.0/24", "192.0.2.3/32",
                                     "fd00:4::/64"}
    side.setkey("spddelete 10.9.0.0/24 10.5.0.0/24 any -P out;\n")
    installer.calls.clear()
    assert sync.sync(side.kernel.spd, local)
    assert installer.calls == ["del 10.5.0.0/24"]
    assert sync.sync(side.kernel.spd, local) and installer.calls == ["del 10.5.0.0/24"]


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
