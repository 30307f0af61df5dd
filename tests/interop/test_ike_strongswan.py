"""Interoperability of our IKEv2 daemon and ESP datapath with strongSwan 5.9 (kernel-libipsec).

hostL — gwL (``uipsec daemon``) ==== gwR (charon) — hostR, in fresh namespaces per test
(tests/interop/ike_fixtures.py). Each case checks what both sides say about the tunnel (IKE and
ESP SPIs, algorithms) and that traffic between the hosts really passes: ICMP echo, and a TCP
stream checked by SHA-256. Both roles, four IKE/ESP suites (one with PFS and a CREATE_CHILD_SA
rekey), NAT, rekeying under continuous traffic, DPD against a killed charon, deletes from either
side, and on-demand (trap) negotiation. charon always floats to UDP 4500 (kernel-libipsec fakes
a NAT), so every Child SA here is UDP-encapsulated.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.interop.ike_fixtures import (
    CHILD,
    CONN,
    ContinuousPing,
    InteropLab,
    OurSide,
    TheirSide,
    interop_lab,
    tcp_transfer,
    wait_until,
)
from tests.strongswan import StrongSwanError, require_strongswan

TCP_BYTES = 8_000_000


@pytest.fixture(autouse=True)
def _strongswan_present() -> None:
    try:
        require_strongswan()
    except StrongSwanError as exc:
        pytest.fail(str(exc), pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("interop tests need root (network namespaces)", pytrace=False)


def charon_suite(raw: dict[str, Any]) -> str:
    """charon's algorithm fields in our status notation ("AES_GCM_16_128/HMAC_SHA2_256/...")."""
    parts = [f"{raw['encr-alg']}_{raw.get('encr-keysize', '256')}"]
    if "integ-alg" in raw:
        parts.append(raw["integ-alg"])
    if "prf-alg" in raw:
        parts.append(raw["prf-alg"].removeprefix("PRF_"))
    if "dh-group" in raw:
        parts.append(raw["dh-group"].replace("_", ""))
    return "/".join(parts)


def assert_agree(lab: InteropLab, ike_suite: str, esp_suite: str) -> tuple[dict[str, Any],
                                                                              dict[str, Any]]:
    """Both sides hold the same established IKE SA and Child SA, with these algorithms."""
    ours = wait_until(lab.established, 5)
    theirs = wait_until(lab.their_established, 5)
    assert ours and theirs, lab.diagnostics()
    assert (ours["spi_i"], ours["spi_r"]) == (theirs["initiator-spi"], theirs["responder-spi"])
    (child,) = ours["children"]
    assert (child["spi_in"], child["spi_out"]) == (theirs["child"]["spi-out"],
                                                   theirs["child"]["spi-in"])
    assert ours["algorithms"] == charon_suite(theirs) == ike_suite
    assert child["algorithms"] == charon_suite(theirs["child"]) == esp_suite
    assert child["encap"] and theirs["child"]["encap"] == "yes"
    assert child["local_ts"] == "10.1.0.0/24" and theirs["child"]["local-ts"] == ["10.4.0.0/24"]
    return ours, theirs


def assert_tcp(lab: InteropLab, size: int = TCP_BYTES) -> None:
    sent, received = tcp_transfer(lab.topo.host_l, lab.topo.host_r, lab.topo.host_r_lan.ip4,
                                  size)
    assert sent.split()[0] == str(size) and sent == received, lab.diagnostics()


def establish(lab: InteropLab, we_initiate: bool) -> None:
    if we_initiate:
        assert lab.up()["state"] == "established", lab.diagnostics()
    else:
        lab.charon.initiate(CHILD, CONN)


def assert_both_clean(lab: InteropLab) -> None:
    """No IKE SA on either side, and our SAD and SPD hold nothing of the tunnel."""
    assert wait_until(lambda: not lab.their_sas(), 10), lab.diagnostics()
    assert wait_until(lambda: not lab.ike_sas(), 10), lab.diagnostics()
    assert wait_until(lambda: not lab.sad() and not lab.spd(), 5), (lab.sad(), lab.spd())


# IKE proposal, ESP proposal (ours, charon's), the suites both must report, TCP when initiator,
# TCP when responder. The first one has PFS: its Child SA is rekeyed with a fresh X25519.
SUITES = [
    pytest.param("aes128gcm16-prfsha256-x25519", "aes128gcm16-x25519", "aes128gcm16-curve25519",
                 "AES_GCM_16_128/HMAC_SHA2_256/CURVE25519", "AES_GCM_16_128", False, True,
                 id="aes128gcm16-x25519-pfs"),
    pytest.param("aes256-sha256-modp2048", "aes256-sha256", "aes256-sha256",
                 "AES_CBC_256/HMAC_SHA2_256_128/HMAC_SHA2_256/MODP2048",
                 "AES_CBC_256/HMAC_SHA2_256_128", True, False, id="aes256-sha256-modp2048"),
    pytest.param("aes256gcm16-prfsha384-ecp384", "aes256gcm16", "aes256gcm16",
                 "AES_GCM_16_256/HMAC_SHA2_384/ECP384", "AES_GCM_16_256", False, True,
                 id="aes256gcm16-ecp384"),
    pytest.param("chacha20poly1305-prfsha256-curve25519", "chacha20poly1305", "chacha20poly1305",
                 "CHACHA20_POLY1305_256/HMAC_SHA2_256/CURVE25519", "CHACHA20_POLY1305_256", True,
                 False, id="chacha20poly1305-curve25519"),
]


@pytest.mark.parametrize("we_initiate", [True, False],
                         ids=["ours-initiates", "charon-initiates"])
@pytest.mark.parametrize(("ike", "our_esp", "their_esp", "ike_suite", "esp_suite", "tcp_init",
                          "tcp_resp"), SUITES)
def test_suite_both_roles(tmp_path: Path, we_initiate: bool, ike: str, our_esp: str,
                          their_esp: str, ike_suite: str, esp_suite: str, tcp_init: bool,
                          tcp_resp: bool) -> None:
    pfs = "x25519" in our_esp
    with interop_lab(tmp_path, OurSide(proposal=ike, esp_proposal=our_esp),
                     TheirSide(proposal=ike, esp_proposal=their_esp)) as lab:
        establish(lab, we_initiate)
        # At once: a responder installs its Child SA before it answers, so the very first
        # packets pass (charon's swanctl --initiate returns when it has our answer).
        assert lab.ping(count=5) == 5, lab.diagnostics()
        ours, _ = assert_agree(lab, ike_suite, esp_suite)
        if tcp_init if we_initiate else tcp_resp:
            assert_tcp(lab)
        if pfs:
            # CREATE_CHILD_SA with KE: charon rekeys; the new Child SA says its DH group.
            lab.charon.swanctl("--rekey", "--child", CHILD)
            old_spi = ours["children"][0]["spi_in"]
            assert wait_until(lambda: (sa := lab.established()) is not None
                              and sa["children"][0]["spi_in"] != old_spi
                              and len(lab.sad()) == 2, 10), lab.diagnostics()
            assert_agree(lab, ike_suite, f"{esp_suite}/CURVE25519")
            assert lab.ping(count=3) == 3, lab.diagnostics()


def test_initiator_behind_nat(tmp_path: Path) -> None:
    """gwL behind a masquerading NAT: our NAT-D finds us behind it, charon sees the NAT's
    outside address, and ESP in UDP 4500 carries ping and a TCP stream through the NAT."""
    with interop_lab(tmp_path, nat=True) as lab:
        establish(lab, we_initiate=True)
        ours, theirs = assert_agree(lab, "AES_GCM_16_128/HMAC_SHA2_256/CURVE25519",
                                    "AES_GCM_16_128")
        assert ours["nat"]["local_behind_nat"] and ours["nat"]["udp_encap"]
        assert lab.topo.nat_outside is not None
        assert theirs["remote-host"] == lab.topo.nat_outside.ip4
        assert theirs.get("nat-remote") == "yes"
        assert lab.ping(count=5) == 5, lab.diagnostics()
        assert_tcp(lab, 4_000_000)


def _spis(lab: InteropLab) -> tuple[str, str] | None:
    """(IKE SPI_i, Child SA inbound SPI) of our established tunnel."""
    sa = lab.established()
    return None if sa is None else (sa["spi_i"], sa["children"][0]["spi_in"])


def _settled(lab: InteropLab, before: tuple[str, str], ike: bool) -> bool:
    """Our IKE SA (ike) or Child SA changed since before, the old one is gone on both sides
    (one IKE SA, one Child SA, two SAs in our SAD), and both agree on the new one's SPIs."""
    now, theirs = _spis(lab), lab.their_established()
    if now is None or theirs is None or len(lab.their_sas()) != 1:
        return False
    changed = now[0] != before[0] if ike else now[1] != before[1]
    # charon keeps a rekeyed Child SA listed as DELETED for a few seconds: count INSTALLED ones.
    installed = [c for c in theirs["child-sas"].values() if c.get("state") == "INSTALLED"]
    return (changed and len(lab.ike_sas()) == 1 and len(lab.sad()) == 2 and len(installed) == 1
            and theirs["initiator-spi"] == now[0] and theirs["child"]["spi-out"] == now[1])


ROLES = pytest.mark.parametrize("we_initiate", [True, False],
                                ids=["ours-initiates", "charon-initiates"])


@ROLES
def test_rekeys_by_us_under_continuous_ping(tmp_path: Path, we_initiate: bool) -> None:
    """Our timers rekey the Child SA every 3 s and the IKE SA at 7 s (make-before-break):
    not one of ~10 echoes a second is lost, and charon follows every rekey."""
    ours = OurSide(child_rekey_time=3.0, ike_rekey_time=7.0)
    with interop_lab(tmp_path, ours) as lab:
        establish(lab, we_initiate)
        first = wait_until(lambda: _spis(lab), 5)
        assert first is not None
        pinger = ContinuousPing(lab.topo.host_l, lab.topo.host_r_lan.ip4).start()
        try:
            assert wait_until(lambda: _settled(lab, first, ike=True), 15), lab.diagnostics()
            after_ike = _spis(lab)
            assert after_ike is not None and after_ike[1] != first[1]
            # Child SAs keep rekeying under the new IKE SA.
            assert wait_until(lambda: _settled(lab, after_ike, ike=False), 8), lab.diagnostics()
        finally:
            sent, answered = pinger.stop()
        assert sent >= 50 and answered == sent, (pinger.lost_at, lab.stats(), lab.diagnostics())
        assert lab.ping(count=3) == 3


@ROLES
def test_rekeys_by_charon_under_continuous_ping(tmp_path: Path, we_initiate: bool) -> None:
    """charon rekeys (swanctl --rekey) the Child SA, then the IKE SA; we answer both
    CREATE_CHILD_SA exchanges as responder and no echo is lost."""
    with interop_lab(tmp_path) as lab:
        establish(lab, we_initiate)
        first = wait_until(lambda: _spis(lab), 5)
        assert first is not None
        pinger = ContinuousPing(lab.topo.host_l, lab.topo.host_r_lan.ip4).start()
        try:
            wait_until(lambda: pinger.sent >= 10, 5)
            lab.charon.swanctl("--rekey", "--child", CHILD)
            assert wait_until(lambda: _settled(lab, first, ike=False), 10), lab.diagnostics()
            child_rekeyed = _spis(lab)
            assert child_rekeyed is not None and child_rekeyed[0] == first[0]
            sent_before = pinger.sent
            wait_until(lambda: pinger.sent >= sent_before + 10, 5)
            lab.charon.swanctl("--rekey", "--ike", CONN)
            assert wait_until(lambda: _settled(lab, child_rekeyed, ike=True), 10), \
                lab.diagnostics()
            sent_before = pinger.sent
            wait_until(lambda: pinger.sent >= sent_before + 10, 5)
        finally:
            sent, answered = pinger.stop()
        assert sent >= 30 and answered == sent, (pinger.lost_at, lab.stats(), lab.diagnostics())
        assert_agree(lab, "AES_GCM_16_128/HMAC_SHA2_256/CURVE25519", "AES_GCM_16_128")


def test_dpd_clears_tunnel_of_killed_charon(tmp_path: Path) -> None:
    """charon is SIGKILLed; our DPD (1 s delay, 0.5 s retransmits) gives up on it and
    dpd_action=clear removes the IKE SA, the Child SAs and the policies."""
    ours = OurSide(dpd_delay=1.0, retransmit_timeout=0.5, retransmit_tries=2)
    with interop_lab(tmp_path, ours) as lab:
        establish(lab, we_initiate=True)
        assert lab.ping(count=2) == 2, lab.diagnostics()
        assert len(lab.sad()) == 2 and len(lab.spd()) == 3
        os.kill(lab.charon.pid, signal.SIGKILL)
        lab.charon.process.wait(5)  # type: ignore[union-attr]
        assert wait_until(lambda: not lab.ike_sas(), 20, 0.25), lab.diagnostics()
        assert not lab.sad() and not lab.spd(), (lab.sad(), lab.spd())
        assert "peer not responding (DPD)" in lab.log.read_text()
        assert lab.ping(count=1, timeout=0.5) == 0


@pytest.mark.parametrize("by_us", [True, False], ids=["uipsec-down", "swanctl-terminate"])
def test_delete_from_either_side_leaves_both_clean(tmp_path: Path, by_us: bool) -> None:
    with interop_lab(tmp_path) as lab:
        establish(lab, we_initiate=not by_us)  # the other side deletes what one initiated
        assert lab.ping(count=2) == 2, lab.diagnostics()
        if by_us:
            assert lab.down()["ike_sas_deleted"] == 1
        else:
            lab.charon.terminate(CONN)
        assert_both_clean(lab)
        assert lab.ping(count=1, timeout=0.5) == 0


def test_trap_negotiates_on_first_packet(tmp_path: Path) -> None:
    """start_action=trap: only policies at first; hostL's first echo raises an ACQUIRE, our
    daemon negotiates with charon, and every echo passes."""
    with interop_lab(tmp_path, OurSide(start_action="trap")) as lab:
        assert wait_until(lambda: len(lab.spd()) >= 1, 5), lab.diagnostics()
        assert not lab.sad() and not lab.ike_sas() and not lab.their_sas()
        answered = lab.topo.host_l.ping(lab.topo.host_r_lan.ip4, count=6, timeout=1.0,
                                        interval=0.2)
        # The datapath holds the packet that raised the ACQUIRE and sends it once the SA is
        # there: even the first echo is answered (after the ~20 ms negotiation).
        assert len(answered) == 6, lab.diagnostics()
        ours, _ = assert_agree(lab, "AES_GCM_16_128/HMAC_SHA2_256/CURVE25519", "AES_GCM_16_128")
        assert ours["initiator"]
        assert lab.ping(count=3) == 3
