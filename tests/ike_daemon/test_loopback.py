"""Two IKE services over loopback UDP, each keying its own emulated kernel through PF_KEY:
the SAD and SPD after up, rekey and down, and the responder's narrowing."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from ike.core import State
from ike.service import IkeRecord
from tests.ike_daemon.gateways import (
    Gateway,
    config_text,
    run,
    start_gateway,
    stop_gateway,
    until,
)
from userspace_ipsec.pfkey.constants import IpsecMode, PolicyDir


def _pair_texts() -> tuple[str, str]:
    left = config_text("127.0.0.1", "127.0.0.2", local_ts='"10.1.0.0/16"',
                       remote_ts='"10.2.0.0/16"')
    right = config_text("127.0.0.2", "127.0.0.1", local_ts='"10.2.0.0/16"',
                        remote_ts='"10.1.0.0/16"')
    return left, right


def test_up_installs_matching_sas_and_policies_then_down_removes_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        left_text, right_text = _pair_texts()
        left = await start_gateway(tmp_path, "left", left_text)
        right = await start_gateway(tmp_path, "right", right_text)
        try:
            rec = await left.service.initiate("site")
            assert await left.service.wait_established(rec, 20)
            await until(lambda: len(right.sas()) == 2 and len(right.policies()) == 3,
                        what="responder SAs and policies")
            lsas, rsas = left.sas(), right.sas()
            assert len(lsas) == 2 and len(policies := left.policies()) == 3
            # Each side's outbound SA is the other's inbound one, with the same keys.
            lout = next(s for s in lsas if str(s.src) == "127.0.0.1")
            lin = next(s for s in lsas if str(s.src) == "127.0.0.2")
            rin = next(s for s in rsas if s.spi == lout.spi)
            rout = next(s for s in rsas if s.spi == lin.spi)
            assert (str(rin.src), str(rin.dst)) == ("127.0.0.1", "127.0.0.2")
            assert lout.enc_key == rin.enc_key and lin.enc_key == rout.enc_key
            assert lout.enc_key != lin.enc_key
            assert lout.encryption is not None and lout.encryption.name == "aes-gcm-16"
            assert len(lout.enc_key) == 20  # AES-128 + 4-byte salt
            assert lout.mode == IpsecMode.TUNNEL and lout.reqid == lin.reqid != 0
            assert lout.hard.addtime and lout.soft.addtime < lout.hard.addtime
            # Policies: out 10.1/16 -> 10.2/16, in and fwd the reverse, reqid templates.
            by_dir = {p.direction: p for p in policies}
            out = by_dir[PolicyDir.OUTBOUND]
            assert out.selector.src == ipaddress.ip_network("10.1.0.0/16")
            assert out.selector.dst == ipaddress.ip_network("10.2.0.0/16")
            assert by_dir[PolicyDir.INBOUND].selector.src == ipaddress.ip_network("10.2.0.0/16")
            assert by_dir[PolicyDir.FWD].selector.src == ipaddress.ip_network("10.2.0.0/16")
            req = out.requests[0]
            assert req.reqid == lout.reqid and str(req.src) == "127.0.0.1"
            assert str(req.dst) == "127.0.0.2"
            # down: the peer is told, both kernels end up empty.
            assert await left.service.terminate("site") == 1
            await until(lambda: not left.sas() and not left.policies(), what="left cleanup")
            await until(lambda: not right.sas() and not right.policies(), what="right cleanup")
            assert not right.service.records
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())


async def _up_then_rekeyed(left: Gateway, right: Gateway,
                           before_rekey: Callable[[], object] = lambda: None) -> IkeRecord:
    """Left brings the tunnel up, then its soft lifetime passes: left rekeys, right answers."""
    rec = await left.service.initiate("site")
    assert await left.service.wait_established(rec, 20)
    await until(lambda: len(right.sas()) == 2, what="responder SAs")
    old_spis = {s.spi for s in left.sas()}
    before_rekey()
    left.tick(3700)  # past the soft lifetime (rekey_time 3600 minus jitter)
    await until(lambda: len(left.sas()) == 2 and {s.spi for s in left.sas()}
                .isdisjoint(old_spis), what="new SAs replace the old")
    await until(lambda: {s.spi for s in right.sas()} == {s.spi for s in left.sas()},
                what="responder agrees")
    return rec


def test_soft_expire_rekeys_make_before_break(tmp_path: Path) -> None:
    async def scenario() -> None:
        left_text, right_text = _pair_texts()
        left = await start_gateway(tmp_path, "left", left_text)
        right = await start_gateway(tmp_path, "right", right_text)
        try:
            policy_ids: set[int] = set()
            rec = await _up_then_rekeyed(left, right, lambda: policy_ids.update(
                p.id for p in left.policies()))
            assert {p.id for p in left.policies()} == policy_ids  # policies never dropped
            assert rec.sa.state is State.ESTABLISHED and len(rec.children) == 1
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())


def test_responder_installs_only_its_configured_subnet(tmp_path: Path) -> None:
    async def scenario() -> None:
        left = config_text("127.0.0.1", "127.0.0.2", local_ts='"0.0.0.0/0"',
                           remote_ts='"0.0.0.0/0"')
        right = config_text("127.0.0.2", "127.0.0.1", local_ts='"10.2.0.0/16"',
                            remote_ts='"10.1.0.0/24"')
        lgw = await start_gateway(tmp_path, "left", left)
        rgw = await start_gateway(tmp_path, "right", right)
        try:
            rec = await lgw.service.initiate("site")
            assert await lgw.service.wait_established(rec, 20)
            await until(lambda: len(rgw.policies()) == 3, what="responder policies")
            for gw in (lgw, rgw):
                nets = {(str(p.selector.src), str(p.selector.dst)) for p in gw.policies()}
                assert nets <= {("10.1.0.0/24", "10.2.0.0/16"), ("10.2.0.0/16", "10.1.0.0/24")}
        finally:
            await stop_gateway(lgw)
            await stop_gateway(rgw)

    run(scenario())


def test_every_inbound_spi_comes_from_getspi_and_none_is_left_larval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both sides, first Child SA and rekeyed ones: each inbound SA is a GETSPI'd larval SA
    made mature by UPDATE (racoon's way), never an ADD of an SPI picked by the daemon."""
    caplog.set_level(logging.DEBUG, logger="userspace_ipsec.kernel")

    async def scenario() -> None:
        left_text, right_text = _pair_texts()
        left = await start_gateway(tmp_path, "left", left_text)
        right = await start_gateway(tmp_path, "right", right_text)
        try:
            await _up_then_rekeyed(left, right)
            inbound = [(gw, sa) for gw, me in ((left, "127.0.0.1"), (right, "127.0.0.2"))
                       for sa in gw.sas() if str(sa.dst) == me]
            assert len(inbound) == 2
            # Only a larval SA (GETSPI's) can be UPDATEd; the peer's kernel, in this process
            # too, logs its outbound twin of each as "added".
            updated = {m.split()[3] for m in caplog.messages if m.endswith(" updated")}
            for _, sa in inbound:
                assert f"{sa.spi:#x}" in updated
            assert all(sa.state.name in ("MATURE", "DYING") for gw in (left, right)
                       for sa in gw.sas())  # no spare larval SA left behind
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())
