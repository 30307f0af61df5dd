"""Hard expiry, trap policies with ACQUIRE, and cleanup when a daemon stops."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from pathlib import Path

from ike.service import RECEIVE_BUFFER
from tests.ike_daemon.gateways import config_text, run, start_gateway, stop_gateway, until
from userspace_ipsec.kernel import Flow
from userspace_ipsec.pfkey.constants import PolicyDir


def _texts(extra_child: str = "") -> tuple[str, str]:
    return (config_text("127.0.0.1", "127.0.0.2", local_ts='"10.1.0.0/16"',
                        remote_ts='"10.2.0.0/16"', extra_child=extra_child),
            config_text("127.0.0.2", "127.0.0.1", local_ts='"10.2.0.0/16"',
                        remote_ts='"10.1.0.0/16"'))


def test_hard_expire_deletes_the_child_on_both_sides(tmp_path: Path) -> None:
    async def scenario() -> None:
        ltext, rtext = _texts('rekey_time = 0\nlife_time = 100\njitter = 0')
        left = await start_gateway(tmp_path, "left", ltext)
        right = await start_gateway(tmp_path, "right", rtext)
        try:
            rec = await left.service.initiate("site")
            assert await left.service.wait_established(rec, 20)
            await until(lambda: len(right.sas()) == 2)
            assert all(not sa.soft.addtime and sa.hard.addtime == 100 for sa in left.sas())
            left.tick(101)
            await until(lambda: not left.sas() and not left.policies(), what="left cleanup")
            await until(lambda: not right.sas() and not right.policies(), what="right cleanup")
            assert not rec.children and rec.uid in {r.uid for r in left.service.records}
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())


def test_trap_policy_acquire_negotiates_and_stop_cleans_everything(tmp_path: Path) -> None:
    async def scenario() -> None:
        ltext, rtext = _texts('start_action = "trap"')
        left = await start_gateway(tmp_path, "left", ltext)
        right = await start_gateway(tmp_path, "right", rtext)
        try:
            traps = left.policies()
            assert len(traps) == 3 and not left.sas()
            out = next(p for p in traps if p.direction == PolicyDir.OUTBOUND)
            flow = Flow(ipaddress.ip_address("10.1.0.5"), ipaddress.ip_address("10.2.0.9"))
            left.server.dispatch(None, left.kernel.acquire(out, flow, time.time()))
            await until(lambda: len(left.sas()) == 2 and len(right.sas()) == 2,
                        what="SAs after ACQUIRE")
            assert {p.id for p in left.policies()} == {p.id for p in traps}
            out_sa = next(s for s in left.sas() if str(s.src) == "127.0.0.1")
            assert out_sa.reqid == out.requests[0].reqid
            await stop_gateway(left)
            assert not left.sas() and not left.policies()
            await until(lambda: not right.sas() and not right.policies(), what="peer told")
        finally:
            await stop_gateway(right)

    run(scenario())


def _dead_peer_texts(dpd_action: str) -> tuple[str, str]:
    ltext, rtext = _texts(f'dpd_action = "{dpd_action}"')
    ltext = ltext.replace("natt_port = 14500", "natt_port = 14500\nretransmit_timeout = 0.1\n"
                          "retransmit_tries = 1").replace(
        'proposals = ["aes256gcm16-prfsha256-x25519"]',
        'proposals = ["aes256gcm16-prfsha256-x25519"]\ndpd_delay = 0.3')
    return ltext, rtext


def test_dpd_clear_removes_everything_when_the_peer_vanishes(tmp_path: Path) -> None:
    async def scenario() -> None:
        ltext, rtext = _dead_peer_texts("clear")
        left = await start_gateway(tmp_path, "left", ltext)
        right = await start_gateway(tmp_path, "right", rtext)
        try:
            rec = await left.service.initiate("site")
            assert await left.service.wait_established(rec, 20)
            await asyncio.sleep(0.8)  # liveness checks answered: still up
            assert rec in left.service.records and len(left.sas()) == 2
            right.service._close_sockets()  # noqa: SLF001 - the peer dies without a word
            await until(lambda: not left.service.records, timeout=10, what="DPD failure")
            await until(lambda: not left.sas() and not left.policies(), what="cleanup")
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())


def test_dpd_trap_leaves_trap_policies(tmp_path: Path) -> None:
    async def scenario() -> None:
        ltext, rtext = _dead_peer_texts("trap")
        left = await start_gateway(tmp_path, "left", ltext)
        right = await start_gateway(tmp_path, "right", rtext)
        try:
            rec = await left.service.initiate("site")
            assert await left.service.wait_established(rec, 20)
            right.service._close_sockets()  # noqa: SLF001
            await until(lambda: not left.service.records and not left.sas(), timeout=10,
                        what="DPD failure")
            await until(lambda: len(left.policies()) == 3, what="trap policies")
            assert ("site", "net") in left.service._traps  # noqa: SLF001
        finally:
            await stop_gateway(left)
            await stop_gateway(right)

    run(scenario())


def test_ike_sockets_hold_the_answers_to_a_burst_of_initiations(tmp_path: Path) -> None:
    """The default UDP receive buffer holds about 200 IKE_SA_INIT answers: with a thousand
    connections starting at once, the rest were dropped and cost a 4 s retransmission each."""
    async def scenario() -> None:
        left = await start_gateway(tmp_path, "left", _texts()[0])
        try:
            socks = left.service._socks  # noqa: SLF001 - the bound UDP sockets
            assert socks
            for sock in socks:
                granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                assert granted >= RECEIVE_BUFFER, (sock, granted)
        finally:
            await stop_gateway(left)

    run(scenario())
