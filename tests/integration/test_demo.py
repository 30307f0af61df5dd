"""uipsec demo: the README's main command, run for real (root, namespaces)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from userspace_ipsec.demo import DEMO_PREFIX, render_script, tunnel_ends
from userspace_ipsec.lab import check_prerequisites, list_namespaces

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manual-keying"


@pytest.mark.parametrize("keying", ["ike", "manual"])
def test_demo_pings_through_the_tunnel_and_leaves_nothing_behind(keying: str) -> None:
    check_prerequisites()  # fails (never skips) without root, ip, nft or /dev/net/tun
    before = set(list_namespaces(DEMO_PREFIX))
    proc = subprocess.run(
        [sys.executable, "-m", "userspace_ipsec.cli", "demo", "--pings", "3",
         "--keying", keying],
        capture_output=True, text=True, timeout=180,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "3 packets transmitted, 3 received" in out
    if keying == "ike":
        assert out.count(": ESTABLISHED,") == 2  # uipsec status on both gateways
        assert out.count("lan: INSTALLED, TUNNEL") == 2
    assert "demo: success" in out
    # Every SA row shows traffic: inbound on one SA, outbound on the other, on both gateways.
    rows = re.findall(r"^0x[0-9a-f]{8}\s+tunnel\s+\S+\s+\S+\s+aes-gcm-16\s+(\d+)/(\d+)", out,
                      re.MULTILINE)
    assert len(rows) == 4
    assert all(int(pin) + int(pout) >= 3 for pin, pout in rows), out
    assert set(list_namespaces(DEMO_PREFIX)) == before
    leftover = subprocess.run(["pgrep", "-f", "uipsec-demo-"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_example_scripts_are_the_demo_scripts() -> None:
    """examples/manual-keying is what the demo loads, with the examples' fixed keys."""
    left_text = (EXAMPLES / "left.conf").read_text()
    keys = re.findall(r"-E aes-gcm-16 0x([0-9a-f]{40})", left_text)
    left, right = tunnel_ends("10.2.0.1", "10.2.0.2", "10.1.0.0/24", "10.4.0.0/24",
                              keys=(keys[0], keys[1]))
    assert render_script(left) == left_text
    assert render_script(right) == (EXAMPLES / "right.conf").read_text()


def test_ikev2_examples_are_the_demo_configs_and_load(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from userspace_ipsec.cli import main
    from userspace_ipsec.demo import render_ike_config

    examples = EXAMPLES.parent / "ikev2-psk"
    psk = re.findall(r'secret = "0x([0-9a-f]{64})"', (examples / "left.toml").read_text())[0]
    left, right = tunnel_ends("10.2.0.1", "10.2.0.2", "10.1.0.0/24", "10.4.0.0/24")
    for name, end, initiator in (("left.toml", left, True), ("right.toml", right, False)):
        text = (examples / name).read_text()
        assert render_ike_config(end, psk, initiator) == text
        copy = tmp_path / name
        copy.touch(mode=0o600)
        copy.write_text(text)
        result = CliRunner().invoke(main, ["config", "check", str(copy)])
        assert result.exit_code == 0, result.output
        copy.chmod(0o644)  # a PSK readable by others is refused
        result = CliRunner().invoke(main, ["config", "check", str(copy)])
        assert result.exit_code == 2 and "chmod 600" in result.output
