"""The datapath follows the SAD and SPD change by change: after any sequence of PF_KEY changes,
what it derived incrementally (SPI index, overheads, keepalive peers, routes) equals what a
rescan from scratch gives."""

from __future__ import annotations

import random

from datapath.keepalive import KeepalivePeers
from datapath.routes import RouteSync, wanted_routes
from datapath.satable import SaTable
from tests.datapath.engine_helpers import KEY_A, LEFT, RIGHT, make_side
from tests.datapath.test_engine_routes import RecordingInstaller

SPIS = (0x1001, 0x1002, 0x1003, 0x1004)
NETS = ("10.4.0.0/24", "10.5.0.0/24", "10.6.0.0/24", "fd00:4::/64")
STEPS = 400


def random_command(rng: random.Random) -> str:
    spi = rng.choice(SPIS)
    src, dst = rng.choice(((LEFT, RIGHT), (RIGHT, LEFT)))  # one SPI, both directions
    encap = rng.choice(("esp-udp", "esp"))
    ports = f"[{rng.choice((4500, 4501, 4502))}]" if encap == "esp-udp" else ""
    net = rng.choice(NETS)
    mine = "fd00:1::/64" if ":" in net else rng.choice(("10.1.0.0/24", "10.1.0.5/32"))
    action = rng.choice(("ipsec esp/tunnel/127.0.0.1-127.0.0.2/require", "none"))
    return rng.choice((
        f"add {src}{ports} {dst}{ports} {encap} {spi:#x} -m tunnel -E aes-gcm-16 {KEY_A};",
        f"add {src}{ports} {dst}{ports} {encap} {spi:#x} -m tunnel -E aes-gcm-16 {KEY_A};",
        f"delete {src} {dst} esp {spi:#x};",
        f"delete {src} {dst} esp {spi:#x};",
        f"spdadd {mine} {net} any -P out {action};",
        f"spdadd {mine} {net} any -P out {action};",
        f"spdupdate {mine} {net} any -P out {action};",
        f"spddelete {mine} {net} any -P out;",
        rng.choice(("flush;", "spdflush;", "get 127.0.0.1 127.0.0.2 esp 0x1001;")),
    ))


def test_incremental_state_equals_a_rescan_after_every_change() -> None:
    rng = random.Random(4303)
    side = make_side(LEFT)
    dp = side.dp
    installer = RecordingInstaller()
    dp.routes = RouteSync(installer, "memtun")
    local = dp.table.local | {bytes.fromhex("fd00" + "00" * 12 + "0001")}
    dp.table.set_local(local)
    seen = [0, 0, 0]  # the most SPIs, peers and routes at once: the walk built things up
    for _ in range(STEPS):
        command = random_command(rng)
        try:
            side.setkey(command + "\n")
        except AssertionError:  # refused (SPI in use, no such SA): nothing changed
            dp.sync()
        fresh = SaTable(side.kernel, udp=dp.udp, raw=dp.raw, local=lambda: local)
        fresh.refresh()
        assert {spi: ctx.sa for spi, ctx in dp.table.by_spi.items()} == \
            {spi: ctx.sa for spi, ctx in fresh.by_spi.items()}, command
        assert dp.table.overheads == fresh.overheads, command
        peers = KeepalivePeers()
        peers.follow(side.kernel.sad, local, dp.udp)
        assert dp._keepalive.peers == peers.peers, command
        assert installer.routes == wanted_routes(side.kernel.spd, local), command
        sizes = (len(dp.table.by_spi), len(peers.peers), len(installer.routes))
        seen = [max(a, b) for a, b in zip(seen, sizes, strict=True)]
    assert seen[0] >= 3 and seen[1] >= 2 and seen[2] >= 3, seen
