"""The bookkeeping of a peer move, in-process: two IKE services on loopback, each with its own
emulated kernel over a real PF_KEY socket (tests.ike_daemon.gateways).

The responder is told that its peer moved (what `receive` does on a verified message from a new
address) while two Child SAs share one policy set, as during a Child SA rekey, and the older one
is deleted right after, before any PF_KEY work of the move has run. The policies must name the
new endpoint with the same ids, the set must sit under its new key with the right count, and
deleting the last Child SA must empty the SPD. In transport mode the policies carry no
endpoints: a selector that was the peer's old address becomes its new one (strongSwan's
"dynamic" selectors), and a selector that does not cover the new address is logged.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from ike.events import ChildSaEstablished
from ike.service import ChildRecord, IkeRecord, IkeService
from tests.ike_daemon.gateways import Gateway, config_text, run, start_gateway, stop_gateway, until
from userspace_ipsec.pfkey.constants import PolicyDir

LEFT, RIGHT, MOVED = "127.0.0.1", "127.0.0.2", "127.0.0.3"
NEW_SPIS = (0x5000_0001, 0x6000_0001)


async def established(tmp: Path, child: str, left_ts: str = '"10.1.0.0/16"',
                      right_ts: str = '"10.2.0.0/16"') -> tuple[Gateway, Gateway]:
    """left (the initiator) and right up; each side's selectors as both configure them."""
    left = await start_gateway(tmp, "left", config_text(
        LEFT, RIGHT, local_ts=left_ts, remote_ts=right_ts, extra_child=child))
    right = await start_gateway(tmp, "right", config_text(
        RIGHT, LEFT, local_ts=right_ts, remote_ts=left_ts, extra_child=child))
    rec = await left.service.initiate("site")
    assert await left.service.wait_established(rec, 20)
    await until(lambda: bool(right.service.records and right.service.records[0].children))
    await right.service._jobs.join()
    return left, right


async def second_child(service: IkeService, rec: IkeRecord, first: ChildRecord) -> ChildRecord:
    """Another installed pair on the first one's policies, as a rekey's new pair is until the
    old one goes (the kernel has its SAs; the policy set counts it)."""
    inbound, outbound = (spi.to_bytes(4, "big") for spi in NEW_SPIS)
    params = replace(first.params)
    ev = ChildSaEstablished(inbound, outbound, first.transforms, first.local_ts,
                            first.remote_ts, False, b"\x01" * 20, b"", b"\x02" * 20, b"")
    await service.keying.install_child(ev, params, larval=False)
    child = replace(first, inbound_spi=inbound, outbound_spi=outbound, params=params)
    rec.children[inbound] = child
    service.policy_sets[first.policy_key].refs += 1
    return child


def kernel_policies(gw: Gateway) -> dict[int, tuple[PolicyDir, str, str, str | None, str | None]]:
    """id -> (direction, selector src, selector dst, template src, template dst)."""
    out = {}
    for p in gw.kernel.spd:
        req = p.requests[0]
        out[p.id] = (p.direction, str(p.selector.src), str(p.selector.dst),
                     None if req.src is None else str(req.src),
                     None if req.dst is None else str(req.dst))
    return out


async def tunnel_scenario(tmp: Path) -> None:
    left, right = await established(tmp, "")
    service = right.service
    try:
        (rec,) = service.records
        (first,) = rec.children.values()
        old_key = first.policy_key
        ids = sorted(service.policy_sets[old_key].ids)
        second = await second_child(service, rec, first)
        assert service.policy_sets[old_key].refs == 2 and len(right.kernel.sad) == 4

        service._peer_moved(rec, rec.sa, (MOVED, 4500))
        # The old pair goes before the move's PF_KEY work has run.
        service._child_gone(rec, first.inbound_spi, first.outbound_spi, "rekeyed")
        await service._jobs.join()

        new_key = (*old_key[:6], MOVED)
        assert old_key not in service.policy_sets
        policy_set = service.policy_sets[new_key]
        assert policy_set.refs == 1 and sorted(policy_set.ids) == ids
        assert first.policy_key == second.policy_key == new_key
        pols = kernel_policies(right)
        assert sorted(pols) == ids
        for direction, _, _, src, dst in pols.values():
            assert (src, dst) == ((RIGHT, MOVED) if direction == PolicyDir.OUTBOUND
                                  else (MOVED, RIGHT))
        sas = {(sa.spi, str(sa.src), str(sa.dst)) for sa in right.kernel.sad}
        assert sas == {(NEW_SPIS[0], MOVED, RIGHT), (NEW_SPIS[1], RIGHT, MOVED)}
        assert rec.sa.remote_addr == (MOVED, 4500)

        service._child_gone(rec, second.inbound_spi, second.outbound_spi, "test over")
        await service._jobs.join()
        assert not service.policy_sets and not list(right.kernel.spd)
    finally:
        await stop_gateway(left)
        await stop_gateway(right)


def test_tunnel_policies_follow_with_their_references(tmp_path: Path) -> None:
    run(tunnel_scenario(tmp_path))


async def transport_scenario(tmp: Path, left_ts: str) -> list[str]:
    """Selectors of right's policies after the move, if they changed."""
    left, right = await established(tmp, 'mode = "transport"', left_ts, '"dynamic"')
    service = right.service
    try:
        (rec,) = service.records
        (child,) = rec.children.values()
        old_key = child.policy_key
        before = kernel_policies(right)
        service._peer_moved(rec, rec.sa, (MOVED, 4500))
        await service._jobs.join()
        new_key = child.policy_key
        assert new_key[6] == MOVED and old_key not in service.policy_sets
        assert service.policy_sets[new_key].refs == 1
        after = kernel_policies(right)
        assert len(after) == 3 and all(t[3] is None for t in after.values())  # no endpoints
        selectors = sorted((t[0], t[1], t[2]) for t in after.values())
        service._child_gone(rec, child.inbound_spi, child.outbound_spi, "test over")
        await service._jobs.join()
        assert not service.policy_sets and not list(right.kernel.spd)
        if before.keys() == after.keys():
            return []  # kept: nothing named the old address
        core = next(c for c in rec.sa.child_sas if c.inbound_spi == child.inbound_spi)
        assert [str(ts.start_addr) for ts in core.remote_ts] == [MOVED]  # a rekey proposes it
        return [f"{d.name} {s} {t}" for d, s, t in selectors]
    finally:
        await stop_gateway(left)
        await stop_gateway(right)


def test_transport_dynamic_selector_follows_the_peer(tmp_path: Path) -> None:
    moved = run(transport_scenario(tmp_path, '"dynamic"'))
    assert moved == [f"INBOUND {MOVED}/32 {RIGHT}/32", f"OUTBOUND {RIGHT}/32 {MOVED}/32",
                     f"FWD {MOVED}/32 {RIGHT}/32"]


def test_transport_selector_not_covering_the_new_address_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ike"):
        moved = run(transport_scenario(tmp_path, '"127.0.0.0/31"'))
    assert moved == []
    assert f"do not cover the peer's new address {MOVED}" in caplog.text
    assert ipaddress.ip_address(MOVED) not in ipaddress.ip_network("127.0.0.0/31")

