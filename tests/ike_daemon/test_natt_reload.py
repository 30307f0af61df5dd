"""Forced UDP encapsulation (IKE floats to the NAT-T port, SAs carry NAT-T ports) and reload
keeping unchanged tunnels while restarting changed ones."""

from __future__ import annotations

from pathlib import Path

from tests.ike_daemon.gateways import (
    NATT_PORT,
    config_text,
    run,
    start_gateway,
    stop_gateway,
    until,
)
from userspace_ipsec.pfkey.constants import NatTType


def test_encap_floats_ike_and_encapsulates_both_sides(tmp_path: Path) -> None:
    async def scenario() -> None:
        left = await start_gateway(tmp_path, "left", config_text(
            "127.0.0.1", "127.0.0.2", local_ts='"10.1.0.0/16"', remote_ts='"10.2.0.0/16"',
            extra_conn="encap = true"))
        right = await start_gateway(tmp_path, "right", config_text(
            "127.0.0.2", "127.0.0.1", local_ts='"10.2.0.0/16"', remote_ts='"10.1.0.0/16"'))
        try:
            rec = await left.service.initiate("site")
            assert await left.service.wait_established(rec, 20)
            await until(lambda: len(right.sas()) == 2)
            assert rec.natt and rec.sa.remote_addr == ("127.0.0.2", NATT_PORT)
            (rrec,) = right.service.records
            assert rrec.natt and rrec.sa.remote_addr == ("127.0.0.1", NATT_PORT)
            for sa in left.sas() + right.sas():
                assert sa.natt_type == NatTType.ESPINUDP
                assert (sa.natt_sport, sa.natt_dport) == (NATT_PORT, NATT_PORT)
            # Later exchanges stay on the NAT-T port: a rekey of the Child SA works there.
            old = {s.spi for s in left.sas()}
            left.tick(3700)
            await until(lambda: len(right.sas()) == 2 and not old & {s.spi for s in right.sas()},
                        what="rekey over UDP 4500")
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())


def test_reload_keeps_unchanged_and_restarts_changed(tmp_path: Path) -> None:
    async def scenario() -> None:
        text = config_text("127.0.0.1", "127.0.0.2", local_ts='"10.1.0.0/16"',
                           remote_ts='"10.2.0.0/16"')
        left = await start_gateway(tmp_path, "left", text)
        right = await start_gateway(tmp_path, "right", config_text(
            "127.0.0.2", "127.0.0.1", local_ts='"10.2.0.0/16"', remote_ts='"10.1.0.0/16"'))
        conf = tmp_path / "left.toml"
        try:
            rec = await left.service.initiate("site")
            assert await left.service.wait_established(rec, 20)
            spis = {s.spi for s in left.sas()}
            conf.write_text(text.replace("[secrets.psk.site]", """
[connections.extra]
remote_addrs = ["127.0.0.3"]
[connections.extra.children.c]
local_ts = ["10.5.0.0/16"]
remote_ts = ["10.6.0.0/16"]
start_action = "trap"

[secrets.psk.site]"""))
            result = await left.service.reload()
            assert result == {"added": ["extra"], "changed": [], "removed": []}
            assert {s.spi for s in left.sas()} == spis and rec in left.service.records
            assert len(left.policies()) == 6  # site's three and extra's trap
            conf.write_text(text.replace('esp_proposals = ["aes128gcm16", "aes256-sha256"]',
                                         'esp_proposals = ["aes256gcm16"]'))
            result = await left.service.reload()
            assert result == {"added": [], "changed": ["site"], "removed": ["extra"]}
            await until(lambda: not left.sas() and not left.policies(), what="cleanup")
            await until(lambda: not right.sas(), what="peer told")
            conf.write_text("[connections.broken\n")
            try:
                await left.service.reload()
            except Exception as exc:  # noqa: BLE001 - the type is asserted below
                assert "TOML syntax" in str(exc)
            else:
                raise AssertionError("a broken file was accepted")
            assert "site" in left.service.connections.connections
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())
