"""A responder with several connections on one address picks each peer's connection (its
PSK, identity and selectors) by the identity the peer shows, not by address alone."""

from __future__ import annotations

from pathlib import Path

from tests.ike_daemon.gateways import IKE_PORT, NATT_PORT, run, start_gateway, stop_gateway

RESPONDER = f"""
[ike]
listen = ["127.0.0.2"]
port = {IKE_PORT}
natt_port = {NATT_PORT}

[connections.alice]
local_addrs = ["127.0.0.2"]
remote_addrs = ["%any"]
local_id = "gw-for-alice"
remote_id = "alice"
[connections.alice.children.net]
local_ts = ["10.2.1.0/24"]
remote_ts = ["10.1.1.0/24"]

[connections.bob]
local_addrs = ["127.0.0.2"]
remote_addrs = ["%any"]
local_id = "gw-for-bob"
remote_id = "bob"
[connections.bob.children.net]
local_ts = ["10.2.2.0/24"]
remote_ts = ["10.1.2.0/24"]

[secrets.psk.alice]
id = ["alice"]
secret = "alice's long pre-shared key"
[secrets.psk.bob]
id = ["bob"]
secret = "bob's long pre-shared key"
"""


def initiator(addr: str, name: str, secret: str, net: str) -> str:
    return f"""
[ike]
listen = ["{addr}"]
port = {IKE_PORT}
natt_port = {NATT_PORT}

[connections.gw]
local_addrs = ["{addr}"]
remote_addrs = ["127.0.0.2"]
local_port = {IKE_PORT}
remote_port = {IKE_PORT}
local_id = "{name}"
[connections.gw.children.net]
local_ts = ["{net}"]
remote_ts = ["10.2.0.0/16"]

[secrets.psk.gw]
id = ["{name}"]
secret = "{secret}"
"""


def test_each_peer_gets_the_connection_of_its_identity(tmp_path: Path) -> None:
    async def scenario() -> None:
        resp = await start_gateway(tmp_path, "resp", RESPONDER)
        peers = [
            await start_gateway(tmp_path, "alice", initiator(
                "127.0.0.3", "alice", "alice's long pre-shared key", "10.1.1.0/24")),
            await start_gateway(tmp_path, "bob", initiator(
                "127.0.0.4", "bob", "bob's long pre-shared key", "10.1.2.0/24")),
            await start_gateway(tmp_path, "mallory", initiator(
                "127.0.0.5", "mallory", "alice's long pre-shared key", "10.1.1.0/24")),
        ]
        try:
            recs = [await p.service.initiate("gw") for p in peers]
            up = [await p.service.wait_established(r, 15) for p, r in zip(peers, recs,
                                                                          strict=True)]
            assert up == [True, True, False]
            by_conn = {r.conn.name: r for r in resp.service.records}
            assert set(by_conn) == {"alice", "bob"}
            for name, rec in by_conn.items():
                (child,) = rec.children.values()
                assert [str(t.start_addr) for t in child.local_ts] == [
                    "10.2.1.0" if name == "alice" else "10.2.2.0"]
            # Each initiator saw the identity of the connection it got, and narrowed its
            # 10.2.0.0/16 to that connection's subnet.
            for rec, gw_id, net in zip(recs, ("gw-for-alice", "gw-for-bob"),
                                        ("10.2.1.0", "10.2.2.0"), strict=False):
                assert rec.sa.remote_id is not None and rec.sa.remote_id[1] == gw_id.encode()
                (child,) = rec.children.values()
                assert [str(t.start_addr) for t in child.remote_ts] == [net]
        finally:
            for gw in (*peers, resp):
                await stop_gateway(gw)

    run(scenario())
