"""The control commands and the CLI against a live pair of services: status agrees with the
kernels, down empties them, config check reports file:line."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from click.testing import CliRunner

from ike import control_cmds
from tests.ike_daemon.gateways import config_text, run, start_gateway, stop_gateway, until
from userspace_ipsec.cli.common import Context
from userspace_ipsec.cli.ike_cmds import config_check, down, status, up
from userspace_ipsec.control import ControlServer


def test_up_status_down_through_the_control_socket(tmp_path: Path) -> None:
    async def scenario() -> None:
        left = await start_gateway(tmp_path, "left", config_text(
            "127.0.0.1", "127.0.0.2", local_ts='"10.1.0.0/16"', remote_ts='"10.2.0.0/16"'))
        right = await start_gateway(tmp_path, "right", config_text(
            "127.0.0.2", "127.0.0.1", local_ts='"10.2.0.0/16"', remote_ts='"10.1.0.0/16"'))
        server = ControlServer(tmp_path / "control.sock")
        control_cmds.register(server, left.service)
        await server.start()
        runner = CliRunner()
        obj = Context(tmp_path)
        try:
            res = await asyncio.to_thread(runner.invoke, up, ["site"], obj=obj)
            assert res.exit_code == 0, res.output
            assert "established" in res.output
            res = await asyncio.to_thread(runner.invoke, status, ["--json"], obj=obj)
            assert res.exit_code == 0, res.output
            doc = json.loads(res.output)
            (ike,) = doc["ike_sas"]
            assert ike["state"] == "established" and ike["algorithms"].startswith("AES_GCM_16")
            (child,) = ike["children"]
            kernel_spis = {f"{sa.spi:08x}" for sa in left.sas()}
            assert {child["spi_in"], child["spi_out"]} == kernel_spis
            assert child["local_ts"] == "10.1.0.0/16" and child["counters"]["packets_in"] == 0
            assert not any(sa.enc_key.hex() in res.output for sa in left.sas())
            counts = {k: v for k, v in left.service.stats().items()
                      if k in ("ike_sas", "ike_sas_established", "child_sas")}
            assert counts == {"ike_sas": 1, "ike_sas_established": 1, "child_sas": 1}
            res = await asyncio.to_thread(runner.invoke, status, [], obj=obj)
            assert f"{child['spi_in']}_i" in res.output and "10.1.0.0/16 === 10.2.0.0/16" \
                in res.output
            res = await asyncio.to_thread(runner.invoke, up, ["nosuch"], obj=obj)
            assert res.exit_code == 1 and "no connection named 'nosuch'" in res.output
            res = await asyncio.to_thread(runner.invoke, down, ["site"], obj=obj)
            assert res.exit_code == 0 and "1 IKE SA(s) deleted" in res.output
            await until(lambda: not left.sas() and not right.sas() and not right.policies())
            assert left.service.stats()["child_sas"] == 0
        finally:
            await server.close()
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())


def test_config_check_reports_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(config_text("127.0.0.1", "127.0.0.2", local_ts='"10.1.0.0/16"',
                                remote_ts='"10.2.0.0/16"'))
    os.chmod(good, 0o600)
    runner = CliRunner()
    res = runner.invoke(config_check, [str(good)])
    assert res.exit_code == 0 and "ok, 1 connection(s)" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('mode = "tunnel"', "").replace(
        'esp_proposals = ["aes128gcm16", "aes256-sha256"]', 'esp_proposals = ["aes999"]'))
    os.chmod(bad, 0o600)
    res = runner.invoke(config_check, [str(bad)])
    assert res.exit_code == 2
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1)
                if "aes999" in text)
    assert f"{bad}:{line}:" in res.output and "aes999" in res.output
